"""Where drafting loses against the copy oracle, step by step: `python -m lookahead.benchmark.misses`.

The oracle columns of `lookahead bench` say how much is lost; this says where. Each prompt is decoded
twice in the exact mode (fp32, eager kernels): plainly, which gives the model's answer, then by the
default engine with its drafting state traced. At every step the copy oracle could have had
`copyable` tokens accepted: the longest prefix of the next `length` answer tokens that occurs as one
stretch of the context. Every one of them the step did not accept is charged to one reason:

- plain: the step drafted nothing by plan (the guard's plain step, or drafting switched off);
- unmatched: the drafter's whole tree does not hold the next token (no source matched the copy);
- capped: the tree holds the copy as far as the caps let it grow (depth, or every node spent);
- parted: the tree holds the copy's start, then goes another way or ends (a source chose elsewhere);
- cut: the whole tree held it, the sizing policy verified less.

Counts of tokens, not times: the same on a loaded machine as on an idle one (only the guard's and the
sizing's choices, which read times, may differ). Tokens the engine accepted beyond what copying could
give (recycle table, shared history) are reported apart. Losses are per step: a copy still in reach over
several steps counts at each of them (a regret, not a count of distinct tokens). `--min-copy N` counts only
copies of N tokens or more (a one-token match is often a coincidence no drafter could know).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..drafting.fusion import Budget
from ..tree import DraftTree
from .oracle import DEFAULT_LENGTH, copied

REASONS = ("plain", "unmatched", "capped", "parted", "cut")


@dataclass
class TracedStep:
    tree: DraftTree | None         # the drafter's whole tree (None: a plain step)
    budget: Budget | None
    verified: DraftTree | None = None  # the part the sizing policy verified
    accepted: int = 0              # draft tokens accepted


class TracedDrafter:
    """A drafter that records what it proposes and what was verified and accepted (otherwise the same)."""

    def __init__(self, inner) -> None:
        self.inner, self.steps = inner, []
        self._proposed: tuple[DraftTree, Budget] | None = None

    @property
    def copy_run(self) -> int:
        return self.inner.copy_run

    @property
    def stats(self) -> dict:
        return self.inner.stats

    def propose(self, context: list[int], budget: Budget) -> DraftTree:
        tree = self.inner.propose(context, budget)
        self._proposed = (tree, budget)
        return tree

    def observe(self, tokens: list[int], tree: DraftTree | None = None, logits: torch.Tensor | None = None,
                nodes: list[int] | None = None) -> None:
        self.inner.observe(tokens, tree, logits, nodes)
        whole, budget = self._proposed or (None, None)  # None: nothing was drafted this step
        self.steps.append(TracedStep(whole, budget, tree, len(tokens) - 1))
        self._proposed = None


class TracedState:
    """Wraps a drafting state; every drafter it hands out is traced (`drafters`, in order)."""

    def __init__(self, inner) -> None:
        self.inner, self.drafters = inner, []

    def drafter(self, prompt: Sequence[int]) -> TracedDrafter:
        traced = TracedDrafter(self.inner.drafter(prompt))
        self.drafters.append(traced)
        return traced


def held(tree: DraftTree, chain: Sequence[int]) -> tuple[int, int]:
    """How many tokens of `chain` the tree holds as one path from its root, and the path's last node."""
    node = 0
    for k, token in enumerate(chain):
        nxt = tree.child(node, token)
        if nxt is None:
            return k, node
        node = nxt
    return len(chain), node


def charge(step: TracedStep, copyable: Sequence[int]) -> Counter:
    """The copyable tokens this step did not accept, by reason (and `beyond`: accepted past the copy)."""
    out: Counter = Counter()
    c, a = len(copyable), step.accepted
    if a > c:
        out["beyond"] += a - c
    lost = max(c - a, 0)
    if not lost:
        return out
    if step.tree is None or step.budget is None:
        out["plain"] += lost
        return out
    whole, end = held(step.tree, copyable)
    verified = held(step.verified, copyable)[0] if step.verified is not None else whole
    # What the verified tree held is what greedy acceptance took (exact mode): the rest of the loss is the
    # part the whole tree held and the sizing cut, then the part the whole tree never held.
    if (cut := min(whole, c) - max(verified, a)) > 0:
        out["cut"] += cut
    missing = c - max(whole, a)
    if missing > 0:
        if whole == 0:
            reason = "unmatched"
        elif not step.tree.children[end] and (step.tree.depths[end] >= step.budget.depth
                                             or len(step.tree) - 1 >= step.budget.nodes):
            reason = "capped"
        else:
            reason = "parted"
        out[reason] += missing
    return out


