"""Fixtures for the tests that run our proposer inside vLLM (run in .venv-vllm: `bash install.sh vllm`).

`import vllm` is at the top on purpose: without vLLM these tests must fail, not skip.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import vllm  # noqa: F401  (fail loudly when the vLLM environment is missing)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the shared prompt set (tests/real_prompts.py)

PROPOSER = "lookahead.integrations.vllm.LookaheadProposer"
TRIE_CAPACITY = 3000  # small enough that the equality prompts overflow it: the bound is exercised


def make_llm(model: Path, speculative_config: dict | None):
    from vllm import LLM

    # fp32: the exact reference. Eager mode: torch.compile would add ~2 minutes per engine on a 2-core CPU.
    # An explicit KV size: on CPU, gpu_memory_utilization is a share of the NUMA node's RAM, which may be
    # already in use by the time the worker checks.
    return LLM(model=str(model), dtype="float32", enforce_eager=True, kv_cache_memory_bytes=512 << 20,
               max_model_len=2048, seed=0, disable_log_stats=False, speculative_config=speculative_config)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M-Instruct, exported by `lookahead export` (what vLLM loads)."""
    from lookahead.export import export

    return export(None, tmp_path_factory.mktemp("smollm2") / "hf", dtype="float32")


@pytest.fixture(scope="session")
def metrics_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("metrics") / "lookahead.prom"


@pytest.fixture(scope="session")
def reference(model_dir):
    """vLLM without speculation."""
    llm = make_llm(model_dir, None)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="session")
def lookahead_llm(model_dir, metrics_file, reference):
    """vLLM with our proposer; its worker inherits these settings through the environment.

    Built after `reference` on purpose: vLLM's Prometheus registry is per process and the engine built
    last owns it, so `counters()` reads this engine's acceptance."""
    os.environ.update({"LOOKAHEAD_VLLM_METRICS": str(metrics_file), "LOOKAHEAD_VLLM_METRICS_EVERY": "1",
                       "LOOKAHEAD_VLLM_CAPACITY": str(TRIE_CAPACITY)})
    llm = make_llm(model_dir, {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": 8})
    yield llm
    llm.llm_engine.engine_core.shutdown()


def read_metrics(path: Path) -> dict[str, float]:
    out = {}
    for line in path.read_text().splitlines():
        name, value = line.rsplit(" ", 1)
        out[name.removeprefix("lookahead_vllm_")] = float(value)
    return out


def counters(llm) -> dict[str, float]:
    """vLLM's own counters: generated tokens and speculative-decoding acceptance."""
    out = {}
    for metric in llm.get_metrics():
        if metric.name in ("vllm:generation_tokens", "vllm:spec_decode_num_accepted_tokens",
                           "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_drafts"):
            out[metric.name.removeprefix("vllm:")] = float(metric.value)
    return out
