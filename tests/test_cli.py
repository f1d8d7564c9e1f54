"""`lookahead generate`: the README's main command."""
from __future__ import annotations

import subprocess
import sys

import pytest

import lookahead
from lookahead.cli import build_parser, main

pytestmark = pytest.mark.real_model


def test_generate_streams_text_and_a_stats_line(real_engine, monkeypatch, capsys):
    monkeypatch.setattr(lookahead, "load", lambda *args, **kwargs: real_engine)
    assert main(["generate", "--max-new-tokens", "24", "--compare"]) == 0
    out, err = capsys.readouterr()
    half = len(out) // 2
    assert out.strip() and out[:half] == out[half:]  # --compare prints the same text twice (no draft, then draft)
    assert "accepted tokens/step" in err and "outputs identical" in err


def test_draft_caps_flags_reach_the_engines_draft_config(real_engine, monkeypatch):
    """--max-nodes / --max-depth / --copy-depth become the DraftConfig `generate` and `serve` load with."""
    from lookahead.server.cli import _draft_config
    seen = {}
    monkeypatch.setattr(lookahead, "load", lambda *args, **kwargs: seen.update(kwargs) or real_engine)
    assert main(["generate", "--max-new-tokens", "4", "--max-depth", "8", "--copy-depth", "16"]) == 0
    cfg = seen["draft_config"]
    assert (cfg.max_depth, cfg.copy_depth, cfg.max_nodes) == (8, 16, lookahead.DraftConfig().max_nodes)
    args = build_parser().parse_args(["serve", "--max-nodes", "6", "--copy-depth", "20"])
    assert (_draft_config(args).max_nodes, _draft_config(args).copy_depth) == (6, 20)


def test_bad_model_path_is_a_clear_error(capsys):
    assert main(["generate", "--model", "/nonexistent/model.gguf", "--max-new-tokens", "4"]) == 2
    assert "neither a named model" in capsys.readouterr().err


def test_console_script_runs_with_no_arguments_but_a_limit():
    done = subprocess.run([sys.executable, "-m", "lookahead.cli", "generate", "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[lookahead]" in done.stderr and done.stdout.strip()
