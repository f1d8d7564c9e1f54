"""The decode core: a ragged batch of requests, one step = draft each row -> one forward -> accept -> commit.

Everything that generates drives this: `Engine.generate` (one request or many, continuously
batched), `Engine.stream` and the server's decode thread. Each step

1. drafts a tree per row (its own `Drafter` over the shared state; root-only where it may not draft),
2. cuts the trees to the size the `SizingPolicy` finds pays for this batch (from the cost curve),
3. runs ONE forward over all rows (`Verifier`: per-row masks, positions, KV),
4. accepts per row with the request's own rule (greedy argmax, or the exact sampling walk),
5. commits the accepted paths to the KV cache, appends tokens through each request's stop rules,
6. feeds the outcome back: drafters (tries, recycle table, trust), sizing policy, cost curve.

Rows join (`add`: prefilled alone, then merged) and leave (`remove`, or when done) between steps.
A request that would run alone leaves the last chunk of its prompt to its first step's forward, which
then prefills it and verifies the first tree at once (one forward fewer, as `model.generate` emits its
first token from the prefill); a second request joining first prefills that tail.
With `prefill_chunk`, a joining prompt is prefilled in chunks between the batch's forwards, each at
most `prefill_chunk` tokens and, while other rows run, costing about their own step times the number of
prefilling requests per running row (read off the cost curve): one long prompt delays the running rows by
about one step's time per step, not by its whole prefill; the shortest waiting prompt goes first.
In a static batch (nothing waits to take a finished row's place: `run` sets `Decoder.static`), the batch ends when
its furthest-behind rows do: the cut is judged by the least they expect, and the sizing policy's guard credits
each step, for every row, with how much closer that end came. Where the verifier packs rows (a forward costs its
real tokens, verify.py), only those rows draft there, and in a running batch each row is cut on its own.
`max_cache_tokens` bounds the batch's KV cache, which is padded to its longest row: a request joins only
while rows x the longest row's final length stays within it (a request alone always runs).
A failure in one row (its prefill, its accept rule) ends that row with `request.error` set and
leaves the others untouched.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..drafting.fusion import Budget
from ..drafting.state import DraftState
from ..request import Request
from ..tree import DraftTree
from .cost import CostModel
from .kv import new_cache
from .sizing import Choice, SizingPolicy
from .verify import Verifier

# Padded KV cache of a batch, in tokens (rows x longest row): ~0.75 GB for SmolLM2-135M in fp32. Its buffers hold up
# to a quarter more positions and row slots (kv.py: room for the coming forwards and joins).
MAX_CACHE_TOKENS = 16384
PREFILL_MIN = 16  # a joining prompt always advances by at least this many tokens per step


@dataclass
class StepReport:
    """What one step did, over all its rows (the server's metrics add these up)."""
    rows: int = 0
    emitted: int = 0          # tokens emitted, bonus included
    draft_nodes: int = 0      # draft nodes verified
    accepted_draft: int = 0   # of those, accepted
    nodes_per_row: int = 0    # the largest row's verified draft (0: plain step)
    tokens: int = 0           # query tokens the forward ran
    forward_s: float = 0.0
    other_s: float = 0.0      # drafting, accepting, committing, feeding back
    choice: Choice | None = None


class _Row:
    __slots__ = ("request", "drafter", "started", "cache", "filled")

    def __init__(self, request: Request, drafter) -> None:
        self.request, self.drafter, self.started = request, drafter, time.perf_counter()
        self.cache, self.filled = None, 0  # while prefilling: the row's own cache, prompt tokens in it


class Decoder:
    """Owns a batch of requests and their KV cache; `step()` advances every row by one forward."""

    def __init__(self, model: torch.nn.Module, drafting: DraftState | None, sizing: SizingPolicy,
                 caps: Budget, cost: CostModel | None = None, prefill_chunk: int | None = None,
                 max_cache_tokens: int | None = MAX_CACHE_TOKENS, copy_depth: int | None = None,
                 row_nodes: int | None = None) -> None:
        self.verifier = Verifier(model)
        self.drafting, self.sizing, self.caps, self.cost = drafting, sizing, caps, cost
        # The deepest a row copying its context drafts (caps_for; None: no deeper than `caps`).
        self.copy_depth = caps.depth if copy_depth is None else copy_depth
        # A node cap widened for a flat verify curve (Engine.max_nodes) is shared by a batch's rows, down to
        # `row_nodes` a row: building a tree costs CPU time per node, which the curve does not count, and wide
        # trees were measured for single requests only.
        self.row_nodes = caps.nodes if row_nodes is None else min(row_nodes, caps.nodes)
        self.prefill_chunk = prefill_chunk  # None: a joining prompt is prefilled whole, at once
        self.max_cache_tokens = max_cache_tokens
        self.rows: list[_Row] = []
        self.prefilling: list[_Row] = []
        self.report = StepReport()          # the last step's
        # No request waits to take a finished row's place (`run` sets it; a server's clients keep coming): the
        # batch then ends when its furthest-behind row does, so the cut is judged by what that row expects and the
        # guard credits every row with its progress. Measured (16 mixed prompts in one `generate_batch`): crediting
        # each row its own tokens, drafting ran 0.89-0.93x of `draft=False`, as the copying rows finished early and
        # the last took as many steps as plain; cutting by every row's expected tokens, 0.91-0.92x against 0.92-0.95x.
        self.static = False

    def __len__(self) -> int:
        return len(self.rows) + len(self.prefilling)

    @property
    def requests(self) -> list[Request]:
        return [row.request for row in self.rows]

    def fits(self, request: Request) -> bool:
        """Whether `request` may join now without the padded KV cache (rows x the longest row's final
        length) passing `max_cache_tokens`; a request alone always fits."""
        if self.max_cache_tokens is None or not len(self):
            return True
        rows = [row.request for row in self.rows + self.prefilling] + [request]
        return len(rows) * max(r.final_length for r in rows) <= self.max_cache_tokens

    def add(self, request: Request) -> None:
        """A new row (between steps). Prefilled now, or chunk by chunk in the coming steps with
        `prefill_chunk`; a failure ends this request alone (`request.error`)."""
        row = _Row(request, None)
        self._settle()
        try:
            if request.draft and self.drafting is not None:
                row.drafter = self.drafting.drafter(request.prompt)
        except Exception as e:  # noqa: BLE001 - reported on the request, the batch goes on
            request.error = e
            return
        self.prefilling.append(row)
        if self.prefill_chunk is None:
            self._prefill(len(request.prompt))

    def _prefill(self, budget: int) -> list[Request]:
        """Prefill up to `budget` prompt tokens of joining rows; returns the requests that failed."""
        failed = []
        while budget > 0 and self.prefilling:
            # Shortest remaining prompt first: a short request joining behind a long prompt runs at once.
            row = min(self.prefilling, key=lambda r: len(r.request.prompt) - r.filled)
            ids = row.request.prompt[:-1]  # the last prompt token is the first tree's root
            t = time.perf_counter()
            try:
                chunk = ids[row.filled: row.filled + budget]
                budget -= max(len(chunk), 1)
                if row.filled + len(chunk) == len(ids) and not self.rows and len(self.prefilling) == 1:
                    # Alone: the last chunk goes into the first step's forward, ahead of the first tree.
                    self.verifier.join(row, row.cache or new_cache(), row.filled, pending=chunk)
                    row.filled, row.cache = len(ids), None
                else:
                    row.cache = self.verifier.prefill(row.cache, chunk)
                    row.filled += len(chunk)
                    if row.filled == len(ids):
                        self.verifier.join(row, row.cache, len(ids))
                        row.cache = None
            except Exception as e:  # noqa: BLE001 - this request only
                row.request.error = e
            row.request.stats.prefill_s += time.perf_counter() - t
            if row.request.error is not None:
                failed.append(row.request)
                self.prefilling.remove(row)
            elif row.cache is None:  # joined the batch
                self.prefilling.remove(row)
                self.rows.append(row)
                if row.drafter is not None:
                    self.sizing.new_text(len(self.rows))
        return failed

    def _settle(self) -> None:
        """Prefill a lone row's pending prompt tail now (another row is joining), timed as its prefill."""
        if any(self.verifier.pending):  # only a row alone in the batch has one
            t = time.perf_counter()
            self.verifier.settle()
            self.rows[0].request.stats.prefill_s += time.perf_counter() - t

    def _prefill_budget(self) -> int:
        """Prompt tokens to prefill this step: a whole chunk while no row waits on it, else a chunk whose cost
        (on the cost curve) is the running rows' own step cost times prefilling requests per running row:
        time is shared between requests, not between the two phases, so one long prompt costs a running
        row about one step per step while a crowd of new arrivals still gets prefilled at full speed."""
        chunk = self.prefill_chunk or 0
        if not self.rows:
            return chunk
        step_tokens = max(1, self.report.tokens)
        share = max(1.0, len(self.prefilling) / len(self.rows))
        if self.cost is None:
            return max(PREFILL_MIN, min(chunk, int(4 * step_tokens * share)))
        limit = self.cost(step_tokens, self.report.rows) * share
        tokens = PREFILL_MIN
        while tokens * 2 <= chunk and self.cost(tokens * 2) <= limit:
            tokens *= 2
        return min(tokens, chunk)

    def remove(self, requests: Sequence[Request]) -> None:
        """Drop rows (finished, failed or cancelled) and their cache at once."""
        gone = {id(r) for r in requests}
        self.prefilling = [row for row in self.prefilling if id(row.request) not in gone]
        leaving = [row for row in self.rows if id(row.request) in gone]
        if leaving:
            self.verifier.remove(leaving)
            self.rows = list(self.verifier.keys)  # the verifier's row order (leavers' places were filled)

    def abort(self) -> None:
        """After a failed forward: forget the uncommitted step and every row (their requests end)."""
        self.verifier = Verifier(self.verifier.model)
        self.rows, self.prefilling = [], []

    def step(self) -> list[Request]:
        """One forward for every row; returns the requests that finished (they have left the batch)."""
        failed = self._prefill(self._prefill_budget()) if self.prefill_chunk and self.prefilling else []
        return failed + self._decode() if self.rows else failed

    def _decode(self) -> list[Request]:
        rows = self.rows
        t0 = time.perf_counter()
        tail = sum(len(p) for p in self.verifier.pending)  # a lone row's prompt tail, prefilled by this forward
        rooms = [row.request.room for row in rows]
        copy_runs = [row.drafter.copy_run if row.drafter is not None else 0 for row in rows]
        # Where nothing may draft (draft=False) the step is plain, and what the guard's plain speed is. A static
        # batch's end waits on its furthest-behind rows: only their copying is worth a trial there.
        copy_run = max(self._behind(rooms, copy_runs) if self.static else copy_runs)
        drafting = any(row.drafter is not None for row in rows)
        plan = self.sizing.plan(len(rows), copy_run) if drafting else Choice(0, "undrafted")
        # A static batch's cut is judged by what its furthest-behind rows expect (see sizing); packed, the
        # others do not draft: their drafts would cost the step their tokens and only let them leave sooner.
        counted = self._behind(rooms, list(range(len(rows)))) if self.static and len(rows) > 1 else None
        packed = self.verifier.packs
        # Packed and judged by every row, a row's tree ends where its nodes could no longer pay (see sizing.least).
        least = self.sizing.least(len(rows), self.caps.nodes) if packed and counted is None and plan is None else 0.0
        trees, draft_s = self._draft(plan, set(counted) if counted is not None and packed else None, least)
        # A plan made before drafting (a plain step, or a probe's small trees) stands; else cut by cost.
        choice = plan if plan is not None else self.sizing.choose(trees, tail, counted, packed)
        trees = choice.cut(trees)
        t1 = time.perf_counter()
        logits = self.verifier.verify(trees)
        t2 = time.perf_counter()
        paths, emitted = [], []
        for row, tree, row_logits in zip(rows, trees, logits, strict=True):
            request = row.request
            try:
                nodes, tokens = request.accept(tree, row_logits, request.context)
            except Exception as e:  # noqa: BLE001 - this request's rule (e.g. its sampler) failed: end it alone
                request.error = e
                nodes, tokens = [0], []
            paths.append(nodes)
            emitted.append(tokens)
        self.verifier.commit(paths)
        forward_s = t2 - t1
        total_emitted = accepted_draft = draft_nodes = 0
        recycle_s = self._recycle(trees, logits, choice)
        for i, (row, tree, tokens) in enumerate(zip(rows, trees, emitted, strict=True)):
            request, stats = row.request, row.request.stats
            if request.error is not None:
                continue
            t = time.perf_counter()
            kept = request.append(tokens)
            if row.drafter is not None:
                row.drafter.observe(tokens, tree=tree, nodes=paths[i])  # the recycle table learnt above
                stats.sources = {name: (s.proposed, s.accepted) for name, s in row.drafter.stats.items()}
            total_emitted += len(tokens)
            accepted_draft += len(tokens) - 1
            draft_nodes += len(tree) - 1
            stats.steps += 1
            stats.draft_tokens += len(tree) - 1
            stats.accepted.append(kept)
            stats.new_tokens = len(request.ids)
            if tail:  # mostly the prompt's tail: counted as prefill, as model.generate's first forward
                stats.prefill_s += forward_s
            else:
                stats.forward_s += forward_s
            stats.draft_s += draft_s[i] + recycle_s + time.perf_counter() - t
            stats.total_s = time.perf_counter() - row.started
        q, tokens = max(len(t) for t in trees), self.verifier.tokens
        seconds = time.perf_counter() - t0
        if not tail:  # a forward that also prefills is no verify step: neither the curve nor the guard learns from it
            if self.cost is not None:
                self.cost.observe(tokens, forward_s, len(rows))
            self.sizing.observe(choice, len(rows), self._progress(rooms, emitted, total_emitted), accepted_draft,
                                seconds, tokens)
        self.report = StepReport(len(rows), total_emitted, draft_nodes, accepted_draft, q - 1, tokens, forward_s,
                                 seconds - forward_s, choice)
        finished = [row.request for row in rows if row.request.done]
        if finished:
            self.remove(finished)
        return finished

    def _recycle(self, trees: list[DraftTree], logits: list[torch.Tensor], choice: Choice) -> float:
        """Feed the recycle table every drafting row's verified inputs and logits at once (one top-k over the
        batch: per row it cost ~0.2 ms, 3 ms of a 16-row step); returns the seconds a row is charged.
        A plain step (the guard's, or drafting off) feeds it nothing: the no-draft loop the guard compares
        against (and a server without drafting) does not pay the top-k."""
        recycle = getattr(self.drafting, "recycle", None)
        drafting = [i for i, row in enumerate(self.rows) if row.drafter is not None and row.request.error is None]
        if recycle is None or choice.plain or not drafting:
            return 0.0
        t = time.perf_counter()
        inputs = [token for i in drafting for token in trees[i].tokens]
        recycle.update(inputs, torch.cat([logits[i] for i in drafting]) if len(drafting) > 1 else logits[drafting[0]])
        return (time.perf_counter() - t) / len(drafting)

    def _behind(self, rooms: list[int], values: list[int]) -> list[int]:
        """`values` of the furthest-behind rows (the most room left) that have not failed."""
        live = [(room, v) for row, room, v in zip(self.rows, rooms, values, strict=True) if row.request.error is None]
        behind = max((room for room, _ in live), default=0)
        return [v for room, v in live if room == behind] or [0]

    def _progress(self, rooms: list[int], emitted: list[list[int]], total: int) -> int:
        """Tokens the guard credits a step with: all rows' (`total`), or in a static batch as many for every row as
        its end came closer: by how much the most room any row has left fell (a row finishing at its end-of-text
        counted as going on: that is the text's luck, not the step's). Not the furthest-behind rows' tokens: one of
        them accepting five while the next-behind row emits one brings the end one token closer, not five (traced,
        40 mixed prompts at 16 rows: such steps read drafting as 2x faster in the batch's last 40 steps, which
        drafted at a loss)."""
        if not self.static or len(self.rows) < 2:
            return total
        live = [(room, len(tokens)) for row, room, tokens in zip(self.rows, rooms, emitted, strict=True)
                if row.request.error is None]
        if not live:
            return total
        return len(live) * (max(room for room, _ in live) - max(room - n for room, n in live))

    def caps_for(self, copy_run: int) -> Budget:
        """The caps of a row that has copied `copy_run` tokens of its context in a row: twice as deep (and as many
        more nodes) once it copied a whole branch, twice again each time it copied a whole branch at that depth,
        up to `copy_depth`. Only after a long copy: a deeper tree there is a copy chain accepted whole, where
        before it (SmolLM2 edits, whose copies part at renames) the extra depth cost what it saved."""
        depth, reach = self.caps.depth, self.caps.depth
        while copy_run >= reach and depth < self.copy_depth:
            depth = min(2 * depth, self.copy_depth)
            reach += depth
        if depth == self.caps.depth:
            return self.caps
        return Budget(self.caps.nodes + depth - self.caps.depth, depth)

    def _draft(self, plan: Choice | None, only: set[int] | None = None, least: float = 0.0
               ) -> tuple[list[DraftTree], list[float]]:
        """One tree per row: the drafter's whole tree within the caps (and the row's room), else the root
        (`only`: the rows that may draft; None: all; `least`: see Drafter.propose)."""
        trees, seconds = [], []
        spare = self.caps.nodes - max(self.row_nodes, self.caps.nodes // max(len(self.rows), 1))
        for i, row in enumerate(self.rows):
            t = time.perf_counter()
            request = row.request
            root = request.ids[-1] if request.ids else request.prompt[-1]
            room = request.room
            if row.drafter is None or room <= 0 or (plan is not None and plan.kind != "probe") \
                    or (only is not None and i not in only):
                trees.append(DraftTree.root_only(root))
            else:
                caps = self.caps_for(row.drafter.copy_run)
                nodes = caps.nodes - spare
                nodes = nodes if request.max_draft is None else min(nodes, request.max_draft)
                if plan is not None:  # a probe: a small tree
                    nodes = min(nodes, plan.nodes)
                budget = Budget(nodes, min(caps.depth, room))
                # `least` only where set: a drafter of the two-argument contract still serves single requests
                trees.append(row.drafter.propose(request.context, budget, least=least) if least
                             else row.drafter.propose(request.context, budget))
            seconds.append(time.perf_counter() - t)
        return trees, seconds


def run(decoder: Decoder, requests: Sequence[Request], max_batch: int,
        on_finish: Callable[[Request], None] | None = None) -> None:
    """Continuous batching of `requests` to completion: rows join in input order as others finish."""
    waiting = deque(requests)
    while waiting or len(decoder):
        finished = []
        while waiting and len(decoder) < max_batch and decoder.fits(waiting[0]):
            request = waiting.popleft()
            decoder.add(request)
            if request.error is not None:  # its prefill failed
                finished.append(request)
        if len(decoder):
            decoder.static = not waiting
            finished += decoder.step()
        if on_finish is not None:
            for request in finished:
                on_finish(request)
