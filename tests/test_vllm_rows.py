"""The vLLM proposer's logic (rows -> chains, feedback, bounds), driven like vLLM drives it, without vLLM."""
from __future__ import annotations

import random
import sys
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest

from lookahead.decoding.sizing import PROBE_EVERY, PROBE_NODES
from lookahead.integrations.rows import NODE_BYTES, Row, RowProposer

TEXT = list(range(100, 140))  # a 40-token "document" the model will copy


class FakeEngine:
    """vLLM's side of the loop for greedy decoding of known target continuations.

    Each step it accepts the longest draft prefix that matches the target and appends one token of
    the target (what greedy verification does when the target is the model's greedy output)."""

    def __init__(self, proposer: RowProposer, prompts: list[list[int]], targets: list[list[int]]) -> None:
        self.proposer = proposer
        self.seqs = [list(p) + [t[0]] for p, t in zip(prompts, targets, strict=True)]  # after prefill
        self.done = [1] * len(prompts)
        self.targets = targets
        self.sampled = [1] * len(prompts)
        self.steps = 0

    def step(self, order: list[int] | None = None) -> list[list[int]]:
        order = order or list(range(len(self.seqs)))
        rows = [Row(np.array(self.seqs[i]), self.sampled[i]) for i in order]
        chains = self.proposer.propose(rows)
        self.steps += 1
        for i, chain in zip(order, chains, strict=True):
            target, done = self.targets[i], self.done[i]
            accepted = 0
            while (accepted < len(chain) and done + accepted < len(target)
                   and chain[accepted] == target[done + accepted]):
                accepted += 1
            new = target[done:done + accepted + 1]
            self.seqs[i] += new
            self.done[i] += len(new)
            self.sampled[i] = len(new)
        return chains


def test_copy_task_accepts_several_tokens_per_step():
    prompt = [1, 2] + TEXT + [3, 4]
    target = TEXT + [5]
    engine = FakeEngine(RowProposer(max_draft=8), [prompt], [target])
    while engine.done[0] < len(target):
        engine.step()
    assert len(target) / (engine.steps + 1) > 3  # +1: the prefill step
    stats = engine.proposer.state.stats
    assert stats["prompt"].accepted > 0 and stats["ngram"].accepted > 0


def test_rows_that_move_keep_their_state_and_outputs():
    other = list(range(200, 240))
    prompts = [[1] + TEXT + [2], [7] + other + [8]]
    targets = [TEXT, other]
    engine = FakeEngine(RowProposer(max_draft=8), prompts, targets)
    engine.step()
    first = list(engine.proposer.requests)
    engine.step(order=[1, 0])  # rows swapped: each must still draft from its own prompt
    assert {id(r) for r in engine.proposer.requests} == {id(r) for r in first}
    while min(engine.done) < 40:
        engine.step(order=[1, 0] if engine.steps % 2 else [0, 1])
    assert engine.seqs[0][len(prompts[0]):] == TEXT[:len(engine.seqs[0]) - len(prompts[0])]
    stats = engine.proposer.state.stats["prompt"]
    assert stats.accepted >= 0.8 * stats.proposed  # drafts came from the right request's text


def test_request_state_is_dropped_when_its_row_leaves():
    proposer = RowProposer(max_draft=4)
    proposer.propose([Row(np.array([1, 2, 3, 4]), 1), Row(np.array([5, 6, 7, 8]), 1)])
    assert len(proposer.requests) == 2
    proposer.propose([Row(np.array([5, 6, 7, 8, 9]), 1)])
    assert len(proposer.requests) == 1
    assert proposer.metrics()["live_requests"] == 1


def test_a_row_that_grew_by_more_than_it_sampled_is_a_new_request():
    proposer = RowProposer(max_draft=4)
    proposer.propose([Row(np.array([1, 2, 3, 4]), 1)])
    old = proposer.requests[0]
    proposer.propose([Row(np.array([1, 2, 3, 4, 9, 9, 9]), 1)])  # e.g. the next chat turn of the same text
    assert proposer.requests[0] is not old


def test_rows_not_decoding_get_no_draft_and_no_state():
    proposer = RowProposer(max_draft=4)
    chains = proposer.propose([Row(np.array(TEXT + TEXT[:5]), 0)])
    assert chains == [[]] and proposer.requests == []


