"""Draft sources (recycle table, n-gram index), their fusion into one tree, and the cost-based size."""
from __future__ import annotations

import pytest
import torch

from lookahead.drafting.budget import Calibration, CostModel, best_size
from lookahead.drafting.drafter import DraftState
from lookahead.drafting.fusion import Budget, build_tree, scaled
from lookahead.drafting.ngram import NgramIndex
from lookahead.drafting.recycle import RecycleTable
from lookahead.drafting.trie import TokenTrie


class Chain:
    """A source that knows one fixed continuation, with a fixed probability per token."""

    def __init__(self, tokens, p):
        self.tokens, self.p = tokens, p

    def next(self, limit):
        return [(self.tokens[0], self.p)] if self.tokens and limit > 0 else []

    def child(self, token):
        return Chain(self.tokens[1:], self.p) if self.tokens and self.tokens[0] == token else None


def test_identical_paths_from_two_sources_are_merged_and_scores_combined():
    sources = {"a": (scaled(1.0), Chain([5, 6, 7], 0.8)), "b": (scaled(1.0), Chain([5, 6, 9], 0.6))}
    scored = build_tree(0, sources, Budget(10, 5))
    assert scored.tree.tokens == [0, 5, 6, 7, 9]
    assert scored.sources[1] == scored.sources[2] == frozenset({"a", "b"})
    assert scored.scores[1] == pytest.approx(0.92)           # noisy-OR: 1 - (1 - 0.8)(1 - 0.6)
    assert scored.scores[3] == pytest.approx(0.92 * 0.92 * 0.8)  # then only "a" says 7
    assert scored.scores[4] == pytest.approx(0.92 * 0.92 * 0.6)
    assert scored.sources[3] == frozenset({"a"}) and scored.sources[4] == frozenset({"b"})


def test_sources_of_one_kind_count_once_and_independent_kinds_combine():
    """Two text-copying sources agree because they read the same text: the better one counts, not both."""
    sources = {"prompt": (scaled(1.0), Chain([5], 0.6)), "ngram": (scaled(1.0), Chain([5], 0.5)),
               "recycle": (scaled(1.0), Chain([5], 0.5))}
    groups = {"prompt": "text", "ngram": "text", "recycle": "model"}
    assert build_tree(0, sources, Budget(1, 1), groups).scores[1] == pytest.approx(1 - 0.4 * 0.5)
    assert build_tree(0, sources, Budget(1, 1)).scores[1] == pytest.approx(1 - 0.4 * 0.5 * 0.5)


def test_a_confident_chain_is_not_diluted_by_other_live_sources():
    """One source's long chain keeps its probability however many other sources are live."""
    chain = {"prompt": (scaled(0.9), Chain([5, 6, 7, 8, 9, 10], 1.0))}
    noise = {f"s{i}": (scaled(0.5), Chain([20 + i], 0.3)) for i in range(3)}
    alone = build_tree(0, chain, Budget(6, 6))
    mixed = build_tree(0, {**chain, **noise}, Budget(6, 6))
    assert mixed.tree.tokens[:5] == alone.tree.tokens[:5] == [0, 5, 6, 7, 8]
    assert mixed.scores[1:5] == pytest.approx(alone.scores[1:5])


def test_source_reliability_counts_only_nodes_the_verifier_reached():
    """A chain that fails at its second node is charged for that node, not for the ones beyond it."""
    from lookahead.drafting.drafter import DraftState
    from lookahead.tree import DraftTree
    state = DraftState(TokenTrie(max_match=1, window=6), sources=("ngram",))
    drafter = state.drafter([1, 2, 3, 4, 5, 1])
    tree = drafter.propose([1, 2, 3, 4, 5, 1], Budget(4, 4))
    assert isinstance(tree, DraftTree) and tree.tokens == [1, 2, 3, 4, 5]
    drafter.observe([2, 9], tree=tree, logits=torch.zeros(5, 10), nodes=[0, 1])
    s = state.stats["ngram"]
    assert (s.proposed, s.accepted, s.reached) == (4, 1, 2)
    trust = state.trust["ngram"]  # the source's trust learns from the two reached nodes only
    assert (sum(trust.seen), sum(trust.accepted)) == (2, 1)


