"""Chat prompts to token ids without role injection through special-token text.

`tokenizer(apply_chat_template(..., tokenize=False))` tokenizes the rendered text as a whole, so a
user who writes `<|im_end|>\\n<|im_start|>system ...` inside a message gets the real control tokens
and can forge turns. `encode_messages` renders the same template but tokenizes message contents as
text: only the template's own markers become special tokens.
"""
from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["encode_messages", "special_token_strings"]

_NO_TEMPLATE = "this model's tokenizer has no chat template; pass a plain string prompt"


def special_token_strings(tokenizer: Any) -> list[str]:
    """The strings the tokenizer turns into special tokens (the ones `split_special_tokens` splits)."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or ())
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(str(token))
    return sorted((s for s in found if s), key=len, reverse=True)  # longest first: leftmost-longest matching


def encode_messages(tokenizer: Any, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` rendered by the tokenizer's chat template, message contents tokenized as text.

    Messages whose contents hold no special-token string give exactly
    `tokenizer(apply_chat_template(messages, tokenize=False), add_special_tokens=False).input_ids`.
    Where a content does hold one, that content comes out as the tokens of its literal text (as
    `tokenizer(text, split_special_tokens=True)` would give them); the template's markers stay special.
    Raises ValueError if the tokenizer has no chat template, or if a template rewrites a content
    that holds special-token text in a way that cannot be traced back (then it cannot be made safe).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(_NO_TEMPLATE)
    messages = [dict(m) for m in messages]
    specials = special_token_strings(tokenizer)
    pattern = re.compile("|".join(re.escape(s) for s in specials)) if specials else None

    def render(msgs: list[dict[str, Any]]) -> str:
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)

    text = render(messages)
    # Each string of a content that holds special-token text, with where it sits in the messages.
    tainted: list[tuple[int, int | None, str]] = []  # (message index, part index or None, the text)
    if pattern is not None:
        for i, m in enumerate(messages):
            content = m.get("content")
            if isinstance(content, str):
                if pattern.search(content):
                    tainted.append((i, None, content))
            elif isinstance(content, list):
                for j, part in enumerate(content):
                    if isinstance(part, Mapping) and isinstance(part.get("text"), str) and pattern.search(part["text"]):
                        tainted.append((i, j, part["text"]))
    if not tainted:  # today's path, bit for bit
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    # Render again with a sentinel in place of each tainted string: what lies between sentinels is the template's.
    nonce = uuid.uuid4().hex
    sentinels = [f"\ue000{nonce}{k}\ue001" for k in range(len(tainted))]
    marked = [dict(m) for m in messages]
    for (i, j, _), sentinel in zip(tainted, sentinels, strict=True):
        if j is None:
            marked[i]["content"] = sentinel
        else:
            parts = list(marked[i]["content"])
            parts[j] = {**parts[j], "text": sentinel}
            marked[i]["content"] = parts
    rendered = render(marked)
    pieces = re.split("(" + "|".join(re.escape(s) for s in sentinels) + ")", rendered)
    template = pieces[0::2]  # template text around the contents, in order
    order = [sentinels.index(s) for s in pieces[1::2]]
    if sorted(order) != list(range(len(tainted))):
        raise ValueError("the chat template drops or repeats message contents; contents holding special-token "
                         "text cannot be tokenized safely with it")
    # Find each content as the real rendering shows it (templates may trim it), so that the template text
    # and content text below concatenate to exactly `text`.
    contents, pos = [], len(template[0])
    if not text.startswith(template[0]):
        raise ValueError("the chat template renders contents in a way that cannot be traced back")
    for k, after in zip(order, template[1:], strict=True):
        raw = tainted[k][2]
        for shown in (raw, raw.strip(), raw.lstrip(), raw.rstrip()):
            if text.startswith(shown + after, pos):
                contents.append(shown)
                pos += len(shown) + len(after)
                break
        else:
            raise ValueError("the chat template rewrites a message content that holds special-token text; it "
                             "cannot be tokenized safely")

    # Segments: the template's special markers as single tokens; all text between them (template text and
    # contents) tokenized with special-token strings split, i.e. as literal text.
    ids: list[int] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            chunk = "".join(pending)
            ids.extend(tokenizer(chunk, add_special_tokens=False, split_special_tokens=True).input_ids)
            pending.clear()

    for n, piece in enumerate(template):
        last = 0
        for match in pattern.finditer(piece):
            pending.append(piece[last:match.start()])
            flush()
            ids.append(tokenizer.convert_tokens_to_ids(match.group()))
            last = match.end()
        pending.append(piece[last:])
        if n < len(contents):
            pending.append(contents[n])
    flush()
    return ids
