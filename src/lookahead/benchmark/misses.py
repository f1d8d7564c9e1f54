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

Next to them, prompt lookup's rule (transformers': the last 3..1 tokens' leftmost earlier occurrence, the next
10 tokens drafted) is walked over the same answer, with its tokens accepted and drafted per step: drafting
compared on one text, apart from either loop's cost per step (the timed bench runs each method on the text its
own forwards give, and in bf16 those part at near-ties).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..decoding.cost import CostModel
from ..drafting.fusion import Budget
from ..tree import DraftTree
from .methods import DEFAULT_PLD_NGRAM, PLD_TOKENS
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

    def propose(self, context: list[int], budget: Budget, least: float = 0.0) -> DraftTree:
        tree = self.inner.propose(context, budget, least)
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

    @property
    def recycle(self):  # the decode core feeds it for all rows at once
        return self.inner.recycle

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


def lookup_chain(context: Sequence[int], ngram: int = DEFAULT_PLD_NGRAM, tokens: int = PLD_TOKENS) -> list[int]:
    """Prompt lookup's draft (transformers' rule): for the last n = ngram..1 tokens, the leftmost earlier occurrence
    with anything after it gives the next `tokens` tokens; none: []."""
    context = list(context)
    for n in range(min(ngram, len(context) - 1), 0, -1):
        tail = context[-n:]
        for start in range(len(context) - n):
            if context[start:start + n] == tail:
                return context[start + n:start + n + tokens]
    return []


def lookup_walk(prompt: Sequence[int], answer: Sequence[int], cost: CostModel | None = None) -> dict[str, float]:
    """Prompt lookup's steps over `answer` (greedy: each step emits its accepted drafts and one token more), and
    with a cost curve their time on it (one forward over the last token and the draft per step)."""
    out = {"lookup_steps": 0, "lookup_accepted": 0, "lookup_drafted": 0, "lookup_time": 0.0}
    done = 0
    while done < len(answer):
        chain = lookup_chain(list(prompt) + list(answer[:done]))
        k = 0
        while k < len(chain) and done + k < len(answer) - 1 and chain[k] == answer[done + k]:
            k += 1  # the last answer token is always the step's own (a bonus past the end is not emitted)
        out["lookup_steps"] += 1
        out["lookup_accepted"] += k
        out["lookup_drafted"] += len(chain)
        out["lookup_time"] += cost(1 + len(chain)) if cost is not None else 0.0
        done += k + 1
    return out


class FixedCurve(CostModel):
    """A cost curve that live forwards do not correct: another mode's, which the traced fp32 forwards must not move."""

    def observe(self, total: int, seconds: float, rows: int = 1) -> None:
        pass


def trace(engine, prompt: Sequence[int], max_new_tokens: int, length: int = DEFAULT_LENGTH,
          min_copy: int = 1, curve: CostModel | None = None) -> dict:
    """Decode `prompt` plainly (the answer) and drafted (traced); the drafted steps' losses by reason, counting
    copies of `min_copy` tokens or more. The drafted decode sizes its trees on `curve` (default: the engine's own),
    and `time`, `lookup_time` and `plain_time` are its, prompt lookup's and plain decoding's steps timed on it
    (0 without a curve: fixed sizing). Given another mode's curve, the guard is off: it judges wall times, and
    these are the exact mode's (measured: fp32 eager forwards judged drafting on the packed curve a loss and
    turned it off for 68-77 % of the lost tokens on summary, qa and chat)."""
    from ..decoding.sizing import SizingPolicy
    from ..engine import Engine

    cost = curve or engine.cost
    answer = list(engine.generate(list(prompt), max_new_tokens=max_new_tokens, draft=False).token_ids)
    state = TracedState(engine.new_state())
    sizing = SizingPolicy(curve, guard=False) if curve is not None else None
    traced = Engine(engine.model, engine.tokenizer, engine.draft_config, state=state, cost=cost, sizing=sizing)
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
        drafts = len(step.verified) - 1 if step.verified is not None else 0
        totals["verified"] += drafts
        totals["time"] += cost(1 + drafts) if cost is not None else 0.0
    totals.update(lookup_walk(prompt, answer, cost))
    totals["plain_time"] = len(answer) * cost(1) if cost is not None else 0.0
    return dict(totals)


def lost(totals: dict) -> int:
    """The copyable tokens a trace's steps did not accept, over every reason."""
    return sum(totals.get(r, 0) for r in REASONS)


def table(rows: dict[str, dict]) -> str:
    """Markdown: per category, steps, accepted and copyable tokens per step, and the lost tokens by reason."""
    head = ["category", "prompts", "steps", "accepted drafts/step", "copyable/step", "lost/step",
            *(f"{r} (share of lost)" for r in REASONS), "beyond copy/step", "verified drafts/step",
            "prompt lookup: steps", "accepted/step", "verified/step", "modeled speedup: ours", "prompt lookup"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, t in rows.items():
        steps = max(t.get("steps", 0), 1)
        missed = lost(t)
        cells = [name, str(t.get("prompts", 0)), str(t.get("steps", 0)), f"{t.get('accepted', 0) / steps:.2f}",
                 f"{t.get('copyable', 0) / steps:.2f}", f"{missed / steps:.2f}",
                 *(f"{100 * t.get(r, 0) / missed:.0f} %" if missed else "–" for r in REASONS),
                 f"{t.get('beyond', 0) / steps:.2f}", f"{t.get('verified', 0) / steps:.2f}"]
        lookup = max(t.get("lookup_steps", 0), 1)
        cells += [str(t.get("lookup_steps", 0)), f"{t.get('lookup_accepted', 0) / lookup:.2f}",
                  f"{t.get('lookup_drafted', 0) / lookup:.2f}",
                  *(f"{t['plain_time'] / t[k]:.2f}x" if t.get(k) and t.get("plain_time") else "–"
                    for k in ("time", "lookup_time"))]
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
    p.add_argument("--curve", choices=("exact", "auto"), default="exact",
                   help="the cost curve drafting is sized by and steps are timed on: the exact mode's own, or "
                        "that of the dtype and kernels `auto` picks here (the text stays exact, the choices the "
                        "fast mode's; the guard off: it would judge the exact mode's wall times)")
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = p.parse_args(argv)
    if args.min_copy < 1 or args.length < 1:
        p.error("--min-copy and --length must be at least 1")
    from tqdm import tqdm

    import lookahead

    from .datasets import load_prompts
    curve, why = None, "the exact mode's"
    if args.curve == "auto":
        fast = lookahead.load(args.model)
        curve, why = FixedCurve(fast.cost.tokens, fast.cost.seconds), f"auto's: {fast.dtype_reason}"
        del fast
    engine = lookahead.load(args.model, dtype="float32", kernels="eager")  # the exact mode: answers agree
    rows: dict[str, dict] = {}
    for category in args.tasks.split(","):
        prompts = load_prompts(category, "test", limit=args.limit)
        totals: Counter = Counter()
        for prompt in tqdm(prompts, desc=category, file=sys.stderr):
            ids = engine.encode(prompt.messages)
            totals += Counter(trace(engine, ids, args.max_new_tokens, args.length, args.min_copy, curve))
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
                    f"{args.min_copy} tokens or more counted; sized and timed on {why} cost curve "
                    f"({_ratios(curve or engine.cost)})\n\n{text}\n")


def _ratios(cost: CostModel) -> str:
    return "t(k)/t(1) " + ", ".join(f"{k}: {cost.ratio(k):.2f}" for k in (2, 4, 8, 16, 32))


if __name__ == "__main__":
    main()
