"""Warm a shared trie from a corpus: `lookahead warm --corpus FILE.jsonl --out PATH`.

Each JSONL line is one record, in any of these forms:

- ``{"messages": [{"role": ..., "content": ...}, ...]}``: every assistant turn is learned, led in
  by the last tokens of the chat-templated conversation before it (what a live request feeds
  the shared scope: the prompt's tail, then the answer) and closed by the end-of-turn token;
- ``{"prompt": ..., "completion" | "response" | "answer" | "output": ...}``: the same, with the
  prompt as one user turn (or as raw text when the tokenizer has no chat template, or with `raw`);
- ``{"text": ...}``: the whole text.

Prompts themselves are request-scoped in a live server (never shared); `include_prompts`
learns them too, for corpora whose answers quote their prompts. Lines that are not JSON or
have none of these fields are skipped and counted. The file is written atomically in the
trie's safe format (safetensors), ready for `lookahead serve --trie PATH`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .trie import TokenTrie

ANSWER_KEYS = ("completion", "response", "answer", "output")


@dataclass
class WarmReport:
    records: int = 0
    skipped: int = 0
    sequences: int = 0
    tokens: int = 0
    nodes: int = 0

    def summary(self) -> str:
        return (f"{self.records} records ({self.skipped} skipped), {self.sequences} sequences, "
                f"{self.tokens} tokens -> {self.nodes} trie nodes")


def load_tokenizer(source: str | None = None):
    """Only the tokenizer of a named model, .gguf file or HF directory (the model is not loaded)."""
    from transformers import AutoTokenizer

    from ..models import locate
    directory, gguf = locate(source)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf:
        kwargs["gguf_file"] = gguf
    return AutoTokenizer.from_pretrained(directory, **kwargs)


class Sequencer:
    """Turns one corpus record into the token sequences a live server would feed the shared scope."""

    def __init__(self, tokenizer, lead_in: int, raw: bool = False, include_prompts: bool = False) -> None:
        self.tok = tokenizer
        self.lead_in = lead_in
        self.chat = not raw and bool(getattr(tokenizer, "chat_template", None))
        self.include_prompts = include_prompts
        eos = tokenizer.eos_token_id
        self.end = [eos] if isinstance(eos, int) else []

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def _turn(self, before: list[dict], answer: str) -> list[int]:
        if self.chat:
            text = self.tok.apply_chat_template(before, add_generation_prompt=True, tokenize=False)
            prompt = self._ids(text)
            return prompt[-self.lead_in:] + self._ids(answer) + self.end
        prompt = self._ids("\n".join(m["content"] for m in before))
        return prompt[-self.lead_in:] + self._ids(answer)

    def __call__(self, record: Any) -> list[list[int]]:
        if not isinstance(record, dict):
            return []
        out: list[list[int]] = []
        messages = record.get("messages")
        if isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                              and isinstance(m.get("role"), str) for m in messages):
            for i, m in enumerate(messages):
                if m["role"] == "assistant" and i > 0:
                    out.append(self._turn(messages[:i], m["content"]))
                elif self.include_prompts and m["role"] != "assistant":
                    out.append(self._ids(m["content"]))
            return [s for s in out if s]
        answer = next((record[k] for k in ANSWER_KEYS if isinstance(record.get(k), str)), None)
        prompt = record.get("prompt")
        if isinstance(prompt, str) and answer is not None:
            out.append(self._turn([{"role": "user", "content": prompt}], answer))
            if self.include_prompts:
                out.append(self._ids(prompt))
        elif isinstance(record.get("text"), str):
            out.append(self._ids(record["text"]))
        return [s for s in out if s]


def iter_records(path: str | os.PathLike) -> Iterator[Any]:
    """Decoded JSON per non-empty line; None for a line that is not JSON."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield None


def warm(corpus: str | os.PathLike, out: str | os.PathLike | None, tokenizer, trie: TokenTrie,
         raw: bool = False, include_prompts: bool = False, progress: bool = True,
         log: Callable[[str], None] | None = None) -> WarmReport:
    """Feed every record of `corpus` into `trie`'s shared scope; save it to `out` (atomic) if given."""
    from tqdm.auto import tqdm

    corpus = Path(corpus)
    if not corpus.is_file():
        raise FileNotFoundError(f"corpus {corpus} does not exist")
    with open(corpus, "rb") as f:
        total = sum(1 for line in f if line.strip())
    seq = Sequencer(tokenizer, lead_in=trie.max_match, raw=raw, include_prompts=include_prompts)
    report = WarmReport()
    bar = tqdm(iter_records(corpus), total=total, unit="rec", desc="warming trie", disable=not progress)
    for record in bar:
        report.records += 1
        sequences = seq(record)
        if not sequences:
            report.skipped += 1
            continue
        for s in sequences:
            trie.insert(s)
            report.sequences += 1
            report.tokens += len(s)
        if report.records % 64 == 0:
            bar.set_postfix(nodes=len(trie), refresh=False)
    bar.close()
    report.nodes = len(trie)
    if report.sequences == 0:
        raise ValueError(f"{corpus}: no usable record (expected JSONL lines with 'messages', "
                         f"'prompt' + one of {ANSWER_KEYS}, or 'text')")
    if out is not None:  # a draft-state file holding only the trie: the server loads it with --trie
        from .state import DraftState
        # Only a tokenizer was read here, not the model: no model name is recorded (token ids are still
        # checked against the serving model's vocabulary when the file is loaded).
        DraftState(trie, sources=("prompt", "history")).save(out)
    if log:
        log(report.summary())
    return report
