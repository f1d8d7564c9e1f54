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

from ..files import write_atomic
from ..weights import cache_root
from .methods import Context, MethodSpec, run_method
from .stats import BASELINE, Record, first_difference

# bf16 carries ~3 significant digits: logits of size 10-30 round in steps of 0.06-0.125 (exact
# ties are common), and a multi-token forward rounds differently from a one-token forward (and
# so do the KV entries the two runs cached). A divergence where both tokens' logits in a plain
# forward are this close to the top logit is a near-tie, not a bug. In fp32 the forwards differ
# by ~1e-5.
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
def tie_gap(model: torch.nn.Module, ids: list[int], a: int, b: int) -> float:
    """How far the worse of tokens a and b is from the top logit, in a plain forward over `ids`.

    When a and b are the top two this is the top-2 gap; bf16 logits are coarse enough for
    exact (and three-way) ties, so both tokens are measured against the maximum.
    """
    logits = model(torch.tensor([ids], device=model.device), logits_to_keep=1).logits[0, -1].float()
    top = float(logits.max())
    return max(top - float(logits[a]), top - float(logits[b]))


def mark_equality(records: list[Record], items: dict[str, Item], model: torch.nn.Module,
                  threshold: float | None) -> None:
    """Fill same_as_baseline (and for divergences: position, tie gap, near-tie) in place.

    threshold None (sampling) skips the near-tie check: a seeded sample may differ wherever a
    draw falls between two rounding results, tie or not.
    """
    base = {r.prompt_id: r.token_ids for r in records if r.method == BASELINE}
    gaps: dict[tuple, float] = {}
    for r in records:
        if r.method == BASELINE or r.prompt_id not in base:
            continue
        ref = base[r.prompt_id]
        k = first_difference(r.token_ids, ref)
        r.same_as_baseline = k is None
        if k is None:
            continue
        r.diverged_at = k
        if threshold is None:
            continue
        if k >= len(ref) or k >= len(r.token_ids):  # one stopped early: compare the stop itself
            r.tie_gap, r.near_tie = None, False
            continue
        key = (r.prompt_id, k, r.token_ids[k])
        if key not in gaps:
            gaps[key] = tie_gap(model, items[r.prompt_id].ids + ref[:k], ref[k], r.token_ids[k])
        r.tie_gap = gaps[key]
        r.near_tie = r.tie_gap <= threshold


def run_interleaved(ctx: Context, items: Sequence[Item], methods: Sequence[MethodSpec], repeats: int = 1,
                    progress: Callable[[str], None] | None = None,
                    sink: Callable[[Record], None] | None = None) -> list[Record]:
    """Every method on every item, item by item; returns one Record per (item, method).

    With `repeats` > 1 every method runs that many times per item (rounds interleaved) and the
    record keeps the fastest run (on a shared machine the least disturbed one: interference
    only ever adds time); `walls` lists them all. `progress` is called after each run, `sink`
    with each finished record (e.g. to save a long run as it goes).
    """
    records = []
    for i, item in enumerate(items):
        best: dict[str, Record] = {}
        walls: dict[str, list[float]] = {}
        for rnd in range(repeats):
            for spec in rotated(methods, i + rnd):
                r = run_method(ctx, spec, item.ids)
                r.prompt_id, r.category = item.id, item.category
                walls.setdefault(spec.name, []).append(r.wall_s)
                if spec.name not in best or r.wall_s < best[spec.name].wall_s:
                    best[spec.name] = r
                if progress:
                    progress(f"{item.id} {spec.name} {r.tokens_per_s:.1f} tok/s")
        for spec in methods:
            r = best[spec.name]
            r.walls = walls[spec.name]
            records.append(r)
            if sink:
                sink(r)
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
    root = Path(root) if root else cache_root()
    return root / "bench" / "warm" / f"{slug(model)}-{dtype}-{max_new_tokens}.json"


def load_warm_cache(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("answers", {}) if isinstance(data, dict) else {}


def save_warm_cache(path: Path, answers: dict[str, dict], meta: dict) -> None:
    write_atomic(path, json.dumps({"meta": meta, "answers": answers}))


def self_answers(engine, items: Sequence[Item], max_new_tokens: int, cache: Path, meta: dict,
                 progress: Callable[[Item], None] | None = None) -> dict[str, dict]:
    """The model's own greedy answers to `items`, generated once (with lookahead, which is
    greedy-exact) and cached at `cache`; returns {item id: {"prompt_tail", "answer"}}."""
    from ..engine import Engine

    answers = load_warm_cache(cache)
    engine = Engine(engine.model, engine.tokenizer, engine.draft_config)  # private state: nothing leaks
    for item in items:
        if item.id not in answers:
            out = engine.generate(list(item.ids), max_new_tokens=max_new_tokens)
            answers[item.id] = {"prompt_tail": item.ids[-16:], "answer": list(out.token_ids)}
            save_warm_cache(cache, answers, meta)  # after each answer: an interrupted warm-up resumes
        if progress:
            progress(item)
    return answers


def warm_pairs(answers: dict[str, dict], items: Sequence[Item]) -> list[tuple[list[int], list[int]]]:
    """(prompt tail, answer) per item that has an answer, in item order."""
    return [(list(answers[i.id]["prompt_tail"]), list(answers[i.id]["answer"])) for i in items if i.id in answers]
