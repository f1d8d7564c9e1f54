"""Verify forwards run grouped-query attention on the shared key/value heads: same logits, no per-head KV copies."""
from __future__ import annotations

import pytest
import torch
from transformers.integrations import sdpa_attention

from conftest import IdTokenizer, tiny_model
from lookahead import DraftTree, Engine
from lookahead.decoding import attention
from lookahead.decoding.attention import NAME, runs, use_grouped
from lookahead.decoding.invariant import NAME as INVARIANT
from lookahead.decoding.verify import Verifier

PROMPT = [3, 17, 42, 8, 17, 42, 8, 5, 9, 17]
TREE = DraftTree([42, 8, 11, 5, 9, 2, 1, 60], [-1, 0, 0, 1, 1, 2, 4, 0])


def _tree_logits(model, rows: int = 2) -> list[torch.Tensor]:
    verifier = Verifier(model)
    for r in range(rows):
        verifier.add(r, PROMPT[: len(PROMPT) - 3 * r])  # rows of different lengths: padding in the mask
    return verifier.verify([TREE, DraftTree([7, 4], [-1, 0])][:rows])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_grouped_attention_gives_the_logits_sdpa_gives(arch):
    model = tiny_model(arch)
    expected = _tree_logits(model)
    assert use_grouped(model) and model.config._attn_implementation == NAME
    for got, want in zip(_tree_logits(model), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_tree_forwards_do_not_copy_key_value_heads(monkeypatch):
    calls = []
    original = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda *a: calls.append(1) or original(*a))
    model = tiny_model("llama")  # 4 query heads on 2 key/value heads
    _tree_logits(model)
    assert calls  # transformers' SDPA copies every key/value head for its query heads
    calls.clear()
    use_grouped(model)
    _tree_logits(model)
    assert not calls


def test_engines_group_sdpa_models_and_leave_deterministic_ones_invariant():
    assert Engine(tiny_model("llama"), IdTokenizer()).model.config._attn_implementation == NAME
    engine = Engine(tiny_model("llama"), IdTokenizer(), deterministic=True)
    assert engine.model.config._attn_implementation == INVARIANT
    assert Engine(tiny_model("llama", attn="eager"), IdTokenizer()).model.config._attn_implementation == "eager"


def test_runs_cut_rows_to_their_own_length_where_a_call_costs_less_than_the_padding():
    assert runs([40, 40, 40, 40], 3) == [(0, 4, 40)]               # equal rows: one call
    assert runs([40, 41, 5000, 39], 3) == [(0, 2, 41), (2, 3, 5000), (3, 4, 39)]
    assert runs([40, 5000], 39) == [(0, 1, 40), (1, 2, 5000)]
    assert runs([7], 1) == [(0, 1, 7)]


def test_rows_of_very_different_lengths_are_attended_apart_with_the_same_logits(monkeypatch):
    long = [int(t) for t in torch.randint(1, 90, (400,), generator=torch.Generator().manual_seed(0))]
    trees = [TREE, DraftTree([7, 4], [-1, 0])]

    def logits(model):
        verifier = Verifier(model)
        verifier.add("long", long)
        verifier.add("short", PROMPT[:5])
        keys.clear()  # the verify forward's calls only, not the prefills'
        return verifier.verify(trees)

    keys = []
    model = tiny_model("llama")
    expected = logits(model)                    # transformers' SDPA: both rows over the long row's keys
    original = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda q, k, *a, **kw: keys.append(k.shape[0:3:2]) or original(q, k, *a, **kw))
    use_grouped(model)
    for got, want in zip(logits(model), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    q = len(TREE)
    assert set(keys) == {(1, 400 + q), (1, 5 + q)}  # each row alone, over its own keys only
