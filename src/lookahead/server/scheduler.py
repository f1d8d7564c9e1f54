"""The decode thread: continuous batching of requests, one batched tree-verify forward per step.

One background thread owns the model. Requests wait in a queue; each iteration the thread

1. drops cancelled rows (a client that went away frees its slot and cache before the next forward),
2. admits waiting requests up to `max_batch` (each prefilled alone, then merged into the batch),
3. builds one draft tree per row from its own TrieSession over the engine's shared trie, sized by
   the `DraftPolicy` for the current batch size (smaller trees as the batch grows, none at all
   past the point where extra query tokens cost more than they can win),
4. runs ONE forward over all rows' trees (`decoding.batch.BatchVerifier`),
5. accepts per row with the request's own rule (greedy, or the exact sampling walk) and commits,
6. appends the tokens through the engine's own stop logic (the same `_Run` object that
   `Engine.generate` iterates: EOS, stop strings, max tokens, context window) and streams the
   new text to the request's sink; finished rows leave the batch.

A failure inside one request (its prefill, its accept rule) ends that request with an error
and leaves the other rows untouched; a failure of the batch forward itself ends the rows of
that batch with an error, resets the batch and keeps the thread alive.
"""
from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..decoding.batch import BatchVerifier
from ..decoding.verify import accept_greedy
from ..drafting.budget import piecewise_linear
from ..drafting.trie import Budget
from ..timing import interleaved, stopwatch
from ..tree import DraftTree

log = logging.getLogger("lookahead.server")
_ids = itertools.count(1)


@dataclass
class Event:
    """What the decode thread tells a request: new text, the end, or an error."""
    kind: str                      # "text" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 200
    message: str = ""


class Request:
    """One generation request: the engine's `_Run` (prompt ids, limits, stops, accept rule) and a sink."""

    def __init__(self, run, sink: Callable[[Event], None], draft: bool = True) -> None:
        self.id = next(_ids)
        self.run = run
        self.sink = sink
        self.draft = draft
        self.cancelled = False
        self.finished = False
        self.created = time.perf_counter()
        # Owned by the decode thread once admitted.
        self.context: list[int] = list(run.prompt)
        self.session = None
        self.sent = 0                  # characters of text already sent
        self.accept = getattr(run, "accept", None) or accept_greedy

    def emit(self, event: Event) -> None:
        try:
            self.sink(event)
        except Exception:  # a sink whose client is gone (closed event loop): stop decoding for it
            self.cancelled = True


