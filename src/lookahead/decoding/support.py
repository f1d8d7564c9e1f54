"""Refuse models whose output tree verification cannot reproduce exactly.

Tree verification needs three things from a model: attention that honours an additive 4D
mask, explicit position ids, and a per-token KV cache we can index-select. Anything else
(FlashAttention kernels, recurrent state, static/quantized caches) would silently change
the output, so it is refused here with a message that says what to do instead.
"""
from __future__ import annotations

import torch

from .attention import NAME as GROUPED_ATTENTION
from .invariant import NAME as INVARIANT_ATTENTION

MASKABLE_ATTENTION = {"eager", "sdpa", "flex_attention", INVARIANT_ATTENTION, GROUPED_ATTENTION}
SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention"}
DYNAMIC_CACHES = {None, "dynamic"}
# Families whose state is not a per-token KV cache (recurrent / hybrid); their state cannot
# be rolled back to an accepted tree path by index-selection.
RECURRENT_MARKERS = ("mamba", "rwkv", "jamba", "zamba", "falcon_h1", "bamba", "recurrent", "xlstm", "lfm2",
                     "qwen3_next", "granitemoehybrid", "nemotron_h", "minimax", "plamo2")


class UnsupportedModelError(ValueError):
    """The model cannot be verified exactly with tree attention."""


def layer_types(config) -> list[str]:
    """Attention kind of every layer ('full_attention' or 'sliding_attention')."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers


def sliding_window(config) -> int | None:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "sliding_window", None)


def check_supported(model: torch.nn.Module) -> None:
    config = model.config
    model_type = str(getattr(config, "model_type", "")).lower()
    if any(marker in model_type for marker in RECURRENT_MARKERS):
        raise UnsupportedModelError(
            f"model type '{model_type}' keeps recurrent state, which cannot be rolled back to an accepted "
            "draft path; use plain model.generate() for it (draft=False does not help: the engine needs a KV cache)")
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in MASKABLE_ATTENTION:
        raise UnsupportedModelError(
            f"attention implementation '{attn}' ignores custom 4D masks, so tree verification would be wrong; "
            "load the model with attn_implementation='sdpa' (or 'eager')")
    unknown = set(layer_types(config)) - SUPPORTED_LAYER_TYPES
    if unknown:
        raise UnsupportedModelError(
            f"layer types {sorted(unknown)} are not plain attention over a KV cache; this model is not supported")
    cache_impl = getattr(getattr(model, "generation_config", None), "cache_implementation", None)
    if cache_impl not in DYNAMIC_CACHES:
        raise UnsupportedModelError(
            f"cache_implementation='{cache_impl}' cannot be compacted to an accepted path; "
            "set model.generation_config.cache_implementation = None (dynamic cache)")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError("encoder-decoder models are not supported; use a decoder-only causal LM")


class ModelBound:
    """Base of the verifiers: the model (refused here if unsupported) and the facts masks need."""

    def __init__(self, model: torch.nn.Module) -> None:
        check_supported(model)
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.types = layer_types(model.config)
        self.window = sliding_window(model.config)
