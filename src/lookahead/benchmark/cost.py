"""Verify-cost curve t(k)/t(1): one forward over k new tokens on a cached context.

Two paths are timed, each on a fresh copy of the same prefilled cache (copy untimed):
- "tree": the engine's own verify step (decoding.verify.Verifier, a batch of one: additive 4D
  tree mask, explicit position ids, logits for every node), with a k-node chain as the tree;
- "plain": `model(x[:, :k], past_key_values=cache)` with transformers' own causal mask.
Repetitions are interleaved across k and path (`timing.interleaved`); the median is kept.
This is the report's view (medians, both paths, up to large k); the engine's own curve, the one
sizing reads, is `decoding.cost.measure_cost`.
"""
from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Sequence

import torch

from ..decoding.verify import Verifier
from ..timing import interleaved, stopwatch
from ..tree import DraftTree
from .stats import median

DEFAULT_KS = (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 32, 48, 64, 96, 128)


def context_ids(tokenizer, n: int) -> list[int]:
    """n tokens of real text: MT-Bench questions when installed, else a fixed English paragraph."""
    text = ""
    try:
        from .datasets import load_prompts

        text = "\n\n".join(t for p in load_prompts("chat", "all", max_prompt_chars=None) for t in p.turns)
    except Exception:  # noqa: BLE001 - the data package is optional here
        pass
    if not text:
        text = ("The committee reviewed the proposal in detail, weighing its costs against the expected "
                "benefits for the city's residents over the next decade. ") * 200
    ids = tokenizer(text, add_special_tokens=False).input_ids
    while len(ids) < n + 128:
        ids = ids + ids
    return ids[: n + 128]


@torch.inference_mode()
def cost_curve(model: torch.nn.Module, ids: list[int], context: int = 512, ks: Sequence[int] = DEFAULT_KS,
               reps: int = 7, warmup: int = 2, paths: Sequence[str] = ("tree", "plain"), seed: int = 0,
               progress: Callable[[], None] | None = None) -> dict:
    """{"ks", "context", path: {"median_ms": [...], "min_ms", "max_ms", "ratio": t(k)/t(1)}}."""
    if len(ids) < context + max(ks):
        raise ValueError(f"need {context + max(ks)} token ids, got {len(ids)}")
    verifier = Verifier(model)
    verifier.add(0, ids[:context])
    base_cache, device = verifier.cache, verifier.device
    new = ids[context:]

    def timed(case: tuple[str, int]) -> float:
        path, k = case
        cache = copy.deepcopy(base_cache)
        if path == "tree":
            verifier.cache = cache
            tree = DraftTree.chain(new[0], new[1:k])
            seconds = stopwatch(lambda: verifier.verify([tree]), device)
            verifier.abort()
            return seconds
        x = torch.tensor([new[:k]], device=device)
        return stopwatch(lambda: model(input_ids=x, use_cache=True, **{verifier.cache_arg: cache}), device)

    runs = interleaved([(p, k) for p in paths for k in ks], timed, reps, warmup=warmup, seed=seed, progress=progress)
    times = {p: {k: runs[p, k] for k in ks} for p in paths}
    out: dict = {"ks": list(ks), "context": context, "reps": reps}
    for p in paths:
        med = [median(times[p][k]) for k in ks]
        one = med[ks.index(1)] if 1 in ks else med[0]
        out[p] = {"median_ms": [1000 * m for m in med],
                  "min_ms": [1000 * min(times[p][k]) for k in ks],
                  "max_ms": [1000 * max(times[p][k]) for k in ks],
                  "stdev_ms": [1000 * statistics.pstdev(times[p][k]) for k in ks],
                  "ratio": [m / one for m in med]}
    return out


def markdown(curve: dict, title: str) -> str:
    ks = curve["ks"]
    paths = [p for p in ("tree", "plain") if p in curve]
    lines = [f"# Verify cost: {title}", "", f"one forward over k new tokens on a {curve['context']}-token cache; "
             f"median of {curve['reps']} interleaved reps", "",
             "| k | " + " | ".join(f"{p} ms | {p} t(k)/t(1)" for p in paths) + " |",
             "|---:|" + "---:|---:|" * len(paths)]
    for i, k in enumerate(ks):
        cells = " | ".join(f"{curve[p]['median_ms'][i]:.1f} | {curve[p]['ratio'][i]:.2f}" for p in paths)
        lines.append(f"| {k} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(path, curve: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for p in ("tree", "plain"):
        if p in curve:
            ax.plot(curve["ks"], curve[p]["ratio"], marker="o", markersize=3, label=f"{p} forward")
    ks = curve["ks"]
    ax.plot(ks, [k for k in ks], color="grey", linestyle=":", linewidth=0.8, label="t(k) = k·t(1)")
    ax.set_ylim(0, max(max(curve[p]["ratio"]) for p in ("tree", "plain") if p in curve) * 1.15)
    save_k_plot(fig, ax, path, "t(k) / t(1)", title)


def save_k_plot(fig, ax, path, ylabel: str, title: str) -> None:
    """Log2 k axis, labels, grid and legend; written as a PNG and closed."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (tokens in one forward)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
