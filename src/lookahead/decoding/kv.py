"""KV cache for tree verification: a plain DynamicCache, compacted to the accepted path.

Sliding-window layers get a full-length layer too (we apply their window in the mask,
see verify.py): a layer that drops old keys by itself cannot be rolled back once a
rejected branch has pushed keys out of its window.
"""
from __future__ import annotations

import inspect

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


def cache_argument(model: torch.nn.Module) -> str:
    """The forward's keyword for the KV cache: `cache` from transformers 5.24 on (where `past_key_values`
    is deprecated, with a warning on every call), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
