"""A/B of the cold-state trust (README "A cold state is not trusted"): plain decoding vs drafting variants,
interleaved per prompt (order rotating), a fresh drafting state per prompt, the sizing guard kept per variant
across prompts as `lookahead bench` does.

    python bench/cold_trust_ab.py float32 4 code,summary,chat,qa old,cold0.5,cold1.0 2

Variants: `old` (trust and calibration equal to the raw score until evidence: the overall ratio fixed at 1),
`coldX` (a source's trust starts at X times its probability, with the overall ratio learned), `new` (the
defaults). Prints per-prompt (speedup over plain, same tokens, tokens per step) and per-category geometric means.
"""
import math
import sys
import time

import torch

import lookahead
from lookahead.benchmark.datasets import load_prompts
from lookahead.engine import Engine


def configure(variant: str, engine: Engine) -> None:
    if variant == "old":
        for c in (engine.state.calibration, *engine.state.trust.values()):
            c._update_ratio = lambda c=c: setattr(c, "ratio", 1.0)
            c._update_ratio()
    elif variant.startswith("cold"):
        for c in engine.state.trust.values():
            c.cold = float(variant[4:])
            c._update_ratio()


def main(dtype: str, limit: int, categories: list[str], variants: list[str], reps: int) -> None:
    torch.set_num_threads(2)
    base = lookahead.load(dtype=dtype, kernels="eager" if dtype == "float32" else "auto")
    tok, sizings, results, k = base.tokenizer, {}, {}, 0
    for cat in categories:
        for p in load_prompts(cat, limit=limit):
            ids = tok.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            ids = ids["input_ids"] if isinstance(ids, dict) else ids
            for _ in range(reps):
                order = ["plain", *variants]
                order = order[k % len(order):] + order[:k % len(order)]
                k += 1
                outs = {}
                for v in order:
                    engine = Engine(base.model, tok, base.draft_config, cost=base.cost, sizing=sizings.get(v))
                    sizings[v] = engine.sizing
                    configure(v, engine)
                    t = time.perf_counter()
                    out = engine.generate(list(ids), max_new_tokens=128, draft=(v != "plain"))
                    outs[v] = (out.token_ids, time.perf_counter() - t, len(out.stats.accepted))
                plain = outs["plain"]
                line = {v: (round(plain[1] / o[1], 3), o[0] == plain[0], round(len(o[0]) / max(o[2], 1), 2))
                        for v, o in outs.items() if v != "plain"}
                results.setdefault(cat, []).append(line)
                print(cat, p.id, len(ids), line, flush=True)
    for v in variants:
        per = {c: math.exp(sum(math.log(r[v][0]) for r in rs) / len(rs)) for c, rs in results.items()}
        overall = math.exp(sum(math.log(x) for x in per.values()) / len(per))
        same = all(r[v][1] for rs in results.values() for r in rs)
        print(v, {c: round(x, 3) for c, x in per.items()}, "all", round(overall, 3), "same tokens", same)


if __name__ == "__main__":
    a = sys.argv
    main(a[1], int(a[2]), a[3].split(","), a[4].split(","), int(a[5]) if len(a) > 5 else 1)
