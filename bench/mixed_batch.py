"""Continuous batching of mixed prompts: `generate_batch` with drafting against `draft=False`, alternating.

    python bench/mixed_batch.py [MODEL] [PER_CATEGORY] [ROUNDS]     e.g. smollm2-135m 8 2 (40 prompts)

One process: PER_CATEGORY test prompts of each benchmark category, interleaved so every batch is mixed, 96 new
tokens each, max batch 16 (more prompts than rows: rows join as others finish, then the batch drains). Each round
runs both modes, their order alternating (drafting first, then `draft=False` first); prints each run's wall time and
the summed times' ratio, drafting over `draft=False` (above 1: drafting is faster).
"""
from __future__ import annotations

import sys
import time

import torch

import lookahead
from lookahead.benchmark.datasets import CATEGORIES, load_prompts


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    torch.set_num_threads(2)
    engine = lookahead.load(model)
    chat = bool(getattr(engine.tokenizer, "chat_template", None))
    by_category = [[engine.encode(p.messages if chat else p.text) for p in load_prompts(c, "test", limit=limit)]
                   for c in CATEGORIES]
    prompts = [ids for group in zip(*by_category, strict=False) for ids in group]
    seconds = {True: 0.0, False: 0.0}
    for r in range(rounds):
        for draft in ((True, False) if r % 2 == 0 else (False, True)):
            # A fresh engine on the same weights and cost curve: each run starts with a cold drafting state and guard.
            run = lookahead.Engine(engine.model, engine.tokenizer, engine.draft_config, cost=engine.cost)
            t = time.perf_counter()
            outputs = run.generate_batch(prompts, max_new_tokens=96, max_batch=16, draft=draft, progress=False)
            seconds[draft] += time.perf_counter() - t
            print(f"round {r} draft={draft}: {time.perf_counter() - t:.2f} s, "
                  f"{sum(len(o.token_ids) for o in outputs)} tokens", flush=True)
    print(f"{len(prompts)} prompts, {model}, {engine.dtype_reason}")
    print(f"drafting over draft=False, summed: {seconds[False] / seconds[True]:.3f}x "
          f"({seconds[True]:.2f} s against {seconds[False]:.2f} s)")


if __name__ == "__main__":
    main()
