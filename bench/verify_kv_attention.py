"""Verify-step cost: transformers' DynamicCache + SDPA against lookahead's AppendCache + grouped SDPA.

    python bench/verify_kv_attention.py ROWS QUERY [DTYPE]      e.g. 8 4 (8 rows, a 4-token chain each)

One process, the three configurations interleaved per step, median of 9 steps after 3 warm-up ones, over
caches of 128, 512 and 1024 tokens (rows 5 tokens apart, so the mask pads). Also prints the largest logit
difference between the grouped and the old attention (0 means bit-identical).
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
from transformers import DynamicCache

import lookahead
from lookahead.decoding import verify
from lookahead.decoding.attention import NAME
from lookahead.decoding.kv import AppendCache
from lookahead.tree import DraftTree


def main() -> None:
    rows, query = int(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(2)
    model = lookahead.load("smollm2-135m", dtype=sys.argv[3] if len(sys.argv) > 3 else "float32").model
    configs = {"DynamicCache+sdpa": (DynamicCache, "sdpa"), "AppendCache+sdpa": (AppendCache, "sdpa"),
               "AppendCache+grouped": (AppendCache, NAME)}
    tree = DraftTree.chain(5, list(range(6, 5 + query)))
    for length in (128, 512, 1024):
        verifiers = {}
        for name, (cache, attn) in configs.items():
            verify.new_cache = cache
            model.set_attn_implementation(attn)
            v = verify.Verifier(model)
            for r in range(rows):
                v.add(r, list(range(100, 100 + length - 1 - 5 * r)))
            verifiers[name] = v
        times, logits = {name: [] for name in configs}, {}
        for _ in range(12):
            for name, v in verifiers.items():
                model.set_attn_implementation(configs[name][1])
                t = time.perf_counter()
                logits[name] = v.verify([tree] * rows)[0]
                v.commit([[0]] * rows)
                times[name].append(time.perf_counter() - t)
        diff = (logits["AppendCache+grouped"] - logits["DynamicCache+sdpa"]).abs().max().item()
        cells = ", ".join(f"{name} {1000 * statistics.median(t[3:]):.1f} ms" for name, t in times.items())
        print(f"rows {rows}, query {query}, cache {length}: {cells}; max logit diff {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
