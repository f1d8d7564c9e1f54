"""KV cache for tree verification: a DynamicCache whose layers append in place, compacted to the accepted path.

transformers' DynamicLayer appends a forward's keys with `torch.cat`, which copies the whole cache every
forward: measured 38 % of an 8-row plain step over a 600-token cache (SmolLM2-135M fp32, Zen 3; 91 of
237 ms), growing with rows x length. `AppendLayer` keeps spare room after the cached positions and writes
new keys into it, so a step costs what its own tokens cost; the cached keys are a view of that buffer.
Whatever replaces `keys` by another tensor (dropping rows, merging a row) just starts a new buffer.

Sliding-window layers get a full-length layer too (we apply their window in the mask, see verify.py):
a layer that drops old keys by itself cannot be rolled back once a rejected branch has pushed keys out
of its window.
"""
from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from .support import UnsupportedModelError

ROOM = 256  # spare positions a new buffer gets (at least; a quarter of its length for long caches)


class AppendLayer(DynamicLayer):
    """A DynamicLayer that writes new keys into spare room instead of concatenating."""

    buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # (keys, values) with room; keys/values view them

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.keys, self.values
        n, m = (keys.shape[-2] if keys.numel() else 0), key_states.shape[-2]
        buffers = self.buffers
        if buffers is None or not (_prefix(keys, buffers[0]) and _prefix(values, buffers[1])) \
                or n + m > buffers[0].shape[-2]:
            capacity = n + m + max(ROOM, (n + m) // 4)
            buffers = tuple(s.new_empty(*s.shape[:-2], capacity, s.shape[-1]) for s in (key_states, value_states))
            if n:
                buffers[0][..., :n, :], buffers[1][..., :n, :] = keys, values
            self.buffers = buffers
        buffers[0][..., n: n + m, :], buffers[1][..., n: n + m, :] = key_states, value_states
        self.keys, self.values = buffers[0][..., : n + m, :], buffers[1][..., : n + m, :]
        return self.keys, self.values


def _prefix(view: torch.Tensor, buffer: torch.Tensor) -> bool:
    """`view` is buffer[..., :n, :] (the cached positions at the start of the buffer), not another tensor."""
    return (view.dim() == buffer.dim() and view.data_ptr() == buffer.data_ptr()
            and view.shape[:-2] == buffer.shape[:-2] and view.shape[-1] == buffer.shape[-1]
            and view.stride() == buffer.stride())


class AppendCache(DynamicCache):
    """A DynamicCache of AppendLayers, one per model layer, created as the first forward fills them."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=AppendLayer)


def new_cache() -> DynamicCache:
    return AppendCache()


def check_cache(cache) -> None:
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) not in (DynamicLayer, AppendLayer) for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
        raise UnsupportedModelError(
            f"cache layers {kinds} cannot be compacted by index; the model must use a plain DynamicCache")


def cache_argument(model: torch.nn.Module) -> str:
    """The forward's keyword for the KV cache: `cache` from transformers 5.24 on (where `past_key_values`
    is deprecated, with a warning on every call), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
