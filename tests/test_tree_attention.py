"""One forward over a branching tree gives the logits sequential decoding gives, for every architecture.

Through the one verifier, as a batch of one (tests/test_batch.py runs it over many rows)."""
from __future__ import annotations

import pytest
import torch

from conftest import FIXED, IdTokenizer, hf_greedy, tiny_model
from lookahead import DraftTree, Engine
from lookahead.decoding.verify import Verifier

TOL = 1e-4  # fp32: tree and sequential forwards differ only by summation order
PROMPT = [3, 17, 42, 8, 17, 42, 8, 5, 9, 17, 42]
# Root 42; branches 8-5, 8-9-1, 11-2, 60: two siblings share a parent, depths up to 3.
TREE = DraftTree([42, 8, 11, 5, 9, 2, 1, 60], [-1, 0, 0, 1, 1, 2, 4, 0])


def sequential_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1]


def test_tree_logits_equal_sequential_decoding(arch):
    model = tiny_model(arch)
    verifier = Verifier(model)
    verifier.add("row", PROMPT[:-1])
    [logits] = verifier.verify([TREE])
    for node in range(len(TREE)):
        path = [TREE.tokens[i] for i in TREE.path_to(node)]
        expected = sequential_logits(model, PROMPT[:-1] + path)
        assert torch.allclose(logits[node], expected, atol=TOL), (arch, node)


def test_compaction_to_a_later_branch_keeps_next_step_exact(arch):
    model = tiny_model(arch)
    verifier = Verifier(model)
    verifier.add("row", PROMPT[:-1])
    verifier.verify([TREE])
    accepted = [0, 2, 5]  # root -> 11 -> 2: not the tree's first branch
    verifier.commit([accepted])
    assert verifier.past == [len(PROMPT) - 1 + len(accepted)]
    # Next step: a fresh tree rooted at a bonus token, verified on the compacted cache.
    nxt = DraftTree([7, 4, 30], [-1, 0, 1])
    [logits] = verifier.verify([nxt])
    history = PROMPT + [11, 2]
    for node in range(len(nxt)):
        path = [nxt.tokens[i] for i in nxt.path_to(node)]
        assert torch.allclose(logits[node], sequential_logits(model, history + path), atol=TOL), (arch, node)


def test_generation_equals_transformers_greedy(arch):
    model = tiny_model(arch, seed=1)
    engine = Engine(model, IdTokenizer(), FIXED)
    prompt = [5, 6, 7, 8, 9, 10, 11, 12] * 3 + [5, 6]
    expected = hf_greedy(model, prompt, 48)
    for _ in range(2):  # second pass: the shared trie has learned the output, drafts get accepted
        out = engine.generate(prompt, max_new_tokens=48)
        assert out.token_ids == expected
    assert out.stats.mean_accepted > 1.5


def test_a_pending_prompt_tail_is_prefilled_by_the_first_tree_forward(arch):
    """A lone row joined with its prompt's tail uncached: one forward prefills the tail and verifies the
    tree with the logits sequential decoding gives, and the cache it commits serves the next step exactly."""
    model = tiny_model(arch)
    verifier = Verifier(model)
    head, tail = PROMPT[:4], PROMPT[4:-1]
    verifier.join("row", verifier.prefill(None, head), len(head), pending=tail)
    [logits] = verifier.verify([TREE])
    assert logits.shape[0] == len(TREE)  # the tail's own logits are not returned
    for node in range(len(TREE)):
        path = [TREE.tokens[i] for i in TREE.path_to(node)]
        assert torch.allclose(logits[node], sequential_logits(model, PROMPT[:-1] + path), atol=TOL), (arch, node)
    verifier.commit([[0, 2, 5]])
    assert verifier.past == [len(PROMPT) + 2] and verifier.pending == [[]]
    nxt = DraftTree([7, 4], [-1, 0])
    [logits] = verifier.verify([nxt])
    history = PROMPT + [11, 2]
    for node in range(len(nxt)):
        path = [nxt.tokens[i] for i in nxt.path_to(node)]
        assert torch.allclose(logits[node], sequential_logits(model, history + path), atol=TOL), (arch, node)


def test_a_second_row_joining_first_prefills_the_pending_tail():
    model = tiny_model("llama")
    verifier = Verifier(model)
    verifier.join("a", verifier.prefill(None, []), 0, pending=PROMPT[:-1])
    other = [9, 8, 7, 6]
    verifier.join("b", verifier.prefill(None, other[:-1]), len(other) - 1)
    assert verifier.pending == [[], []] and verifier.past == [len(PROMPT) - 1, len(other) - 1]
    logits = verifier.verify([DraftTree.root_only(PROMPT[-1]), DraftTree.root_only(other[-1])])
    assert torch.allclose(logits[0][0], sequential_logits(model, PROMPT), atol=TOL)
    assert torch.allclose(logits[1][0], sequential_logits(model, other), atol=TOL)


def test_only_a_row_joining_an_empty_batch_may_leave_a_tail_pending():
    model = tiny_model("llama")
    verifier = Verifier(model)
    verifier.add("a", PROMPT[:-1])
    with pytest.raises(ValueError, match="empty batch"):
        verifier.join("b", verifier.prefill(None, []), 0, pending=[1, 2, 3])
