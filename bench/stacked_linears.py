"""Sibling projections stacked into one packed matmul (q/k/v, gate/up) against one matmul each, alternating.

    python bench/stacked_linears.py [MODEL ...]      e.g. smollm2-135m qwen2.5-coder-0.5b gemma3-270m

One process per model: `auto`'s dtype, packed kernels either way; the cost curve (verify forwards of 1, 4, 13
and 25 query tokens over a 256-token cache, `measure_cost`) taken four times per variant, alternating; prints the
medians and their ratio, and whether the two give bitwise equal logits over a 25-token draft chain.
"""
from __future__ import annotations

import statistics
import sys

import torch

import lookahead
from lookahead.decoding import kernels
from lookahead.decoding.cost import measure_cost
from lookahead.decoding.verify import Verifier
from lookahead.tree import DraftTree

TOKENS = (1, 4, 13, 25)


def logits(model: torch.nn.Module) -> torch.Tensor:
    verifier = Verifier(model)
    verifier.add(0, list(range(100, 356)))
    out = verifier.verify([DraftTree.chain(7, list(range(500, 524)))])[0]
    verifier.abort()
    return out


def main() -> None:
    torch.set_num_threads(2)
    for name in sys.argv[1:] or ["smollm2-135m"]:
        engine = lookahead.load(name)
        model, siblings = engine.model, kernels.SIBLINGS
        times: dict[bool, list[list[float]]] = {True: [], False: []}
        outputs = {}
        for rep in range(8):
            stacked = rep % 2 == 0
            kernels.SIBLINGS = siblings if stacked else ()
            kernels.pack_linears(model)
            curve = measure_cost(model, tokens=TOKENS, context=256, reps=3)
            times[stacked].append([1000 * curve(k, 1) for k in TOKENS])
            outputs.setdefault(stacked, logits(model))
        kernels.SIBLINGS = siblings
        kernels.pack_linears(model)
        med = {s: [statistics.median(run[i] for run in times[s]) for i in range(len(TOKENS))] for s in times}
        print(f"{name} ({engine.dtype_reason.split(':')[0]}), ms per verify forward at {TOKENS} query tokens:")
        print(f"  one matmul each: {' '.join(f'{t:.2f}' for t in med[False])}")
        print(f"  stacked:         {' '.join(f'{t:.2f}' for t in med[True])}")
        print(f"  ratio:           {' '.join(f'{a / b:.3f}x' for a, b in zip(med[False], med[True], strict=True))}")
        print(f"  logits bitwise equal: {torch.equal(outputs[True], outputs[False])}", flush=True)


if __name__ == "__main__":
    main()
