"""Grouped-query attention for verify forwards, without copying the KV cache per head.

With a mask and more than one query token, transformers' SDPA path repeats every key/value head for
the query heads that share it (`repeat_kv`): a copy of the whole cache, times the group size, in every
layer of every verify forward (a draft tree always has a mask). For one query token it already packs
the group's query heads into rows of their shared key/value head instead (`pack_gqa`); `grouped_sdpa`
does the same for q query tokens: [B, Hkv * g, q, d] -> [B, Hkv, g * q, d], the mask repeated for the g
heads (one mask per forward: it is computed once and reused by every layer).

Rows of a batch are cut to their own length. The cache is padded to its longest row, and the verifier puts
each row's visible keys at the start of its cache row (verify.py), so a row needs only the keys up to the last
one its mask shows. One call per row would pay a call's fixed cost per row; one call for the batch reads the
longest row's keys for every row (an 8-row step whose rows held 47-559 tokens spent three quarters of its
attention on padding: measured 0.75 vs 0.52 ms a layer for one query token, 2.46 vs 1.00 ms for 13, SmolLM2's
3 key/value heads on Zen 3). `runs` splits the batch into consecutive runs of rows, each cut to its longest
row, minimising calls x a call's cost plus rows x keys.
Every other call (prefill without a mask, no grouping, attention extras) goes to transformers' SDPA unchanged.
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


# A call's fixed cost in units of one row's key (measured on Zen 3, SmolLM2: ~40 us a call; a key costs a
# row ~0.13 us plus ~0.011 us per query row attending to it). Only the ratio matters, and only roughly.
CALL_US, KEY_US, KEY_QUERY_US = 40.0, 0.13, 0.011


def runs(extents: list[int], query_rows: int) -> list[tuple[int, int, int]]:
    """Consecutive runs (start, end, keys) covering the rows, cheapest by calls and padded keys read."""
    call = CALL_US / (KEY_US + KEY_QUERY_US * query_rows)
    best, cut = [0.0], [0]  # best[t]: cheapest cover of rows [0, t); cut[t]: where its last run starts
    for t in range(1, len(extents) + 1):
        longest, choice = 0, None
        for start in range(t - 1, -1, -1):
            longest = max(longest, extents[start])
            cost = best[start] + call + (t - start) * longest
            if choice is None or cost < choice[0]:
                choice = (cost, start)
        best.append(choice[0])
        cut.append(choice[1])
    out, t = [], len(extents)
    while t:
        start = cut[t]
        out.append((start, t, max(extents[start:t])))
        t = start
    return out[::-1]


# Per mask (every layer of a forward gets the same one, or one per kind of layer): the keys each row needs, its
# runs and grouped form. The mask is held with them, so its id cannot be reused by another tensor meanwhile.
_memo: dict[int, tuple] = {}
MEMO = 4


def _plan(mask: torch.Tensor, groups: int, query_rows: int) -> tuple[list[tuple[int, int, int]], torch.Tensor]:
    """The runs of rows (see `runs`; from each row's last visible column) and the mask for packed heads."""
    entry = _memo.get(id(mask))
    if entry is None or entry[0] is not mask:
        if mask.shape[0] == 1:  # one row (a single request): nothing to cut, no pass over the mask
            extents = [mask.shape[-1]]
        else:
            seen = (mask[:, 0] > torch.finfo(mask.dtype).min / 2).any(1)  # [B, kv]
            columns = torch.arange(1, seen.shape[1] + 1, device=mask.device)
            extents = (seen * columns).amax(1).clamp(min=1).tolist()
        entry = (mask, extents, {})
        if len(_memo) >= MEMO:  # masks of past forwards: dropped whole (one call, safe with another thread reading)
            _memo.clear()
        _memo[id(mask)] = entry
    plans = entry[2]
    if (groups, query_rows) not in plans:  # mask row j * q + i: query i of the group's head j
        plans[groups, query_rows] = (runs(entry[1], query_rows), mask.repeat(1, 1, groups, 1) if groups > 1 else mask)
    return plans[groups, query_rows]


def grouped_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface; query [B, H, q, d], key/value [B, Hkv, kv, d] -> [B, q, H, d]."""
    extras = any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "s_aux", "sinks"))
    if (attention_mask is None or attention_mask.dtype == torch.bool or extras or dropout
            or attention_mask.shape[1] != 1 or torch.compiler.is_compiling()):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, q, dim = query.shape
    groups = heads // key.shape[1]
    packs = groups > 1 and q > 1  # for one query transformers packs the group's heads itself
    parts, packed_mask = _plan(attention_mask, groups if packs else 1, groups * q)
    outs = []
    for start, end, keys in parts:
        keys = min(keys, key.shape[2])
        k, v = key[start:end, :, :keys], value[start:end, :, :keys]
        mask = packed_mask[start:end, :, :, :keys]
        if packs:
            packed = query[start:end].reshape(end - start, key.shape[1], groups * q, dim)
            out = F.scaled_dot_product_attention(packed, k, v, attn_mask=mask, scale=scaling)
            outs.append(out.reshape(end - start, heads, q, value.shape[-1]).transpose(1, 2))
        else:
            outs.append(sdpa_attention_forward(module, query[start:end], k, v, mask, scaling=scaling, **kwargs)[0])
    return (outs[0] if len(outs) == 1 else torch.cat(outs)).contiguous(), None
