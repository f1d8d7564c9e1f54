"""KV cache for tree verification: a plain DynamicCache, compacted to the accepted path.

Sliding-window layers get a full-length layer too (we apply their window in the mask,
see masks.py): a layer that drops old keys by itself cannot be rolled back once a
rejected branch has pushed keys out of its window.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .support import UnsupportedModelError


def new_cache() -> DynamicCache:
    # No config: every layer is a plain, full-length DynamicLayer.
    return DynamicCache()


def check_cache(cache) -> None:
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
        raise UnsupportedModelError(
            f"cache layers {kinds} cannot be compacted by index; the model must use a plain DynamicCache")


def compact(cache: DynamicCache, past: int, keep: list[int]) -> None:
    """Keep positions [0, past) plus tree nodes `keep` (indices relative to `past`)."""
    n = len(keep)
    if keep == list(range(n)):  # accepted path is the tree's first nodes: a plain crop
        for layer in cache.layers:
            layer.keys = layer.keys[:, :, : past + n]
            layer.values = layer.values[:, :, : past + n]
        return
    index = torch.tensor(keep, device=cache.layers[0].keys.device) + past
    for layer in cache.layers:
        kept_k = layer.keys.index_select(2, index)
        kept_v = layer.values.index_select(2, index)
        layer.keys = torch.cat([layer.keys[:, :, :past], kept_k], dim=2)
        layer.values = torch.cat([layer.values[:, :, :past], kept_v], dim=2)
