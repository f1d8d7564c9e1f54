"""KV cache for tree verification: a DynamicCache whose layers append in place, compacted to the accepted path.

transformers' DynamicLayer appends a forward's keys with `torch.cat`, which copies the whole cache every
forward: measured 38 % of an 8-row plain step over a 600-token cache (SmolLM2-135M fp32, Zen 3; 91 of
237 ms), growing with rows x length. `AppendLayer` keeps spare room after the cached positions and writes
new keys into it, so a step costs what its own tokens cost; the cached keys are a view of that buffer.
Rows are slots of the buffers, which hold spare slots too: a row leaving has the last rows moved into its slot and
the batch view shortened (`keep_rows`), a row joining is written into the next spare slot (`put_row`), each a copy
of one row, not of the whole cache (measured, SmolLM2 bf16 on Zen 5, 40 mixed prompts at 16 rows: joins and leaves
took 1.2-1.4 s of a 17 s `generate_batch` with drafting, 0.7 s of 15 s without, each copying the batch). A new
buffer (no spare slot, or no room) gets a quarter more slots (`slots`). Whatever else replaces `keys` by another
tensor just starts a new buffer.

A verify forward writes each row's query block right after that row's own committed keys (`AppendCache.starts`,
set by the verifier for one forward), not after the longest row's: every row's visible keys are then a prefix
of its cache row, which attention can cut to its own length instead of the longest row's (see attention.py).
Buffers start zeroed: a row's columns past its own block may be read (masked) before anything wrote them.
In a packed forward (attention.py: the rows' real query tokens only, in a batch of one) `AppendCache.packed` says
where each token sits in the padded [rows, q] block, and its keys are written to that row's block the same way.

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
        """Append; with `place` (end, rows, columns: see AppendCache._place_for) each row's keys go where it says
        (key_states [B, Hkv, m, d], or packed: [1, Hkv, T, d] for T tokens spread over the cache's B rows)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, m = (self.keys.shape[-2] if self.keys.numel() else 0), key_states.shape[-2]
        end = n + m if place is None else place[0]
        rows = self.keys.shape[0] if n else key_states.shape[0]
        buffers = self._room(n, end, key_states, value_states, rows)
        for buffer, states in zip(buffers, (key_states, value_states), strict=True):
            if place is None:
                buffer[:rows, :, n: end] = states
            else:  # one indexed write for all rows: a slice copy per row cost twice as much (8 rows)
                buffer[place[1], :, place[2]] = states.transpose(1, 2).reshape(-1, states.shape[1], states.shape[-1])
        self.keys, self.values = buffers[0][:rows, :, :end], buffers[1][:rows, :, :end]
        return self.keys, self.values

    def _room(self, n: int, end: int, key_states: torch.Tensor, value_states: torch.Tensor, rows: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers of at least `rows` slots whose first n positions are the cached keys, with room up to `end` (a new
        pair if need be, with as many slots as the old one)."""
        keys, values, buffers = self.keys, self.values, self.buffers
        viewed = self._viewed()
        if not viewed or end > buffers[0].shape[-2]:
            count = max(rows, buffers[0].shape[0]) if viewed else rows
            buffers = tuple(s.new_zeros(count, s.shape[1], capacity(end), s.shape[-1])
                            for s in (key_states, value_states))
            if n:
                buffers[0][:rows, :, :n], buffers[1][:rows, :, :n] = keys, values
            self.buffers = buffers
        return buffers

    def _viewed(self) -> bool:
        """keys/values are the first rows and positions of `buffers` (nothing replaced them since)."""
        buffers = self.buffers
        return buffers is not None and _prefix(self.keys, buffers[0]) and _prefix(self.values, buffers[1])

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, length: int, rows: int | None = None) -> None:
        """Take buffers [slots, H, capacity, d] whose first `rows` slots (default: all) and `length` positions are the
        cached keys: the next forward writes into their room instead of copying the cache into new ones."""
        rows = keys.shape[0] if rows is None else rows
        self.device = keys.device
        self.buffers, self.is_initialized = (keys, values), True
        self.keys, self.values = keys[:rows, :, :length], values[:rows, :, :length]

    def keep_rows(self, order: list[int], length: int) -> None:
        """Rows `order` (old indices, in their new order), cut to `length` positions. Where every row that moves
        comes from past the new batch's end (the last rows filling the leavers' slots, as the verifier orders them),
        it moves in place: one copy of those rows; else the kept rows are copied out (the next forward then starts
        a new buffer)."""
        if self._viewed() and all(old == new or old >= len(order) for new, old in enumerate(order)):
            buffers = self.buffers
            for new, old in enumerate(order):
                if old != new:
                    for buffer in buffers:
                        buffer[new, :, :length] = buffer[old, :, :length]
            self.adopt(buffers[0], buffers[1], length, len(order))
            return
        index = torch.tensor(order, device=self.keys.device)
        self.keys = self.keys.index_select(0, index)[:, :, :length]
        self.values = self.values.index_select(0, index)[:, :, :length]

    def spare(self, length: int) -> bool:
        """Whether a row can join in place: a spare slot, and room for `length` positions."""
        return self._viewed() and self.keys.shape[0] < self.buffers[0].shape[0] and length <= self.buffers[0].shape[-2]

    def put_row(self, keys: torch.Tensor | None, values: torch.Tensor | None, length: int) -> None:
        """A joining row's cached keys [1, H, n, d] (None: nothing cached) into the next spare slot (see `spare`);
        every row's view becomes `length` positions long. The slot's positions past n hold a left row's keys or
        zeros: finite, and masked for this row."""
        buffers, rows = self.buffers, self.keys.shape[0]
        if keys is not None and keys.numel():
            n = min(keys.shape[2], length)
            buffers[0][rows, :, :n], buffers[1][rows, :, :n] = keys[0, :, :n], values[0, :, :n]
        self.adopt(buffers[0], buffers[1], length, rows + 1)


def capacity(end: int) -> int:
    """Positions a new buffer gets for `end` cached ones: room for the coming forwards."""
    return end + max(ROOM, end // 4)


def slots(rows: int) -> int:
    """Row slots a new buffer gets for `rows` rows: spare ones for rows joining later."""
    return rows + rows // 4


def _prefix(view: torch.Tensor, buffer: torch.Tensor) -> bool:
    """`view` is buffer[:rows, :, :n] (the first slots and cached positions of the buffer), not another tensor."""
    return (view.dim() == buffer.dim() and view.data_ptr() == buffer.data_ptr()
            and view.shape[0] <= buffer.shape[0] and view.shape[1:-2] == buffer.shape[1:-2]
            and view.shape[-1] == buffer.shape[-1] and view.stride() == buffer.stride())


class AppendCache(DynamicCache):
    """A DynamicCache of AppendLayers, one per model layer, created as the first forward fills them."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=AppendLayer)
        self.starts: list[int] | None = None  # per-row write positions for the next forward (None: append)
        # A packed forward's tokens: (index of each in the padded [rows, q] block, q); None: the block itself.
        self.packed: tuple[torch.Tensor, int] | None = None
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
        packed = self.packed
        if packed is None and all(s == n for s in starts):
            return layer.update(key_states, value_states)
        return layer.update(key_states, value_states, place=self._place_for(key_states.shape[-2], key_states.device))

    def _place_for(self, m: int, device: torch.device) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Where this forward's new keys go under `starts` (m per row, or the packed tokens), for one indexed
        write per layer: (end of the cache, row index, column index); built once per forward."""
        starts, packed = self.starts, self.packed
        if self._place is None or self._place[0] != (starts, m) or self._place[1] is not packed:
            if packed is None:
                rows = torch.arange(len(starts)).repeat_interleave(m)
                columns = (torch.tensor(starts)[:, None] + torch.arange(m)).flatten()
                end = max(starts) + m
            else:
                index, q = packed
                rows, offsets = index // q, index % q
                columns = torch.tensor(starts)[rows] + offsets
                end = max(starts) + q
            self._place = ((list(starts), m), packed, (end, rows.to(device), columns.to(device)))
        return self._place[2]


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
