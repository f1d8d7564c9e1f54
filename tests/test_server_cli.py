"""`lookahead serve` as a real process: kill -9 and restart keeps the learned trie; SIGTERM saves it.

A tiny random Llama with the embedded model's real tokenizer keeps process start-up short.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lookahead import DraftState

pytestmark = pytest.mark.real_model


def tiny_llama(tokenizer, path: Path, max_positions: int = 256) -> Path:
    """A tiny random Llama with `tokenizer`, saved to `path`."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_positions,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(real_engine, tmp_path_factory):
    return tiny_llama(real_engine.tokenizer, tmp_path_factory.mktemp("tiny-llama"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model_dir, trie, port) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lookahead.cli", "serve", "--model", str(model_dir), "--dtype", "float32",
           "--device", "cpu", "--port", str(port), "--trie", str(trie), "--save-every", "0.2", "--threads", "1",
           "--served-model-name", "tiny", "--log-level", "warning"]
    # The tiny model's measured cost curve goes to a cache beside it, not the user's ~/.cache.
    env = {**os.environ, "LOOKAHEAD_CACHE": str(Path(model_dir).parent / "cache")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not start in time")


def ask(port: int, prompt: str) -> dict:
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": prompt, "max_tokens": 12})
    assert r.status_code == 200, r.text
    return r.json()


def health(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()


def wait_saved(path, nodes: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(DraftState.load(path).trie) == nodes:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{path} never held the {nodes}-node trie")


def test_kill_and_restart_keeps_the_trie_and_sigterm_saves(tiny_dir, tmp_path):
    trie = tmp_path / "shared.trie"
    port = free_port()
    proc = serve(tiny_dir, trie, port)
    try:
        assert "does not exist yet" in health(port)["trie"]
        ask(port, "The quick brown fox")
        learned = health(port)["trie_nodes"]
        assert learned > 0
        wait_saved(trie, learned)      # the periodic save
        proc.send_signal(signal.SIGKILL)  # no chance to save anything more
        proc.wait(30)

        proc = serve(tiny_dir, trie, port)
        status = health(port)
        assert status["trie_nodes"] == learned and status["trie"].startswith("loaded")
        ask(port, "Lorem ipsum dolor sit amet")
        grown = health(port)["trie_nodes"]
        assert grown > learned
        proc.send_signal(signal.SIGTERM)  # graceful: the lifespan saves on the way out
        proc.wait(60)  # uvicorn re-raises the signal after its graceful shutdown: the exit code is -15
        assert len(DraftState.load(trie).trie) == grown
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)


def test_the_load_test_gives_every_server_the_first_ones_dtype_and_kernels(real_engine, tmp_path, monkeypatch):
    """`auto` is decided once, by the first server alone: servers deciding apart can land on different kernels
    where two measure within noise, and the load test's ratio would then not be drafting's alone."""
    from lookahead.server import loadtest

    model_dir = tiny_llama(real_engine.tokenizer, tmp_path / "tiny-llama", 4096)  # long enough for copy prompts
    monkeypatch.setenv("LOOKAHEAD_CACHE", str(tmp_path / "cache"))  # the servers' cost curves, not ~/.cache
    started = []
    start = loadtest.start_server
    monkeypatch.setattr(loadtest, "start_server",  # (mode, the numerics it was given)
                        lambda *a: started.append((a[1], a[3] if len(a) > 3 else None)) or start(*a))
    out = tmp_path / "load"
    assert loadtest.main(["--model", str(model_dir), "--workload", "copy", "--concurrency", "1", "--modes",
                          "adaptive", "plain", "--rounds", "1", "--max-tokens", "4", "--out", str(out)]) == 0
    servers = json.loads(out.with_suffix(".json").read_text())["meta"]["servers"]
    assert [mode for mode, _ in started] == ["adaptive", "plain"]
    assert started[0][1] is None  # the first decides `auto` itself
    assert started[1][1] == servers["adaptive"]  # the second is given what the first runs
    assert (servers["plain"]["dtype"], servers["plain"]["kernels"]) == (servers["adaptive"]["dtype"],
                                                                        servers["adaptive"]["kernels"])
    assert out.with_suffix(".md").exists() and out.with_suffix(".png").exists()


def test_the_load_test_sends_a_base_models_prompts_as_text_to_completions(real_engine, tmp_path, monkeypatch):
    """A model without a chat template (the named gemma3-270m is a base model) answers chat requests with a 400:
    the load test sends each prompt's text to /v1/completions instead (it failed on the first request before)."""
    import copy

    from lookahead.server import loadtest

    tokenizer = copy.deepcopy(real_engine.tokenizer)
    tokenizer.chat_template = None
    model_dir = tiny_llama(tokenizer, tmp_path / "tiny-base", 4096)
    monkeypatch.setenv("LOOKAHEAD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "load"
    assert loadtest.main(["--model", str(model_dir), "--dtype", "float32", "--workload", "copy", "--concurrency", "1",
                          "--modes", "plain", "--rounds", "1", "--max-tokens", "4", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["meta"]["endpoint"] == "completions"
    assert [cell["tokens"] for cell in result["cells"]] == [8]  # two requests of 4 tokens each
