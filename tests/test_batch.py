"""Ragged batched tree verification (decoding/batch.py) and the scheduler's batching, on tiny models.

Rows of different lengths, each with its own tree (or none), in one forward; compaction to a
later branch; rows joining (prefilled alone, merged with padding) and leaving between steps.
"""
from __future__ import annotations

import threading

import pytest
import torch

from conftest import FIXED, IdTokenizer, hf_greedy, tiny_model
from lookahead import DraftTree, Engine
from lookahead.decoding.batch import BatchVerifier
from lookahead.server.scheduler import DraftPolicy, Event, Request, Scheduler

TOL = 1e-4
PROMPTS = {
    "a": [3, 17, 42, 8, 17, 42, 8, 5, 9, 17, 42],
    "b": [60, 61],
    "c": [5, 6, 7, 8, 9, 10, 11, 12] * 2 + [5, 6, 1, 2, 3],
    "d": [44],  # one token: nothing to prefill, the first tree's root is the whole prompt
}


def sequential_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1]


def tree_for(root: int, step: int) -> DraftTree:
    shapes = [
        DraftTree([root, 8, 11, 5, 9, 2, 1, 60], [-1, 0, 0, 1, 1, 2, 4, 0]),
        DraftTree([root, 4, 30], [-1, 0, 1]),
        DraftTree.root_only(root),
        DraftTree([root, 7, 7, 3], [-1, 0, 0, 2]),  # siblings carrying the same token
    ]
    return shapes[step % len(shapes)]


def check_step(model, verifier: BatchVerifier, history: dict, step: int) -> list[list[int]]:
    """Verify one tree per row, compare every node with sequential decoding, pick a non-first branch."""
    trees = [tree_for(history[k][-1], step + i) for i, k in enumerate(verifier.keys)]
    logits = verifier.verify(trees)
    accepted = []
    for key, tree, row_logits in zip(verifier.keys, trees, logits, strict=True):
        assert row_logits.shape[0] == len(tree)
        for node in range(len(tree)):
            path = [tree.tokens[i] for i in tree.path_to(node)][1:]
            expected = sequential_logits(model, history[key] + path)
            assert torch.allclose(row_logits[node], expected, atol=TOL), (key, step, node)
        deepest = max(range(len(tree)), key=lambda n: (tree.depths[n], n))  # the last, deepest branch
        nodes = tree.path_to(deepest)
        accepted.append(nodes)
        history[key] = history[key] + [tree.tokens[n] for n in nodes[1:]] + [int(row_logits[nodes[-1]].argmax())]
    verifier.commit(accepted)
    for key, past in zip(verifier.keys, verifier.past, strict=True):
        assert past == len(history[key]) - 1  # every committed token but the next root is cached
    return accepted


def test_ragged_batch_logits_equal_sequential_decoding(arch):
    model = tiny_model(arch)
    verifier = BatchVerifier(model)
    history = {}
    for key in ("a", "b"):
        verifier.add(key, PROMPTS[key][:-1])
        history[key] = list(PROMPTS[key])
    check_step(model, verifier, history, 0)
    verifier.add("c", PROMPTS["c"][:-1])  # joins a running batch, longer than the others
    verifier.add("d", [])                 # joins with an empty cache
    history["c"], history["d"] = list(PROMPTS["c"]), list(PROMPTS["d"])
    check_step(model, verifier, history, 1)
    verifier.remove(["c"])                # the longest row leaves: the cache shrinks to the others
    assert verifier.length == max(verifier.past)
    assert all(layer.keys.shape[:3] == (3, layer.keys.shape[1], verifier.length) for layer in verifier.cache.layers)
    check_step(model, verifier, history, 2)
    check_step(model, verifier, history, 3)
    verifier.remove(["a", "b", "d"])
    assert len(verifier) == 0 and verifier.length == 0


def test_a_batch_of_empty_caches():
    model = tiny_model("llama")
    verifier = BatchVerifier(model)
    history = {"x": [5], "y": [9]}
    verifier.add("x", [])
    verifier.add("y", [])
    check_step(model, verifier, history, 0)
    check_step(model, verifier, history, 1)


