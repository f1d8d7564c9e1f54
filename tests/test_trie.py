"""TokenTrie: counts, best-first retrieval, bounds, request isolation, persistence."""
from __future__ import annotations

import pytest

from lookahead import Budget, DraftState, StateFileError, TokenTrie
from lookahead.drafting.fusion import build_tree
from lookahead.drafting.trie import _Feeder


def propose(session, context: list[int], budget: Budget):
    """The best-first tree of this trie alone: both scopes, each trusted at its own probability."""
    with session.trie.lock:
        cursors = {name: ((lambda p: p), c) for name, c in session.cursors(context).items()}
        return build_tree(context[-1], cursors, budget).tree


def branches(tree) -> set[tuple[int, ...]]:
    """Every root-to-leaf path of draft tokens."""
    leaves = [i for i in range(1, len(tree)) if not tree.children[i]]
    return {tuple(tree.tokens[j] for j in tree.path_to(i)[1:]) for i in leaves}


def test_counts_every_ngram_once():
    trie = TokenTrie(max_match=2, window=4)
    trie.insert([1, 2, 3, 1, 2, 4])
    root = trie.shared.root
    assert root.children[1].count == 2
    assert root.children[1].children[2].count == 2
    assert root.children[1].children[2].children[3].count == 1
    assert root.children[1].children[2].children[4].count == 1
    assert root.children[1].children[2].total == 2


def test_feeding_in_pieces_counts_like_feeding_whole():
    whole, pieces = TokenTrie(window=5), TokenTrie(window=5)
    seq = [1, 2, 3, 1, 2, 3, 4, 1, 2]
    whole.insert(seq)
    feeder = _Feeder(pieces.shared, pieces.window)
    for chunk in ([1, 2], [3, 1, 2, 3], [4], [1, 2]):
        feeder.feed(chunk)
    assert len(whole) == len(pieces)
    budget = Budget(8, 4)
    assert propose(whole.session([1]), [1], budget).tokens == propose(pieces.session([1]), [1], budget).tokens


def test_retrieval_is_best_first_by_frequency():
    trie = TokenTrie(max_match=1, window=4)
    for _ in range(3):
        trie.insert([7, 1, 2, 3])
    trie.insert([7, 5, 6, 0])
    tree = propose(trie.session([]), [9, 7], Budget(nodes=4, depth=3))
    # The frequent branch 1-2-3 (p=0.75 per node chain) beats 5 (p=0.25) ...
    assert tree.tokens[1:4] == [1, 2, 3]
    # ... and the rarer first token still gets the last slot.
    assert tree.tokens[4] == 5


def test_longest_suffix_match_wins_and_falls_back():
    trie = TokenTrie(max_match=3, window=6)
    trie.insert([1, 2, 3, 10, 11])
    trie.insert([9, 9, 3, 20, 21])
    trie.insert([9, 9, 3, 20, 21])
    assert propose(trie.session([]), [1, 2, 3], Budget(1, 1)).tokens[1] == 10   # 3-token match: only 10
    assert propose(trie.session([]), [5, 5, 3], Budget(1, 1)).tokens[1] == 20   # fallback to "3": 20 is commoner
    assert len(propose(trie.session([]), [4, 4, 4], Budget(5, 5))) == 1          # nothing matches: root only


def test_bounds_on_nodes_and_depth_are_respected():
    trie = TokenTrie(max_match=1, window=12)
    for start in range(6):
        trie.insert([50] + list(range(start * 10, start * 10 + 10)))
    tree = propose(trie.session([]), [50], Budget(nodes=13, depth=3))
    assert len(tree) - 1 == 13
    assert tree.max_depth <= 3


def test_request_scope_does_not_leak_into_the_next_request():
    trie = TokenTrie(max_match=2, window=6)
    first = trie.session([1, 2, 3, 4, 5])
    assert propose(first, [1, 2], Budget(4, 4)).tokens[1:] == [3, 4, 5]
    second = trie.session([8, 9])
    assert len(propose(second, [1, 2], Budget(4, 4))) == 1  # the first prompt is gone
    # Only each prompt's last max_match tokens (the lead-in to its output) reach the shared scope.
    assert set(trie.shared.root.children) == {4, 5, 8, 9}


def test_accepted_output_enters_the_shared_scope():
    trie = TokenTrie(max_match=2, window=6)
    session = trie.session([1, 2])
    session.observe([3, 4, 5])
    assert propose(trie.session([]), [1, 2], Budget(4, 4)).tokens[1:] == [3, 4, 5]


def test_prompt_only_continuation_survives_a_large_shared_subtree():
    # The original code dropped prompt-only branches once the output subtree was large.
    trie = TokenTrie(max_match=1, window=4)
    for t in range(100, 160):
        trie.insert([7, t, t + 1])
    tree = propose(trie.session([7, 999, 998]), [7], Budget(nodes=8, depth=2))
    assert tree.tokens[1] == 999  # probability 0.5 from the prompt beats 0.5/60 from history


def test_prompt_with_eos_and_special_tokens_is_indexed_whole():
    eos = 2
    trie = TokenTrie(max_match=1, window=4)
    session = trie.session([5, eos, 6, 7, eos, 8, 9])
    assert propose(session, [eos, 8], Budget(2, 2)).tokens[1:] == [9]
    assert propose(session, [eos], Budget(2, 2)).tokens[1] in (6, 8)


