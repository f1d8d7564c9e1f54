"""Loading: named models, .gguf files, local HF directories; offline only, clear errors otherwise."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from lookahead.decoding.attention import NAME as GROUPED
from lookahead.models import cast, load_model, locate, parse_dtype


def test_unknown_source_names_what_is_accepted(tmp_path):
    with pytest.raises(FileNotFoundError, match="named model"):
        locate(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="config.json"):
        locate(tmp_path)  # a folder without a model


def test_dtype_names_are_checked():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int3")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_a_model_cast_to_bf16_computes_as_one_loaded_in_bf16(tmp_path, arch):
    """dtype="auto" casts the fp32 model it measured: RoPE frequencies must stay fp32 as a bf16 load keeps them, or
    late positions turn by wrong angles (SmolLM2-135M: logits 0.25 apart at 641 tokens)."""
    from transformers import AutoModelForCausalLM
    tiny_model(arch).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    cast_ = cast(tiny_model(arch), torch.bfloat16)
    assert next(cast_.parameters()).dtype == torch.bfloat16
    assert {n: b.dtype for n, b in cast_.named_buffers()} == {n: b.dtype for n, b in loaded.named_buffers()}
    ids = torch.randint(0, 96, (1, 480), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(cast_(ids).logits, loaded(ids).logits)


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
