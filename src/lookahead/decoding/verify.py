"""The verifier: one forward over a ragged batch of draft trees (a single request is a batch of one).

Layout. The batch shares one DynamicCache whose layers hold [B, heads, L, head_dim]. Row i's
committed keys sit at [0, past_i); [past_i, L) is padding that the mask hides (L = the longest
row's past). A step right-pads every row's tree to q = the largest tree and writes each row's q
query tokens right after its own committed keys, over its padding, so after the forward the cache
holds L + q positions per row:

    row 0:  [ committed (past_0)   ][ tree 0 (n_0) | pad ][ stale      ]
    row 1:  [ committed (past_1)                  ][ tree 1 (n_1)       ]
            0                                     L                     L + q

Each row's query i sees its committed prefix and its own tree ancestors (a padding query
sees only itself, so every softmax row has one visible key), positions are past_i + depth.
A row's visible keys are thus a prefix of its cache row, [0, past_i + q): attention need not
read the longest row's length for every row (attention.py cuts rows to their own).
`commit` moves each row's accepted nodes to [past_i, past_i + a_i) with one index copy per
layer (nothing moves where the accepted path is the tree's first branch) and crops to the new
common length: compaction costs O(accepted tokens), not O(cache).

Rows join between steps (`add`: prefilled alone, then merged into the batch with padding)
and leave between steps (`remove`: their cache rows are dropped at once, the last rows taking their places:
row order may change, `keys` says it). A row joining an empty
batch may leave the tail of its prompt uncached (`join(..., pending=tail)`): its first step's query
is then tail + tree, causal over the tail, so the prefill's last forward also verifies the first
tree, as `model.generate`'s prefill also yields the first token (one forward fewer per request; the
tail's logits are not computed). Another row joining first prefills the tail (`settle`). Sliding-window
layers keep a full-length cache (see kv.py) and get their window in the mask, by the same rule as
transformers' sliding_window_overlay (key position > query position - window).

Masks are additive floats: transformers passes a 4D mask through untouched and eager attention
*adds* it to the scores (a boolean mask would be silently ignored).

Packed. On our own attention (attention.py), a batch whose trees differ in size runs the model on the rows'
real query tokens only, in a batch of one; attention and the cache see the padded layout above. The linear
layers and the lm head then cost the step's real tokens, not rows x the largest tree: a copying row's
draft no longer makes every other row pay for as many tokens (`Verifier.tokens`).
"""
from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from contextlib import nullcontext

import torch
from transformers import DynamicCache

from ..tree import DraftTree
from .attention import NAME as GROUPED
from .attention import packed
from .kv import AppendLayer, cache_argument, capacity, check_cache, new_cache, slots
from .support import ModelBound