def trace(engine, prompt: Sequence[int], max_new_tokens: int, length: int = DEFAULT_LENGTH,
          min_copy: int = 1) -> dict:
    """Decode `prompt` plainly (the answer) and drafted (traced); the drafted steps' losses by reason, counting
    copies of `min_copy` tokens or more."""
    from ..engine import Engine

    answer = list(engine.generate(list(prompt), max_new_tokens=max_new_tokens, draft=False).token_ids)
    state = TracedState(engine.new_state())
    traced = Engine(engine.model, engine.tokenizer, engine.draft_config, state=state, cost=engine.cost)
    out = list(traced.generate(list(prompt), max_new_tokens=max_new_tokens).token_ids)
    if out != answer:
        raise RuntimeError("drafted output differs from plain decoding: the trace needs the exact mode "
                           "(fp32, eager kernels)")
    totals: Counter = Counter()
    context = list(prompt) + answer
    for step in state.drafters[0].steps:
        done = totals["emitted"]  # every step emits its accepted draft tokens and one more
        copyable = copied(context[:len(prompt) + done], answer[done:done + length])
        if len(copyable) < min_copy:
            copyable = []
        totals += charge(step, copyable)
        totals["steps"] += 1
        totals["copyable"] += len(copyable)
        totals["accepted"] += step.accepted
        totals["emitted"] += step.accepted + 1
    return dict(totals)


def lost(totals: dict) -> int:
    """The copyable tokens a trace's steps did not accept, over every reason."""
    return sum(totals.get(r, 0) for r in REASONS)


def table(rows: dict[str, dict]) -> str:
    """Markdown: per category, steps, accepted and copyable tokens per step, and the lost tokens by reason."""
    head = ["category", "prompts", "steps", "accepted drafts/step", "copyable/step", "lost/step",
            *(f"{r} (share of lost)" for r in REASONS), "beyond copy/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, t in rows.items():
        steps = max(t.get("steps", 0), 1)
        missed = lost(t)
        cells = [name, str(t.get("prompts", 0)), str(t.get("steps", 0)), f"{t.get('accepted', 0) / steps:.2f}",
                 f"{t.get('copyable', 0) / steps:.2f}", f"{missed / steps:.2f}",
                 *(f"{100 * t.get(r, 0) / missed:.0f} %" if missed else "–" for r in REASONS),
                 f"{t.get('beyond', 0) / steps:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lookahead.benchmark.misses", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="named model, .gguf file or HF directory")
    p.add_argument("--tasks", default="edit,summary,code", help="comma-separated categories")
    p.add_argument("--limit", type=int, default=6, help="prompts per category (test split)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--length", type=int, default=DEFAULT_LENGTH, help="the copy oracle's chain length L")
    p.add_argument("--min-copy", type=int, default=1, help="count only copies of at least this many tokens")
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = p.parse_args(argv)
    if args.min_copy < 1 or args.length < 1:
        p.error("--min-copy and --length must be at least 1")
    from tqdm import tqdm

    import lookahead

    from .datasets import load_prompts
    engine = lookahead.load(args.model, dtype="float32", kernels="eager")  # the exact mode: answers agree
    rows: dict[str, dict] = {}
    for category in args.tasks.split(","):
        prompts = load_prompts(category, "test", limit=args.limit)
        totals: Counter = Counter()
        for prompt in tqdm(prompts, desc=category, file=sys.stderr):
            ids = engine.encode(prompt.messages)
            totals += Counter(trace(engine, ids, args.max_new_tokens, args.length, args.min_copy))
            totals["prompts"] += 1
        rows[category] = dict(totals)
    text = table(rows)
    print(text)
    if args.out:
        from .cli import _machine, run_facts
        from .report import _machine_line
        facts = {"machine": _machine(), "dtype": "float32",
                 **run_facts(engine.model, "the exact mode: the trace compares drafted output with plain")}
        command = " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.out, "w") as f:
            f.write(f"`python -m lookahead.benchmark.misses {command}`\n\n{_machine_line(facts)}; test split, "
                    f"{args.max_new_tokens} new tokens, copy oracle chains of {args.length}, copies of "
                    f"{args.min_copy} tokens or more counted\n\n{text}\n")


if __name__ == "__main__":
    main()