def test_capacity_bounds_the_shared_scope_with_decay():
    trie = TokenTrie(max_match=1, window=4, capacity=500)
    frequent = [1, 2, 3, 4]
    for i in range(400):
        trie.insert(frequent)
        trie.insert([1000 + i, 2000 + i, 3000 + i])  # rare n-grams
        assert len(trie) <= 500
    # Frequent n-grams survive the decay; rare ones were evicted.
    assert propose(trie.session([]), [1], Budget(3, 3)).tokens[1:] == [2, 3, 4]


def test_save_load_round_trip(tmp_path):
    trie = TokenTrie(max_match=2, window=5)
    trie.insert([1, 2, 3, 4, 5, 1, 2, 6])
    path = tmp_path / "state.safetensors"
    DraftState(trie).save(path)
    loaded = DraftState.load(path).trie
    assert (loaded.max_match, loaded.window, len(loaded)) == (2, 5, len(trie))
    query, budget = [9, 1, 2], Budget(6, 3)
    assert propose(loaded.session([]), query, budget).tokens == propose(trie.session([]), query, budget).tokens


def test_corrupted_file_is_refused_with_a_clear_error(tmp_path):
    trie = TokenTrie()
    trie.insert(list(range(50)))
    path = tmp_path / "state.safetensors"
    DraftState(trie).save(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip bits in the array data
    path.write_bytes(bytes(data))
    with pytest.raises(StateFileError, match="corrupted"):
        DraftState.load(path)
    path.write_bytes(b"not a trie at all")
    with pytest.raises(StateFileError, match="not a readable draft-state file"):
        DraftState.load(path)


def test_a_safetensors_file_of_another_kind_is_refused(tmp_path):
    import torch
    from safetensors.torch import save_file
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(StateFileError, match="not a lookahead draft-state file"):
        DraftState.load(path)


def test_a_request_scope_reads_the_counts_a_trie_of_its_windows_holds():
    """The request scope keeps positions, not nodes: on random streams fed in pieces, every tree it drafts (tokens,
    shape, probabilities) equals the one a trie counting the same windows drafts, from every context tried."""
    import random

    from lookahead.drafting.trie import NodeCursor, _Scope, _Text
    rng = random.Random(0)
    for trial in range(200):
        window = rng.randint(2, 7)
        max_match = rng.randint(1, window - 1)
        text, scope = _Text(window), _Scope()
        feeder = _Feeder(scope, window)
        stream = [rng.randrange(4 if trial % 2 else 12) for _ in range(rng.randint(0, 60))]
        cut = rng.randint(0, len(stream))
        for piece in (stream[:cut], stream[cut:]):
            text.feed(piece)
            feeder.feed(piece)
        for _ in range(10):
            context = rng.choice([stream, stream[:rng.randint(1, len(stream) or 1)],
                                  [rng.randrange(12) for _ in range(rng.randint(1, 5))]])
            if not context:
                continue
            node = scope.match(context, max_match)
            expected = build_tree(context[-1], {"p": ((lambda p: p), node and NodeCursor(node))}, Budget(40, 10))
            got = build_tree(context[-1], {"p": ((lambda p: p), text.match(context, max_match))}, Budget(40, 10))
            assert (got.tree.tokens, got.tree.parents) == (expected.tree.tokens, expected.tree.parents)
            assert got.scores == pytest.approx(expected.scores, rel=1e-12)


def test_a_request_scope_reads_only_a_pairs_latest_occurrences():
    """A text that repeats itself thousands of times costs a proposal what RECENT occurrences do, not all of them,
    and still drafts the repetition."""
    from lookahead.drafting.trie import RECENT
    session = TokenTrie(max_match=4, window=16).session([5, 6, 7] * 3000)
    cursor = session.cursors([5, 6, 7] * 2)["prompt"]
    assert cursor.depth == 4 and 0 < len(cursor.ends) <= RECENT
    assert propose(session, [5, 6, 7], Budget(6, 6)).tokens[1:] == [5, 6, 7, 5, 6, 7]


def test_what_other_requests_wrote_once_is_a_guess_not_a_certainty():
    """The shared scope holds back one count for a continuation it has not seen (c / (n + 1)): a continuation of
    `5 6` that one earlier output wrote is proposed at 1/2, at 2/3 once two did; this request's own text is read
    as counted (its prompt's `5 6 7`: certain)."""
    trie = TokenTrie(max_match=2, window=8)
    trie.insert([5, 6, 7, 8])
    assert trie.session([]).cursors([5, 6])["history"].next(2) == [(7, pytest.approx(1 / 2))]
    trie.insert([5, 6, 7, 9])
    history = trie.session([]).cursors([5, 6])["history"]
    assert history.next(2) == [(7, pytest.approx(2 / 3))]
    assert history.child(7).next(2) == [(8, pytest.approx(1 / 3)), (9, pytest.approx(1 / 3))]
    assert trie.session([5, 6, 7]).cursors([5, 6])["prompt"].next(2) == [(7, 1.0)]
