"""Additive 4D attention masks for one tree forward.

transformers passes a 4D mask through untouched; eager attention *adds* it to the scores,
so it must be a float mask (0 = visible, dtype-min = hidden), never a boolean one.
"""
from __future__ import annotations

import torch

from ..tree import DraftTree


def tree_masks(tree: DraftTree, past: int, dtype: torch.dtype, device: torch.device | str,
               types: list[str], window: int | None) -> torch.Tensor | dict[str, torch.Tensor]:
    """The mask each layer type needs, shape [1, 1, n, past + n].

    A single tensor when all layers share one type, else a dict keyed by layer type (the
    form models with mixed sliding/full layers, e.g. Gemma 3, accept as `attention_mask`).
    """
    n = len(tree)
    visible = torch.ones(n, past + n, dtype=torch.bool)
    visible[:, past:] = tree.ancestor_mask()
    masks = {}
    for kind in set(types):
        seen = visible
        if kind == "sliding_attention" and window is not None:
            # Same rule as transformers' sliding_window_overlay: key pos > query pos - window.
            q_pos = tree.position_ids(past)[:, None]
            k_pos = torch.cat([torch.arange(past), tree.position_ids(past)])[None, :]
            seen = visible & (k_pos > q_pos - window)
        additive = torch.zeros(n, past + n, dtype=dtype)
        additive.masked_fill_(~seen, torch.finfo(dtype).min)
        masks[kind] = additive[None, None].to(device)
    return next(iter(masks.values())) if len(masks) == 1 else masks
