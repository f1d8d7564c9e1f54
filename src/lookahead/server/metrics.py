"""Prometheus text for /metrics: one registry per app, values read from the scheduler at scrape time."""
from __future__ import annotations

import threading
from collections import Counter

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]


class Metrics:
    """HTTP request counts plus the scheduler's and the shared trie's numbers."""

    def __init__(self, scheduler, trie_getter, max_series: int = 200) -> None:
        self.scheduler = scheduler
        self.trie = trie_getter
        self.requests: Counter[tuple[str, str]] = Counter()  # (endpoint, status code) -> count
        # Callers label by route template; this bound is the backstop should a label ever come from a client.
        self.max_series = max_series
        self._lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def count(self, endpoint: str, status: int) -> None:
        """Count one request; past `max_series` label pairs, new ones fold into endpoint "overflow"."""
        key = (endpoint, str(status))
        with self._lock:
            if key not in self.requests and len(self.requests) >= self.max_series:
                key = ("overflow", str(status))
            self.requests[key] += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # prometheus_client collector protocol
    def collect(self):
        s = self.scheduler.stats
        requests = CounterMetricFamily("lookahead_requests", "HTTP requests by endpoint and status code",
                                       labels=["endpoint", "status"])
        with self._lock:
            for (endpoint, status), n in sorted(self.requests.items()):
                requests.add_metric([endpoint, status], n)
        yield requests

        def counter(name: str, doc: str, value: float):
            return CounterMetricFamily(name, doc, value=value)

        def gauge(name: str, doc: str, value: float):
            return GaugeMetricFamily(name, doc, value=value)

        yield counter("lookahead_prompt_tokens", "prompt tokens of admitted requests", s.prompt_tokens)
        yield counter("lookahead_completion_tokens", "completion tokens of finished requests", s.completion_tokens)
        yield counter("lookahead_generated_tokens", "tokens emitted by decode steps (bonus tokens included)", s.emitted)
        yield counter("lookahead_decode_steps", "batched verify forwards", s.steps)
        yield counter("lookahead_row_steps", "rows verified, summed over forwards", s.row_steps)
        yield counter("lookahead_draft_tokens", "draft tokens verified", s.draft_tokens)
        yield counter("lookahead_accepted_draft_tokens", "draft tokens accepted", s.accepted_draft)
        yield counter("lookahead_forward_seconds", "time spent in verify forwards", s.forward_s)
        yield counter("lookahead_draft_seconds", "time spent drafting, accepting and streaming", s.draft_s)
        yield counter("lookahead_prefill_seconds", "time spent in prefill forwards", s.prefill_s)
        yield counter("lookahead_finished_requests", "requests that reached a stop or their token limit", s.finished)
        yield counter("lookahead_cancelled_requests", "requests whose client went away", s.cancelled)
        yield counter("lookahead_failed_requests", "requests ended by an internal error", s.failed)
        yield gauge("lookahead_mean_accepted_tokens_per_step",
                    "tokens emitted per row per forward, bonus included (1 = plain decoding)", s.mean_accepted)
        yield gauge("lookahead_draft_hit_rate", "accepted draft tokens / verified draft tokens", s.draft_hit_rate)
        yield gauge("lookahead_queue_depth", "requests waiting for a batch slot", self.scheduler.queue_depth)
        yield gauge("lookahead_batch_size", "rows in the running batch", self.scheduler.active)
        yield gauge("lookahead_draft_nodes_per_row", "draft nodes verified per row in the last step (0 = off)",
                    s.draft_nodes_per_row)
        sources = CounterMetricFamily("lookahead_source_draft_tokens",
                                      "draft nodes by source: proposed, and accepted by the model",
                                      labels=["source", "outcome"])
        for name, st in sorted(self.scheduler.engine.state.stats.items()):
            sources.add_metric([name, "proposed"], st.proposed)
            sources.add_metric([name, "accepted"], st.accepted)
        yield sources
        trie = self.trie()
        yield gauge("lookahead_trie_nodes", "nodes in the shared trie", len(trie))
        yield gauge("lookahead_trie_capacity", "node bound of the shared trie", trie.capacity)
