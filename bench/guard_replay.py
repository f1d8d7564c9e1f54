"""The never-slower guard replayed on recorded steps: how much each guard rule gives up, without timing noise.

    python bench/guard_replay.py record traces.json [MODEL] [PER_CATEGORY]    # decode with drafting always on
    python bench/guard_replay.py replay traces.json [OVERHEADS]               # e.g. 1,2,3,4,6,10

`record` decodes PER_CATEGORY test prompts of each benchmark category with the guard off and keeps, per step, the
tokens it emitted and its wall time. `replay` drives the real `SizingPolicy` over those texts (prompts one after
another, one policy, as a server or the benchmark keeps it): where the policy drafts, the step emits what the
recorded drafted step at that position emitted, at its recorded cost; where it runs plain, one token at a plain
step's cost. OVERHEADS scales what a drafted step costs above a plain one (1: as recorded; 4: a CPU whose verify
forwards are 4x as steep), so one recording covers machines where drafting wins big, barely, or loses. Step times
get 3 % Gaussian noise (20 seeds, prompt order shuffled per seed). Prints tokens per plain step's time: plain
decoding 1.00, always drafting, and the guard with one-step and with multi-step trials (`TRIAL_STEPS`).

A model, not a measurement of wall time: a step's outcome is taken from the always-drafting run at the same
position (positions inside an accepted run reuse the last recorded step) and copy-triggered trials are not
replayed. It ranks guard rules on the same steps; wall-clock A/Bs decide what ships.
"""
from __future__ import annotations

import json
import random
import sys
import time

PLAIN_COST = 1.0


def record(path: str, model: str = "smollm2-135m", limit: int = 8) -> None:
    import lookahead
    from lookahead.benchmark.datasets import CATEGORIES, load_prompts
    from lookahead.decoding import step
    from lookahead.engine import Engine

    base = lookahead.load(model)
    steps: list[tuple[int, int, float]] = []
    decode = step.Decoder._decode

    def traced(self):  # noqa: ANN001, ANN202 - a wrapper of Decoder._decode
        out = decode(self)
        steps.append((self.report.emitted, self.report.tokens, self.report.forward_s + self.report.other_s))
        return out

    step.Decoder._decode = traced
    plain_s, traces = [], {}
    for category in CATEGORIES:
        for prompt in load_prompts(category, "test", limit=limit):
            for draft in (False, True):
                engine = Engine(base.model, base.tokenizer, base.draft_config, cost=base.cost)
                engine.sizing.guard = False
                steps.clear()
                t = time.perf_counter()
                engine.generate(prompt.messages, max_new_tokens=128, draft=draft)
                if draft:
                    traces[f"{category}/{prompt.id}"] = steps[1:]  # the first step also prefills
                else:
                    plain_s += [s for *_, s in steps[1:]]
            print(f"{category}/{prompt.id}: {len(steps)} steps, {time.perf_counter() - t:.1f} s", file=sys.stderr)
    plain_s.sort()
    with open(path, "w") as f:
        json.dump({"plain_step_s": plain_s[len(plain_s) // 2], "traces": traces}, f)


def replay_one(data: dict, trial_steps: int, guard: bool, overhead: float, categories: set[str], seed: int) -> float:
    from lookahead.decoding import sizing
    from lookahead.decoding.cost import CostModel

    sizing.TRIAL_STEPS = trial_steps
    rng = random.Random(seed)
    policy = sizing.SizingPolicy(cost=CostModel([1, 2], [1.0, 1.0]), guard=guard)
    plain_s = data["plain_step_s"]
    names = sorted(k for k in data["traces"] if k.split("/")[0] in categories)
    rng.shuffle(names)
    seconds = tokens = 0.0
    for name in names:
        at, pos = {}, 0
        for emitted, query, s in data["traces"][name]:
            at[pos] = (emitted, query, s)
            pos += emitted
        end, pos, last = pos, 0, (1, 1, plain_s)
        policy.new_text(1)
        while pos < end:
            last = at.get(pos, last)
            emitted, query, s = last
            if policy.plan(1) is None:
                drafted = query > 1
                choice = sizing.Choice(query - 1, "sized")
                cost = PLAIN_COST + (s / plain_s - PLAIN_COST) * overhead if drafted else PLAIN_COST
                emitted = min(emitted, end - pos) if drafted else 1
            else:
                choice, cost, emitted = sizing.Choice(0, "plain"), PLAIN_COST, 1
            cost *= rng.gauss(1.0, 0.03)
            policy.observe(choice, 1, emitted, emitted - 1, cost * plain_s)
            seconds, tokens, pos = seconds + cost, tokens + emitted, pos + emitted
    return tokens / seconds


def replay(path: str, overheads: list[float], seeds: int = 20) -> None:
    with open(path) as f:
        data = json.load(f)
    groups = sorted({k.split("/")[0] for k in data["traces"]})
    rules = {"always drafting": (1, False), "one-step trials": (1, True), "multi-step trials": (4, True)}
    print("| drafted step's overhead | texts | plain | " + " | ".join(rules) + " |")
    print("|---:|---|---:|" + "---:|" * len(rules))
    for overhead in overheads:
        for cats in [[g] for g in groups] + [groups]:
            rates = [sum(replay_one(data, t, g, overhead, set(cats), s) for s in range(seeds)) / seeds
                     for t, g in rules.values()]
            print(f"| {overhead:g}x | {'+'.join(cats)} | 1.000 | " + " | ".join(f"{r:.3f}" for r in rates) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("record", "replay"):
        sys.exit(__doc__)
    if sys.argv[1] == "record":
        record(sys.argv[2], *(sys.argv[3:4] or ["smollm2-135m"]), *[int(a) for a in sys.argv[4:5]])
    else:
        replay(sys.argv[2], [float(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "1,2,3,4,6,10").split(",")])
