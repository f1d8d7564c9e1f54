"""One draft tree from several sources, grown best-first by estimated path probability.

A source answers, for a position in the tree, "which tokens may come next, and how likely".
It does so through a cursor: `cursor.next(limit)` returns up to `limit` (token, probability)
pairs and `cursor.child(token)` the cursor one token further (None where the source knows
nothing there). Each source comes with a `trust` function that maps its own probability to
the probability that the model accepts the token (the drafter learns one per source online).
The builder combines what the sources live at a node say about a token by kind of evidence:
within a group of correlated sources (copies of the same text) the best trusted probability
counts once; independent groups combine by noisy-OR (a token is missed only if every kind of
evidence is wrong). Tokens proposed at one node exclude each other, so one that claims more than
its better siblings leave is believed at what that share is measured to be worth. It merges identical
continuations and pops the most probable path first, so the tree holds the `budget.nodes` best paths
whatever source proposed them.

Why noisy-OR and not a weighted average: an average divides a confident source by the number
of live sources at every level, so a long copy chain that only the prompt knows decays
geometrically while an always-live source's guesses overtake it (measured: 5.3 instead of 8.5
accepted tokens per step on a copy task).
"""
from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..tree import DraftTree


class Cursor(Protocol):
    def next(self, limit: int) -> list[tuple[int, float]]: ...
    def child(self, token: int) -> Cursor | None: ...


@dataclass(frozen=True)
class Budget:
    """Draft tree size: draft nodes (root excluded) and branch depth."""
    nodes: int
    depth: int


@dataclass
class ScoredTree:
    tree: DraftTree
    scores: list[float]                 # estimated probability that each node's path is accepted (root: 1)
    proposals: list[dict[str, float]] = field(default_factory=list)  # per node: proposing source -> its own probability
    # per node: the share its better siblings left it, where it claimed more (None: it did not)
    shares: list[float | None] = field(default_factory=list)


Trust = Callable[[float], float]  # a source's probability -> P(model accepts the token | parent accepted)
SHARE_MIN = 0.02  # the least share a sibling is judged at (see _push)


def build_tree(root: int, cursors: dict[str, tuple[Trust, Cursor | None]], budget: Budget,
               groups: dict[str, str] | None = None, siblings: Trust | None = None,
               worth: Callable[[float], bool] | None = None) -> ScoredTree:
    """Best-first tree under `budget`; `cursors` maps source name -> (trust, cursor at the root).

    `groups` names each source's kind of evidence (default: its own). Sources of one group are
    correlated (all copy the same text): their best trusted probability counts, once. Groups
    are independent: combined by noisy-OR. `siblings` maps the share of probability a token's better
    siblings leave it (where it claims more) to P(accepted | parent accepted); default: that share.
    `worth`: called on each node's score in best-first order; the tree stops before the first it refuses."""
    groups = groups or {}
    tokens, parents, scores, sources, shares = [root], [-1], [1.0], [{}], [None]
    if budget.nodes <= 0 or budget.depth <= 0:
        return ScoredTree(DraftTree(tokens, parents), scores, sources, shares)
    depths = [0]
    frontier: list = []
    tick = itertools.count()  # tie-break: earlier-pushed first; never compare cursors
    _push(frontier, tick, 0, 1.0, cursors, budget.nodes, groups, siblings)
    while frontier and len(tokens) <= budget.nodes:
        neg_score, _, parent, token, proposers, live, share = heapq.heappop(frontier)
        if worth is not None and not worth(-neg_score):
            break
        tokens.append(token)
        parents.append(parent)
        scores.append(-neg_score)
        sources.append(proposers)
        shares.append(share)
        depths.append(depths[parent] + 1)
        if depths[-1] < budget.depth:
            # Every live source follows the token, proposer or not: a source may know what comes next. Only a
            # popped node's cursors are moved on: most pushed candidates are never popped.
            children = {name: (trust, cursor.child(token)) for name, (trust, cursor) in live.items()}
            _push(frontier, tick, len(tokens) - 1, -neg_score, children, budget.nodes + 1 - len(tokens), groups,
                  siblings)
    return ScoredTree(DraftTree(tokens, parents), scores, sources, shares)


def _push(frontier: list, tick, parent: int, score: float, cursors: dict, limit: int, groups: dict,
          siblings: Trust | None) -> None:
    """Push the `limit` most probable continuations of one node."""
    if limit <= 0:
        return
    live = {name: (trust, c) for name, (trust, c) in cursors.items() if c is not None}
    # token -> ({group: best trusted probability}, {proposer: its own probability})
    merged: dict[int, tuple[dict, dict]] = {}
    for name, (trust, cursor) in live.items():
        group = groups.get(name, name)
        for token, p in cursor.next(limit):
            by_group, proposers = merged.setdefault(token, ({}, {}))
            by_group[group] = max(by_group.get(group, 0.0), min(max(trust(p), 0.0), 1.0))
            proposers[name] = p
    # A token is missed only if every independent kind of evidence is wrong.
    candidates = [(1.0 - math.prod(1.0 - q for q in by_group.values()), token, proposers)
                  for token, (by_group, proposers) in merged.items()]
    # Siblings exclude each other (one token comes next), so a candidate claiming more than its better
    # siblings leave is believed at what that share is measured to be worth (`siblings`; cold: the share,
    # at least SHARE_MIN, so that what a share of nothing is worth can still be learned).
    left = 1.0
    for p, token, proposers in heapq.nlargest(limit, candidates, key=lambda c: c[0]):
        share = None
        if p > left:
            share = max(left, SHARE_MIN)
            p = min(p, siblings(share) if siblings is not None else share)
        if p <= 0:
            break
        left = max(0.0, left - p)
        heapq.heappush(frontier, (-score * p, next(tick), parent, token, proposers, live, share))
