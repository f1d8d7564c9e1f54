"""Where a decode's time goes, lookahead against transformers' prompt lookup, prompt by prompt.

For each prompt: prompt lookup's forwards (query tokens each, and their time), then the default engine's (fresh
drafting state) with its step split into the model's forward and each part of our loop around it (drafting,
the recycle table's update, accepting, KV compaction). Answers "does prompt lookup win on forwards or on the
loop?" (README, Zen 3 headline: on edits, forward time was level and our loop's ~5 ms a step was the gap).

    python bench/step_costs.py --task edit --limit 4
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

import lookahead
from lookahead import engine as engine_module
from lookahead.benchmark.datasets import load_prompts
from lookahead.benchmark.methods import DEFAULT_PLD_NGRAM, PLD_TOKENS
from lookahead.decoding import step, verify
from lookahead.drafting import drafter, recycle

# What is timed: (owner, attribute) wrapped in place. Greedy requests get their accept rule from the engine module.
PARTS = {"forward (no prefill)": None, "propose": (drafter.Drafter, "propose"),
         "observe": (drafter.Drafter, "observe"), "  of which recycle": (recycle.RecycleTable, "update"),
         "accept": (engine_module, "accept_greedy"), "commit": (verify.Verifier, "commit"),
         "whole step": (step.Decoder, "_decode")}


def timed(seconds: dict[str, float], key: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[key] += time.perf_counter() - start
    return wrapper


def forwards(log: list[tuple[int, float]]) -> str:
    by: dict[int, list[float]] = defaultdict(list)
    for q, s in log:
        by[q].append(s)
    return (f"{len(log)} forwards, {sum(s for _, s in log):.2f} s, mean {statistics.mean(q for q, _ in log):.1f} "
            "query tokens; " + " ".join(f"q{q}: {len(v)} x {1000 * statistics.median(v):.0f} ms"
                                        for q, v in sorted(by.items())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="edit")
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    engine = lookahead.load()
    model, tokenizer = engine.model, engine.tokenizer
    log: list[tuple[int, float]] = []
    seconds: dict[str, float] = defaultdict(float)
    forward = model.forward

    def logged_forward(*a, **kw):
        start = time.perf_counter()
        out = forward(*a, **kw)
        log.append((kw["input_ids"].shape[1], time.perf_counter() - start))
        return out
    model.forward = logged_forward
    for key, where in PARTS.items():
        if where is not None:
            setattr(where[0], where[1], timed(seconds, key, getattr(where[0], where[1])))
    steps = 0
    for prompt in load_prompts(args.task, limit=args.limit):
        ids = tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"].to(model.device)
        log.clear()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                           prompt_lookup_num_tokens=PLD_TOKENS, max_matching_ngram_size=DEFAULT_PLD_NGRAM)
        pld = forwards(log[1:])  # the first is the prefill
        log.clear()
        engine.state = engine.new_state()
        out = engine.generate(prompt.messages, max_new_tokens=args.max_new_tokens)
        steps += out.stats.steps
        seconds["forward (no prefill)"] += sum(s for _, s in log[1:])
        print(f"{prompt.id}\n  prompt lookup: {pld}\n  lookahead:     {forwards(log[1:])}")
    print(f"\nlookahead, ms a step over {steps} steps (the prefill is in 'whole step', not in 'forward'):")
    for key in PARTS:
        print(f"  {key:22s} {1000 * seconds[key] / steps:7.2f}")


if __name__ == "__main__":
    main()
