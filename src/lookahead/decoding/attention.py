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

Packed rows. A batch's rows verify trees of different sizes; padded to the largest, every row would pay the
largest row's query tokens in every linear layer and the lm head (the bulk of a CPU forward). The verifier
instead runs the model on the rows' real query tokens only, one after another in a batch of one (`packed`), and
attention alone sees the padded [B, q] layout: `grouped_sdpa` scatters the packed queries into it, attends each
row to its own cache row as before, and gathers the real positions back. The keys went into the padded cache
the same way (kv.py).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

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


def _entry(mask: torch.Tensor) -> tuple:
    """The mask's memo entry: (mask, each row's keys up to its last visible column, its plans by grouping)."""
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
    return entry


def _plan(mask: torch.Tensor, groups: int, query_rows: int) -> tuple[list[tuple[int, int, int]], torch.Tensor]:
    """The runs of rows (see `runs`; from each row's last visible column) and the mask for packed heads."""
    entry = _entry(mask)
    plans = entry[2]
    if (groups, query_rows) not in plans:  # mask row j * q + i: query i of the group's head j
        plans[groups, query_rows] = (runs(entry[1], query_rows), mask.repeat(1, 1, groups, 1) if groups > 1 else mask)
    return plans[groups, query_rows]


class _Packing:
    """A packed forward in flight: where each real query token sits in the padded [rows, q] block, and how
    attention is split (decided once per mask, then reused by every layer)."""

    def __init__(self, index: torch.Tensor, rows: int, q: int, sizes: list[int]) -> None:
        self.index, self.rows, self.q, self.sizes = index, rows, q, sizes
        self.starts = [0]
        for n in sizes[:-1]:
            self.starts.append(self.starts[-1] + n)
        self.plans: dict[int, tuple] = {}  # id(mask) -> (mask, split plan or None: pad)

    def plan(self, mask: torch.Tensor, groups: int) -> tuple | None:
        """(roots' mask, [(row, its tree's first packed token, its size, its keys, its mask)]) where attending each
        row's tree on its own costs less than padding every row to the largest (see `runs` for the unit costs)."""
        entry = self.plans.get(id(mask))
        if entry is None or entry[0] is not mask:
            extents = _entry(mask)[1]  # the same pass `_plan` reads
            trees = [r for r, n in enumerate(self.sizes) if n > 1]
            padded = sum(e * (KEY_US + KEY_QUERY_US * groups * self.q) for e in extents)
            split = sum(e * (KEY_US + KEY_QUERY_US * groups) for e in extents) + sum(
                CALL_US + extents[r] * (KEY_US + KEY_QUERY_US * groups * (self.sizes[r] - 1)) for r in trees)
            plan = None
            if split < padded:
                rows = [(r, self.starts[r] + 1, self.sizes[r] - 1, extents[r],
                         mask[r:r + 1, :, 1:self.sizes[r], :extents[r]].repeat(1, 1, groups, 1)) for r in trees]
                plan = (mask[:, :, :1], rows)
            entry = self.plans[id(mask)] = (mask, plan)
        return entry[1]


# The packed forward in flight (this thread's), set by `packed`.
_packing: ContextVar[_Packing | None] = ContextVar("lookahead_packing", default=None)


@contextmanager
def packed(index: torch.Tensor, rows: int, q: int, sizes: list[int]) -> Iterator[None]:
    """Within: the model runs on the packed query tokens (`index`: each one's place in the [rows, q] padded
    batch; `sizes`: each row's count) of a padded batch (see above)."""
    token = _packing.set(_Packing(index, rows, q, sizes))
    try:
        yield
    finally:
        _packing.reset(token)


def grouped_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface; query [B, H, q, d], key/value [B, Hkv, kv, d] -> [B, q, H, d].
    In a packed forward query is [1, H, T, d] (T real tokens of a [B, q] batch) and so is the output."""
    packing = _packing.get()
    if packing is None or query.shape[0] != 1 or key.shape[0] == 1:
        return _grouped(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    heads, dim, groups = query.shape[1], query.shape[3], query.shape[1] // key.shape[1]
    plan = packing.plan(attention_mask, groups) if _plain_mask(attention_mask, dropout, kwargs) else None
    if plan is None:  # every row padded to the largest tree, as the padded layout's forward
        padded = query.new_zeros(packing.rows * packing.q, heads, dim)  # padding queries see one key: any value
        padded[packing.index] = query[0].transpose(0, 1)
        out, _ = _grouped(module, padded.view(packing.rows, packing.q, heads, dim).transpose(1, 2), key, value,
                          attention_mask, dropout, scaling, **kwargs)
        return out.reshape(packing.rows * packing.q, heads, -1)[packing.index].unsqueeze(0), None
    # Every row's first query (its root) in one call, then each tree on its own over its row's keys.
    roots_mask, trees = plan
    out = query.new_empty(query.shape[2], heads, value.shape[-1])
    roots = query[0, :, packing.starts].transpose(0, 1).unsqueeze(2)  # [B, H, 1, d]
    out[packing.starts] = _grouped(module, roots, key, value, roots_mask, dropout, scaling, **kwargs)[0][:, 0]
    for r, first, n, keys, mask in trees:
        tree = query[:, :, first: first + n].reshape(1, key.shape[1], groups * n, dim)  # group's heads packed
        att = F.scaled_dot_product_attention(tree, key[r:r + 1, :, :keys], value[r:r + 1, :, :keys], attn_mask=mask,
                                             scale=scaling)
        out[first: first + n] = att.reshape(heads, n, -1).transpose(0, 1)
    return out.unsqueeze(0), None


def _plain_mask(mask: torch.Tensor | None, dropout: float, kwargs: dict) -> bool:
    """Attention that `_grouped` runs itself: an additive mask shared by the heads, no extras."""
    extras = any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "s_aux", "sinks"))
    return not (mask is None or mask.dtype == torch.bool or extras or dropout or mask.shape[1] != 1
                or torch.compiler.is_compiling())


def _grouped(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
             **kwargs) -> tuple[torch.Tensor, None]:
    if not _plain_mask(attention_mask, dropout, kwargs):
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
