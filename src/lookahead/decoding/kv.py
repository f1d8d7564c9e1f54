"""KV cache for tree verification: a DynamicCache whose layers append in place, compacted to the accepted path.

transformers' DynamicLayer appends a forward's keys with `torch.cat`, which copies the whole cache every
forward: measured 38 % of an 8-row plain step over a 600-token cache (SmolLM2-135M fp32, Zen 3; 91 of
237 ms), growing with rows x length. `AppendLayer` keeps spare room after the cached positions and writes
new keys into it, so a step costs what its own tokens cost; the cached keys are a view of that buffer.
Whatever replaces `keys` by another tensor (dropping rows, merging a row) just starts a new buffer.

A verify forward writes each row's query block right after that row's own committed keys (`AppendCache.starts`,
set by the verifier for one forward), not after the longest row's: every row's visible keys are then a prefix
of its cache row, which attention can cut to its own length instead of the longest row's (see attention.py).
Buffers start zeroed: a row's columns past its own block may be read (masked) before anything wrote them.

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

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               place: tuple[int, torch.Tensor, torch.Tensor] | None = None, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append; with `place` (end, rows, columns: see AppendCache._place_for) each row's keys go where it says."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, m = (self.keys.shape[-2] if self.keys.numel() else 0), key_states.shape[-2]
        end = n + m if place is None else place[0]
        buffers = self._room(n, end, key_states, value_states)
        for buffer, states in zip(buffers, (key_states, value_states), strict=True):
            if place is None:
                buffer[..., n: end, :] = states
            else:  # one indexed write for all rows: a slice copy per row cost twice as much (8 rows)
                buffer[place[1], :, place[2]] = states.transpose(1, 2).reshape(-1, states.shape[1], states.shape[-1])
        self.keys, self.values = buffers[0][..., :end, :], buffers[1][..., :end, :]
        return self.keys, self.values

    def _room(self, n: int, end: int, key_states: torch.Tensor, value_states: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers whose first n positions are the cached keys, with room up to `end` (a new pair if need be)."""
        keys, values, buffers = self.keys, self.values, self.buffers
        if buffers is None or not (_prefix(keys, buffers[0]) and _prefix(values, buffers[1])) \
                or end > buffers[0].shape[-2]:
            capacity = end + max(ROOM, end // 4)
            buffers = tuple(s.new_zeros(*s.shape[:-2], capacity, s.shape[-1]) for s in (key_states, value_states))
            if n:
                buffers[0][..., :n, :], buffers[1][..., :n, :] = keys, values
            self.buffers = buffers
        return buffers


def _prefix(view: torch.Tensor, buffer: torch.Tensor) -> bool:
    """`view` is buffer[..., :n, :] (the cached positions at the start of the buffer), not another tensor."""
    return (view.dim() == buffer.dim() and view.data_ptr() == buffer.data_ptr()
            and view.shape[:-2] == buffer.shape[:-2] and view.shape[-1] == buffer.shape[-1]
            and view.stride() == buffer.stride())


class AppendCache(DynamicCache):
    """A DynamicCache of AppendLayers, one per model layer, created as the first forward fills them."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=AppendLayer)
        self.starts: list[int] | None = None  # per-row write positions for the next forward (None: append)
        self._place: tuple | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.starts
        if starts is None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        while len(self.layers) <= layer_idx:
            self.layers.append(AppendLayer())
        layer = self.layers[layer_idx]
        n = layer.keys.shape[-2] if layer.is_initialized and layer.keys.numel() else 0
        place = None if all(s == n for s in starts) else self._place_for(key_states.shape[-2], key_states.device)
        return layer.update(key_states, value_states, place=place)

    def _place_for(self, m: int, device: torch.device) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Where m new keys per row go under `starts`, for one indexed write per layer: (end of the cache,
        row index, column index); built once per forward."""
        starts = self.starts
        if self._place is None or self._place[0] != (starts, m):
            rows = torch.arange(len(starts)).repeat_interleave(m)
            columns = (torch.tensor(starts)[:, None] + torch.arange(m)).flatten()
            self._place = ((list(starts), m), (max(starts) + m, rows.to(device), columns.to(device)))
        return self._place[1]


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
