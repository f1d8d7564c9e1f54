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
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..decoding.batch import BatchVerifier
from ..decoding.verify import accept_greedy
from ..drafting.trie import Budget
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


@dataclass
class DraftPolicy:
    """Draft nodes per row as the batch grows.

    On CPU (and GPU) a forward over a few query tokens costs about what one token costs, up to
    a knee, then grows linearly. Plain batched decoding already spends `batch` query tokens per
    forward, so drafting fills only what is left below the knee: each row gets
    `token_budget // batch - 1` nodes (capped by `max_nodes`), and drafting is off once that
    falls under `min_nodes` - past the knee extra tokens cost more than they can win, and
    drafting would make throughput worse than plain batched decoding.
    """
    max_nodes: int = 24
    max_depth: int = 12
    token_budget: int = 32
    min_nodes: int = 2

    def budget(self, batch: int) -> Budget | None:
        nodes = min(self.max_nodes, self.token_budget // max(batch, 1) - 1)
        if nodes < self.min_nodes:
            return None
        return Budget(nodes, min(self.max_depth, nodes))

    def switch_off_batch(self) -> int:
        """The smallest batch size at which drafting is off."""
        batch = 1
        while self.budget(batch) is not None:
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
        """The client went away: the row leaves the batch before the next forward."""
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
                    request.session = self.engine.trie.session(prompt)
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

    def _trees(self) -> tuple[list[DraftTree], int]:
        max_positions = self.engine.max_positions
        budget = self.policy.budget(len(self.rows)) if self.draft else None
        trees = []
        for row in self.rows:
            run = row.run
            # An accepted path of depth d emits d + 1 tokens: never draft past the token limit
            # or the model's last position (the same rule as decoding.loop.decode).
            room = run.max_new_tokens - len(run.ids) - 1
            if max_positions is not None:
                room = min(room, max_positions - len(row.context) - 1)
            if row.session is None or budget is None or room <= 0:
                trees.append(DraftTree.root_only(row.context[-1]))
            else:
                trees.append(row.session.propose(row.context, Budget(budget.nodes, min(budget.depth, room))))
        return trees, budget.nodes if budget else 0

    def _step(self) -> None:
        stats = self.stats
        t0 = time.perf_counter()
        trees, nodes = self._trees()
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
        for row, tree, tokens in zip(self.rows, trees, emitted, strict=True):
            if row in failed:
                continue
            stats.emitted += len(tokens)
            stats.draft_tokens += len(tree) - 1
            stats.accepted_draft += len(tokens) - 1
            if self._commit_tokens(row, tree, tokens):
                finished.append(row)
        stats.draft_s += (t1 - t0) + (time.perf_counter() - t3)
        if finished:
            self.batch.remove([r.id for r in finished])
            self.rows = [r for r in self.rows if r not in finished]
            stats.failed += len(failed)

    def _commit_tokens(self, row: Request, tree: DraftTree, tokens: list[int]) -> bool:
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
            row.session.observe(tokens)
        done = (run.finish_reason == "stop" or len(run.ids) >= run.max_new_tokens
                or (max_positions is not None and len(row.context) >= max_positions))
        text = run.text(final=done)
        if len(text) > row.sent:
            row.emit(Event("text", text=text[row.sent:]))
            row.sent = len(text)
        if done:
            s.total_s = time.perf_counter() - row.created
            self.stats.completion_tokens += len(run.ids)
            self.stats.finished += 1
            row.emit(Event("done", finish_reason=run.finish_reason, prompt_tokens=len(run.prompt),
                           completion_tokens=len(run.ids)))
        return done
