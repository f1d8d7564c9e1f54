"""Draft sources (recycle table, n-gram index), their fusion into one tree, and the drafting state file."""
from __future__ import annotations

import pytest
import torch

from lookahead.drafting.calibration import Calibration
from lookahead.drafting.fusion import Budget, build_tree
from lookahead.drafting.ngram import NgramIndex
from lookahead.drafting.recycle import RecycleTable
from lookahead.drafting.state import DraftState, StateFileError
from lookahead.drafting.trie import TokenTrie


def scaled(weight: float):
    """A fixed trust: the source's probability times `weight`."""
    return lambda p: weight * p


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
    assert set(scored.proposals[1]) == set(scored.proposals[2]) == {"a", "b"}
    assert scored.scores[1] == pytest.approx(0.92)           # noisy-OR: 1 - (1 - 0.8)(1 - 0.6)
    assert scored.scores[3] == pytest.approx(0.92 * 0.92 * 0.8)  # then only "a" says 7
    assert scored.scores[4] == pytest.approx(0.92 * 0.92 * 0.2)  # 7 and 9 exclude each other: 0.6 capped at 1 - 0.8
    assert set(scored.proposals[3]) == {"a"} and set(scored.proposals[4]) == {"b"}


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


def test_siblings_exclude_each_other_so_a_sure_copy_outranks_guesses_beside_it():
    """One token comes next: where a copy is 0.95 likely, a guess beside it is at most 0.05 likely, so the
    copy's deep nodes come before it (measured on edits: side nodes of long copies accepted 1 time in 107)."""
    sources = {"ngram": (scaled(1.0), Chain([5, 6, 7, 8, 9, 10, 11, 12], 0.95)),
               "recycle": (scaled(1.0), Chain([40], 0.5))}
    scored = build_tree(0, sources, Budget(8, 8), {"ngram": "text", "recycle": "model"})
    assert scored.tree.tokens == [0, 5, 6, 7, 8, 9, 10, 11, 12]
    capped = build_tree(0, sources, Budget(9, 9), {"ngram": "text", "recycle": "model"})
    assert capped.tree.tokens[-1] == 40 and capped.scores[-1] == pytest.approx(0.05)
    # Guesses that leave room keep their own probabilities.
    loose = build_tree(0, {"a": (scaled(1.0), Chain([5], 0.5)), "b": (scaled(1.0), Chain([6], 0.3))}, Budget(2, 1))
    assert loose.scores[1:] == pytest.approx([0.5, 0.3]) and loose.shares == [None, None, None]


def test_what_a_sibling_beside_a_likelier_token_is_worth_is_learned_from_the_verifier():
    """The share its better siblings leave a token is a bound from the sources' own estimates, which can be wrong
    either way: the drafter learns what such tokens are accepted at (measured: 0.24 where the share said 0.12 on
    Gemma-3-270M, 0.09 where it said 0.13 on SmolLM2) and believes that."""
    state = DraftState(TokenTrie(max_match=2, window=8), RecycleTable(64, 4), sources=("ngram", "recycle"))
    state.trust = {name: Calibration(cold=1.0) for name in state.sources}  # the sources' own probabilities
    state.recycle.tokens[3, 0], state.recycle.probs[3, 0] = 7, 0.5  # the table guesses 7 after 3
    prompt = [1, 2, 3, 4, 5, 1, 2, 3]  # the prompt says 4 after 1 2 3 (0.85)
    drafter = state.drafter(prompt)
    tree = drafter.propose(prompt, Budget(8, 4))
    side = tree.tokens.index(7)
    assert tree.parents[side] == 0 and drafter.last.shares[side] == pytest.approx(0.15)
    assert drafter.last.scores[side] == pytest.approx(0.15)  # cold: believed at its share
    for _ in range(30):  # the model keeps taking the table's 7 where the copy said 4
        drafter.observe([7], tree=tree, logits=None, nodes=[0, side])
    assert state.siblings.seen[1] == state.siblings.accepted[1] == 30
    again = state.drafter(prompt)
    tree = again.propose(prompt, Budget(8, 4))
    assert again.last.scores[tree.tokens.index(7)] > 0.4  # no longer held to its share