def test_trust_is_learned_from_what_the_engine_accepted():
    proposer = RowProposer(max_draft=8, sizing="fixed")
    prompt = [1] + TEXT + [2] + TEXT[:3]
    chain = proposer.propose([Row(np.array(prompt), 1)])[0]
    assert chain[:3] == TEXT[3:6]
    # The engine accepted two draft tokens, then sampled its own third token.
    grown = prompt + [chain[0], chain[1], 999]
    proposer.propose([Row(np.array(grown), 3)])
    trust = proposer.state.trust["prompt"]
    assert sum(trust.seen) == 3 and sum(trust.accepted) == 2  # 2 accepted + the first miss; nothing beyond
    assert proposer.accepted_tokens == 2


def test_no_draft_where_it_would_not_pay_but_probes_now_and_then():
    # one more token costs ~ a whole step; the history trie left out: cold, it trusts its single lead-in
    proposer = RowProposer(max_draft=8, cost_prior=100.0, sources=("prompt", "ngram"))
    # After token 50 four different tokens have followed: no source is sure of the next one.
    seq = np.array([1] + [t for i in range(4) for t in (50, 60 + i, 70, 80)] + [50])
    lengths = [len(proposer.propose([Row(seq, 1)])[0]) for _ in range(PROBE_EVERY + 1)]
    assert lengths[:PROBE_EVERY - 1] == [0] * (PROBE_EVERY - 1)
    assert 0 < max(lengths) <= PROBE_NODES


def test_step_cost_is_fitted_from_timed_steps_per_batch_size():
    proposer = RowProposer(max_draft=4)
    assert proposer.cost.ratio(1) == proposer.cost.prior  # nothing timed yet
    for tokens in [1, 5, 9] * 10:  # one row: a few tokens barely cost more than one
        proposer.cost.observe(tokens, 0.010 + 0.001 * tokens, rows=1)
    assert proposer.cost.ratio(3) == pytest.approx(0.1, rel=0.01)  # batch size never seen: the fit over all steps
    for tokens in [8, 40, 72] * 10:  # eight rows: dozens of tokens cost compute
        proposer.cost.observe(tokens, 0.010 + 0.004 * tokens, rows=8)
    assert proposer.cost.ratio(1) == pytest.approx(0.1, rel=0.01)
    assert proposer.cost.ratio(8) == pytest.approx(0.4, rel=0.01)


def test_shared_trie_stays_under_its_byte_bound():
    max_bytes = 2_000_000
    proposer = RowProposer(max_draft=8, max_bytes=max_bytes)
    assert proposer.state.trie.capacity == max_bytes // NODE_BYTES
    rnd = random.Random(0)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(40):  # 40 requests of random text: far more n-grams than the bound holds
        seq = [rnd.randrange(30_000) for _ in range(8)]
        for _ in range(60):
            chains = proposer.propose([Row(np.array(seq), 1)])
            seq = seq + [rnd.randrange(30_000)]
        proposer.propose([])  # the request leaves
        assert len(proposer.state.trie) <= proposer.state.trie.capacity
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert chains is not None
    assert held <= max_bytes


def test_vllm_adapter_converts_vllm_arguments_without_importing_vllm():
    from lookahead.integrations.vllm import LookaheadProposer

    config = SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=6),
                             model_config=SimpleNamespace(max_model_len=64))
    proposer = LookaheadProposer(config, sizing="fixed")
    proposer.load_model()
    token_ids = np.zeros((4, 64), dtype=np.int32)
    seq = [1] + TEXT[:10] + [2] + TEXT[:3]
    token_ids[1, :len(seq)] = seq
    token_ids[2, :64] = 5
    chains = proposer.propose([[], [seq[-1]], [5]], np.array([0, len(seq), 64, 0]), token_ids)
    assert chains[0] == [] and chains[2] == []  # not decoding; at the length limit
    assert chains[1][:3] == TEXT[3:6] and len(chains[1]) <= 6
    assert "vllm" not in sys.modules
    assert 'lookahead_vllm_source_proposed{source="prompt"}' in proposer.core.prometheus()
