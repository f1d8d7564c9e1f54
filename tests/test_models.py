"""Loading: named models, .gguf files, local HF directories; offline only, clear errors otherwise."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from lookahead.decoding.attention import NAME as GROUPED
from lookahead.models import load_model, locate, parse_dtype


def test_unknown_source_names_what_is_accepted(tmp_path):
    with pytest.raises(FileNotFoundError, match="named model"):
        locate(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="config.json"):
        locate(tmp_path)  # a folder without a model


def test_dtype_names_are_checked():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int3")


@pytest.mark.real_model
def test_local_hf_directory_loads_with_its_tokenizer(tmp_path, real_engine):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    real_engine.tokenizer.save_pretrained(tmp_path)
    loaded, tokenizer = load_model(tmp_path, dtype="float32", device="cpu")
    assert type(loaded).__name__ == "LlamaForCausalLM" and loaded.config._attn_implementation == GROUPED
    assert tokenizer("hello").input_ids == real_engine.tokenizer("hello").input_ids
    for name, p in model.state_dict().items():
        assert torch.equal(p, loaded.state_dict()[name])


@pytest.mark.real_model
def test_gguf_file_path_loads(real_engine):
    directory, name = locate(None)
    model, _ = load_model(directory / name, dtype="float32", device="cpu")
    ref = real_engine.model.state_dict()
    for key in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert torch.equal(model.state_dict()[key], ref[key])
