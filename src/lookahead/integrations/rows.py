"""Drafting for an engine that owns the batch and verifies one chain per row (vLLM).

The engine calls `RowProposer.propose(rows)` once per step with, for every row of its batch, the
row's whole token sequence and how many tokens it sampled in the step just run. No request ids
are given, so a request's drafting state is found again from its own tokens: the sequence we saw
last time, grown by exactly the tokens just sampled (rows may move between steps). A request
whose row is gone is dropped with its state (its trie scope and n-gram index); what it taught the
shared trie and the trust curves stays.

Each step, per row: the drafting package's `Drafter` builds the fused best-first tree (request
trie, shared history trie, prompt n-grams; trust per source), we keep its best chain (the path
with the most expected accepted tokens), cut it to the length that pays on the learned step-cost
line (zero when nothing pays, with the drafter's occasional probes), and `Drafter.narrow` it so
that the feedback judges only what the engine verified. The feedback comes one call later: the
tokens a row sampled are the accepted draft prefix plus one token of the model's own.

Nothing here imports vLLM: the adapter in `vllm.py` only converts its arguments.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..decoding.cost import CostModel
from ..decoding.sizing import PROBE_EVERY, PROBE_NODES, best_cut
from ..drafting.drafter import Drafter
from ..drafting.fusion import Budget
from ..drafting.state import DraftState
from ..drafting.trie import TokenTrie
from ..tree import DraftTree

# The recycle table needs the verify logits, which vLLM keeps to itself.
SOURCES = ("prompt", "history", "ngram")
# Measured with tracemalloc on TokenTrie.insert (random text, vocabularies 50..50k): 267-272 bytes per
# node (the node, its slot in the parent's dict, its own dict); rounded up for dict growth slack.
NODE_BYTES = 320


@dataclass
class Row:
    """One row of the engine's batch: its whole sequence so far, and the tokens sampled for it last step."""
    tokens: np.ndarray  # prompt + output, 1-D int array (a view is fine: it is copied when kept)
    sampled: int        # 0: the row is not decoding (e.g. a prefill chunk): nothing to draft


class StepCost:
    """Step time as a line in the number of tokens the engine ran, fitted online per batch size.

    The engine's step costs about a + b * tokens; what matters for sizing is b / a, the price of one
    more verified token relative to the fixed cost of a step. The line is not the same at every batch
    size (a few tokens read the weights once whatever their number; dozens start to cost compute), so
    it is fitted on the steps that ran as many rows as the current one, falling back to all steps,
    then to `prior`, while those do not spread enough to fit."""

    def __init__(self, prior: float = 0.02, window: int = 512, min_samples: int = 16) -> None:
        self.prior, self.window, self.min_samples = prior, window, min_samples
        self.samples: deque[tuple[float, float]] = deque(maxlen=window)
        self.by_rows: dict[int, deque[tuple[float, float]]] = {}

    def observe(self, tokens: int, seconds: float, rows: int = 1) -> None:
        if tokens > 0 and seconds > 0:
            self.samples.append((float(tokens), seconds))
            self.by_rows.setdefault(rows, deque(maxlen=self.window)).append((float(tokens), seconds))

    def ratio(self, rows: int | None = None) -> float:
        """b / a: cost of one more token, in steps, for a batch of `rows` rows (None: all steps)."""
        for samples in (self.by_rows.get(rows, ()), self.samples):
            fitted = self._fit(samples)
            if fitted is not None:
                return fitted
        return self.prior

    def _fit(self, samples) -> float | None:
        if len(samples) < self.min_samples:
            return None
        x, y = np.array(samples).T
        if x.std() < 0.5:  # no spread in step sizes: the slope is not identifiable
            return None
        b = max(float(np.cov(x, y, bias=True)[0, 1] / x.var()), 0.0)
        a = float(y.mean() - b * x.mean())
        return b / a if a > 0 else None

    def model(self, rows: int | None = None) -> CostModel:
        """t(k) relative to t(1), for the sizing policy's `best_cut`."""
        r = self.ratio(rows)
        return CostModel([1, 2], [1.0 + r, 1.0 + 2 * r])