class CostCurve:
    """Measured time of one forward over T query tokens (any split into rows), linear in between."""

    def __init__(self, tokens: list[int], seconds: list[float]) -> None:
        if not tokens or tokens[0] != 1 or sorted(set(tokens)) != tokens or len(tokens) != len(seconds):
            raise ValueError("CostCurve needs increasing token counts starting at 1, one time each")
        self.tokens, self.seconds = list(tokens), list(seconds)

    def __call__(self, total: int) -> float:
        return self.seconds[0] if total <= 1 else piecewise_linear(self.tokens, self.seconds, total)

    def knee(self, ratio: float = 2.0) -> int:
        """The most query tokens one forward takes for at most `ratio` x the cost of one token."""
        return max(t for t, s in zip(self.tokens, self.seconds, strict=True) if s <= ratio * self.seconds[0])

    def __repr__(self) -> str:
        return "CostCurve(" + ", ".join(f"{t}: {1000 * s:.1f}ms" for t, s in zip(self.tokens, self.seconds,
                                                                                   strict=True)) + ")"

    @classmethod
    def measure(cls, model, tokens: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128), context: int = 256,
                reps: int = 3) -> CostCurve:
        """Time BatchVerifier forwards of T tokens (rows of 1 + a chain) over `context`-token caches.

        The Ts are timed interleaved (see `timing.interleaved`); the fastest run of each is kept."""
        vocab = model.get_input_embeddings().num_embeddings
        gen = torch.Generator().manual_seed(0)
        setups = {}
        for total in tokens:
            rows = max(1, total // 16)  # big T as several rows, as the server batches them
            verifier = BatchVerifier(model)
            for r in range(rows):
                verifier.add(r, torch.randint(0, vocab, (context,), generator=gen).tolist())
            sizes = [total // rows + (1 if r < total % rows else 0) for r in range(rows)]
            setups[total] = verifier, [DraftTree.chain(1, list(range(2, 1 + n))) for n in sizes]

        def timed(total: int) -> float:
            verifier, trees = setups[total]
            seconds = stopwatch(lambda: verifier.verify(trees), verifier.device)
            verifier.abort()
            return seconds

        runs = interleaved(tokens, timed, reps)
        return cls(list(tokens), [min(runs[t]) for t in tokens])  # the least disturbed run


SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # draft budgets per row the policy chooses from


@dataclass
class DraftPolicy:
    """Draft nodes per row for the current batch size; none where drafting cannot pay.

    With a measured `cost` curve (what `lookahead serve` does at start), each step picks the
    per-row budget n that maximises the expected tokens per second of the whole batch,

        rate(n) = (1 + g(n)) * T(batch, 0) / T(batch, n),      rate(0) = 1 (plain decoding),

    where g(n) is the number of draft tokens a row gets accepted per step with budget n, and
    T(batch, n) the time of one step: the curve at batch * (1 + s(n)) query tokens, s(n) being
    the draft nodes every row is padded to (the largest tree of the step; drafters often find
    fewer than the budget), times a correction c(batch, n) = measured / curve time learned from
    the step's own forwards (the start-up curve knows total tokens only, not how they split
    into rows, nor today's load). All are running means measured on live traffic. Budgets not
    tried yet are extrapolated from the nearest tried one m: g(m) * sqrt(n / m) (a bigger tree
    wins less than proportionally), min(n, s(m) * n / m), and c of the nearest tried budget.
    Drafting is used only when it is predicted to beat plain decoding by `margin`; every
    `explore_every` steps the next bigger budget is tried so the estimates stay current. As the
    batch grows, T(batch, n) / T(batch, 0) grows, so trees shrink and then switch off.

    Without a cost curve: each row gets `token_budget // batch - 1` nodes (at most `max_nodes`),
    off below `min_nodes`.
    """
    max_nodes: int = 24
    max_depth: int = 12
    token_budget: int = 32
    min_nodes: int = 2
    cost: CostCurve | None = None
    prior: float = 1.0          # g(4) assumed before anything is measured
    smoothing: float = 0.1
    margin: float = 0.05
    explore_every: int = 16
    gains: dict[int, float] = field(default_factory=dict)   # budget -> accepted draft tokens per row-step
    used: dict[int, float] = field(default_factory=dict)    # budget -> draft nodes per drafted row
    counts: dict[int, int] = field(default_factory=dict)
    corrections: dict[tuple[int, int], float] = field(default_factory=dict)  # (batch, budget) -> measured/curve
    forward_counts: dict[tuple[int, int], int] = field(default_factory=dict)
    steps: int = 0

    def sizes(self) -> list[int]:
        return sorted({n for n in SIZES if n < self.max_nodes} | {self.max_nodes})

    def _nearest(self, nodes: int) -> int | None:
        measured = [n for n, c in self.counts.items() if c >= 3]
        if nodes in measured:
            return nodes
        return min(measured, key=lambda n: (abs(math.log(nodes / n)), n)) if measured else None

    def expected_gain(self, nodes: int) -> float:
        near = self._nearest(nodes)
        if near is None:
            return self.prior * math.sqrt(nodes / 4)
        return self.gains[near] * math.sqrt(nodes / near)

    def expected_size(self, nodes: int) -> float:
        near = self._nearest(nodes)
        return float(nodes) if near is None else min(float(nodes), self.used[near] * nodes / near)

    def correction(self, batch: int, nodes: int) -> float:
        seen = [n for b, n in self.corrections if b == batch]
        if not seen:
            return 1.0
        near = min(seen, key=lambda n: (abs(n - nodes), n))
        return self.corrections[(batch, near)]

    def step_time(self, batch: int, nodes: int) -> float:
        """Predicted time of one forward of `batch` rows with a budget of `nodes` each."""
        tokens = batch if nodes == 0 else max(batch + 1, round(batch * (1 + self.expected_size(nodes))))
        return self.cost(tokens) * self.correction(batch, nodes)

    def rate(self, batch: int, nodes: int) -> float:
        """Predicted throughput with a budget of `nodes` per row, relative to plain batched decoding."""
        if nodes == 0:
            return 1.0
        return (1.0 + self.expected_gain(nodes)) * self.step_time(batch, 0) / self.step_time(batch, nodes)

    def observe_forward(self, batch: int, nodes: int, tokens: int, seconds: float) -> None:
        """The measured time of one step's forward over `tokens` query tokens (rows x padded tree)."""
        if self.cost is None or seconds <= 0:
            return
        key = (batch, nodes)
        count = self.forward_counts[key] = self.forward_counts.get(key, 0) + 1
        ratio = seconds / self.cost(tokens)
        old = self.corrections.get(key, ratio)
        self.corrections[key] = old + max(self.smoothing, 1.0 / count) * (ratio - old)

    def budget(self, batch: int, explore: bool = False) -> Budget | None:
        batch = max(batch, 1)
        if self.cost is None:
            nodes = min(self.max_nodes, self.token_budget // batch - 1)
            return Budget(nodes, min(self.max_depth, nodes)) if nodes >= self.min_nodes else None
        sizes = self.sizes()
        rates = {n: self.rate(batch, n) for n in sizes}
        nodes = max(sizes, key=lambda n: (rates[n], -n))
        if rates[nodes] < 1.0 + self.margin:
            nodes = 0
        if explore:  # the next bigger budget, unless it is hopeless
            bigger = [n for n in sizes if n > nodes]
            if bigger and rates[bigger[0]] >= 0.75:
                nodes = bigger[0]
        return Budget(nodes, min(self.max_depth, nodes)) if nodes else None

    def next_budget(self, batch: int) -> Budget | None:
        """The budget for this step (explores now and then)."""
        self.steps += 1
        return self.budget(batch, explore=self.cost is not None and self.steps % self.explore_every == 0)

    def observe(self, nodes: int, drafted_rows: int, accepted: int, padded: int | None = None) -> None:
        """One step with budget `nodes`: `accepted` draft tokens over `drafted_rows` rows, each tree padded
        to `padded` draft nodes (the step's largest tree; default: the full budget)."""
        if drafted_rows and nodes:
            count = self.counts[nodes] = self.counts.get(nodes, 0) + 1
            weight = max(self.smoothing, 1.0 / count)  # a plain mean until 1/smoothing steps are seen
            for table, mean in ((self.gains, accepted / drafted_rows),
                                (self.used, float(nodes if padded is None else padded))):
                old = table.get(nodes, 0.0)
                table[nodes] = old + weight * (mean - old)

    def nodes_per_row(self, batch: int) -> int:
        budget = self.budget(batch)
        return budget.nodes if budget else 0

    def switch_off_batch(self, limit: int = 256) -> int:
        """The smallest batch size at which drafting is off (with what is measured so far)."""
        batch = 1
        while batch < limit and self.budget(batch) is not None:
            batch += 1
        return batch


@dataclass
class SchedulerStats:
    """Counters read by /metrics (written by the decode thread only)."""
    steps: int = 0                 # batched forwards
    row_steps: int = 0             # sum of batch sizes over steps
    emitted: int = 0               # tokens emitted by steps (bonus included)
    draft_tokens: int = 0          # draft nodes verified
    accepted_draft: int = 0        # draft nodes accepted
    forward_s: float = 0.0
    draft_s: float = 0.0
    prefill_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    batch_size: int = 0            # rows in the last step
    draft_nodes_per_row: int = 0   # budget of the last step (0 = drafting off)
    max_batch_seen: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # batch size -> steps

    @property
    def mean_accepted(self) -> float:
        """Tokens per row per forward, bonus included (1.0 = plain decoding)."""
        return self.emitted / self.row_steps if self.row_steps else 0.0

    @property
    def draft_hit_rate(self) -> float:
        return self.accepted_draft / self.draft_tokens if self.draft_tokens else 0.0


def new_drafter(engine, prompt: list[int]):
    """One request's drafter over the engine's shared state: the engine's own drafter when it has one
    (`engine.drafting.drafter`), else a TrieSession of the shared trie."""
    state = getattr(engine, "drafting", None)
    if state is not None and hasattr(state, "drafter"):
        return state.drafter(prompt)
    return engine.trie.session(prompt)


class QueueFull(RuntimeError):
    pass


class Scheduler:
    def __init__(self, engine, *, max_batch: int = 32, max_waiting: int = 512, draft: bool = True,
                 policy: DraftPolicy | None = None, prefill_tokens_per_step: int = 4096) -> None:
        cfg = engine.draft_config
        self.engine = engine
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.draft = draft
        self.policy = policy or DraftPolicy(max_nodes=cfg.max_nodes, max_depth=cfg.max_depth)
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.stats = SchedulerStats()
        self.batch = BatchVerifier(engine.model)
        self.rows: list[Request] = []          # active, in batch order
        self.waiting: deque[Request] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- control (any thread) -----------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lookahead-decode", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        return len(self.rows)

    def submit(self, request: Request) -> None:
        with self._cv:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"server overloaded: {len(self.waiting)} requests waiting")
            self.waiting.append(request)
            self._cv.notify_all()

    def cancel(self, request: Request) -> None:
        """The client went away: the row leaves the batch before the next forward (no-op once finished)."""
        if request.finished:
            return
        request.cancelled = True
        with self._cv:
            self._cv.notify_all()

    # -- the decode thread -----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.rows and not self.waiting:
                    self._cv.wait(timeout=1.0)
                if self._stop:
                    break
            try:
                self._drop_cancelled()
                self._admit()
                if self.rows:
                    self._step()
            except Exception as e:  # the batch forward failed: end this batch, keep serving
                log.exception("decode step failed; ending the %d rows of this batch", len(self.rows))
                self.batch.abort()
                for row in self.rows:
                    row.emit(Event("error", status=500, message=f"internal error during decoding: {e}"))
                self.stats.failed += len(self.rows)
                self.rows = []
                self.batch = BatchVerifier(self.engine.model)
        for row in [*self.rows, *self.waiting]:  # shutting down
            row.emit(Event("error", status=503, message="the server is shutting down"))
        self.rows, self.waiting = [], deque()

    def _drop_cancelled(self) -> None:
        gone = [r for r in self.rows if r.cancelled]
        if gone:
            self.batch.remove([r.id for r in gone])
            self.rows = [r for r in self.rows if not r.cancelled]
            self.stats.cancelled += len(gone)

    def _admit(self) -> None:
        budget = self.prefill_tokens_per_step
        while len(self.rows) < self.max_batch and budget > 0:
            with self._cv:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            if request.cancelled:
                self.stats.cancelled += 1
                continue
            t0 = time.perf_counter()
            try:
                prompt = request.run.prompt
                self.batch.add(request.id, prompt[:-1])
                if request.draft and self.draft:
                    request.session = new_drafter(self.engine, prompt)
            except Exception as e:  # this request only
                log.exception("prefill failed for request %d", request.id)
                if request.id in self.batch:
                    self.batch.remove([request.id])
                self.stats.failed += 1
                request.emit(Event("error", status=500, message=f"prefill failed: {e}"))
                continue
            self.stats.prefill_s += time.perf_counter() - t0
            self.stats.prompt_tokens += len(prompt)
            budget -= len(prompt)
            self.rows.append(request)

    def _trees(self) -> tuple[list[DraftTree], int, list[bool]]:
        max_positions = self.engine.max_positions
        budget = self.policy.next_budget(len(self.rows)) if self.draft else None
        trees, proposed = [], []
        for row in self.rows:
            run = row.run
            # An accepted path of depth d emits d + 1 tokens: never draft past the token limit
            # or the model's last position (the same rule as decoding.loop.decode).
            room = run.max_new_tokens - len(run.ids) - 1
            if max_positions is not None:
                room = min(room, max_positions - len(row.context) - 1)
            if row.session is None or budget is None or room <= 0:
                trees.append(DraftTree.root_only(row.context[-1]))
                proposed.append(False)
            else:
                trees.append(row.session.propose(row.context, Budget(budget.nodes, min(budget.depth, room))))
                proposed.append(True)
        return trees, budget.nodes if budget else 0, proposed

    def _step(self) -> None:
        stats = self.stats
        t0 = time.perf_counter()
        trees, nodes, proposed = self._trees()
        t1 = time.perf_counter()
        logits = self.batch.verify(trees)
        t2 = time.perf_counter()
        accepted, emitted, failed = [], [], []
        for row, tree, row_logits in zip(self.rows, trees, logits, strict=True):
            try:
                path, tokens = row.accept(tree, row_logits, row.context)
            except Exception as e:  # this request's accept rule (e.g. its sampler) failed: end it alone
                log.exception("accept failed for request %d", row.id)
                row.emit(Event("error", status=500, message=f"token choice failed: {e}"))
                path, tokens = [0], []
                failed.append(row)
            accepted.append(path)
            emitted.append(tokens)
        self.batch.commit(accepted)
        t3 = time.perf_counter()
        stats.steps += 1
        stats.row_steps += len(self.rows)
        stats.batch_size = len(self.rows)
        stats.max_batch_seen = max(stats.max_batch_seen, len(self.rows))
        stats.batch_sizes[len(self.rows)] = stats.batch_sizes.get(len(self.rows), 0) + 1
        stats.draft_nodes_per_row = nodes
        stats.forward_s += t2 - t1
        finished = list(failed)
        drafted_rows = drafted_accepted = 0
        for i, (row, tree, tokens) in enumerate(zip(self.rows, trees, emitted, strict=True)):
            if row in failed:
                continue
            stats.emitted += len(tokens)
            stats.draft_tokens += len(tree) - 1
            stats.accepted_draft += len(tokens) - 1
            if proposed[i]:  # rows given a budget (a drafter may still find nothing: that counts too)
                drafted_rows += 1
                drafted_accepted += len(tokens) - 1
            if self._commit_tokens(row, tree, tokens, row_logits=logits[i], nodes=accepted[i]):
                finished.append(row)
        q = max(len(t) for t in trees)
        self.policy.observe(nodes, drafted_rows, drafted_accepted, padded=q - 1)
        self.policy.observe_forward(len(trees), nodes, len(trees) * q, t2 - t1)
        stats.draft_s += (t1 - t0) + (time.perf_counter() - t3)
        if finished:
            self.batch.remove([r.id for r in finished])
            self.rows = [r for r in self.rows if r not in finished]
            stats.failed += len(failed)

    def _commit_tokens(self, row: Request, tree: DraftTree, tokens: list[int], row_logits=None,
                       nodes: list[int] | None = None) -> bool:
        """Append one step's tokens through the engine's stop logic; stream new text. True when done."""
        run = row.run
        max_positions = self.engine.max_positions
        row.context.extend(tokens)
        kept = run._append(tokens)
        s = run.stats
        s.steps += 1
        s.draft_tokens += len(tree) - 1
        s.accepted.append(kept)
        s.new_tokens = len(run.ids)
        if row.session is not None:
            row.session.observe(tokens, tree=tree, logits=row_logits, nodes=nodes)
        done = (run.finish_reason == "stop" or len(run.ids) >= run.max_new_tokens
                or (max_positions is not None and len(row.context) >= max_positions))
        text = run.text(final=done)
        if len(text) > row.sent:
            row.emit(Event("text", text=text[row.sent:]))
            row.sent = len(text)
        if done:
            row.finished = True
            s.total_s = time.perf_counter() - row.created
            self.stats.completion_tokens += len(run.ids)
            self.stats.finished += 1
            row.emit(Event("done", finish_reason=run.finish_reason, prompt_tokens=len(run.prompt),
                           completion_tokens=len(run.ids)))
        return done
