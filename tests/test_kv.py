"""The verifier's KV cache appends into spare room: a forward does not copy the cache it extends."""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from lookahead.decoding.kv import ROOM, AppendLayer, new_cache


def _states(rows: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, n, 4, generator=gen), torch.randn(rows, 2, n, 4, generator=gen)


def test_appending_writes_into_spare_room_without_copying_the_cache():
    layer, reference = AppendLayer(), DynamicLayer()
    pointers = set()
    for step, n in enumerate([7, 1, 3, 1, 1]):
        k, v = _states(3, n, step)
        keys, values = layer.update(k, v)
        want_k, want_v = reference.update(k, v)
        assert torch.equal(keys, want_k) and torch.equal(values, want_v)
        pointers.add(keys.data_ptr())
    assert len(pointers) == 1  # one buffer for all five forwards (DynamicLayer: a new tensor each time)


def test_a_full_buffer_or_a_replaced_cache_starts_a_new_one_with_the_same_contents():
    layer = AppendLayer()
    k, v = _states(2, ROOM, 0)
    layer.update(k, v)
    first = layer.keys.data_ptr()
    k2, v2 = _states(2, ROOM + 1, 1)  # more than the room left (a first buffer has ROOM spare)
    keys, _ = layer.update(k2, v2)
    assert keys.data_ptr() != first and torch.equal(keys, torch.cat([k, k2], dim=-2))
    # Rows dropped (as the verifier does when a request leaves): keys are another tensor now.
    layer.keys, layer.values = layer.keys[[1]].clone(), layer.values[[1]].clone()
    k3, v3 = _states(1, 2, 2)
    keys, values = layer.update(k3, v3)
    assert torch.equal(keys, torch.cat([k[[1]], k2[[1]], k3], dim=-2))
    assert torch.equal(values, torch.cat([v[[1]], v2[[1]], v3], dim=-2))


def test_cropping_then_appending_overwrites_the_dropped_positions():
    layer = AppendLayer()
    k, v = _states(1, 6, 0)
    layer.update(k, v)
    layer.keys, layer.values = layer.keys[:, :, :4], layer.values[:, :, :4]  # a rejected tail, as commit crops
    k2, v2 = _states(1, 1, 1)
    keys, _ = layer.update(k2, v2)
    assert torch.equal(keys, torch.cat([k[:, :, :4], k2], dim=-2))


def test_new_caches_are_append_caches():
    cache = new_cache()
    k, v = _states(1, 3, 0)
    cache.update(k, v, 0)
    assert type(cache.layers[0]) is AppendLayer


def test_rows_write_their_new_keys_right_after_their_own_cached_keys():
    cache = new_cache()
    k, v = _states(2, 6, 0)
    cache.update(k, v, 0)                 # two rows of 6 cached positions; say row 0 has 3 committed, row 1 all 6
    k2, v2 = _states(2, 2, 1)
    cache.starts = [3, 6]                 # the verifier's per-row write positions for one forward
    keys, values = cache.update(k2, v2, 0)
    cache.starts = None
    assert keys.shape[-2] == 8            # the longest row's end
    assert torch.equal(keys[0, :, :3], k[0, :, :3]) and torch.equal(keys[0, :, 3:5], k2[0])
    assert torch.equal(values[1, :, :6], v[1]) and torch.equal(values[1, :, 6:8], v2[1])
    assert torch.equal(keys[0, :, 7:], torch.zeros_like(keys[0, :, 7:]))  # never written: zero, never garbage


def test_equal_write_positions_are_plain_appending():
    cache, reference = new_cache(), DynamicLayer()
    k, v = _states(2, 4, 0)
    cache.update(k, v, 0)
    reference.update(k, v)
    k2, v2 = _states(2, 3, 1)
    cache.starts = [4, 4]
    keys, _ = cache.update(k2, v2, 0)
    assert torch.equal(keys, reference.update(k2, v2)[0])