@dataclass
class _Request:
    drafter: Drafter
    seen: np.ndarray              # the row's tokens at the last call
    chain: DraftTree | None = None  # the chain proposed at the last call, awaiting its verdict


class RowProposer:
    """Per-row draft chains from the fused drafting state; see the module docstring."""

    def __init__(self, max_draft: int, max_nodes: int = 12, max_match: int = 4, capacity: int = 200_000,
                 max_bytes: int | None = None, sizing: str = "measured",
                 sources: tuple[str, ...] = SOURCES, cost_prior: float = 0.02) -> None:
        if max_draft < 1:
            raise ValueError("max_draft must be >= 1")
        if sizing not in ("measured", "fixed"):
            raise ValueError("sizing must be 'measured' or 'fixed'")
        if "recycle" in sources:
            raise ValueError("the recycle source needs the verify logits, which the engine does not give")
        if max_bytes is not None:
            capacity = min(capacity, max(1, max_bytes // NODE_BYTES))
        self.max_draft, self.sizing = max_draft, sizing
        # Room for siblings: the best chain is picked from a tree, not grown alone.
        self.budget = Budget(max(max_nodes, max_draft), max_draft)
        trie = TokenTrie(max_match=max_match, window=max_match + max_draft, capacity=capacity)
        # The drafter returns the whole best-first tree; the chain is sized here.
        self.state = DraftState(trie, None, tuple(sources))
        self.idle = 0  # consecutive rows for which no chain paid (probe after PROBE_EVERY)
        self.cost = StepCost(prior=cost_prior)
        self.requests: list[_Request] = []  # by row at the last call
        self.steps = self.rows_drafted = self.draft_tokens = self.accepted_tokens = 0
        self._last: tuple[float, int] | None = None  # (end of the last call, tokens its step will run)

    # -- one engine step ------------------------------------------------------------------
    def propose(self, rows: Sequence[Row]) -> list[list[int]]:
        start = time.perf_counter()
        previous, claimed = self.requests, set()
        found: list[_Request | None] = [self._find(i, row, previous, claimed) for i, row in enumerate(rows)]
        steady = all(r is not None or row.sampled == 0 for r, row in zip(found, rows, strict=True)) and \
            len(claimed) == len(previous) and all(row.sampled for row in rows)
        decoding = sum(1 for row in rows if row.sampled)
        if steady and self._last is not None:  # same rows as the step just timed: a clean sample
            self.cost.observe(self._last[1], start - self._last[0], decoding)
        cost = self.cost.model(decoding)
        chains, current, scheduled = [], [], 0
        for row, request in zip(rows, found, strict=True):
            if row.sampled == 0:  # not decoding yet (or paused): keep what it has, draft nothing
                current.append(request)
                chains.append([])
                continue
            request = self._feedback(row, request)
            chain = self._chain(request, row, cost, decoding)
            current.append(request)
            chains.append(chain)
            scheduled += 1 + len(chain)
        self.requests = [r for r in current if r is not None]  # the rest left the batch: dropped
        self.steps += 1
        self._last = (time.perf_counter(), scheduled)
        return chains

    def _find(self, i: int, row: Row, previous: list[_Request], claimed: set[int]) -> _Request | None:
        """The request this row continues: its last-seen tokens, grown by exactly what was sampled."""
        def fits(request: _Request) -> bool:
            seen = request.seen
            return (id(request) not in claimed and len(row.tokens) == len(seen) + row.sampled
                    and np.array_equal(row.tokens[:len(seen)], seen))
        # Rows usually keep their index; the scan covers rows that moved.
        candidates = ([previous[i]] if i < len(previous) else []) + previous
        for request in candidates:
            if fits(request):
                claimed.add(id(request))
                return request
        return None

    def _feedback(self, row: Row, request: _Request | None) -> _Request:
        """Feed the newly sampled tokens (and the verdict on the last chain) to the drafter."""
        n = len(row.tokens)
        fresh = row.tokens[n - row.sampled:].tolist()
        if request is None:  # a new request: its prompt is everything before the first sampled token
            request = _Request(self.state.drafter(row.tokens[:n - row.sampled].tolist()), row.tokens.copy())
            request.drafter.observe(fresh)
            return request
        chain = request.chain
        if chain is not None:
            # Sampled = the accepted draft prefix + one token of the model's own.
            accepted = 0
            while accepted < min(len(chain) - 1, len(fresh) - 1) and chain.tokens[accepted + 1] == fresh[accepted]:
                accepted += 1
            self.accepted_tokens += accepted
            request.drafter.observe(fresh, tree=chain, nodes=list(range(accepted + 1)))
        else:
            request.drafter.observe(fresh)
        request.seen, request.chain = row.tokens.copy(), None
        return request

    def _chain(self, request: _Request, row: Row, cost: CostModel, rows: int) -> list[int]:
        drafter, state = request.drafter, self.state
        window = state.trie.window
        tree = drafter.propose(row.tokens[-window:].tolist(), self.budget)
        path = _best_path(tree, tree.expected)
        if self.sizing == "fixed":
            n = len(path)
        else:
            chain = DraftTree.chain(tree.tokens[0], [tree.tokens[i] for i in path])
            chain.expected = [1.0] + [tree.expected[i] for i in path]
            n = best_cut([chain] * rows, cost)  # as if every decoding row drafted like this one
            # Acceptance is only learned from verified nodes: probe now and then when nothing pays.
            self.idle = self.idle + 1 if n == 0 else 0
            if path and self.idle >= PROBE_EVERY:
                n, self.idle = min(PROBE_NODES, len(path)), 0
        if n == 0:
            return []
        request.chain = drafter.narrow([0, *path[:n]])
        self.rows_drafted += 1
        self.draft_tokens += n
        return request.chain.tokens[1:]

    # -- what it learned, as counters ----------------------------------------------------
    @property
    def trie_nodes(self) -> int:
        return len(self.state.trie)

    def metrics(self) -> dict[str, float]:
        """Counters in the spirit of /metrics: steps, drafts, tokens proposed/accepted, per source."""
        out = {"steps": self.steps, "rows_drafted": self.rows_drafted, "draft_tokens": self.draft_tokens,
               "accepted_tokens": self.accepted_tokens, "live_requests": len(self.requests),
               "trie_nodes": self.trie_nodes, "trie_bytes_estimate": self.trie_nodes * NODE_BYTES,
               "trie_capacity_nodes": self.state.trie.capacity, "step_cost_ratio": self.cost.ratio(len(self.requests))}
        for name, stats in self.state.stats.items():
            out[f"source_proposed{{source={name}}}"] = stats.proposed
            out[f"source_accepted{{source={name}}}"] = stats.accepted
        return out

    def prometheus(self, prefix: str = "lookahead_vllm_") -> str:
        """The counters in Prometheus text format (e.g. for node-exporter's textfile collector)."""
        lines = []
        for key, value in self.metrics().items():
            name, _, label = key.partition("{")
            label = "{" + label.replace("=", '="').replace("}", '"}') if label else ""
            lines.append(f"{prefix}{name}{label} {value:g}")
        return "\n".join(lines) + "\n"


def _best_path(tree: DraftTree, gains: list[float]) -> list[int]:
    """Root-to-leaf node path (root excluded) with the largest sum of gains (expected accepted tokens)."""
    best = list(gains)
    for node in range(len(tree) - 1, 0, -1):  # children come after their parent
        kids = tree.children[node]
        if kids:
            best[node] += max(best[k] for k in kids)
    path, node = [], 0
    while tree.children[node]:
        node = max(tree.children[node], key=lambda k: best[k])
        path.append(node)
    return path