class Verifier(ModelBound):
    """Owns the KV cache of a ragged batch of sequences, each keyed by a hashable id."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.cache_arg = cache_argument(model)
        self.cache: DynamicCache = new_cache()
        self.keys: list[Hashable] = []   # row order == batch index
        self.past: list[int] = []        # committed tokens in each row's cache
        self.pending: list[list[int]] = []  # committed tokens not cached yet (a lone row's prompt tail)
        self.length = 0                  # L: common cache length (max past)
        self.tokens = 0                  # query tokens the last verify forward ran (packed: the real ones)
        self._step: tuple[int, list[int]] | None = None  # (L, tree sizes) between verify and commit
        # Rows can be packed where attention is ours: it knows where each packed token sits (see Packed). On CPUs
        # only, where a forward's cost follows its tokens; a GPU runs small batches at launch cost, and packing
        # adds launches (measured on CPUs alone so far).
        self.packs = getattr(model.config, "_attn_implementation", None) == GROUPED and self.device.type == "cpu"

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.keys

    # -- rows joining and leaving ---------------------------------------------------------
    @torch.inference_mode()
    def add(self, key: Hashable, ids: Sequence[int]) -> None:
        """Prefill `ids` (a prompt without its last token: that token is the first tree's root) as a new row."""
        self.join(key, self.prefill(None, ids), len(ids))

    @torch.inference_mode()
    def prefill(self, row: DynamicCache | None, ids: Sequence[int]) -> DynamicCache:
        """Extend a one-row cache (None: a new one) by `ids`, outside the batch: a long prompt can be
        prefilled a chunk at a time between the batch's steps."""
        row = new_cache() if row is None else row
        if ids:
            self.model(input_ids=torch.tensor([list(ids)], device=self.device), use_cache=True, logits_to_keep=1,
                       **{self.cache_arg: row})
            check_cache(row)
        return row

    @torch.inference_mode()
    def join(self, key: Hashable, row: DynamicCache, past: int, pending: Sequence[int] = ()) -> None:
        """A prefilled one-row cache of `past` positions becomes a row of the batch (between steps).

        `pending`: the rest of its prompt, not prefilled: it goes into the row's next verify forward, ahead
        of its tree (only into an empty batch: a tail would pad every other row's query to its length)."""
        if key in self.keys:
            raise ValueError(f"row {key!r} is already in the batch")
        if self._step is not None:
            raise RuntimeError("rows can only join between steps (after commit)")
        if pending and self.keys:
            raise ValueError("only a row joining an empty batch may leave its prompt's tail pending")
        self.settle()
        self._merge(row, past)
        self.keys.append(key)
        self.past.append(past)
        self.pending.append(list(pending))

    @torch.inference_mode()
    def settle(self) -> None:
        """Prefill a lone row's pending prompt tail into its cache (before another row joins)."""
        if self._step is not None:
            raise RuntimeError("settle between steps (after commit)")
        for i, tail in enumerate(self.pending):
            if tail:  # a pending tail only exists in a batch of one: the batch cache is that row's
                self.prefill(self.cache, tail)
                self.past[i] += len(tail)
                self.length = max(self.past)
                self.pending[i] = []

    @torch.inference_mode()
    def remove(self, keys: Sequence[Hashable]) -> None:
        """Drop rows (finished or cancelled) and their cache at once. The last rows take the leavers' places
        (`keys` gives the new order): in the cache each moves in place, one row's copy (kv.py)."""
        if self._step is not None:
            raise RuntimeError("rows can only leave between steps (after commit)")
        gone = set(keys)
        keep = [i for i, k in enumerate(self.keys) if k not in gone]
        if len(keep) == len(self.keys):
            return
        order = list(range(len(keep)))
        holes = [i for i in order if self.keys[i] in gone]
        for hole, last in zip(holes, [i for i in keep if i >= len(keep)], strict=True):
            order[hole] = last
        self.keys = [self.keys[i] for i in order]
        self.past = [self.past[i] for i in order]
        self.pending = [self.pending[i] for i in order]
        if not order:
            self.cache, self.length = new_cache(), 0
            return
        self.length = max(self.past)
        index = torch.tensor(order, device=self.device)
        for layer in self.cache.layers:
            if isinstance(layer, AppendLayer):
                layer.keep_rows(order, self.length)
            else:
                layer.keys = layer.keys.index_select(0, index)[:, :, : self.length]
                layer.values = layer.values.index_select(0, index)[:, :, : self.length]

    def _merge(self, row: DynamicCache, past: int) -> None:
        """Append a one-row cache of `past` positions to the batch, padding both to a common length: into a spare
        slot of the batch's buffers where they have one (a copy of the row), else one copy of each into new buffers
        with room and spare slots (kv.py), which the next forward writes into."""
        length = max(self.length, past)
        batch_layers, row_layers = self.cache.layers, row.layers
        if not row_layers and not batch_layers:  # nothing cached on either side yet
            self.length = length
            return
        if batch_layers and all(isinstance(layer, AppendLayer) and layer.spare(length) for layer in batch_layers) \
                and len(row_layers) in (0, len(batch_layers)):
            for i, layer in enumerate(batch_layers):
                cached = row_layers[i] if row_layers else None
                layer.put_row(cached.keys if cached else None, cached.values if cached else None, length)
            self.length = length
            return
        template = row_layers or batch_layers
        rows = len(self.keys)
        merged = self.cache if batch_layers else row
        for i, ref in enumerate(template):
            parts = [(batch_layers[i] if batch_layers else None, slice(0, rows)),
                     (row_layers[i] if row_layers else None, slice(rows, rows + 1))]
            append = isinstance(merged.layers[i], AppendLayer)
            buffers = []
            for like in (ref.keys, ref.values):
                shape = (slots(rows + 1) if append else rows + 1, like.shape[1],
                         capacity(length) if append else length, like.shape[3])
                buffers.append(like.new_zeros(shape))
            for layer, where in parts:
                if layer is not None and layer.keys.numel():
                    n = min(layer.keys.shape[2], length)
                    buffers[0][where, :, :n] = layer.keys[:, :, :n]
                    buffers[1][where, :, :n] = layer.values[:, :, :n]
            if append:
                merged.layers[i].adopt(buffers[0], buffers[1], length, rows + 1)
            else:
                merged.layers[i].keys, merged.layers[i].values = buffers
        self.cache, self.length = merged, length

    # -- one step ---------------------------------------------------------------------------
    def inputs(self, trees: Sequence[DraftTree]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | dict]:
        """input_ids [B, q], position_ids [B, q] and the additive mask(s) [B, 1, q, L + q] of one step.

        A row's query is its pending tail (causal) then its tree (seeing the whole tail), padded to q."""
        if len(trees) != len(self.keys):
            raise ValueError(f"{len(trees)} trees for {len(self.keys)} rows")
        batch, length = len(trees), self.length
        q = max(len(tail) + len(t) for t, tail in zip(trees, self.pending, strict=True))
        input_ids = torch.zeros(batch, q, dtype=torch.long)
        positions = torch.zeros(batch, q, dtype=torch.long)
        visible = torch.zeros(batch, q, length + q, dtype=torch.bool)
        pad_q = torch.arange(q)
        for i, (tree, past, tail) in enumerate(zip(trees, self.past, self.pending, strict=True)):
            p, n = len(tail), len(tree)
            if p:
                input_ids[i, :p] = torch.tensor(tail)
                positions[i, :p] = torch.arange(past, past + p)
                visible[i, :p, past: past + p] = torch.ones(p, p, dtype=torch.bool).tril()
                visible[i, p: p + n, past: past + p] = True
            input_ids[i, p: p + n] = torch.tensor(tree.tokens)
            positions[i, p: p + n] = tree.position_ids(past + p)
            positions[i, p + n:] = past  # padding queries: any valid position, their output is discarded
            visible[i, : p + n, :past] = True
            visible[i, p: p + n, past + p: past + p + n] = tree.ancestor_mask()
            visible[i, pad_q[p + n:], past + pad_q[p + n:]] = True
        masks = {}
        for kind in set(self.types):
            seen = visible
            if kind == "sliding_attention" and self.window is not None:
                # Cache column c of a row holds position c below its past, then its query tokens' positions.
                k_pos = torch.arange(length + q).repeat(batch, 1)
                for i, past in enumerate(self.past):
                    k_pos[i, past: past + q] = positions[i]
                seen = visible & (k_pos[:, None, :] > positions[:, :, None] - self.window)
            additive = torch.zeros(batch, q, length + q, dtype=self.dtype)
            additive.masked_fill_(~seen, torch.finfo(self.dtype).min)
            masks[kind] = additive[:, None].to(self.device)
        mask = next(iter(masks.values())) if len(masks) == 1 else masks
        return input_ids.to(self.device), positions.to(self.device), mask

    @torch.inference_mode()
    def verify(self, trees: Sequence[DraftTree]) -> list[torch.Tensor]:
        """One forward over every row's tree (row order); returns each row's logits [n_i, vocab]."""
        if not trees:
            return []
        if self._step is not None:
            raise RuntimeError("commit the previous step first")
        input_ids, positions, mask = self.inputs(trees)
        rows, q, tails = len(trees), input_ids.shape[1], [len(tail) for tail in self.pending]
        sizes = [p + len(t) for t, p in zip(trees, tails, strict=True)]
        index = None
        if self.packs and rows > 1 and sum(sizes) < rows * q and self.cache.layers:
            index = torch.cat([torch.arange(i * q, i * q + n) for i, n in enumerate(sizes)])
            input_ids, positions = input_ids.view(-1)[index][None], positions.view(-1)[index][None]
        # A lone row's pending tail needs no logits: keep the tree's (the query's last positions).
        keep = {"logits_to_keep": len(trees[0])} if rows == 1 and tails[0] else {}
        self.cache.starts = list(self.past)  # each row's block right after its own keys (see Layout)
        self.cache.packed = None if index is None else (index, q)
        try:
            with packed(index.to(self.device), rows, q, sizes) if index is not None else nullcontext():
                out = self.model(input_ids=input_ids, position_ids=positions, attention_mask=mask, use_cache=True,
                                 **keep, **{self.cache_arg: self.cache})
        finally:
            self.cache.starts = self.cache.packed = None
        if not self.keys or not self.cache.layers:
            raise RuntimeError("the model did not fill the KV cache")
        if any(tails):  # this forward may have been the cache's first fill: check it as prefill does
            check_cache(self.cache)
        self._step = (self.length, [len(t) for t in trees])
        self.tokens = input_ids.numel()
        if index is not None:  # row i's tokens follow rows 0..i-1's in the packed query
            starts = [0, *itertools.accumulate(sizes)]
            return [out.logits[0, starts[i] + p: starts[i] + p + len(t)]
                    for i, (t, p) in enumerate(zip(trees, tails, strict=True))]
        first = q - out.logits.shape[1]  # query position of the first logits row
        return [out.logits[i, p - first: p - first + len(t)] for i, (t, p) in enumerate(zip(trees, tails, strict=True))]

    @torch.inference_mode()
    def commit(self, accepted: Sequence[Sequence[int]]) -> None:
        """Keep each row's pending tail and accepted tree nodes (indices from the root, row order); drop the rest."""
        if self._step is None:
            raise RuntimeError("commit needs a verify first")
        sizes = self._step[1]
        if len(accepted) != len(self.keys):
            raise ValueError(f"{len(accepted)} accepted paths for {len(self.keys)} rows")
        rows, dst, src = [], [], []
        for i, nodes in enumerate(accepted):
            if not nodes or nodes[0] != 0 or any(not 0 <= n < sizes[i] for n in nodes):
                raise ValueError(f"row {i}: accepted nodes {list(nodes)} must start at the root and lie in its tree")
            past = self.past[i] + len(self.pending[i])  # the tail stays where it is
            moved = [(past + k, past + n) for k, n in enumerate(nodes) if k != n]
            rows += [i] * len(moved)
            dst += [d for d, _ in moved]
            src += [s for _, s in moved]
            self.past[i] = past + len(nodes)
        self.pending = [[] for _ in self.keys]
        self.length = max(self.past)
        if rows:  # else every accepted path is its tree's first branch: already in place
            r = torch.tensor(rows, device=self.device)
            d = torch.tensor(dst, device=self.device)
            s = torch.tensor(src, device=self.device)
            for layer in self.cache.layers:
                layer.keys[r, :, d] = layer.keys[r, :, s]
                layer.values[r, :, d] = layer.values[r, :, s]
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, : self.length]
            layer.values = layer.values[:, :, : self.length]
        self._step = None

    def abort(self) -> None:
        """Forget a verify that will not be committed (e.g. the accept rule failed): drop the tree keys."""
        if self._step is None:
            return
        length = self._step[0]
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]
        self._step = None