def test_a_source_the_model_keeps_rejecting_ranks_below_one_it_accepts():
    """Trust is learned per source: a confident source that is always wrong loses the first place."""
    table = RecycleTable(vocab_size=32, k=2)
    logits = torch.full((1, 32), -20.0)
    logits[0, 7] = 10.0
    table.update([1], logits)                       # the recycle table says 7 follows 1, p ~ 1
    state = DraftState(TokenTrie(max_match=1, window=6), table, sources=("recycle", "ngram"))
    context = [1, 2, 3, 1]                          # prompt lookup says 2 follows 1 (a 1-token match)
    assert state.drafter(context).propose(context, Budget(1, 1)).tokens == [1, 7]
    state.trust["recycle"].observe([1.0] * 50, [False] * 50)
    assert state.drafter(context).propose(context, Budget(1, 1)).tokens == [1, 2]


def test_best_first_order_is_non_increasing_and_any_prefix_is_a_tree():
    trie = TokenTrie(max_match=1, window=6)
    for seq in ([1, 2, 3, 4], [1, 2, 5, 6], [1, 7, 8], [1, 2, 3, 9]):
        trie.insert(seq)
    scored = build_tree(1, trie.session([]).cursors([1]), Budget(8, 4))
    assert scored.scores == sorted(scored.scores, reverse=True)
    assert all(p < i for i, p in enumerate(scored.tree.parents) if i)


def test_recycle_table_keeps_the_models_top_k_per_token():
    table = RecycleTable(vocab_size=10, k=3)
    logits = torch.full((2, 10), -10.0)
    logits[0, [4, 5, 6]] = torch.tensor([3.0, 2.0, 1.0])
    logits[1, 8] = 5.0
    table.update([2, 7], logits)
    assert [t for t, _ in table.cursor(2).next(3)] == [4, 5, 6]
    assert table.cursor(7).next(1)[0][0] == 8 and table.cursor(7).next(1)[0][1] > 0.9
    assert table.cursor(3) is None                        # never seen: no guess
    assert table.cursor(2).child(4) is None               # 4 was never an input
    again = RecycleTable.from_arrays(table.to_arrays())
    assert again.cursor(2).next(3) == table.cursor(2).next(3)


def test_ngram_index_continues_the_latest_longest_match():
    index = NgramIndex(max_ngram=3)
    index.extend([1, 2, 3, 10, 11, 9, 2, 3, 20, 21, 1, 2, 3])
    cursor = index.cursor()  # suffix 1 2 3 occurred at the start -> continues with 10
    assert cursor.next(1)[0][0] == 10 and cursor.child(10).next(1)[0][0] == 11
    index.extend([7, 2, 3])  # "7 2 3" is new; "2 3" last occurred just before 7: the latest occurrence wins
    assert index.cursor().next(1)[0][0] == 7
    assert NgramIndex().cursor() is None


def test_cost_model_interpolates_and_extrapolates():
    cost = CostModel([1, 2, 4], [10.0, 20.0, 24.0])
    assert (cost(1), cost(2), cost(3), cost(4), cost(6)) == (1.0, 2.0, 2.2, 2.4, 2.8)
    with pytest.raises(ValueError):
        CostModel([2, 4], [1.0, 2.0])


def test_best_size_uses_the_cost_curve():
    calib = Calibration(prior=1e9)  # calibrated acceptance == score
    scores = [0.9, 0.8, 0.5, 0.2, 0.05]
    assert best_size(scores, CostModel.flat(), calib) == 5                   # free: verify everything
    assert best_size(scores, CostModel([1, 2], [1.0, 3.0]), calib) == 0      # steep: no draft pays off
    # fp32-like step at k=2 then flat: worth it only because the first nodes are likely.
    step = CostModel([1, 2, 16, 32], [1.0, 1.4, 1.45, 3.0])
    assert best_size(scores, step, calib) == 5
    assert best_size([0.2, 0.1], step, calib) == 0
    # Batched rows share the forward: the same tree costs more per row when the batch is compute-bound.
    assert best_size(scores, CostModel([1, 8, 64], [1.0, 1.0, 8.0]), calib, rows=16) == 0