def test_commit_refuses_nodes_outside_the_tree():
    verifier = BatchVerifier(tiny_model("llama"))
    verifier.add("a", PROMPTS["a"][:-1])
    verifier.verify([DraftTree([42, 1], [-1, 0])])
    with pytest.raises(ValueError, match="accepted nodes"):
        verifier.commit([[0, 2]])
    verifier.abort()
    assert verifier.past == [len(PROMPTS["a"]) - 1] and verifier.length == verifier.past[0]


# -- the scheduler: continuous batching through the engine's own stop logic ----------------------
def run_all(engine: Engine, jobs: list[tuple], **scheduler_args) -> tuple[list, Scheduler]:
    """Submit every (prompt, max_tokens[, sampling]) before the decode thread starts; wait for all; return the runs."""
    from lookahead.server.app import new_run

    scheduler = Scheduler(engine, **scheduler_args)
    done = threading.Semaphore(0)
    events: list[list[Event]] = []
    runs = []
    for prompt, max_tokens, *sampling in jobs:
        log: list[Event] = []
        events.append(log)

        def sink(event: Event, log=log) -> None:
            log.append(event)
            if event.kind != "text":
                done.release()
        run = new_run(engine, prompt, max_tokens, [], True, sampling[0] if sampling else {})
        runs.append(run)
        scheduler.submit(Request(run, sink))
    scheduler.start()
    try:
        for _ in jobs:
            assert done.acquire(timeout=120)
    finally:
        scheduler.shutdown()
    for log in events:
        assert [e.kind for e in log][-1] == "done", log
    return runs, scheduler


def test_continuous_batching_equals_transformers_greedy(arch):
    """Rows of different lengths and limits join as others finish; each equals model.generate()."""
    model = tiny_model(arch, seed=1)
    engine = Engine(model, IdTokenizer(), FIXED)
    base = [5, 6, 7, 8, 9, 10, 11, 12] * 3 + [5, 6]
    jobs = [(base, 30), (base[3:], 12), ([3, 4], 20), (base + base[:5], 25), ([7], 9), (base, 30)]
    expected = [hf_greedy(model, p, n) for p, n in jobs]
    runs, scheduler = run_all(engine, jobs, max_batch=3)  # 6 requests, 3 slots: rows join mid-flight
    assert [r.ids for r in runs] == expected
    assert scheduler.stats.max_batch_seen == 3
    assert scheduler.stats.accepted_draft > 0  # the repeated prompt drafts from what earlier rows taught the trie


def test_seeded_sampling_in_a_batch_equals_each_request_alone():
    """Every row samples with its own generator: a batch changes nobody's draws (with or without drafts)."""
    pytest.importorskip("lookahead.decoding.sampling")
    model = tiny_model("gemma3", seed=2)
    engine = Engine(model, IdTokenizer(), FIXED)
    base = [5, 6, 7, 8, 9, 10, 11, 12] * 3 + [5, 6]
    params = [dict(do_sample=True, temperature=t, top_k=0, top_p=p, seed=s)
              for t, p, s in ((1.0, 1.0, 1), (0.7, 0.9, 2), (1.3, 1.0, 3), (1.0, 1.0, 1))]
    jobs = [(base, 20, params[0]), (base[4:], 16, params[1]), ([3, 4, 9], 18, params[2]), (base, 20, params[3]),
            (base, 12)]  # and one greedy row in the same batch
    expected = [engine.generate(p, max_new_tokens=n, draft=False, **(rest[0] if rest else {})).token_ids
                for p, n, *rest in jobs]
    runs, _ = run_all(engine, jobs, max_batch=4)
    assert [r.ids for r in runs] == expected
    assert runs[0].ids == runs[3].ids  # same prompt, same seed


def test_drafting_off_is_plain_batched_decoding():
    model = tiny_model("qwen2", seed=1)
    engine = Engine(model, IdTokenizer(), FIXED)
    jobs = [([5, 6, 7, 8, 5, 6, 7], 10), ([9, 1], 10)]
    runs, scheduler = run_all(engine, jobs, draft=False)
    assert [r.ids for r in runs] == [hf_greedy(model, p, n) for p, n in jobs]
    assert scheduler.stats.draft_tokens == 0 and scheduler.stats.steps == 10


