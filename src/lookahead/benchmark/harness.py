"""The interleaved run: every method on prompt 1, then every method on prompt 2, ...

Interleaving prompt by prompt (with the method order rotated from one prompt to the next)
means a slow spell of a shared machine hits every method alike; the speedup of a method is
then the ratio of two runs of the same prompt taken moments apart.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .methods import Context, MethodSpec, run_method
from .stats import BASELINE, Record, first_difference

# bf16 carries ~3 significant digits: logits of size 10-30 round in steps of 0.06-0.125, and a
# tree forward rounds differently from a one-token forward (and so do the KV entries the two
# runs cached). A divergence where the top-2 logits of a plain forward are this close is a
# near-tie, not a bug. In fp32 the two forwards differ by ~1e-5.
NEAR_TIE = {torch.bfloat16: 0.25, torch.float16: 0.25, torch.float32: 1e-3}


@dataclass(frozen=True)
class Item:
    """One benchmark prompt, already tokenised."""
    id: str
    category: str
    ids: list[int]


def rotated(methods: Sequence[MethodSpec], index: int) -> list[MethodSpec]:
    """Method order for the index-th prompt: rotated, so no method always runs first or last."""
    k = index % len(methods) if methods else 0
    return list(methods[k:]) + list(methods[:k])


@torch.inference_mode()
def top2_gap(model: torch.nn.Module, ids: list[int]) -> tuple[float, list[int]]:
    """(top-1 minus top-2 logit, [top-1, top-2] tokens) of a plain forward over `ids`."""
    logits = model(torch.tensor([ids], device=model.device), logits_to_keep=1).logits[0, -1].float()
    top = logits.topk(2)
    return float(top.values[0] - top.values[1]), top.indices.tolist()


def mark_equality(records: list[Record], items: dict[str, Item], model: torch.nn.Module,
                  threshold: float | None) -> None:
    """Fill same_as_baseline (and for divergences: position, top-2 gap, near-tie) in place.

    threshold None (sampling) leaves the columns empty: samples are not expected to match.
    """
    if threshold is None:
        return
    base = {r.prompt_id: r.token_ids for r in records if r.method == BASELINE}
    gaps: dict[tuple[str, int], tuple[float, list[int]]] = {}
    for r in records:
        if r.method == BASELINE or r.prompt_id not in base:
            continue
        ref = base[r.prompt_id]
        k = first_difference(r.token_ids, ref)
        r.same_as_baseline = k is None
        if k is None:
            continue
        r.diverged_at = k
        if k >= len(ref) or k >= len(r.token_ids):  # one stopped early: compare the stop itself
            r.top2_gap, r.near_tie = None, False
            continue
        key = (r.prompt_id, k)
        if key not in gaps:
            gaps[key] = top2_gap(model, items[r.prompt_id].ids + ref[:k])
        gap, top = gaps[key]
        r.top2_gap = gap
        r.near_tie = gap <= threshold and set(top) == {ref[k], r.token_ids[k]}


def run_interleaved(ctx: Context, items: Sequence[Item], methods: Sequence[MethodSpec],
                    progress: Callable[[str], None] | None = None) -> list[Record]:
    """Every method on every item, item by item; returns one Record per (item, method)."""
    records = []
    for i, item in enumerate(items):
        for spec in rotated(methods, i):
            if progress:
                progress(f"{item.category} {item.id} {spec.name}")
            r = run_method(ctx, spec, item.ids)
            r.prompt_id, r.category = item.id, item.category
            records.append(r)
    return records


def warm_up_methods(ctx: Context, methods: Sequence[MethodSpec], ids: list[int], tokens: int = 8) -> None:
    """One short untimed call per method: first-call allocations and lazy imports stay out of the timings."""
    saved, saved_scope = ctx.max_new_tokens, ctx.trie_scope
    ctx.max_new_tokens, ctx.trie_scope = tokens, "prompt"
    try:
        for spec in methods:
            run_method(ctx, spec, ids)
    finally:
        ctx.max_new_tokens, ctx.trie_scope = saved, saved_scope


# -- warm corpus: the model's own answers to the train split, cached on disk -----------------
def slug(text: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-60:]
    return f"{clean}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def warm_cache_path(model: str, dtype: str, max_new_tokens: int, root: str | os.PathLike | None = None) -> Path:
    root = Path(root or os.environ.get("LOOKAHEAD_CACHE") or Path.home() / ".cache" / "lookahead")
    return root / "bench" / "warm" / f"{slug(model)}-{dtype}-{max_new_tokens}.json"


def load_warm_cache(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("answers", {}) if isinstance(data, dict) else {}


def save_warm_cache(path: Path, answers: dict[str, dict], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "answers": answers}))
    os.replace(tmp, path)


def self_answers(engine, items: Sequence[Item], max_new_tokens: int, cache: Path, meta: dict,
                 progress: Callable[[Item], None] | None = None) -> dict[str, dict]:
    """The model's own greedy answers to `items`, generated once (with lookahead, which is
    greedy-exact) and cached at `cache`; returns {item id: {"prompt_tail", "answer"}}."""
    answers = load_warm_cache(cache)
    trie = engine.draft_config.new_trie()  # a private trie: the run's tries stay untouched
    saved = engine.trie
    engine.trie = trie
    try:
        for item in items:
            if progress:
                progress(item)
            if item.id in answers:
                continue
            out = engine.generate(list(item.ids), max_new_tokens=max_new_tokens)
            answers[item.id] = {"prompt_tail": item.ids[-16:], "answer": list(out.token_ids)}
            save_warm_cache(cache, answers, meta)  # after each answer: an interrupted warm-up resumes
    finally:
        engine.trie = saved
    return answers


def warm_pairs(answers: dict[str, dict], items: Sequence[Item]) -> list[tuple[list[int], list[int]]]:
    """(prompt tail, answer) per item that has an answer, in item order."""
    return [(list(answers[i.id]["prompt_tail"]), list(answers[i.id]["answer"])) for i in items if i.id in answers]
