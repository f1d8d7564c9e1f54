"""How many draft nodes each row verifies this step: one policy for single requests, batches and the server.

Drafters return their whole best-first tree with `expected[i]`, the calibrated probability that
node i's path is accepted (any prefix of a best-first tree is a tree). For a batch of B rows the
step's forward covers B * q query tokens, q = 1 + the largest row's draft after the cut, so a
cut of n nodes per row gives

    rate(n) = sum over rows of (1 + expected[1] + ... + expected[min(n, size)])  /  t(B * q(n))

tokens per second, t being the engine's measured cost curve (corrected online). The policy picks
the n with the best rate; n = 0 is plain decoding. A single request is B = 1: verify the prefix
whose expected tokens per unit of cost is highest. As B grows, t(B * q) grows and trees shrink.
Where the verifier packs rows (verify.py: a forward costs its rows' real tokens, not B * q), each row
is cut on its own (`best_cuts`): the step verifies the nodes likeliest to be accepted, wherever they
are, as many as pay on the curve, so a copying row drafts deep while rows beside it draft nothing;
its drafters stop building trees at nodes that could not pay whatever else is drafted (`least`).
A static batch (nothing waits to take a finished row's place) ends with its last row, so there the
sum is B times the least that any of its furthest-behind rows expects: a copying row's drafts, paid
for by every row's padding, would only let it leave sooner (packed, only those rows draft at all).

Two safeguards keep the promise "never slower than plain decoding" whatever the curve says:
- probes: when no draft pays, a small tree is still verified now and then (acceptance is only
  learned from verified nodes); a probe that does not pay for its own forward doubles the wait;
- a guard on realised speed: now and then a drafting step is run plain, and the measured time per
  emitted token of drafted and plain steps are compared, per batch-size class once that class has
  enough steps of each kind, else over all batch sizes pooled (under load rows come and go, and a
  class alone may never gather enough; until either has, the plain steps come twice as often). Times are
  kept in units of a plain step's cost for that batch size on the curve, so steps of different sizes
  compare. Where drafted steps are slower,
  drafting is switched off; a drafted trial now and then (the wait doubling after each trial
  that still loses) turns it back on at once when the text changes (a copy after chat). A trial is
  judged on up to TRIAL_STEPS drafted steps together, ending at the first that wins, or once its steps
  cost more than TRIAL_REACH plain steps' tokens each (then no plausible run of drafts could win). Probes and
  trials verify at most as many nodes a row as cost a batch, over its plain step, what they cost a
  lone request (at least one: every row is padded to the largest cut). A request
  joining, or a row copying its context for COPY_TRIAL tokens in a row, calls a trial sooner. The
  guard's own plain steps wait while a row is copying or the last step's drafts landed (up to twice their
  period): a plain step costs the most there (traced, a Qwen2.5-Coder-1.5B edit: the cold guard's plain steps
  in a copy took one answer from 10 steps to 15), and its time does not depend on the text, so the comparison
  stays fair.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..drafting.ngram import MIN_RUN
from ..tree import DraftTree
from .cost import CostModel

PROBE_EVERY, PROBE_NODES, PROBE_MAX = 8, 4, 64
# One plain step in this many, to keep the guard's comparison current; rarer once drafting is
# measured well ahead (each plain step gives up what drafting would have won).
PLAIN_EVERY, PLAIN_EVERY_AHEAD, AHEAD = 8, 32, 1.3
# Until the guard has a verdict: its GUARD_MIN plain steps come this often, so a losing start (a batch of
# rows that do not copy) is judged in ~12 steps, not ~24. As many plain steps either way, only sooner.
PLAIN_EVERY_COLD = 4
GUARD_MIN = 3         # steps of each kind a batch-size class (or the pool) needs before the guard may act
POOLED = None         # the speeds' key for all batch sizes together
# Drafting is switched off as soon as its steps are measured slower per token than plain ones (no tolerance:
# the promise is never slower); a drafted trial must beat plain ones by this much to switch it back on.
GUARD_MARGIN = 0.02
# With drafting off, a row that has copied this many tokens in a row gets a trial sooner (at most one in
# max(PROBE_EVERY, trial_every / 4) steps). Measured: a summary turned into a repeated log at token 46 and
# drafting stayed off to token 116; a copy 4 tokens long can still be the wrong one (the first trial there,
# 4 tokens into the copy, followed "[" to "2023" where the log went on "[POP3]").
COPY_TRIAL = 2 * MIN_RUN
JOIN_TRIAL = 4        # a request joining a batch of at most this many rows calls a trial at once
# A trial is judged over up to this many drafted steps: where drafts land now and then (chat), one step
# mostly misses, so one-step trials kept drafting off at 1.2x ahead (measured: SmolLM2 chat, Intel Xeon with
# AMX, 29 of ~100 steps off on two prompts of six). It goes on only while its steps cost at most TRIAL_REACH
# plain steps' tokens each: a step that costs more needs drafts nearly always right to win back its time.
TRIAL_STEPS, TRIAL_REACH = 4, 2.0
WORTH_SLACK = 0.5     # a packed batch's drafts end at nodes expected below this share of what a node costs (`least`)


@dataclass
class _Speed:
    """Realised time per emitted token: running means of seconds and of tokens per step (then exponential
    ones), divided. A ratio of sums, not a mean of per-step ratios: that mean weighs a step that emitted
    one token as much as one that emitted eight, and on text where drafts land now and then (1 step in
    10 emitting 7 tokens) it read drafting as slower while it was 1.4x faster."""
    steps: int = 0
    seconds: float = 0.0
    tokens: float = 0.0

    def add(self, seconds: float, tokens_per_row: float) -> None:
        self.steps += 1
        weight = max(0.1, 1.0 / self.steps)
        self.seconds += weight * (seconds - self.seconds)
        self.tokens += weight * (tokens_per_row - self.tokens)

    @property
    def per_token(self) -> float:
        return self.seconds / max(self.tokens, 1e-9)


@dataclass
class Choice:
    """This step's decision: draft nodes per row (None: the whole trees), and why."""
    nodes: int | None  # the most any row verifies (every row's, unless `cuts`)
    kind: str   # "sized" | "fixed" | "probe" | "plain" (a guard step) | "off" (the guard switched drafting off)
    #             | "undrafted" (no row may draft: requests with draft=False; a plain step for the guard)
    cuts: list[int] | None = None  # each row's own, where the verifier packs rows (`best_cuts`)

    def cut(self, trees: list[DraftTree]) -> list[DraftTree]:
        """The trees as this step verifies them."""
        if self.cuts is not None:
            return [t.prefix(n) for t, n in zip(trees, self.cuts, strict=True)]
        return trees if self.nodes is None else [t.prefix(self.nodes) for t in trees]

    @property
    def plain(self) -> bool:
        """No draft was verified: the kind of step the guard compares drafting against."""
        return self.kind in ("plain", "off", "undrafted")


