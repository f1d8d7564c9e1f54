"""The decode thread: requests from HTTP handlers, decoded by the engine's own core, text back as events.

One background thread owns the model and one `decoding.step.Decoder` (the same core
`Engine.generate` runs). Each iteration it drops cancelled rows (a client that went away frees its
slot and cache before the next forward), admits waiting requests up to `max_batch`, runs one
`Decoder.step()` and sends each row's new text to its sink. Sizing, drafting, stop rules and
statistics are the core's; this module adds only the queue, the thread and the events.

A failure inside one request (its prefill, its accept rule) ends that request with an error and
leaves the other rows untouched; a failure of the batch forward itself ends the rows of that
batch with an error, resets the batch and keeps the thread alive.
"""
from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..decoding.step import MAX_CACHE_TOKENS
from ..request import Request

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
    speculation: dict | None = None  # "done": steps, accepted tokens per step, draft nodes verified


class Job:
    """A request in the server: the core's `Request` plus where its events go."""

    def __init__(self, request: Request, sink: Callable[[Event], None]) -> None:
        self.id = next(_ids)
        self.request = request
        self.sink = sink
        self.cancelled = False
        self.finished = False
        self.sent = 0                  # characters of text already sent

    def emit(self, event: Event) -> None:
        try:
            self.sink(event)
        except Exception:  # a sink whose client is gone (closed event loop): stop decoding for it
            self.cancelled = True


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
    draft_nodes_per_row: int = 0   # verified draft nodes per row in the last step (0 = off)
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
    def __init__(self, engine, *, max_batch: int = 32, max_waiting: int = 512, prefill_chunk: int = 256,
                 max_cache_tokens: int | None = MAX_CACHE_TOKENS) -> None:
        self.engine = engine
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.stats = SchedulerStats()
        # A long prompt is prefilled a chunk per step, so the running streams wait one chunk, not its whole prefill.
        self.decoder = engine.decoder(prefill_chunk=prefill_chunk, max_cache_tokens=max_cache_tokens)
        self.jobs: dict[int, Job] = {}         # active, by id(request)
        self.waiting: deque[Job] = deque()
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
        return len(self.jobs)

    def submit(self, job: Job) -> None:
        with self._cv:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"server overloaded: {len(self.waiting)} requests waiting")
            self.waiting.append(job)
            self._cv.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: the row leaves the batch before the next forward (no-op once finished)."""
        if job.finished:
            return
        job.cancelled = True
        with self._cv:
            self._cv.notify_all()

    # -- the decode thread -----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.jobs and not self.waiting:
                    self._cv.wait(timeout=1.0)
                if self._stop:
                    break
            try:
                self._drop_cancelled()
                self._admit()
                if self.jobs:
                    self._step()
            except Exception:  # the batch forward failed: end this batch, keep serving
                log.exception("decode step failed; ending the %d rows of this batch", len(self.jobs))
                for job in self.jobs.values():
                    job.emit(Event("error", status=500, message="internal error during decoding"))
                self.stats.failed += len(self.jobs)
                self.jobs = {}
                self.decoder.abort()
        for job in [*self.jobs.values(), *self.waiting]:  # shutting down
            job.emit(Event("error", status=503, message="the server is shutting down"))
        self.jobs, self.waiting = {}, deque()

    def _drop_cancelled(self) -> None:
        gone = [job for job in self.jobs.values() if job.cancelled]
        if gone:
            self.decoder.remove([job.request for job in gone])
            for job in gone:
                del self.jobs[id(job.request)]
            self.stats.cancelled += len(gone)

    def _admit(self) -> None:
        while len(self.jobs) < self.max_batch:
            with self._cv:
                if not self.waiting:
                    return
                if not self.waiting[0].cancelled and not self.decoder.fits(self.waiting[0].request):
                    return  # in order: it joins once the batch's padded cache has room for it
                job = self.waiting.popleft()
            if job.cancelled:
                self.stats.cancelled += 1
                continue
            request = job.request
            self.jobs[id(request)] = job
            self.decoder.add(request)  # prefilled over the coming steps, a chunk per step
            self.stats.prompt_tokens += len(request.prompt)
            if request.error is not None:  # this request only
                self._send(job)

    def _step(self) -> None:
        stats = self.stats
        self.decoder.step()
        report = self.decoder.report
        stats.steps += 1
        stats.row_steps += report.rows
        stats.emitted += report.emitted
        stats.draft_tokens += report.draft_nodes
        stats.accepted_draft += report.accepted_draft
        stats.forward_s += report.forward_s
        stats.draft_s += report.other_s
        stats.batch_size = report.rows
        stats.draft_nodes_per_row = report.nodes_per_row
        stats.max_batch_seen = max(stats.max_batch_seen, report.rows)
        stats.batch_sizes[report.rows] = stats.batch_sizes.get(report.rows, 0) + 1
        for job in list(self.jobs.values()):
            self._send(job)

    def _send(self, job: Job) -> None:
        """Stream the new text of a row; end the job when its request is done."""
        request = job.request
        if request.error is not None:
            log.error("request %d failed: %r", job.id, request.error)
            self.stats.failed += 1
            job.emit(Event("error", status=500, message=f"request failed: {request.error!r}"))
            job.finished = True
            del self.jobs[id(request)]
            return
        done = request.done
        text = request.text(final=done)
        if len(text) > job.sent:
            job.emit(Event("text", text=text[job.sent:]))
            job.sent = len(text)
        if done:
            job.finished = True
            del self.jobs[id(request)]
            self.stats.prefill_s += request.stats.prefill_s
            self.stats.completion_tokens += len(request.ids)
            self.stats.finished += 1
            s = request.stats
            job.emit(Event("done", finish_reason=request.finish_reason, prompt_tokens=len(request.prompt),
                           completion_tokens=len(request.ids),
                           speculation={"steps": s.steps, "accepted_tokens_per_step": round(s.mean_accepted, 3),
                                        "draft_tokens": s.draft_tokens}))
