"""Accepted tokens per step when verification is free, for draft-cap variants: a GPU's regime, measured on a CPU.

Where a verify forward over 128 tokens costs what one over 1 does (an H200 running SmolLM2-135M, README "On a
GPU"), the sizing keeps every drafted node and speed follows accepted tokens per step. Those depend on the text
and the drafts only, not on the hardware, so any machine measures them: each variant decodes each prompt from a
fresh drafting state under a fixed flat cost curve (the H200's shape), the guard off (it would judge this CPU's
real step times), and the outputs are checked identical across variants.

    python bench/free_verify.py --tasks edit,code,chat,summary --limit 3 --variants n48-d12-c24,n48-d24-c48
"""
from __future__ import annotations

import argparse
import math

import torch
from tqdm.auto import tqdm

import lookahead
from lookahead.benchmark.datasets import load_prompts
from lookahead.decoding.cost import CostModel
from lookahead.decoding.sizing import SizingPolicy
from lookahead.engine import DraftConfig, Engine


class FlatCost(CostModel):
    """The H200's measured shape (t(128)/t(1) = 1.08), never corrected by this machine's forwards."""

    def observe(self, total: int, seconds: float) -> None:
        pass


def flat() -> FlatCost:
    return FlatCost([1, 16, 64, 128], [1.0, 1.02, 1.03, 1.08])


def parse(variant: str) -> DraftConfig:
    """`n48-d12-c24[-rK]`: max_nodes, max_depth, copy_depth, recycle_k."""
    keys = {"n": "max_nodes", "d": "max_depth", "c": "copy_depth", "r": "recycle_k"}
    return DraftConfig(**{keys[part[0]]: int(part[1:]) for part in variant.split("-")})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="edit,code,chat,summary")
    p.add_argument("--limit", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--variants", default="n48-d12-c24,n48-d24-c48")
    args = p.parse_args()
    torch.set_num_threads(2)
    base = lookahead.load(dtype="float32")
    variants = args.variants.split(",")
    prompts = [q for task in args.tasks.split(",") for q in load_prompts(task, limit=args.limit)]
    rates: dict[tuple[str, str], list[float]] = {}
    draft_ms = {v: [0.0, 0] for v in variants}   # drafting seconds, steps: its CPU cost grows with the tree
    with tqdm(total=len(prompts) * len(variants), desc="free verify") as bar:
        for prompt in prompts:
            outputs = {}
            for v in variants:
                engine = Engine(base.model, base.tokenizer, parse(v), cost=flat(),
                                sizing=SizingPolicy(flat(), guard=False))
                out = engine.generate(prompt.messages, max_new_tokens=args.max_new_tokens)
                outputs[v] = out.token_ids
                rates.setdefault((prompt.category, v), []).append(out.stats.mean_accepted)
                draft_ms[v][0] += 1000 * out.stats.draft_s
                draft_ms[v][1] += out.stats.steps
                bar.set_postfix_str(f"{prompt.id} {v} {out.stats.mean_accepted:.2f}")
                bar.update()
            if len({tuple(t) for t in outputs.values()}) != 1:
                print(f"{prompt.id}: outputs differ between variants (fp32 eager should not: a bug)")
    tasks = args.tasks.split(",")
    print("\naccepted tokens per step (geometric mean over prompts), verification free\n")
    print("| variant | " + " | ".join(tasks) + " | drafting ms a step |\n|---|" + "---:|" * (len(tasks) + 1))
    for v in variants:
        cells = [math.exp(sum(map(math.log, rates[t, v])) / len(rates[t, v])) for t in tasks]
        print(f"| {v} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {draft_ms[v][0] / draft_ms[v][1]:.1f} |")


if __name__ == "__main__":
    main()
