"""The misses trace: every token the copy oracle would have had accepted is accepted or charged to one reason."""
from __future__ import annotations

import pytest

from lookahead import DraftConfig, DraftTree, Engine
from lookahead.benchmark.misses import FixedCurve, TracedStep, charge, lookup_chain, lookup_walk, lost, table, trace
from lookahead.decoding.cost import CostModel
from lookahead.drafting.fusion import Budget

COPY = [7, 8, 9, 10, 11]
CAPS = Budget(12, 12)


def tree(tokens: list[int], parents: list[int]) -> DraftTree:
    return DraftTree([1, *tokens], [-1, *parents])


def step(whole: DraftTree | None, accepted: int, verified: DraftTree | None = None,
         budget: Budget = CAPS) -> TracedStep:
    return TracedStep(whole, budget if whole is not None else None, verified or whole, accepted)


def test_a_plain_step_loses_the_whole_copy_to_the_plan():
    assert charge(step(None, 0), COPY) == {"plain": 5}


def test_a_tree_without_the_next_token_is_unmatched():
    assert charge(step(tree([3, 4], [0, 1]), 0), COPY) == {"unmatched": 5}


def test_a_chain_that_ends_at_the_depth_cap_is_capped_and_one_that_turns_away_has_parted():
    capped = tree([7, 8, 9], [0, 1, 2])
    assert charge(step(capped, 3, budget=Budget(12, 3)), COPY) == {"capped": 2}
    assert charge(step(capped, 3, budget=Budget(3, 12)), COPY) == {"capped": 2}  # every node spent
    turned = tree([7, 8, 4, 5], [0, 1, 2, 3])                                      # 7 8, then elsewhere
    assert charge(step(turned, 2), COPY) == {"parted": 3}


def test_what_the_sizing_did_not_verify_is_cut():
    whole = tree([7, 8, 9, 10], [0, 1, 2, 3])
    assert charge(step(whole, 1, verified=whole.prefix(1), budget=Budget(4, 4)), COPY) == {"cut": 3, "capped": 1}


def test_tokens_accepted_past_the_copy_count_apart():
    assert charge(step(tree([7, 8, 2], [0, 1, 2]), 3), COPY[:2]) == {"beyond": 1}


def test_prompt_lookup_drafts_what_follows_the_longest_tail_match_leftmost_first():
    assert lookup_chain([4, 5, 6, 4, 5, 7, 4, 5]) == [6, 4, 5, 7, 4, 5]       # [4, 5] first seen at 0 (not 3)
    assert lookup_chain([9, 4, 5, 1, 4, 5, 2, 9, 4, 5]) == [1, 4, 5, 2, 9, 4, 5]   # the 3-gram [9, 4, 5] wins
    assert lookup_chain([1, 2, 3]) == []                                        # nothing seen before
    assert lookup_chain(list(range(30)) + [0]) == list(range(1, 11))           # at most 10 tokens


def test_prompt_lookup_walks_an_answer_copied_from_the_prompt_in_two_steps():
    # Step 1: nothing to match, emits 1. Step 2: "1" seen at 0, drafts 2..6 and 1; 2..5 accepted, 6 is its own.
    # Timed on a curve: one forward over 1 token, one over 7 (1 + 1.5 * 6 / 15).
    assert lookup_walk([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], CostModel([1, 16], [1.0, 2.5])) == {
        "lookup_steps": 2, "lookup_accepted": 4, "lookup_drafted": 6, "lookup_time": pytest.approx(2.6)}


def test_a_traced_decode_accounts_for_every_copyable_token(real_engine):
    """On the real model: each copyable token is accepted or charged once; tight caps show up as capped."""
    prompt = real_engine.encode([{"role": "user", "content": "Repeat exactly: the quick brown fox jumps over the "
                                                             "lazy dog while the cat sleeps on the warm mat."}])
    tight = Engine(real_engine.model, real_engine.tokenizer,
                   DraftConfig(max_nodes=2, max_depth=2, copy_depth=2, sizing="fixed"),
                   cost=real_engine.cost)
    def accounted(t: dict) -> bool:
        return t["copyable"] == t["accepted"] - t.get("beyond", 0) + lost(t)

    answer = real_engine.generate(prompt, max_new_tokens=24, draft=False).token_ids
    totals = {}
    for name, engine in (("default", real_engine), ("tight", tight)):
        t = totals[name] = trace(engine, prompt, max_new_tokens=24)
        assert t["copyable"] > 0 and accounted(t), t
        assert t["emitted"] == t["steps"] + t["accepted"] <= 24
        assert t["lookup_steps"] + t["lookup_accepted"] == len(answer)     # prompt lookup, over the same answer
    assert totals["tight"].get("capped", 0) > totals["default"].get("capped", 0)
    assert "| tight |" in table(totals)
    free = FixedCurve([1, 16], [1.0, 1.0])       # another mode's curve: sizes the drafted decode, times every step
    timed = trace(real_engine, prompt, max_new_tokens=24, curve=free)
    assert timed["plain_time"] == len(answer) and timed["time"] == timed["steps"] < len(answer)
    assert timed["lookup_time"] == timed["lookup_steps"] and free.seconds == [1.0, 1.0]   # not moved by fp32 forwards
    long = trace(tight, prompt, max_new_tokens=24, min_copy=4)   # fixed sizing: the same steps as before
    assert long["steps"] == totals["tight"]["steps"] and long["copyable"] < totals["tight"]["copyable"]
    assert accounted(long), long
