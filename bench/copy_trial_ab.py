"""A/B of the guard's copy-trial wait: a summary (where drafting switches off) then a code edit, on one guard.

    python bench/copy_trial_ab.py qwen2.5-coder-1.5b 4

old = a copy trial after max(PROBE_EVERY, trial_every // 4) off steps (the rule before; patched in here),
new = after PROBE_EVERY (decoding/sizing.py). Each round runs both, order alternating, each with a fresh engine
(drafting state and guard) on the same model and cost curve; prints the edit's steps, seconds and tokens/s,
and the guard's trial wait at the end.
"""
import sys
import time

import torch

import lookahead
from lookahead.benchmark.datasets import load_prompts
from lookahead.decoding import sizing as sz
from lookahead.engine import Engine

torch.set_num_threads(2)
model_name, rounds = sys.argv[1], int(sys.argv[2])
base = lookahead.load(model_name)
summary, edit = load_prompts("summary", limit=1)[0], load_prompts("edit", limit=1)[0]
new_plan = sz.SizingPolicy.plan

def old_plan(self, rows, copy_run=0):
    self.trial = False
    if not self.guard:
        return None
    adv = self.advantage(rows)
    every = sz.PLAIN_EVERY_AHEAD if adv is not None and adv > sz.AHEAD else sz.PLAIN_EVERY
    self.since_plain += 1
    if self.since_plain >= (2 * every if copy_run >= sz.MIN_RUN else every):
        self.since_plain = 0
        return sz.Choice(0, "plain")
    if adv is None or adv >= 1:
        self.off = 0
    else:
        self.off += 1
        copying = copy_run >= sz.COPY_TRIAL and self.off >= max(sz.PROBE_EVERY, self.trial_every // 4)
        if self.off < self.trial_every and not copying:
            return sz.Choice(0, "off")
        self.off, self.trial = 0, True
    return None

for r in range(rounds):
    for name, plan in (("old", old_plan), ("new", new_plan)) if r % 2 == 0 else (("new", new_plan), ("old", old_plan)):
        sz.SizingPolicy.plan = plan
        eng = Engine(base.model, base.tokenizer, base.draft_config, cost=base.cost)
        s = eng.generate(summary.messages, max_new_tokens=128)
        t = time.perf_counter()
        e = eng.generate(edit.messages, max_new_tokens=128)
        w = time.perf_counter() - t
        print(f"round {r} {name}: summary {s.stats.steps} steps; edit {e.stats.steps} steps {w:.2f}s "
              f"{len(e.token_ids) / w:.1f} tok/s trial wait at the end {eng.sizing.trial_every}", flush=True)
