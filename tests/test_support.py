"""Models whose output tree verification cannot reproduce are refused with advice, never run wrong."""
from __future__ import annotations

import pytest

from conftest import IdTokenizer, tiny_model
from lookahead import Engine, UnsupportedModelError


def test_flash_attention_is_refused_with_advice():
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="attn_implementation='sdpa'"):
        Engine(model, IdTokenizer())


def test_eager_attention_is_accepted_and_exact():
    from conftest import hf_greedy
    model = tiny_model("llama", attn="eager")
    prompt = [4, 5, 6, 4, 5, 6, 4, 5]
    assert Engine(model, IdTokenizer()).generate(prompt, max_new_tokens=12).token_ids == hf_greedy(model, prompt, 12)


def test_static_cache_is_refused_with_advice():
    model = tiny_model("qwen2")
    model.generation_config.cache_implementation = "static"
    with pytest.raises(UnsupportedModelError, match="cache_implementation"):
        Engine(model, IdTokenizer())


def test_recurrent_models_are_refused():
    from transformers import MambaConfig, MambaForCausalLM
    model = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4))
    with pytest.raises(UnsupportedModelError, match="recurrent state"):
        Engine(model, IdTokenizer())


def test_unknown_layer_kinds_are_refused():
    model = tiny_model("qwen3")
    model.config.layer_types = ["linear_attention"] * model.config.num_hidden_layers
    with pytest.raises(UnsupportedModelError, match="linear_attention"):
        Engine(model, IdTokenizer())