def test_calibration_learns_the_acceptance_of_a_score():
    calib = Calibration(prior=4.0)
    assert calib(0.9) == pytest.approx(0.9)
    calib.observe([0.95] * 100, [False] * 90 + [True] * 10)
    assert calib(0.95) < 0.15


def test_drafter_records_per_source_acceptance():
    state = DraftState(TokenTrie(max_match=2, window=6), RecycleTable(32, 4))
    drafter = state.drafter([1, 2, 3, 4, 1, 2])
    tree = drafter.propose([1, 2, 3, 4, 1, 2], Budget(4, 3))
    assert tree.tokens[1:3] == [3, 4]
    logits = torch.zeros(len(tree), 32)
    drafter.observe([3, 4, 9], tree=tree, logits=logits, nodes=[0, 1, 2])
    assert state.stats["prompt"].accepted == 2 and state.stats["ngram"].accepted == 2
    assert state.stats["recycle"].proposed == 0 and drafter.stats["prompt"].accepted == 2
    with pytest.raises(ValueError, match="unknown draft sources"):
        DraftState(TokenTrie(), sources=("prompt", "magic"))


def test_engine_drafts_only_what_the_cost_curve_pays_for():
    from conftest import IdTokenizer, hf_greedy, tiny_model
    from lookahead import DraftConfig, Engine
    from lookahead.drafting.drafter import PROBE_EVERY, PROBE_NODES
    model = tiny_model("llama", seed=1)
    engine = Engine(model, IdTokenizer(), DraftConfig(sizing="measured"))
    prompt = [5, 6, 7, 8, 9, 10, 11, 12] * 3 + [5, 6]
    expected = hf_greedy(model, prompt, 36)
    engine.drafting.cost = CostModel([1, 2], [1.0, 50.0])  # every extra token costs 49 forwards: never pays
    out = engine.generate(prompt, max_new_tokens=36)
    assert out.token_ids == expected
    probes = out.stats.steps // (PROBE_EVERY + 1)
    assert out.stats.draft_tokens <= probes * PROBE_NODES  # only the periodic probes verified drafts
    engine.drafting.cost = CostModel.flat()  # free verification: the whole budget every step
    out = engine.generate(prompt, max_new_tokens=36)
    assert out.token_ids == expected and out.stats.mean_accepted > 2


def test_draft_state_saves_the_recycle_table_with_the_trie(tmp_path):
    from conftest import IdTokenizer, tiny_model
    from lookahead import DraftConfig, Engine, TokenTrie
    model = tiny_model("qwen2")
    engine = Engine(model, IdTokenizer(), DraftConfig(sizing="fixed", sources=("history", "recycle")))
    engine.generate([3, 4, 5, 3, 4], max_new_tokens=12)
    path = tmp_path / "draft.safetensors"
    engine.save_draft_state(path)
    again = Engine(model, IdTokenizer(), engine.draft_config, trie=TokenTrie.load(path))
    assert len(again.trie) == len(engine.trie)
    assert torch.equal(again.drafting.recycle.tokens, engine.drafting.recycle.tokens)


def test_measured_cost_is_monotone_and_starts_at_one():
    from conftest import tiny_model
    from lookahead.drafting.budget import measure_cost
    cost = measure_cost(tiny_model("llama"), ks=(1, 2, 4, 8), context=16, reps=3)
    assert cost.ks == [1, 2, 4, 8] and cost(1) == 1.0
    assert all(a <= b for a, b in zip(cost.times, cost.times[1:], strict=False))
