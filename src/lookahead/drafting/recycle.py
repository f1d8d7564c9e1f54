"""Token Recycling (Luo et al., 2024): the model's own recent predictions, reused as drafts.

A table `vocab x k` holds, for each token, the top-k next tokens (and their probabilities) the
model predicted the last time that token was an input of a forward pass — every tree node,
accepted or not. Kept across requests: it is small (k=8 int32 + fp16 per token; ~4 MB at 150k).
"""
from __future__ import annotations

import torch

from ..vocab import topk


class RecycleTable:
    def __init__(self, vocab_size: int, k: int = 8) -> None:
        if vocab_size < 1 or k < 1:
            raise ValueError("RecycleTable needs vocab_size >= 1 and k >= 1")
        self.k = k
        self._set(torch.zeros(vocab_size, k, dtype=torch.int32), torch.zeros(vocab_size, k, dtype=torch.float16))

    def _set(self, tokens: torch.Tensor, probs: torch.Tensor) -> None:
        self.tokens, self.probs = tokens, probs  # probs 0 = never seen
        # numpy views of the same memory: the tree builder reads single rows, where a torch
        # index costs microseconds and numpy a fraction of one
        self._tokens, self._probs = tokens.numpy(), probs.numpy()

    @property
    def vocab_size(self) -> int:
        return self.tokens.shape[0]

    def update(self, inputs: list[int], logits: torch.Tensor) -> None:
        """Row inputs[i] <- top-k of the distribution the model predicted after it (logits[i])."""
        # softmax in the logits' own dtype, gathered at the top-k: logsumexp's exp runs at half softmax's
        # speed on CPU, and a float32 softmax writes twice the bytes. bf16 is plenty for a draft score.
        logits = logits.detach()
        _, top_tokens = topk(logits, self.k)
        probs = logits.softmax(-1).gather(1, top_tokens)
        rows = [i for i, t in enumerate(inputs) if 0 <= t < self.vocab_size]  # the lm head may be wider
        if len(rows) < len(inputs):
            top_tokens, probs = top_tokens[rows], probs[rows]
        index = torch.tensor([inputs[i] for i in rows], dtype=torch.long)
        self.tokens[index] = top_tokens.to("cpu", torch.int32)
        self.probs[index] = probs.to("cpu", torch.float16)

    def cursor(self, token: int) -> RecycleCursor | None:
        return RecycleCursor(self, token) if 0 <= token < self.vocab_size and self._probs[token, 0] > 0 else None

    @classmethod
    def from_arrays(cls, tokens: torch.Tensor, probs: torch.Tensor) -> RecycleTable:
        """A table from saved arrays; ValueError says what does not fit."""
        if tokens.dim() != 2 or tokens.shape != probs.shape or tokens.dtype.is_floating_point:
            raise ValueError("recycle table arrays have mismatched shapes or types")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= tokens.shape[0]):
            raise ValueError("the recycle table holds token ids beyond its vocabulary")
        probs = probs.to(torch.float16)
        if not bool(torch.isfinite(probs).all()) or (probs.numel() and (probs.min() < 0 or probs.max() > 1)):
            raise ValueError("the recycle table holds probabilities outside [0, 1]")
        table = cls(tokens.shape[0], tokens.shape[1])
        table._set(tokens.to(torch.int32).contiguous(), probs.contiguous())
        return table


class RecycleCursor:
    __slots__ = ("table", "token")

    def __init__(self, table: RecycleTable, token: int) -> None:
        self.table, self.token = table, token

    def next(self, limit: int) -> list[tuple[int, float]]:
        n = min(limit, self.table.k)
        table = self.table
        pairs = zip(table._tokens[self.token, :n].tolist(), table._probs[self.token, :n].tolist(), strict=True)
        return [(t, p) for t, p in pairs if p > 0]

    def child(self, token: int) -> RecycleCursor | None:
        return self.table.cursor(token)
