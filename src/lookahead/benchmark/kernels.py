"""Verify cost t(k) per dtype and linear kernels, interleaved in one run: what `load(dtype="auto")` chooses from.

    python -m lookahead.benchmark.kernels [--model NAME] [--ks 1,2,4,8,16] [--reps 7] [--out DIR]

Variants: float32 / bfloat16 x eager (`F.linear`), packed (oneDNN-packed weights, decoding/kernels.py)
and invariant (deterministic mode's tiles, decoding/invariant.py). Each is a copy of the model with its
own prefilled `Verifier`; every (variant, k) is timed once per round, rounds shuffled
(`timing.interleaved`), medians kept. Writes results.json (with the machine's facts), results.md and
kernels.png.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..decoding.invariant import make_invariant
from ..decoding.kernels import can_pack, pack_linears
from ..decoding.verify import Verifier
from ..models import cast
from ..timing import interleaved, stopwatch
from ..tree import DraftTree
from .cost import save_k_plot
from .stats import median


def variants(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        base = cast(copy.deepcopy(model), dtype)
        name = str(dtype).removeprefix("torch.")
        out[f"{name} eager"] = base
        if can_pack(base):
            out[f"{name} packed"] = copy.deepcopy(base)
            pack_linears(out[f"{name} packed"])
        out[f"{name} invariant"] = copy.deepcopy(base)
        make_invariant(out[f"{name} invariant"])
    return out


@torch.inference_mode()
def measure(models: dict[str, torch.nn.Module], ids: list[int], ks: list[int], context: int, reps: int) -> dict:
    verifiers = {}
    for name, model in models.items():
        verifiers[name] = Verifier(model)
        verifiers[name].add(0, ids[:context])
    new = ids[context:]
    bar = tqdm(total=reps + 1, desc="rounds", unit="round")

    def timed(case: tuple[str, int]) -> float:
        name, k = case
        verifier = verifiers[name]
        seconds = stopwatch(lambda: verifier.verify([DraftTree.chain(new[0], new[1:k])]), verifier.device)
        verifier.abort()
        return seconds

    runs = interleaved([(n, k) for n in models for k in ks], timed, reps, progress=lambda: bar.update(1))
    bar.close()
    return {name: [1000 * median(runs[name, k]) for k in ks] for name in models}


def markdown(result: dict) -> str:
    from ..decoding.cost import CostModel, drafting_rate

    ks, ms = result["ks"], result["median_ms"]
    head = "| variant | t(1) ms | " + " | ".join(f"t({k})/t(1)" for k in ks[1:]) + \
           " | tok/s with drafting (70 % acceptance) |"
    lines = [head, "|---|" + "---:|" * (len(ks) + 1)]
    for name, times in ms.items():
        rate = drafting_rate(CostModel(ks, [t / 1000 for t in times]))
        lines.append(f"| {name} | {times[0]:.1f} | " + " | ".join(f"{t / times[0]:.2f}" for t in times[1:])
                     + f" | {rate:.1f} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, result: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, times in result["median_ms"].items():
        ax.plot(result["ks"], times, marker="o", markersize=3, label=name,
                linestyle="--" if "invariant" in name else "-")
    save_k_plot(fig, ax, path, "ms per forward (median)", title)


def main(argv: list[str] | None = None) -> int:
    from ..models import load_model
    from .cli import run_facts
    from .cost import context_ids

    p = argparse.ArgumentParser(prog="python -m lookahead.benchmark.kernels", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--ks", default="1,2,4,8,16,32")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/kernels")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ks = sorted({1, *(int(k) for k in args.ks.split(","))})
    model, tokenizer = load_model(args.model, dtype=torch.float32, device="cpu")
    models = variants(model)
    result = {"ks": ks, "context": args.context, "reps": args.reps, "model": args.model or "smollm2-135m",
              "median_ms": measure(models, context_ids(tokenizer, args.context), ks, args.context, args.reps),
              **{k: v for k, v in run_facts(model, "each variant's own").items()
                 if k not in ("torch_dtype", "kernels")}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    title = f"{result['model']} · {result['cpu_model']} · {args.threads} threads"
    caps = " ".join(f"{k}={v}" for k, v in result["isa_caps"].items())
    (out / "results.md").write_text(f"# Verify cost by dtype and kernels: {title}\n\n"
                                    f"{args.context}-token cache, median of {args.reps} interleaved reps"
                                    + (f"; instruction sets capped: {caps}" if caps else "") + "\n\n"
                                    + markdown(result))
    plot(out / "kernels.png", result, title)
    print(markdown(result))
    print(f"written: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
