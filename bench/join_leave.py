"""What a row leaving and a row joining a running batch cost, against a steady plain step.

    python bench/join_leave.py [ROWS] [CONTEXT] [DTYPE]     e.g. 15 1000 auto (15 rows of ~1,000 cached tokens)

One process, SmolLM2-135M (`auto`: the dtype and kernels `load` picks). Eight times: three plain steps, a row
leaves, a 300-token prompt is prefilled alone and joins, one more step. Prints medians: the steady step, the
leave, the join (without its prompt's prefill, printed apart) and the first step after them (a join or leave that
left its copying to the next forward would show there).
"""
from __future__ import annotations

import statistics
import time

from packed_rows import batch_of_rows  # bench/ is the script's directory

from lookahead.tree import DraftTree


def main() -> None:
    engine, verifier, rows, context = batch_of_rows(1000, apart=20)

    def step() -> float:
        t = time.perf_counter()
        verifier.verify([DraftTree.root_only(5)] * len(verifier))
        verifier.commit([[0]] * len(verifier))
        return time.perf_counter() - t

    for _ in range(3):
        step()
    steady, leaves, prefills, joins, after = [], [], [], [], []
    prompt = list(range(200, 500))
    for k in range(8):
        steady += [step() for _ in range(3)]
        t = time.perf_counter()
        verifier.remove([verifier.keys[k % len(verifier)]])
        leaves.append(time.perf_counter() - t)
        t = time.perf_counter()
        row = verifier.prefill(None, prompt)
        prefills.append(time.perf_counter() - t)
        t = time.perf_counter()
        verifier.join(("joined", k), row, len(prompt))
        joins.append(time.perf_counter() - t)
        after.append(step())
    ms = [1000 * statistics.median(x) for x in (steady, leaves, joins, prefills, after)]
    print(f"{rows} rows of ~{context} positions, {engine.dtype_reason}")
    print(f"steady step {ms[0]:.1f} ms | leave {ms[1]:.1f} ms | join {ms[2]:.1f} ms (its prefill {ms[3]:.1f} ms) | "
          f"first step after {ms[4]:.1f} ms")


if __name__ == "__main__":
    main()
