"""Accept rules: walk the model's own choices down the draft tree.

Greedy: at each node take the argmax of that node's logits; descend into the child that
carries that token, if any. The tokens emitted are exactly those plain greedy decoding
would emit, one bonus token past the last accepted draft node included.

Any other choice (sampling, processors): `accept_walk` makes one choice per *visited* node
from the token path leading to it, descends into the child carrying the chosen token, and
stops at the first node without one. Each emitted token is thus drawn from exactly the
distribution plain decoding would draw it from, given the same preceding tokens: a child is
taken with probability p(child), the bonus token is the draw itself (SpecInfer's multi-step
rule for one-hot drafts). Branches are never sampled independently; siblings with the same
token share the one draw (the first such child is followed).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..tree import DraftTree
from ..vocab import argmax

# (tree, logits [n, vocab], context = prompt + emitted tokens) -> (accepted node indices, emitted tokens)
AcceptRule = Callable[[DraftTree, torch.Tensor, list[int]], tuple[list[int], list[int]]]


def accept_greedy(tree: DraftTree, logits: torch.Tensor, context: list[int] | None = None
                  ) -> tuple[list[int], list[int]]:
    """Return (accepted node indices from the root, emitted tokens).

    `logits` is [n, vocab] for the tree's nodes. The emitted tokens are the accepted draft
    tokens followed by the bonus token, so len(emitted) == len(nodes).
    """
    choice = argmax(logits).tolist()  # exactly torch's: the first of a tie
    nodes, emitted = [0], []
    node = 0
    while True:
        token = choice[node]
        emitted.append(token)
        child = tree.child(node, token)
        if child is None:
            return nodes, emitted
        nodes.append(child)
        node = child


def accept_walk(tree: DraftTree, logits: torch.Tensor, context: list[int],
                choose: Callable[[list[int], torch.Tensor], int]) -> tuple[list[int], list[int]]:
    """Like `accept_greedy`, with `choose(path_ids, node_logits) -> token` at each visited node.

    `context` ends with the root's token; `path_ids` is context + the draft tokens from the
    root down to the node, i.e. the input_ids plain decoding would have at that position.
    `choose` runs at most depth + 1 times per step, never on unvisited nodes.
    """
    path = list(context)
    nodes, emitted = [0], []
    node = 0
    while True:
        token = choose(path, logits[node])
        emitted.append(token)
        child = tree.child(node, token)
        if child is None:
            return nodes, emitted
        nodes.append(child)
        path.append(token)
        node = child
