"""Batch- and tree-invariant kernels: a position's logits do not depend on what shares its forward.

With fast kernels, the logits of a position can differ in their last bits between a one-token
forward and a forward over a draft tree or a batch of rows: a matmul picks another algorithm
for another row count (MKL runs one row as a matrix-vector product), attention reduces over a
different number of keys (padding, sibling branches) and transformers packs grouped-query heads
differently for one query than for many. In bf16 those bits flip near-ties, so the same greedy
request can give another text when the draft tree or the batch changes. `make_invariant` makes
every position's computation the same whatever shares the forward:

- linear layers: every matmul call has the same shape, TILE rows (zero-padded), so the library
  runs the same code path for any row count;
- attention: each query row attends over exactly its visible keys, gathered in order into a
  contiguous tensor, by the same one-query call a one-token forward makes.

Norms, rotary embeddings and activations act on each row alone. The cost is measured in the
README ("Deterministic mode"); greedy output then equals plain decoding bit for bit in any dtype.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import eager_mask
from transformers.pytorch_utils import Conv1D

NAME = "lookahead_invariant"


def make_invariant(model: torch.nn.Module) -> dict[str, int]:
    """Install invariant linears and attention on `model` in place; returns how many linears use each kernel."""
    chosen: dict[tuple, Callable] = {}
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            w = module.weight
            shape = (tuple(w.shape), w.dtype, w.device.type, module.bias is not None)
            if shape not in chosen:
                chosen[shape] = _kernel(module)
            kernel = chosen[shape]
            module.forward = functools.partial(kernel, module)
            counts[kernel.__name__] = counts.get(kernel.__name__, 0) + 1
    AttentionInterface.register(NAME, invariant_attention)
    AttentionMaskInterface.register(NAME, eager_mask)  # additive float masks, as the verifier builds
    model.set_attn_implementation(NAME)
    return counts


def is_invariant(model: torch.nn.Module) -> bool:
    return getattr(model.config, "_attn_implementation", None) == NAME


# -- linear layers --------------------------------------------------------------------------------
# Libraries pick the matmul algorithm by row count (MKL runs one row as a matrix-vector product),
# and oneDNN's bf16 kernels were seen to round one row differently from three on real activations
# while agreeing on random ones: invariance cannot be found by testing, only built. Every call has
# exactly TILE rows (zero-padded), so one shape and one code path serve every row count; a row's
# result then depends on its own data alone. TILE = 8: a forward of up to 8 rows costs one tile
# (bf16: ~1.1x a one-row call, fp32 ~2x; README "Deterministic mode").
TILE = 8


def _tiled(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    m = rows.shape[0]
    padded = F.pad(rows, (0, 0, 0, -m % TILE))
    out = torch.cat([_matmul(module, padded[i: i + TILE]) for i in range(0, padded.shape[0], TILE)])[:m]
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _matmul(module: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    if isinstance(module, Conv1D):  # GPT-2's linear layers: weight [in, out]
        return torch.addmm(module.bias, rows, module.weight)
    return F.linear(rows, module.weight, module.bias)


def _alone(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each row alone in its tile, for kernels whose result depends on a row's place in the tile."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.cat([_tiled(module, rows[i: i + 1]) for i in range(rows.shape[0])])
    return out.reshape(*x.shape[:-1], out.shape[-1])


@torch.inference_mode()
def _kernel(module: torch.nn.Module):
    """Tiles, unless a row's place in the tile changes its bits (checked on random data): then rows alone."""
    w = module.weight
    gen = torch.Generator().manual_seed(0)
    features = w.shape[0] if isinstance(module, Conv1D) else w.shape[1]
    x = torch.randn(TILE, features, generator=gen).to(w.dtype).to(w.device)
    order = torch.randperm(TILE, generator=gen).to(w.device)
    return _tiled if torch.equal(_tiled(module, x[order]), _tiled(module, x)[order]) else _alone


# -- attention ------------------------------------------------------------------------------------
def invariant_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface; query [B, H, q, d], key/value [B, Hkv, kv, d] -> [B, q, H, d]."""
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError("deterministic mode does not support attention sinks")
    groups = query.shape[1] // key.shape[1]
    batch, _, q, _ = query.shape
    out = query.new_empty(batch, q, query.shape[1], query.shape[3])
    visible = _visible(attention_mask, batch, q, key.shape[2])
    for b in range(batch):
        for i in range(q):
            index = visible[b][i]
            if isinstance(index, int):  # a prefix of the cache
                keys, values = key[b: b + 1, :, :index], value[b: b + 1, :, :index]
            else:
                keys, values = key[b: b + 1, :, index], value[b: b + 1, :, index]
            keys, values = repeat_kv(keys, groups).contiguous(), repeat_kv(values, groups).contiguous()
            out[b, i] = _one_query(query[b: b + 1, :, i: i + 1].contiguous(), keys, values, scaling, softcap)[0, :, 0]
    return out, None


# (mask, its visible keys) of the last forward: every layer of a forward gets the same mask. One tuple,
# rebound whole, so a reader on another thread never pairs one mask with another's keys.
_last: tuple = (None, None)


def _visible(mask: torch.Tensor | None, batch: int, q: int, kv: int) -> list[list[int | torch.Tensor]]:
    """Per row and query: the key indices it sees (an int n: the first n keys)."""
    if mask is None:  # causal over the cache, the queries being its last q positions
        return [[kv - q + i + 1 for i in range(q)] for _ in range(batch)]
    global _last
    last = _last
    if last[0] is mask:  # held, so its id cannot be reused by another tensor
        return last[1]
    seen = (mask[:, 0] > torch.finfo(mask.dtype).min / 2).cpu()
    visible = []
    for b in range(batch):
        rows = []
        for i in range(q):
            index = seen[b, i].nonzero().squeeze(1)
            n = len(index)
            rows.append(n if n and int(index[-1]) == n - 1 else index.to(mask.device))
        visible.append(rows)
    _last = (mask, visible)
    return visible


def _one_query(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float | None,
               softcap: float | None) -> torch.Tensor:
    """[1, H, 1, d] over [1, H, n, d]: the same call (same shapes, same kernel) wherever the query sits."""
    if softcap is None:
        return F.scaled_dot_product_attention(query, keys, values, scale=scaling)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.tanh(query @ keys.transpose(-1, -2) * scale / softcap) * softcap
    return torch.softmax(scores.float(), dim=-1).to(values.dtype) @ values
