"""Grouped-query attention for verify forwards, without copying the KV cache per head.

With a mask and more than one query token, transformers' SDPA path repeats every key/value head for
the query heads that share it (`repeat_kv`): a copy of the whole cache, times the group size, in every
layer of every verify forward (a draft tree always has a mask). For one query token it already packs
the group's query heads into rows of their shared key/value head instead (`pack_gqa`); `grouped_sdpa`
does the same for q query tokens: [B, Hkv * g, q, d] -> [B, Hkv, g * q, d], the mask repeated for the g
heads (one mask per forward: it is computed once and reused by every layer). Every other call
(prefill without a mask, no grouping, attention extras) goes to transformers' SDPA unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "lookahead_sdpa"


def use_grouped(model: torch.nn.Module) -> bool:
    """Switch a model on transformers' SDPA to `grouped_sdpa` (in place); False where it uses anything else."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, grouped_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True


# (mask, groups, its grouped form) of the last call: every layer of a forward gets the same mask. One tuple,
# rebound whole, so another thread never pairs one mask with another's grouped form.
_last: tuple = (None, 0, None)


def grouped_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface; query [B, H, q, d], key/value [B, Hkv, kv, d] -> [B, q, H, d]."""
    batch, heads, q, dim = query.shape
    groups = heads // key.shape[1]
    extras = any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "s_aux", "sinks"))
    if (groups == 1 or q == 1 or attention_mask is None or attention_mask.dtype == torch.bool or extras
            or dropout or attention_mask.shape[1] != 1 or torch.compiler.is_compiling()):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    global _last
    last = _last
    if last[0] is attention_mask and last[1] == groups:  # held, so its id cannot be reused by another tensor
        mask = last[2]
    else:
        mask = attention_mask.repeat(1, 1, groups, 1)  # row j * q + i: query i of the group's head j
        _last = (attention_mask, groups, mask)
    packed = query.reshape(batch, key.shape[1], groups * q, dim)
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, q, value.shape[-1]).transpose(1, 2).contiguous(), None