def test_source_reliability_counts_only_nodes_the_verifier_reached():
    """A chain that fails at its second node is charged for that node, not for the ones beyond it."""
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
    cursors = {name: (scaled(1.0), c) for name, c in trie.session([]).cursors([1]).items()}
    scored = build_tree(1, cursors, Budget(8, 4))
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
    again = RecycleTable.from_arrays(table.tokens, table.probs)
    assert again.cursor(2).next(3) == table.cursor(2).next(3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recycle_table_at_a_large_vocabulary_keeps_the_top_k_and_their_probabilities(dtype):
    vocab_size = 49152  # wide enough for the block-maxima top-k
    logits = (torch.randn(5, vocab_size, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    table = RecycleTable(vocab_size, k=8)
    table.update([11, 12, 13, 14, 15], logits)
    softmax = logits.float().softmax(-1)
    for row, token in enumerate([11, 12, 13, 14, 15]):
        tokens, probs = zip(*table.cursor(token).next(8), strict=True)
        # the 8 largest logits, largest first (bf16 ties may come in either order)
        assert logits[row, list(tokens)].tolist() == logits[row].topk(8).values.tolist()
        assert probs == pytest.approx(softmax[row, list(tokens)].tolist(), rel=0.02)


def test_ngram_index_continues_the_latest_longest_match():
    index = NgramIndex(max_ngram=3)
    index.extend([1, 2, 3, 10, 11, 9, 2, 3, 20, 21, 1, 2, 3])
    cursor = index.cursor()  # suffix 1 2 3 occurred at the start -> continues with 10
    assert cursor.next(1)[0][0] == 10 and cursor.child(10).next(1)[0][0] == 11
    index.extend([7, 2, 3])  # "7 2 3" is new; "2 3" last occurred just before 7: the latest occurrence wins
    assert index.cursor().next(1)[0][0] == 7
    assert NgramIndex().cursor() is None


def test_calibration_learns_the_acceptance_of_a_score():
    calib = Calibration(prior=4.0)
    assert calib(0.9) == pytest.approx(0.9)
    calib.observe([0.95] * 100, [False] * 90 + [True] * 10)
    assert calib(0.95) < 0.15


def test_a_cold_calibration_learns_from_rejections_in_any_bin_that_its_scores_are_optimistic():
    calib = Calibration(cold=0.5)
    assert calib(1.0) == pytest.approx(0.5)          # believed at half its score before any evidence
    calib.observe([0.55] * 6, [False] * 6)           # rejections in another bin
    assert calib(1.0) < 0.4                          # lower every bin, not only the one observed
    trusting = Calibration()                         # cold = 1: the score itself until evidence
    assert trusting(1.0) == pytest.approx(1.0)


def test_a_cold_state_does_not_expect_a_prompt_copy_chain_to_be_accepted_whole():
    """A prompt's n-gram seen once continues one way with trie probability 1.0 at every node; a cold
    state believed such a 12-node chain would be accepted whole (12.0 expected tokens; measured: 1)."""
    prompt = list(range(1, 14)) + [1]
    state = DraftState(TokenTrie(max_match=1, window=16), sources=("prompt",))
    tree = state.drafter(prompt).propose(prompt, Budget(12, 12))
    assert tree.tokens[1:] == list(range(2, 14))
    assert sum(tree.expected[1:]) < 1.5


def test_the_calibration_learns_the_nodes_the_cut_left_out_where_the_steps_tokens_tell_their_fate():
    """Not only verified nodes: else the nodes the sizing expects least are never verified to show they are
    accepted more often than expected (measured: nodes cut at 0.004-0.007 expected were accepted 0.04 of the time)."""
    from lookahead.tree import DraftTree
    prompt = list(range(1, 14)) + [1]

    def step(tokens, verified):
        state = DraftState(TokenTrie(max_match=1, window=16), sources=("prompt",))
        drafter = state.drafter(prompt)
        whole = drafter.propose(prompt, Budget(12, 12))
        assert whole.tokens[1:] == list(range(2, 14))
        tree = whole.prefix(verified)  # `verified` draft nodes after the root
        drafter.observe(tokens, tree=tree, nodes=list(range(1 + verified))[:len(tokens)])
        seen = sum(state.calibration.seen), sum(state.calibration.accepted)
        # a plain step after it (nothing proposed: a root-only tree, here with the same root) judges nothing again
        drafter.observe(tokens, tree=DraftTree.root_only(prompt[-1]), nodes=[0])
        assert (sum(state.calibration.seen), sum(state.calibration.accepted)) == seen
        return seen

    # node 1 verified and accepted; node 2 (3) was cut but is the model's next token; below it: not known
    assert step([2, 3], verified=1) == (2, 2)
    # the model went on with 9 after 2: every node the cut left out is known rejected
    assert step([2, 9], verified=1) == (12, 1)
    # nothing verified (a plain step): the first node is the model's token, the rest not known
    assert step([2], verified=0) == (1, 1)


def test_a_drafter_given_least_ends_its_tree_before_the_first_node_expected_below_it():
    """What the sizing policy would never verify is not built: the tree is the whole one's prefix up to the first
    node whose expected tokens (the least on its way in best-first order) fall below `least`."""
    prompt = list(range(1, 14)) + [1]
    state = DraftState(TokenTrie(max_match=1, window=16), sources=("prompt",))
    whole = state.drafter(prompt).propose(prompt, Budget(12, 12))
    floors = [min(whole.expected[1:i + 1]) for i in range(1, len(whole))]
    least = (floors[2] + floors[3]) / 2 if floors[2] > floors[3] else floors[3]
    cut = state.drafter(prompt).propose(prompt, Budget(12, 12), least=least)
    kept = sum(f >= least for f in floors)
    assert 0 < kept < len(whole) - 1
    assert cut.tokens == whole.tokens[:1 + kept] and cut.expected == whole.expected[:1 + kept]
    assert state.drafter(prompt).propose(prompt, Budget(12, 12), least=1.01).tokens == [1]


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


def test_draft_state_file_holds_everything_drafting_learned(tmp_path):
    from conftest import IdTokenizer, tiny_model
    from lookahead import DraftConfig, Engine
    model = tiny_model("qwen2")
    engine = Engine(model, IdTokenizer(), DraftConfig(sizing="fixed"))
    engine.generate([3, 4, 5, 3, 4, 5, 3, 4], max_new_tokens=16)
    path = tmp_path / "draft.safetensors"
    engine.save_state(path)
    again = Engine(model, IdTokenizer(), engine.draft_config)
    again.load_state(path)
    old, new = engine.state, again.state
    assert len(new.trie) == len(old.trie) > 0
    assert torch.equal(new.recycle.tokens, old.recycle.tokens) and torch.equal(new.recycle.probs, old.recycle.probs)
    assert new.calibration.seen == old.calibration.seen and sum(old.calibration.seen) > 0
    assert all(new.trust[k].accepted == old.trust[k].accepted for k in old.trust)
    assert sum(sum(t.seen) for t in old.trust.values()) > 0
    assert new.siblings.seen == old.siblings.seen and new.siblings.accepted == old.siblings.accepted


def test_a_state_file_from_before_the_sibling_curve_loads_with_a_cold_one(tmp_path):
    path = bad_state_file(tmp_path, **{"siblings.seen": None, "siblings.accepted": None})
    state = DraftState.load(path, vocab_size=32)
    assert sum(state.siblings.seen) == 0 and state.siblings(0.1) == pytest.approx(0.1)


def bad_state_file(tmp_path, **overrides):
    """A state file with a valid checksum whose content was changed as `overrides` say."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from lookahead.drafting.state import _digest
    trie = TokenTrie(max_match=2, window=6)
    trie.insert([1, 2, 3, 1, 2, 4])
    path = tmp_path / "state.safetensors"
    DraftState(trie, RecycleTable(32, 4)).save(path, model="m")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    arrays = load_file(str(path))
    settings = json.loads(meta["settings"])
    for key, value in overrides.items():
        if key in settings:
            settings[key] = value
        elif value is None:
            del arrays[key]
        else:
            arrays[key] = value
    meta["settings"] = json.dumps(settings) if "raw_settings" not in overrides else overrides["raw_settings"]
    arrays.pop("raw_settings", None)
    meta["sha256"] = _digest(arrays)
    save_file(arrays, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("overrides, message", [
    ({"trie.tokens": torch.tensor([1, 2, 3, 4, 999, 2], dtype=torch.int64)}, "beyond the model's vocabulary"),
    ({"recycle.tokens": torch.full((32, 4), 77, dtype=torch.int32)}, "beyond its vocabulary"),
    ({"recycle.probs": torch.zeros(32, 3, dtype=torch.float16)}, "mismatched shapes"),
    ({"trie.parents": torch.tensor([-1, 0.5, 1, -1, 3, 4], dtype=torch.float64)}, "integer"),
    ({"max_match": 0}, "settings are invalid"),
    ({"model": "another-model"}, "built for model 'another-model'"),
    ({"vocab": 50}, "vocabulary of 50"),
    ({"calibration.accepted": torch.full((10,), 5.0, dtype=torch.float64)}, "calibration counts are invalid"),
])
def test_a_state_file_with_wrong_content_is_refused_by_name(tmp_path, overrides, message):
    path = bad_state_file(tmp_path, **overrides)
    with pytest.raises(StateFileError, match=message):
        DraftState.load(path, vocab_size=32, model="m")


def test_state_file_settings_that_are_not_json_are_refused(tmp_path):
    path = bad_state_file(tmp_path, raw_settings="{not json")
    with pytest.raises(StateFileError):
        DraftState.load(path, vocab_size=32)


def test_ngram_index_follows_the_copy_across_an_edit():
    """An output that copies a source, inserts two tokens (an edit), then goes on copying: after the edit the
    source's next tokens are proposed (the resume point), not the latest occurrence of the edited suffix."""
    source = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    index = NgramIndex(max_ngram=3)
    index.extend(source + [30, 8, 40, 41])              # "8 40 41" elsewhere: the latest occurrence of "8"
    index.extend([5, 6, 7, 8])                          # copying the source
    assert index.cursor().next(1)[0][0] == 9            # the copy pointer, not "8 -> 40"
    index.extend([40, 41])                              # an insertion the source does not have
    proposed = index.cursor()
    assert 9 in [t for t, _ in proposed.next(4)]        # the source resumes where the copy stopped
    chain, cursor = [], proposed
    while cursor is not None and len(chain) < 4:
        token = 9 if not chain else cursor.next(1)[0][0]
        chain.append(token)
        cursor = cursor.child(token)
    assert chain == [9, 10, 11, 12]                     # ... and continues as a copy
    index.extend([50, 9])                               # a further inserted token: the resume point waits
    assert index.cursor().next(1)[0][0] == 10           # lined up again: copying from 10 on


def test_a_copy_that_has_held_longer_is_proposed_with_more_confidence():
    """The copy pointer's chain carries (r + 1) / (r + 2) after r copied tokens (at least COPY_P): a long copy
    outranks a tree's alternatives deep down, where a fixed 0.9 a token fell below them after ~15 tokens."""
    from lookahead.drafting.ngram import COPY_P
    source = list(range(10, 70))
    confidence = {}
    for run in (4, 10, 40):
        copy = NgramIndex(max_ngram=3)
        copy.extend(source + [99] + source[:run])
        assert copy.copy_run == run
        (token, p), = copy.cursor().next(1)
        assert token == source[run]
        confidence[run] = p
    assert confidence[4] == COPY_P < confidence[10] == 11 / 12 < confidence[40] == 41 / 42


def test_a_resume_point_waits_inside_the_draft_while_it_goes_through_an_insertion():
    index = NgramIndex(max_ngram=3)
    index.extend([5, 6, 7, 8, 9, 10, 11, 12] + [5, 6, 7, 8, 60])   # the copy broke at 60 (the source had 9)
    cursor = index.cursor().child(61)                   # a draft token the source does not have
    assert cursor is not None and 9 in [t for t, _ in cursor.next(4)]


def test_ngram_index_tells_how_long_the_output_has_been_copying():
    """`copy_run`: tokens copied in a row from one place of the context; trusted (`copying`) from MIN_RUN on,
    0 once the copy breaks, MIN_RUN again where the output lines up after an edit. The guard reads it."""
    from lookahead.drafting.ngram import MIN_RUN
    index = NgramIndex(max_ngram=3)
    index.extend([5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 40])
    assert index.copy_run == 0 and not index.copying
    index.extend([5, 6, 7])                             # a suffix seen before: followed, not yet trusted
    assert 0 < index.copy_run < MIN_RUN and not index.copying
    index.extend([8, 9, 10, 11])
    assert index.copy_run == 7 and index.copying
    index.extend([50])                                  # an edit: the copy breaks
    assert index.copy_run == 0 and not index.copying
    index.extend([13])                                  # lines up again after a substitution
    assert index.copy_run == MIN_RUN and index.copying


def drafted_chain(index: NgramIndex, depth: int) -> list[int]:
    """The chain a cursor drafts, taking its likeliest token at every depth."""
    chain, cursor = [], index.cursor()
    while cursor is not None and len(chain) < depth:
        token = cursor.next(1)[0][0]
        chain.append(token)
        cursor = cursor.child(token)
    return chain


def test_an_edit_the_output_made_twice_is_drafted_wherever_the_copy_meets_its_source_tokens():
    """A list rewritten with another separator (`,` -> ` |`): the output replaces source token 1 by 2. Seen once it
    could be chance; seen twice it is drafted, and the copy pointer follows the edited copy without breaking."""
    source = [20, 21, 22, 23, 1, 7, 8, 1, 9, 10, 1, 11, 12, 1, 13, 14, 1, 15, 16]
    index = NgramIndex(max_ngram=3)
    index.extend(source + [90], output=False)
    index.extend([20, 21, 22, 23, 2, 7, 8])         # a trusted copy, the edit (1 -> 2), lined up again
    assert index.copying
    assert drafted_chain(index, 3) == [1, 9, 10]    # seen once: the source's reading still
    index.extend([2, 9, 10])                        # made again: followed, not a break
    from lookahead.drafting.ngram import MIN_RUN
    assert index.copy_run == MIN_RUN + 4            # lined up again at 7, then 8, 2, 9, 10
    options = dict(index.cursor().next(4))
    assert options[2] == options[1] > 0             # seen twice: both readings offered, as likely
    index.extend([2, 11, 12])
    assert drafted_chain(index, 6) == [2, 13, 14, 2, 15, 16]
    options = dict(index.cursor().next(4))
    assert options[2] > options[1] > 0              # thrice: the edit's first


def test_an_insertion_after_a_source_token_is_learned_as_an_edit_of_that_token():
    """A rename that appends to a name (`has_close_elements` -> `has_close_elements_v2`): 50 inserted after 31.
    Where 31 comes again in the copy, the draft offers both: 31 then 50 (the edit), 31 then 40 (the source)."""
    source = [20, 21, 22, 23, 31, 40, 41, 42, 43, 31, 40, 44, 45, 46, 31, 40, 47]
    index = NgramIndex(max_ngram=3)
    index.extend(source + [90], output=False)
    index.extend([20, 21, 22, 23, 31, 50, 40, 41, 42, 43, 31, 50, 40])   # made twice
    assert index.copying
    assert drafted_chain(index, 5) == [44, 45, 46, 31, 50]
    cursor = index.cursor()
    for token in [44, 45, 46, 31]:
        cursor = cursor.child(token)
    assert {t for t, _ in cursor.next(4)} == {50, 40}


def test_edits_are_learned_from_the_output_only_and_one_made_once_is_not_drafted():
    """A prompt's lines alike but not equal (log lines, numbered items) are no edits; nor is a chance
    substitution the output made once (another line's digit): the source's reading alone is drafted."""
    lines = [20, 21, 22, 23, 5, 24, 25, 90, 20, 21, 22, 23, 6, 24, 25, 91]
    prompt = NgramIndex(max_ngram=3)
    prompt.extend(lines, output=False)
    assert not prompt.edits
    index = NgramIndex(max_ngram=3)
    index.extend([30, 31, 32, 33, 5, 34, 35, 36, 5, 37, 38, 90], output=False)
    index.extend([30, 31, 32, 33, 6, 34, 35, 36])   # 5 written as 6 once
    assert (5,) in index.edits and drafted_chain(index, 3) == [5, 37, 38]


def test_a_two_token_edit_is_learned_where_the_output_lines_up_two_source_tokens_on_not_trusted_at_once():
    """A table's row break: the source's `\\n -` (3 4) written as ` |\\n |` (5 6), its `,` (1) as ` |` (2). Lining
    up two tokens on may be chance, so the copy pointer follows from there untrusted (no copy chain drafted) until
    it has held MIN_RUN tokens; the edit is learned, and once made twice the pointer copies through both, row on
    row, and drafts them."""
    from lookahead.drafting.ngram import COPY_P, MIN_RUN
    rows = [[7, 8], [9, 10], [11, 12], [13, 14], [15, 16], [17, 18]]
    source = [20, 21, 22, 23] + [t for a, b in rows for t in (a, 1, b, 3, 4)]  # "a , b \\n -" per row
    index = NgramIndex(max_ngram=3)
    index.extend(source + [90], output=False)
    index.extend([20, 21, 22, 23, 7, 2, 8, 5, 6, 9])  # 1 -> 2 (lined up one on), 3 4 -> 5 6 (two on)
    assert (3, 4) in index.edits and 0 < index.copy_run < MIN_RUN and not index.copying
    assert dict(index.cursor().next(4))[1] < COPY_P     # only the suffix lookup's `9 -> 1`, no copy chain yet
    index.extend([2, 10, 5, 6, 11, 2, 12, 5, 6, 13])  # both edits made again: followed, never broken
    assert index.copying and index.copy_run == 11
    assert drafted_chain(index, 2) == [2, 14]
    options = dict(index.cursor().child(2).child(14).next(4))
    assert set(options) == {5, 3} and options[5] >= options[3]  # the edit (seen twice) beside the source's
