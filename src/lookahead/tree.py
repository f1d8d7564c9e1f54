"""DraftTree: the plain data passed from drafting to decoding.

Node 0 is the root: the last committed token, whose KV is not cached yet. Every other node
is a draft token with a parent earlier in the list, so parents always precede children
and one forward pass can verify the whole tree.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DraftTree:
    tokens: list[int]
    parents: list[int]  # parents[0] == -1
    depths: list[int] = field(default_factory=list)
    children: list[list[int]] = field(default_factory=list)
    # Optional, from the drafter: estimated probability that each node's path is accepted (root: 1);
    # the sizing policy cuts best-first trees by it.
    expected: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents) or not self.tokens or self.parents[0] != -1:
            raise ValueError("DraftTree needs one parent per token and parents[0] == -1 (the root)")
        if self.expected and len(self.expected) != len(self.tokens):
            raise ValueError("DraftTree.expected needs one value per node")
        self.depths = [0] * len(self.tokens)
        self.children = [[] for _ in self.tokens]
        for i in range(1, len(self.tokens)):
            p = self.parents[i]
            if not 0 <= p < i:
                raise ValueError(f"node {i}: parent {p} must come before it")
            self.depths[i] = self.depths[p] + 1
            self.children[p].append(i)

    @classmethod
    def root_only(cls, token: int) -> DraftTree:
        return cls([token], [-1])

    @classmethod
    def chain(cls, root: int, draft: list[int]) -> DraftTree:
        return cls([root, *draft], list(range(-1, len(draft))))

    def prefix(self, n: int) -> DraftTree:
        """The root and the first n draft nodes (a tree: parents come first)."""
        k = n + 1
        if k >= len(self.tokens):
            return self
        return DraftTree(self.tokens[:k], self.parents[:k], expected=self.expected[:k])

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    def child(self, node: int, token: int) -> int | None:
        """The child of `node` that holds `token` (None: no such draft)."""
        return next((c for c in self.children[node] if self.tokens[c] == token), None)

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root down to `node` (inclusive)."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def ancestor_mask(self) -> torch.Tensor:
        """Bool [n, n]: row i sees column j iff j is i or one of its ancestors."""
        n = len(self.tokens)
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            p = self.parents[i]
            if p >= 0:
                mask[i] = mask[p]
            mask[i, i] = True
        return mask

    def position_ids(self, past: int) -> torch.Tensor:
        """Positions seen by RoPE / position embeddings: context length + depth."""
        return torch.tensor(self.depths, dtype=torch.long) + past
