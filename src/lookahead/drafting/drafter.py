"""The fused drafter: every draft source in one best-first tree, sized by measured cost.

`DraftState` is what lives across requests (shared trie, recycle table, calibration, per-source
statistics, cost curve); `Drafter` is one request's view of it, with the two calls the decode
loop uses: `propose(context, budget)` and `observe(tokens, tree, logits, nodes)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..tree import DraftTree
from .budget import Calibration, CostModel, best_size
from .fusion import Budget, ScoredTree, build_tree
from .ngram import NgramIndex
from .recycle import RecycleTable
from .trie import TokenTrie

SOURCES = ("prompt", "history", "recycle", "ngram")
# Kinds of evidence: the tries and prompt lookup all copy text seen before (they agree because
# they read the same text, not because the token is likelier); the recycle table is the model's
# own earlier prediction. See fusion.build_tree.
GROUPS = {"prompt": "text", "history": "text", "ngram": "text", "recycle": "model"}
# With measured sizing, when no draft pays: verify PROBE_NODES nodes once after PROBE_EVERY draftless
# steps, so acceptance keeps being learned. A probe that wins nothing doubles the wait (up to
# PROBE_MAX): on text no source can predict, probing would otherwise cost more than it finds.
PROBE_EVERY, PROBE_NODES, PROBE_MAX = 8, 4, 64


@dataclass
class SourceStats:
    proposed: int = 0   # draft nodes this source proposed
    accepted: int = 0   # of those, accepted by the model
    reached: int = 0    # of those, nodes whose parent was accepted (the verifier got to judge them)


@dataclass
class DraftState:
    trie: TokenTrie
    recycle: RecycleTable | None = None
    sources: tuple[str, ...] = SOURCES
    cost: CostModel | None = None  # None: fixed budget, always used in full
    calibration: Calibration = field(default_factory=Calibration)  # fused score -> acceptance (for sizing)
    # Per source: its own probability -> P(accepted | parent accepted). Conditioning on the parent
    # judges one step of a source: a long chain is not blamed for the nodes beyond its first miss.
    trust: dict[str, Calibration] = field(default_factory=dict)
    stats: dict[str, SourceStats] = field(default_factory=dict)
    idle: int = 0  # consecutive steps that drafted nothing
    probe_every: int = PROBE_EVERY  # current wait between probes

    def __post_init__(self) -> None:
        unknown = set(self.sources) - set(SOURCES)
        if unknown or not self.sources:
            raise ValueError(f"unknown draft sources {sorted(unknown)}; choose from {SOURCES}")
        self.stats = {name: self.stats.get(name, SourceStats()) for name in self.sources}
        self.trust = {name: self.trust.get(name, Calibration()) for name in self.sources}

    def drafter(self, prompt: list[int]) -> Drafter:
        return Drafter(self, prompt)


class Drafter:
    def __init__(self, state: DraftState, prompt: list[int]) -> None:
        self.state = state
        self.session = state.trie.session(prompt) if {"prompt", "history"} & set(state.sources) else None
        self.ngram = NgramIndex() if "ngram" in state.sources else None
        if self.ngram:
            self.ngram.extend(prompt)
        self.last: ScoredTree | None = None
        self.probing = False  # the last proposal was a probe
        self.stats = {name: SourceStats() for name in state.sources}  # this request's share of state.stats

    def propose(self, context: list[int], budget: Budget) -> DraftTree:
        state = self.state
        trust = state.trust
        with state.trie.lock:
            cursors = {}
            if self.session:
                for name, (_, cursor) in self.session.cursors(context).items():
                    if name in trust:
                        cursors[name] = (trust[name], cursor)
            if state.recycle is not None and "recycle" in trust:
                cursors["recycle"] = (trust["recycle"], state.recycle.cursor(context[-1]))
            if self.ngram:
                cursors["ngram"] = (trust["ngram"], self.ngram.cursor())
            scored = build_tree(context[-1], cursors, budget, GROUPS)
        if state.cost is not None:
            n = best_size(scored.scores[1:], state.cost, state.calibration)
            # Probe now and then when nothing pays: acceptance is only learned from verified nodes.
            state.idle = state.idle + 1 if n == 0 else 0
            self.probing = state.idle >= state.probe_every
            if self.probing:
                n, state.idle = min(PROBE_NODES, len(scored.tree) - 1), 0
            scored = _prefix(scored, n)
        self.last = scored
        return scored.tree

    def narrow(self, nodes: list[int]) -> DraftTree:
        """Keep only `nodes` of the last proposal (root first, each after its parent) and return that tree.

        For verifiers that check less than the tree, e.g. vLLM, which verifies one chain per row:
        `observe` must then judge only what was verified, or the unverified siblings would be
        learned as rejections."""
        last = self.last
        if last is None or not nodes or nodes[0] != 0:
            raise ValueError("narrow() needs a proposal and node lists starting at the root (0)")
        index = {node: i for i, node in enumerate(nodes)}
        parents = [-1] + [index[last.tree.parents[node]] for node in nodes[1:]]
        tree = DraftTree([last.tree.tokens[n] for n in nodes], parents)
        self.last = ScoredTree(tree, [last.scores[n] for n in nodes], [last.proposals[n] for n in nodes])
        return tree

    def observe(self, tokens: list[int], tree: DraftTree | None = None, logits: torch.Tensor | None = None,
                nodes: list[int] | None = None) -> None:
        """Feed back a step: accepted tokens, and (when given) the verified tree, its logits, accepted nodes."""
        if self.session:
            self.session.observe(tokens)
        if self.ngram:
            self.ngram.extend(tokens)
        state = self.state
        if tree is not None and logits is not None and state.recycle is not None:
            state.recycle.update(tree.tokens, logits)
        if self.last is not None and nodes is not None and self.last.tree is tree:
            kept = set(nodes)  # starts with the root
            if self.probing:
                state.probe_every = PROBE_EVERY if len(nodes) > 1 else min(2 * state.probe_every, PROBE_MAX)
            flags = [i in kept for i in range(1, len(tree))]
            state.calibration.observe(self.last.scores[1:], flags)
            for i, proposers in enumerate(self.last.proposals[1:], start=1):
                reached, accepted = tree.parents[i] in kept, flags[i - 1]
                for name, p in proposers.items():
                    if reached:
                        state.trust[name].observe([p], [accepted])
                    for stats in (state.stats[name], self.stats[name]):
                        stats.proposed += 1
                        stats.accepted += accepted
                        stats.reached += reached


def _prefix(scored: ScoredTree, n: int) -> ScoredTree:
    """The first n draft nodes of a best-first tree (a valid tree: parents come first)."""
    k = n + 1
    tree = DraftTree(scored.tree.tokens[:k], scored.tree.parents[:k])
    return ScoredTree(tree, scored.scores[:k], scored.proposals[:k])
