"""A batch's verify forward with rows padded to the largest tree against rows packed to their real tokens.

    python bench/packed_rows.py [ROWS] [CONTEXT] [DTYPE]     e.g. 15 200 auto (15 rows of ~200 cached tokens)

One process, SmolLM2-135M (`auto`: the dtype and kernels `load` picks). For each mix of tree sizes (k rows
drafting n nodes, the others none) four ways are timed interleaved, median of 11 forwards after 2 warm-up ones:
`padded` (every row's query padded to the largest tree: the layout before packing), `packed` (the model runs on
the real query tokens; attention pads them back or attends each tree apart, by its cost estimate: what the
engine runs), and packed with attention forced each way (`pad-attn`, `apart`). Also prints what the engine's
cost model says a step costs over its plain one (having seen the packed forwards, as the engine does) and the
largest logit difference between padded and packed (bf16 and packed kernels round differently as a matmul's
row count changes, as any change of batch does; fp32 eager stays within float error).
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

import lookahead
from lookahead.decoding import attention
from lookahead.decoding.verify import Verifier
from lookahead.tree import DraftTree

MIXES = [(1, 3), (1, 12), (2, 12), (4, 4), (8, 2), (15, 1), (15, 3)]  # (rows drafting, nodes each)


def batch_of_rows(context: int, apart: int) -> tuple[lookahead.Engine, Verifier, int, int]:
    """SmolLM2 (argv: ROWS CONTEXT DTYPE) and a verifier holding ROWS rows of ~CONTEXT cached tokens, each row
    `apart` tokens shorter than the one before (the cache is padded); also returns ROWS and CONTEXT."""
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    context = int(sys.argv[2]) if len(sys.argv) > 2 else context
    torch.set_num_threads(2)
    engine = lookahead.load("smollm2-135m", dtype=sys.argv[3] if len(sys.argv) > 3 else "auto")
    verifier = Verifier(engine.model)
    for r in range(rows):
        verifier.add(r, list(range(100 + r, 100 + r + context - apart * r)))
    return engine, verifier, rows, context


def main() -> None:
    engine, verifier, rows, context = batch_of_rows(200, apart=3)  # rows 3 tokens apart: the mask pads
    if not verifier.packs:
        raise SystemExit("this model and device do not pack rows (packing needs our attention, on a CPU)")

    def forward(trees: list[DraftTree], way: str) -> tuple[float, torch.Tensor]:
        verifier.packs = way != "padded"
        # A call costing next to nothing beside its keys: trees apart; a dear call: padded back.
        attention.CALL_US = 1e9 if way == "pad-attn" else CALL_US
        attention.KEY_QUERY_US = 1e9 if way == "apart" else KEY_QUERY_US
        t = time.perf_counter()
        logits = verifier.verify(trees)
        seconds = time.perf_counter() - t
        if way == "packed":  # what the engine learns from its own forwards
            engine.cost.observe(verifier.tokens, seconds, rows)
        verifier.abort()
        return seconds, logits[0]

    CALL_US, KEY_QUERY_US = attention.CALL_US, attention.KEY_QUERY_US
    plain = [DraftTree.root_only(5)] * rows
    base = statistics.median(forward(plain, "packed")[0] for _ in range(11))
    print(f"{rows} rows, ~{context} cached tokens each; a plain step {1000 * base:.1f} ms "
          f"(the cost model: {1000 * engine.cost(rows, rows):.1f} ms)")
    for drafting, nodes in MIXES:
        trees = [DraftTree.chain(5, list(range(10, 10 + nodes)))] * drafting + plain[drafting:]
        times: dict[str, list[float]] = {"padded": [], "packed": [], "pad-attn": [], "apart": []}
        logits = {}
        for i in range(13):
            for way in times:
                seconds, logits[way] = forward(trees, way)
                if i >= 2:
                    times[way].append(seconds)
        tokens = rows + drafting * nodes
        model = engine.cost(tokens, rows) - engine.cost(rows, rows)
        diff = (logits["padded"] - logits["packed"]).abs().max().item()
        cells = ", ".join(f"{way} +{1000 * (statistics.median(t) - base):.1f} ms" for way, t in times.items())
        print(f"{drafting} rows x {nodes} nodes ({tokens} tokens, padded {rows * (1 + nodes)}): {cells} over plain; "
              f"the cost model +{1000 * model:.1f} ms; max logit diff {diff:.1e}", flush=True)
    attention.CALL_US, attention.KEY_QUERY_US = CALL_US, KEY_QUERY_US


if __name__ == "__main__":
    main()
