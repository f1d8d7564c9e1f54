"""Shared fixtures: tiny random-weight models of several architectures and the real embedded model."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from lookahead import DraftConfig

# 2 threads for the 2-core CI machine; 1 where other jobs share the cores (oversubscribed OpenMP threads
# spin and slow a forward down many times).
torch.set_num_threads(int(os.environ.get("LOOKAHEAD_TEST_THREADS", "2")))

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512)


def _gemma3():
    # A window of 6 with 3 layers (sliding, sliding, full) puts keys outside the window in every test.
    cfg = Gemma3TextConfig(**{**_COMMON, "num_hidden_layers": 3}, head_dim=8, sliding_window=6,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(cfg)


TINY_MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_COMMON)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**_COMMON, head_dim=8)),
    "gemma3": _gemma3,
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=512)),
}


def tiny_model(arch: str, seed: int = 0, attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(seed)
    model = TINY_MODELS[arch]()
    model.config._attn_implementation = attn
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


class IdTokenizer:
    """Stands in for a tokenizer where tests feed token ids directly: text is the ids, space-separated."""
    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


# Mechanism tests verify the whole draft budget every step; the measured sizing (which may
# decide that drafting does not pay on a noisy machine) has tests of its own.
FIXED = DraftConfig(sizing="fixed")


@pytest.fixture(params=sorted(TINY_MODELS))
def arch(request):
    return request.param


def hf_greedy(model, ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """Reference: plain transformers greedy decoding of the new tokens."""
    x = torch.tensor([ids], device=model.device)
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                         **kwargs)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="session")
def real_engine():
    """The embedded SmolLM2-135M-Instruct in fp32 (the exact reference dtype), full draft trees every step.

    Fixed sizing: the measured sizing may decide on a loaded CI machine that drafting does not pay,
    which would leave the equality tests nothing to verify.
    """
    import lookahead
    return lookahead.load(dtype="float32", device="cpu", draft_config=FIXED)
