"""The fused drafter: one request's view of the shared `DraftState`, every source in one best-first tree.

Two calls, the whole contract with decoding: `propose(context, budget, least) -> DraftTree` (the whole
best-first tree within the budget, each node with its calibrated acceptance probability in
`tree.expected`, so the sizing policy can cut it; `least`, optional: the tree ends where nodes are
expected below it, as no such node could pay) and `observe(tokens, tree, logits, nodes)` (the
verified tree, possibly cut, its logits and the accepted node indices). One read-only hint tells the
sizing policy's guard that the text is predictable without building a tree: `copy_run`.
"""
from __future__ import annotations

import torch

from ..tree import DraftTree
from .fusion import Budget, ScoredTree, build_tree
from .ngram import NgramIndex
from .state import DraftState, SourceStats

# Kinds of evidence: the tries and prompt lookup all copy text seen before (they agree because
# they read the same text, not because the token is likelier); the recycle table is the model's
# own earlier prediction. See fusion.build_tree.
GROUPS = {"prompt": "text", "history": "text", "ngram": "text", "recycle": "model"}


class Drafter:
    def __init__(self, state: DraftState, prompt: list[int]) -> None:
        self.state = state
        self.session = state.trie.session(prompt) if {"prompt", "history"} & set(state.sources) else None
        self.ngram = NgramIndex() if "ngram" in state.sources else None
        if self.ngram:
            self.ngram.extend(prompt, output=False)
        self.last: ScoredTree | None = None
        self._fresh = False  # `last` is this step's proposal, not yet judged
        self.stats = {name: SourceStats() for name in state.sources}  # this request's share of state.stats

    @property
    def copy_run(self) -> int:
        """Tokens the output has just copied in a row from its context (0: not copying)."""
        return self.ngram.copy_run if self.ngram is not None else 0

    def propose(self, context: list[int], budget: Budget, least: float = 0.0) -> DraftTree:
        """The best-first tree within `budget`; `least`: it ends before the first node expected (the least expected
        on its way in best-first order, as the sizing policy ranks it) below that many tokens."""
        state, trust = self.state, self.state.trust
        worth = None
        if least > 0:
            floor = 1.0

            def worth(score: float) -> bool:
                nonlocal floor
                floor = min(floor, state.calibration(score))
                return floor >= least
        with state.trie.lock:
            cursors = {}
            if self.session:
                for name, cursor in self.session.cursors(context).items():
                    if name in trust:
                        cursors[name] = (trust[name], cursor)
            if state.recycle is not None and "recycle" in trust:
                cursors["recycle"] = (trust["recycle"], state.recycle.cursor(context[-1]))
            if self.ngram:
                cursors["ngram"] = (trust["ngram"], self.ngram.cursor())
            scored = build_tree(context[-1], cursors, budget, GROUPS, state.siblings, worth)
        self.last, self._fresh = scored, True
        tree = scored.tree
        tree.expected = [1.0] + [state.calibration(s) for s in scored.scores[1:]]
        return tree

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
        self.last = ScoredTree(tree, [last.scores[n] for n in nodes], [last.proposals[n] for n in nodes],
                               [last.shares[n] for n in nodes])
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
        last, fresh, self._fresh = self.last, self._fresh, False
        # The verified tree is the proposed one or a prefix of it (the sizing policy's cut).
        if last is None or nodes is None or tree is None or len(tree) > len(last.tree) \
                or tree.tokens != last.tree.tokens[:len(tree)]:
            return
        # The nodes the cut left out are judged too, where this step's tokens tell: else the calibration sees only
        # what the sizing chose to verify, and nodes it expects too little of are never verified to show it
        # (measured: nodes cut at 0.004-0.007 expected were accepted 0.04 of the time). Once per proposal: a later
        # plain step's root-only tree is not one.
        if fresh:
            state.calibration.observe(*_left_out(last, len(tree), tokens))
        if len(tree) < 2:
            return
        kept = set(nodes)  # starts with the root
        flags = [i in kept for i in range(1, len(tree))]
        state.calibration.observe(last.scores[1:len(tree)], flags)
        shares, judged = [], []
        for i, proposers in enumerate(last.proposals[1:len(tree)], start=1):
            reached, accepted = tree.parents[i] in kept, flags[i - 1]
            if reached and last.shares[i] is not None:
                shares.append(last.shares[i])
                judged.append(accepted)
            for name, p in proposers.items():
                if reached:
                    state.trust[name].observe([p], [accepted])
                for stats in (state.stats[name], self.stats[name]):
                    stats.proposed += 1
                    stats.accepted += accepted
                    stats.reached += reached
        state.siblings.observe(shares, judged)


def _left_out(last: ScoredTree, verified: int, tokens: list[int]) -> tuple[list[float], list[bool]]:
    """The scores of the proposed nodes the cut left out (from `verified` on) whose fate this step's tokens tell,
    and whether each would have been accepted: its path is the step's tokens (the accepted drafts, then the
    model's own next token). A node below one that matches the last token is not known."""
    tree, scores, outcomes = last.tree, [], []
    match: list[bool | None] = [True] + [None] * (len(tree) - 1)  # the path is the step's first tokens (None: unknown)
    for j in range(1, len(tree)):
        p, d = tree.parents[j], tree.depths[j]
        if match[p] is None or (match[p] and d > len(tokens)):
            continue  # below what the step's tokens tell
        match[j] = match[p] and tokens[d - 1] == tree.tokens[j]
        if j >= verified:
            scores.append(last.scores[j])
            outcomes.append(match[j])
    return scores, outcomes
