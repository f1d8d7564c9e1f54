"""Accept rules: walk the model's own choices down the draft tree.

Greedy: at each node take the argmax of that node's logits; descend into the child that
carries that token, if any. The tokens emitted are exactly those plain greedy decoding
would emit, one bonus token past the last accepted draft node included.
"""
from __future__ import annotations

import torch

from ..tree import DraftTree


def accept_greedy(tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], list[int]]:
    """Return (accepted node indices from the root, emitted tokens).

    `logits` is [n, vocab] for the tree's nodes. The emitted tokens are the accepted draft
    tokens followed by the bonus token, so len(emitted) == len(nodes).
    """
    choice = logits.argmax(dim=-1).tolist()
    nodes, emitted = [0], []
    node = 0
    while True:
        token = choice[node]
        emitted.append(token)
        child = next((c for c in tree.children[node] if tree.tokens[c] == token), None)
        if child is None:
            return nodes, emitted
        nodes.append(child)
        node = child
