"""lookahead's drafting as a vLLM speculative-decoding proposer.

    LLM(model=..., speculative_config={"method": "custom_class",
        "model": "lookahead.integrations.vllm.LookaheadProposer", "num_speculative_tokens": 8})

vLLM owns the model, the KV cache, batching and verification; we only propose one chain per row
(`rows.RowProposer`: request trie, shared history trie, prompt n-grams, per-source trust learned from
what vLLM accepted, chain length from learned acceptance and step cost). The recycle source is left
out: it needs the verify logits, which vLLM does not give a proposer.

vLLM builds the class in its worker process, so settings come from the environment:
  LOOKAHEAD_VLLM_CAPACITY   node cap of the shared trie (default 200000)
  LOOKAHEAD_VLLM_MAX_BYTES  byte cap of the shared trie (estimated; default none)
  LOOKAHEAD_VLLM_MAX_NODES  draft tree nodes the chain is picked from (default 12)
  LOOKAHEAD_VLLM_SIZING     measured (default: chain length that pays) or fixed (always the longest chain)
  LOOKAHEAD_VLLM_METRICS    file the counters are written to, Prometheus text format (every
                            LOOKAHEAD_VLLM_METRICS_EVERY steps, default 64, and at exit), e.g. for
                            node-exporter's textfile collector
This module imports vLLM only for type checking: the proposer needs nothing from it at run time.
"""
from __future__ import annotations

import atexit
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..files import write_atomic
from .rows import Row, RowProposer

if TYPE_CHECKING:
    from vllm.config import VllmConfig



def _env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else default


class LookaheadProposer:
    """vLLM `custom_class` proposer: `Class(vllm_config)`, then `propose(...)` once per step."""

    def __init__(self, vllm_config: VllmConfig, **settings: Any) -> None:
        spec = vllm_config.speculative_config
        self.k = spec.num_speculative_tokens
        self.max_model_len = vllm_config.model_config.max_model_len
        options = {"max_nodes": _env_int("LOOKAHEAD_VLLM_MAX_NODES", 12),
                   "capacity": _env_int("LOOKAHEAD_VLLM_CAPACITY", 200_000),
                   "max_bytes": _env_int("LOOKAHEAD_VLLM_MAX_BYTES", None),
                   "sizing": os.environ.get("LOOKAHEAD_VLLM_SIZING", "measured")}
        options.update(settings)
        self.core = RowProposer(max_draft=self.k, **options)
        path = os.environ.get("LOOKAHEAD_VLLM_METRICS")
        self.metrics_path = Path(path) if path else None
        self.metrics_every = max(1, _env_int("LOOKAHEAD_VLLM_METRICS_EVERY", 64))
        if self.metrics_path:
            atexit.register(self.write_metrics)

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to load: the drafts come from tokens already seen."""

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings: Any = None, **_: Any) -> list[list[int]]:
        rows = []
        for i, sampled in enumerate(sampled_token_ids):
            n = int(num_tokens_no_spec[i])
            # A row at the length limit must not be given drafts (vLLM's own n-gram proposer skips it too).
            decoding = len(sampled) if n < self.max_model_len else 0
            rows.append(Row(token_ids_cpu[i, :n], decoding))
        chains = self.core.propose(rows)
        for i, chain in enumerate(chains):
            room = self.max_model_len - int(num_tokens_no_spec[i]) - 1
            if len(chain) > room:
                chains[i] = chain[:max(room, 0)]
        if self.metrics_path and self.core.steps % self.metrics_every == 0:
            self.write_metrics()
        return chains

    def metrics(self) -> dict[str, float]:
        return self.core.metrics()

    def write_metrics(self) -> None:
        """Write the counters atomically (a scraper never reads half a file)."""
        path = self.metrics_path
        if path is None:
            return
        write_atomic(path, self.core.prometheus())