def test_draft_policy_shrinks_then_switches_off():
    policy = DraftPolicy(max_nodes=24, max_depth=12, token_budget=32, min_nodes=2)
    sizes = {b: (policy.budget(b).nodes if policy.budget(b) else 0) for b in (1, 2, 4, 8, 10, 11, 16, 32)}
    assert sizes == {1: 24, 2: 15, 4: 7, 8: 3, 10: 2, 11: 0, 16: 0, 32: 0}
    assert policy.switch_off_batch() == 11
    assert all(policy.budget(b) is None or b * (policy.budget(b).nodes + 1) <= 32 for b in range(2, 64))


def test_measured_cost_shrinks_trees_that_cannot_pay():
    from lookahead.server.scheduler import CostCurve

    # Flat to 4 tokens, then about linear: the shape measured on CPU (and, further out, on GPU).
    curve = CostCurve([1, 2, 4, 8, 16, 32, 64, 128], [1.0, 1.0, 1.0, 1.1, 1.5, 2.3, 4.0, 8.0])
    assert curve(3) == 1.0 and curve(24) == pytest.approx(1.9) and curve(256) == pytest.approx(16.0)
    assert curve.knee(2.0) == 16
    batches = (1, 2, 4, 8, 16, 32)

    def learned(gain_of) -> DraftPolicy:
        policy = DraftPolicy(cost=curve)
        for n in policy.sizes():
            for _ in range(3):
                policy.observe(n, 4, round(4 * gain_of(n)))
        return policy

    copy_heavy = learned(lambda n: min(n, 6) * 0.6)     # long accepted runs: up to 3.6 tokens/row-step
    sizes = [copy_heavy.nodes_per_row(b) for b in batches]
    assert sizes[0] >= 6 and sizes == sorted(sizes, reverse=True) and sizes[-1] == 0  # shrink, then off
    for b in batches:
        chosen = copy_heavy.nodes_per_row(b)
        best = max(copy_heavy.rate(b, n) for n in copy_heavy.sizes())
        if chosen:
            assert copy_heavy.rate(b, chosen) == best >= 1.05  # the predicted-fastest budget
        else:
            assert best < 1.05                                  # nothing beats plain batched decoding
    # The cost is that of the trees drafters really build: a budget they never fill costs no more.
    small_trees = DraftPolicy(cost=curve)
    for n in small_trees.sizes():
        for _ in range(3):
            small_trees.observe(n, 4, 4, padded=min(n, 2))
    assert small_trees.expected_size(24) == 2 and small_trees.rate(8, 24) == small_trees.rate(8, 2)
    nothing = learned(lambda n: 0.0)
    assert [nothing.nodes_per_row(b) for b in batches] == [0] * len(batches)
    assert nothing.switch_off_batch() == 1
    # Before anything is measured: a prior of 1 token at 4 nodes, sqrt-extrapolated.
    fresh = DraftPolicy(cost=curve)
    assert fresh.expected_gain(16) == pytest.approx(2.0) and fresh.nodes_per_row(1) > 0
    # Exploring tries the next bigger budget (when not hopeless), and what it sees is learned.
    chosen = fresh.nodes_per_row(1)
    bigger = fresh.budget(1, explore=True).nodes
    assert bigger == min(n for n in fresh.sizes() if n > chosen)
    fresh.observe(bigger, 2, 0)
    assert fresh.gains[bigger] == 0.0 and fresh.counts[bigger] == 1
    fresh.observe(bigger, 2, 8)  # a plain mean while a budget has few observations: one bad step is not sticky
    assert fresh.gains[bigger] == 2.0
    # Forwards slower than the curve says (e.g. many short rows) make drafting at that batch size dearer.
    steady = learned(lambda n: min(n, 6) * 0.6)
    before = steady.nodes_per_row(8)
    assert before > 0
    for _ in range(20):
        steady.observe_forward(8, 0, 8, curve(8))                     # plain steps: as the curve says
        steady.observe_forward(8, before, 8 * (before + 1), 3 * curve(8 * (before + 1)))  # drafting: 3x dearer
    assert steady.correction(8, before) == pytest.approx(3.0) and steady.correction(8, 0) == pytest.approx(1.0)
    assert steady.nodes_per_row(8) < before and steady.nodes_per_row(4) == copy_heavy.nodes_per_row(4)