@dataclass
class SizingPolicy:
    cost: CostModel | None = None   # None: fixed sizing, every tree is verified whole
    guard: bool = True
    idle: int = 0                   # consecutive steps in which no draft paid
    probe_every: int = PROBE_EVERY
    off: int = 0                    # consecutive steps the guard kept drafting off
    trial_every: int = PROBE_EVERY
    trial: bool = False             # this step is the guard's drafted trial
    trial_steps: int = 0            # a trial's steps so far, and their time (units) and tokens a row
    trial_units: float = 0.0
    trial_tokens: float = 0.0
    since_plain: int = 0            # steps since the guard's last plain step
    landed: bool = False            # the last step was drafted and its drafts landed (2+ tokens a row)
    # (batch class or POOLED, drafted) -> time per emitted token, in plain steps of that batch size
    speeds: dict[tuple[int | None, bool], _Speed] = field(default_factory=dict)
    # A batch's cut picks the nodes that look likeliest across its rows, so its expected tokens run high
    # (measured, 40 mixed prompts at 16 rows: 1,217 expected, 1,039 accepted): drafted batch steps' accepted
    # over expected draft tokens, running sums (then exponential ones), scale what a batch's cut expects.
    batch_expected: float = 0.0
    batch_accepted: float = 0.0
    batch_steps: int = 0
    _expected: float = 0.0          # what this step's cut expects (draft tokens, all rows)

    @staticmethod
    def batch_class(rows: int) -> int:
        return int(math.log2(max(rows, 1)))

    def _unit(self, rows: int) -> float:
        """A plain step's cost for `rows` rows on the curve (1 without one): the unit speeds are kept in."""
        return self.cost(rows, rows) if self.cost is not None else 1.0

    def _judged(self, rows: int) -> tuple[_Speed, _Speed] | None:
        """(drafted, plain) speeds the verdict for this batch size rests on: its class's own once both
        have GUARD_MIN steps, else the pooled ones once those have (None: too few steps yet)."""
        for key in (self.batch_class(rows), POOLED):
            drafted, plain = self.speeds.get((key, True)), self.speeds.get((key, False))
            if drafted and plain and min(drafted.steps, plain.steps) >= GUARD_MIN:
                return drafted, plain
        return None

    def advantage(self, rows: int) -> float | None:
        """Measured plain / drafted time per emitted token for this batch size (None: too few steps)."""
        judged = self._judged(rows)
        if judged is None:
            return None
        drafted, plain = judged
        return plain.per_token / max(drafted.per_token, 1e-12)

    def drafting_loses(self, rows: int) -> bool:
        """The guard's verdict for this batch size: drafted steps measured slower than plain ones."""
        adv = self.advantage(rows)
        return adv is not None and adv < 1

    def plan(self, rows: int, copy_run: int = 0) -> Choice | None:
        """Before drafting: a plain step (the guard's own, or drafting switched off), else None: draft.
        `copy_run`: the longest run of tokens a row has just copied from its context (predictable text)."""
        self.trial = False
        if not self.guard:
            return None
        if self.trial_steps:  # a trial under way goes on: judged on its steps together
            self.trial = True
            return None
        adv = self.advantage(rows)
        every = PLAIN_EVERY_COLD if adv is None else PLAIN_EVERY_AHEAD if adv > AHEAD else PLAIN_EVERY
        self.since_plain += 1
        if self.since_plain >= (2 * every if copy_run >= MIN_RUN or self.landed else every):
            self.since_plain = 0
            return Choice(0, "plain")
        if adv is None or adv >= 1:
            self.off = 0  # drafting is on: a joining request's early trial (new_text) is not owed later
        else:
            self.off += 1
            copying = copy_run >= COPY_TRIAL and self.off >= max(PROBE_EVERY, self.trial_every // 4)
            if self.off < self.trial_every and not copying:
                return Choice(0, "off")
            self.off, self.trial = 0, True  # a drafted trial: the text may have become predictable
        return None

    def new_text(self, rows: int = 1) -> None:
        """A drafting request joined a batch of now `rows` rows: its text may be predictable where the last one's
        was not (a code edit after chat), so with drafting off the next step is a trial instead of waiting up to
        PROBE_MAX steps (measured: a copy-heavy edit after chat prompts decoded its first 14 steps plain). Not
        where it is one row of many (more than JOIN_TRIAL): there it changes little what a step's drafts are worth,
        a row that copies still calls a trial soon (COPY_TRIAL), and as many trials as joins cost a 16-row batch
        of 40 mixed prompts 24 trials at 1.4x a plain step each."""
        if rows <= JOIN_TRIAL:
            self.off = max(self.off, self.trial_every)

    def choose(self, trees: list[DraftTree], tail: int = 0, counted: list[int] | None = None,
               packed: bool = False) -> Choice:
        """The cut for this step's trees (one per row; root-only where a row drafts nothing); `tail`: prompt
        tokens the same forward prefills (a draft costs only its share on top of them); `counted`: the rows
        whose expected tokens the cut is judged by (None: all; see `best_cut`); `packed`: the forward costs
        its rows' real tokens (verify.py), so rows are cut each on its own where all are counted."""
        self._expected = 0.0
        if self.cost is None:
            return Choice(None, "fixed")
        if not any(len(t) > 1 for t in trees):
            return Choice(0, "sized")
        scale = self.realised if len(trees) > 1 else 1.0
        cuts = best_cuts(trees, self.cost, tail, scale) if packed and counted is None and len(trees) > 1 else None
        n = max(cuts) if cuts is not None else best_cut(trees, self.cost, tail, counted, packed, scale)
        if self.trial and not n:  # a trial that verifies nothing could never show that drafting pays again
            cuts, n = None, forced_cut(trees, self.cost, tail, packed)
        if n:
            self.idle = 0
            choice = Choice(n, "sized", cuts)
            self._expected = sum(sum(t.expected[1:len(c)]) for t, c in zip(trees, choice.cut(trees), strict=True)
                                 if t.expected)
            return choice
        self.idle += 1
        if self.idle >= self.probe_every:  # acceptance is only learned from verified nodes
            self.idle = 0
            return Choice(forced_cut(trees, self.cost, tail, packed), "probe")
        return Choice(0, "sized")

    def least(self, rows: int, nodes: int) -> float:
        """Expected tokens below which a draft node cannot pay in a packed batch of `rows` rows verifying up to
        `nodes` draft nodes: a token is worth a plain step's cost over its rows, a node costs at least the curve's
        cheapest rise per token, and the sizing gains a node only where it brings more than that (`best_cuts`;
        WORTH_SLACK halves it, for rises that pay only over many nodes). Drafters stop building there: at 16 rows a
        draft token cost about what a row's token does (traced), and 12-node trees cost ~0.5 ms a row of Python
        for cuts of 1-3 nodes. 0 (build whole trees) for one row, without a curve, or where this step may verify
        nodes that do not pay (a guard trial, a probe)."""
        if self.cost is None or rows < 2 or self.trial or self.idle + 1 >= self.probe_every:
            return 0.0
        plain = self.cost(rows, rows)
        cheapest = min((self.cost(rows + j, rows) - plain) / j for j in range(1, max(nodes, 1) + 1))
        return WORTH_SLACK * cheapest * rows / plain

    @property
    def realised(self) -> float:
        """A batch's accepted over expected draft tokens, at most 1 (the calibration is trusted where it is
        pessimistic); 1 until drafted batch steps have expected 8 tokens."""
        if self.batch_expected * min(self.batch_steps, 8) < 8:
            return 1.0
        return min(1.0, self.batch_accepted / self.batch_expected)

    def observe(self, choice: Choice, rows: int, emitted: int, accepted_draft: int, seconds: float,
                tokens: int | None = None) -> None:
        """One step's outcome: `emitted` tokens over `rows` rows in `seconds` (draft + forward + accept);
        `tokens`: the forward's query tokens (None: every row padded to the largest cut)."""
        if choice.kind == "sized" and rows > 1 and self._expected > 0:
            self.batch_steps += 1
            weight = max(self.cost.smoothing if self.cost is not None else 0.05, 1.0 / self.batch_steps)
            self.batch_expected += weight * (self._expected - self.batch_expected)
            self.batch_accepted += weight * (accepted_draft - self.batch_accepted)
        if choice.kind == "probe":
            # The wait doubles unless the probe paid for its own forward on the curve (a lone request: one
            # accepted token on a steep curve, a batch: most rows'): a batch's probe where one row in eight
            # accepts a token would otherwise come back every PROBE_EVERY steps, each a loss.
            tokens = rows * (1 + choice.nodes) if tokens is None else tokens
            paid = (rows + accepted_draft) / max(rows, 1) >= over_plain(self.cost, tokens, rows)
            self.probe_every = PROBE_EVERY if paid else min(2 * self.probe_every, PROBE_MAX)
            return  # probes are small by design: not what the guard judges
        if self.guard and seconds > 0 and rows:
            drafted = not choice.plain  # the drafting engine's steps, paid-off or not
            self.landed = drafted and emitted >= 2 * rows  # a row's worth of drafts landed
            judged = self._judged(rows) if self.trial else None   # before this step is added
            units, per_row = seconds / self._unit(rows), emitted / rows
            for key in (self.batch_class(rows), POOLED):
                self.speeds.setdefault((key, drafted), _Speed()).add(units, per_row)
            if self.trial and choice.nodes == 0:  # nothing was drafted to try: try again next step
                if not self.trial_steps:
                    self.off = self.trial_every
            elif self.trial:
                self.trial_steps += 1
                self.trial_units += units
                self.trial_tokens += per_row
                per_token = self.trial_units / max(self.trial_tokens, 1e-9)
                plain = judged[1].per_token if judged else 0.0
                if drafted and judged and per_token * (1 - GUARD_MARGIN) < plain:
                    # The text became predictable (e.g. a copy after chat): drafting wins now, back on at
                    # once. The trial is one sample (its time per token, as a one-token step), not GUARD_MIN
                    # of them nor its tokens' worth: the next drafted steps are averaged with it equally, so
                    # a lucky trial in a losing stretch is outvoted at once.
                    for key in (self.batch_class(rows), POOLED):
                        self.speeds[(key, True)] = _Speed(steps=1, seconds=per_token, tokens=1.0)
                    self._end_trial(PROBE_EVERY)
                elif judged and self.trial_steps < TRIAL_STEPS and \
                        self.trial_units / self.trial_steps <= TRIAL_REACH * plain:
                    pass  # undecided: the trial's next step is drafted too
                else:  # still losing: wait twice as long for the next trial
                    self._end_trial(min(2 * self.trial_every, PROBE_MAX))

    def _end_trial(self, every: int) -> None:
        """A trial was decided: the next comes `every` steps on, judged from scratch."""
        self.trial_every, self.trial_steps, self.trial_units, self.trial_tokens = every, 0, 0.0, 0.0


def forced_cut(trees: list[DraftTree], cost: CostModel, tail: int = 0, packed: bool = False) -> int:
    """Draft nodes per row for a step that verifies a draft although no cut pays (a probe, a guard trial): up
    to PROBE_NODES, as many as cost this batch, over its plain step, no more than PROBE_NODES cost a lone
    request (at least one). Padded, every row pays for the largest cut, so a fixed probe is not small in a batch:
    measured, 4 nodes a row made an 8-row step cost 2.6x its plain step (Zen 3, fp32), for half a token a row."""
    largest = max(len(t) for t in trees) - 1
    rows, limit = len(trees), over_plain(cost, 1 + PROBE_NODES, 1)
    n = 1
    while n < min(PROBE_NODES, largest) and over_plain(cost, step_tokens(trees, n + 1, packed), rows, tail) <= limit:
        n += 1
    return n


def over_plain(cost: CostModel, tokens: int, rows: int, tail: int = 0) -> float:
    """A forward over `tokens` query tokens in `rows` rows (and `tail`), in plain steps of those rows (on the curve)."""
    return cost(tokens + tail, rows) / cost(rows + tail, rows)


def step_tokens(trees: list[DraftTree], nodes: int, packed: bool = False) -> int:
    """Query tokens of a forward verifying `nodes` draft nodes a row: every row padded to that many, or, where
    the verifier packs rows, each row's own (its tree may be smaller)."""
    if not packed:
        return len(trees) * (1 + nodes)
    return sum(min(len(t), 1 + nodes) for t in trees)


def best_cut(trees: list[DraftTree], cost: CostModel, tail: int = 0, counted: list[int] | None = None,
             packed: bool = False, scale: float = 1.0) -> int:
    """Draft nodes per row (a prefix of every best-first tree) with the most expected tokens per second;
    `tail`: query tokens the forward carries anyway (a lone row's prompt tail). `counted`: rows whose least
    expected tokens are credited to every row (a static batch ends with its last row: another row's accepted
    drafts only let it leave sooner, while every row pays for the cut); `packed`: see `step_tokens`; `scale`:
    what an expected token is worth (`SizingPolicy.realised`)."""
    rows = len(trees)
    largest = max(len(t) for t in trees) - 1
    gains = [[scale * e for e in t.expected[1:]] if t.expected else [0.0] * (len(t) - 1) for t in trees]
    judged = None if counted is None else [gains[i] for i in counted]
    totals = [0.0] * len(judged or ())
    best_n, best_rate = 0, rows / cost(rows + tail, rows)
    expected = float(rows)
    for n in range(1, largest + 1):
        if judged is None:
            expected += sum(g[n - 1] for g in gains if len(g) >= n)
        else:
            totals = [total + (g[n - 1] if len(g) >= n else 0.0) for total, g in zip(totals, judged, strict=True)]
            expected = rows * (1 + min(totals))
        rate = expected / cost(step_tokens(trees, n, packed) + tail, rows)
        if rate > best_rate:
            best_n, best_rate = n, rate
    return best_n


def best_cuts(trees: list[DraftTree], cost: CostModel, tail: int = 0, scale: float = 1.0) -> list[int]:
    """Draft nodes for each row on its own, for a forward that costs its rows' real tokens (packed): the k
    nodes likeliest to be accepted over all rows, k the one with the most expected tokens per second. A
    node counts at the least expected on its path so far in its row's best-first order, so the chosen nodes
    are a prefix of every row's tree. `scale`: as in `best_cut`."""
    rows, ranked = len(trees), []
    for r, tree in enumerate(trees):
        floor = 1.0
        for i, e in enumerate(tree.expected[1:] if tree.expected else [0.0] * (len(tree) - 1), start=1):
            floor = min(floor, scale * e)
            ranked.append((-floor, r, i))
    ranked.sort()  # likeliest first; within a row, in its order
    best_k, best_rate, expected = 0, rows / cost(rows + tail, rows), float(rows)
    for k, (gain, _, _) in enumerate(ranked, start=1):
        expected -= gain
        rate = expected / cost(rows + k + tail, rows)
        if rate > best_rate:
            best_k, best_rate = k, rate
    cuts = [0] * rows
    for _, r, i in ranked[:best_k]:
        cuts[r] = max(cuts[r], i)
    return cuts
