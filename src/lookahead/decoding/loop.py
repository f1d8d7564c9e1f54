"""The step loop: prefill, then draft -> verify -> accept -> commit until the caller stops.

One sequence at a time. Each step feeds the root (the last emitted token, not yet in the
KV cache) together with the draft tree, so plain decoding is the same loop with a
root-only tree.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from ..tree import DraftTree
from .kv import check_cache, compact, new_cache
from .masks import tree_masks
from .support import ModelBound
from .verify import AcceptRule, accept_greedy


class Drafter(Protocol):
    def propose(self, context: list[int], budget) -> DraftTree: ...
    def observe(self, tokens: list[int], tree: DraftTree | None = None, logits: torch.Tensor | None = None,
                nodes: list[int] | None = None) -> None: ...


@dataclass
class Step:
    tokens: list[int]      # emitted this step: accepted draft tokens + the bonus token
    draft_size: int        # draft nodes verified (root excluded)
    draft_s: float
    forward_s: float


class TreeVerifier(ModelBound):
    """Owns one sequence's KV cache; runs tree forwards and keeps the accepted path."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.cache = new_cache()
        self.past = 0

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> None:
        if not ids:
            return
        self.model(input_ids=torch.tensor([ids], device=self.device), past_key_values=self.cache,
                   use_cache=True, logits_to_keep=1)
        check_cache(self.cache)
        self.past = len(ids)

    @torch.inference_mode()
    def verify(self, tree: DraftTree) -> torch.Tensor:
        """Logits [n, vocab] of every tree node; the cache then holds past + n positions."""
        mask = tree_masks(tree, self.past, self.dtype, self.device, self.types, self.window)
        out = self.model(input_ids=torch.tensor([tree.tokens], device=self.device),
                         position_ids=tree.position_ids(self.past)[None].to(self.device),
                         attention_mask=mask, past_key_values=self.cache, use_cache=True)
        return out.logits[0]

    def commit(self, nodes: list[int]) -> None:
        compact(self.cache, self.past, nodes)
        self.past += len(nodes)


def decode(verifier: TreeVerifier, prompt: list[int], drafter: Drafter | None, budget,
           max_new_tokens: int, max_positions: int | None = None, accept: AcceptRule = accept_greedy
           ) -> Iterator[Step]:
    """Yield one Step per forward until `max_new_tokens` are emitted (the caller may stop earlier).

    `accept` picks the accepted path and the bonus token (greedy argmax, or a `Sampler`'s
    exact per-node choice after the logits processors).
    """
    verifier.prefill(prompt[:-1])
    context = list(prompt)
    emitted = 0
    # The whole sequence (prompt + output) stays within the model's context window.
    while emitted < max_new_tokens and (max_positions is None or len(context) < max_positions):
        t0 = time.perf_counter()
        # An accepted path of depth d emits d + 1 tokens: never draft past the token limit
        # or past the model's last position.
        room = max_new_tokens - emitted - 1
        if max_positions is not None:
            room = min(room, max_positions - len(context) - 1)
        if drafter is None or room <= 0:
            tree = DraftTree.root_only(context[-1])
        else:
            tree = drafter.propose(context, type(budget)(budget.nodes, min(budget.depth, room)))
        t1 = time.perf_counter()
        logits = verifier.verify(tree)
        nodes, tokens = accept(tree, logits, context)
        verifier.commit(nodes)
        t2 = time.perf_counter()
        context.extend(tokens)
        emitted += len(tokens)
        if drafter is not None:
            drafter.observe(tokens, tree=tree, logits=logits, nodes=nodes)
        yield Step(tokens, len(tree) - 1, t1 - t0 + time.perf_counter() - t2, t2 - t1)
