"""The verifier over a ragged batch (decoding/verify.py) and continuous batching through the one core, on tiny models.

Rows of different lengths, each with its own tree (or none), in one forward; compaction to a
later branch; rows joining (prefilled alone, merged with padding) and leaving between steps.
"""
from __future__ import annotations

import threading

import pytest
import torch

from conftest import FIXED, IdTokenizer, hf_greedy, tiny_model
from lookahead import DraftTree, Engine
from lookahead.decoding.verify import Verifier
from lookahead.server.scheduler import Event, Job, Scheduler

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


def check_step(model, verifier: Verifier, history: dict, step: int) -> list[list[int]]:
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
    verifier = Verifier(model)
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


def test_rows_leave_and_join_in_place_through_spare_slots(arch):
    """A leaving row's slot is filled by the last row and a joining row is written into a spare slot: the cache
    buffers stay the same tensors (no copy of the batch), and every node's logits still equal sequential decoding."""
    model = tiny_model(arch)
    verifier = Verifier(model)
    history = {}
    for key in ("a", "b", "c", "d"):
        verifier.add(key, PROMPTS[key][:-1])
        history[key] = list(PROMPTS[key])
    check_step(model, verifier, history, 0)

    def buffers():
        return [layer.buffers[0].data_ptr() for layer in verifier.cache.layers]

    before = buffers()
    verifier.remove(["a"])                # the first row leaves: the last takes its slot
    assert verifier.keys == ["d", "b", "c"] and buffers() == before
    check_step(model, verifier, history, 1)
    verifier.add("e", [70, 71, 72, 73])   # into the spare slot
    history["e"] = [70, 71, 72, 73, 74]
    assert verifier.keys[-1] == "e" and buffers() == before
    check_step(model, verifier, history, 2)
    verifier.remove(["b", "c"])
    assert verifier.keys == ["d", "e"] and buffers() == before
    check_step(model, verifier, history, 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_joins_and_leaves_keep_every_rows_logits(seed, monkeypatch):
    """Rows leaving from anywhere (the tail too, several at once) and joining longer or shorter than the batch,
    with spare slots or none and little room (so buffers are also replaced): every node's logits stay sequential
    decoding's."""
    from lookahead.decoding import kv
    monkeypatch.setattr(kv, "ROOM", 3)  # little room: joins and forwards often need new buffers
    gen = torch.Generator().manual_seed(seed)
    model = tiny_model("llama")
    verifier = Verifier(model)
    history, next_key = {}, 0

    def join() -> None:
        nonlocal next_key
        prompt = torch.randint(3, 90, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen).tolist()
        verifier.add(next_key, prompt[:-1])
        history[next_key] = prompt
        next_key += 1

    for _ in range(3):
        join()
    for step in range(14):
        check_step(model, verifier, history, step)
        leaving = [k for k in verifier.keys if torch.rand(1, generator=gen) < 0.3]
        verifier.remove(leaving)
        for _ in range(int(torch.randint(0, 3, (1,), generator=gen))):
            join()
        if not len(verifier):
            join()
    assert next_key >= 8  # rows did come and go


@pytest.mark.parametrize("split", [False, True], ids=["padded-attention", "each-tree-apart"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_packed_rows_give_the_logits_sequential_decoding_gives(arch, split, monkeypatch):
    """On our attention, a batch whose trees differ in size runs the model on its real query tokens only (packed):
    every node's logits still equal sequential decoding's, whether attention pads the rows back or attends each
    tree apart (forced both ways here; the verifier picks by cost), across joins, leaves and later branches."""
    from lookahead.decoding import attention
    monkeypatch.setattr(attention, "KEY_QUERY_US" if split else "CALL_US", 1e9)  # apart / padded back
    model = tiny_model(arch)
    assert attention.use_grouped(model)
    verifier = Verifier(model)
    history, forwards = {}, []
    for key in ("a", "b", "c"):
        verifier.add(key, PROMPTS[key][:-1])
        history[key] = list(PROMPTS[key])
    verify = verifier.verify

    def counted(trees):
        logits = verify(trees)
        forwards.append((verifier.tokens, sum(map(len, trees)), len(trees) * max(map(len, trees))))
        return logits

    verifier.verify = counted
    for step in range(5):
        check_step(model, verifier, history, step)
        if step == 2:
            verifier.remove(["b"])
    assert all(tokens == real < padded for tokens, real, padded in forwards if real < padded)
    assert sum(real < padded for _, real, padded in forwards) >= 4  # the trees differed in size: packed


def test_a_batch_of_empty_caches():
    model = tiny_model("llama")
    verifier = Verifier(model)
    history = {"x": [5], "y": [9]}
    verifier.add("x", [])
    verifier.add("y", [])
    check_step(model, verifier, history, 0)
    check_step(model, verifier, history, 1)


def test_commit_refuses_nodes_outside_the_tree():
    verifier = Verifier(tiny_model("llama"))
    verifier.add("a", PROMPTS["a"][:-1])
    verifier.verify([DraftTree([42, 1], [-1, 0])])
    with pytest.raises(ValueError, match="accepted nodes"):
        verifier.commit([[0, 2]])
    verifier.abort()
    assert verifier.past == [len(PROMPTS["a"]) - 1] and verifier.length == verifier.past[0]


# -- continuous batching through the one decode core ----------------------------------------------
BASE = [5, 6, 7, 8, 9, 10, 11, 12] * 3 + [5, 6]


def test_generate_batch_equals_transformers_greedy_for_every_row(arch):
    """Rows of different lengths and limits join as others finish; each equals model.generate()."""
    model = tiny_model(arch, seed=1)
    engine = Engine(model, IdTokenizer(), FIXED)
    jobs = [(BASE, 30), (BASE[3:], 12), ([3, 4], 20), (BASE + BASE[:5], 25), ([7], 9), (BASE, 30)]
    requests = [engine.request(p, n) for p, n in jobs]
    outputs = engine.generate_batch(requests, max_batch=3, progress=False)  # 6 requests, 3 slots
    assert [o.token_ids for o in outputs] == [hf_greedy(model, p, n) for p, n in jobs]
    assert sum(o.stats.mean_accepted > 1 for o in outputs) >= 2  # later rows draft from what earlier ones taught


def test_generate_batch_keeps_input_order_and_reports_per_request_stats(capsys):
    model = tiny_model("qwen2", seed=1)
    engine = Engine(model, IdTokenizer(), FIXED)
    prompts = [BASE, [3, 4], BASE[2:], [9, 8, 7]]
    outputs = engine.generate_batch(prompts, max_new_tokens=10, max_batch=2)
    assert [o.token_ids for o in outputs] == [hf_greedy(model, p, 10) for p in prompts]
    assert all(o.stats.prompt_tokens == len(p) and o.stats.new_tokens == 10 and o.stats.steps >= 1
               for o, p in zip(outputs, prompts, strict=True))
    assert "4/4" in capsys.readouterr().err  # the progress bar
    with pytest.raises(ValueError, match="prompt 1"):
        engine.generate_batch([BASE, []])


def run_all(engine: Engine, jobs: list[tuple], **scheduler_args) -> tuple[list, Scheduler]:
    """Submit every (prompt, max_tokens[, sampling]) before the decode thread starts; wait for all;
    return the requests."""
    scheduler = Scheduler(engine, **scheduler_args)
    done = threading.Semaphore(0)
    events: list[list[Event]] = []
    requests = []
    for prompt, max_tokens, *sampling in jobs:
        log: list[Event] = []
        events.append(log)

        def sink(event: Event, log=log) -> None:
            log.append(event)
            if event.kind != "text":
                done.release()
        request = engine.request(prompt, max_tokens, **(sampling[0] if sampling else {}))
        requests.append(request)
        scheduler.submit(Job(request, sink))
    scheduler.start()
    try:
        for _ in jobs:
            assert done.acquire(timeout=120)
    finally:
        scheduler.shutdown()
    for log in events:
        assert [e.kind for e in log][-1] == "done", log
    return requests, scheduler


def test_the_server_scheduler_batches_through_the_same_core():
    model = tiny_model("gemma3", seed=1)
    engine = Engine(model, IdTokenizer(), FIXED)
    jobs = [(BASE, 30), (BASE[3:], 12), ([3, 4], 20), (BASE, 30)]
    requests, scheduler = run_all(engine, jobs, max_batch=3)
    assert [r.ids for r in requests] == [hf_greedy(model, p, n) for p, n in jobs]
    assert scheduler.stats.max_batch_seen == 3
    assert scheduler.stats.accepted_draft > 0  # the repeated prompt drafts from what earlier rows taught the trie


def test_seeded_sampling_in_a_batch_equals_each_request_alone():
    """Every row samples with its own generator: a batch changes nobody's draws (with or without drafts)."""
    model = tiny_model("gemma3", seed=2)
    engine = Engine(model, IdTokenizer(), FIXED)
    params = [dict(do_sample=True, temperature=t, top_k=0, top_p=p, seed=s)
              for t, p, s in ((1.0, 1.0, 1), (0.7, 0.9, 2), (1.3, 1.0, 3), (1.0, 1.0, 1))]
    jobs = [(BASE, 20, params[0]), (BASE[4:], 16, params[1]), ([3, 4, 9], 18, params[2]), (BASE, 20, params[3]),
            (BASE, 12)]  # and one greedy row in the same batch
    expected = [engine.generate(p, max_new_tokens=n, draft=False, **(rest[0] if rest else {})).token_ids
                for p, n, *rest in jobs]
    requests, _ = run_all(engine, jobs, max_batch=4)
    assert [r.ids for r in requests] == expected
    assert requests[0].ids == requests[3].ids  # same prompt, same seed


def test_drafting_off_is_plain_batched_decoding():
    model = tiny_model("qwen2", seed=1)
    engine = Engine(model, IdTokenizer(), FIXED)
    jobs = [([5, 6, 7, 8, 5, 6, 7], 10), ([9, 1], 10)]
    outputs = engine.generate_batch([p for p, _ in jobs], max_new_tokens=10, draft=False, progress=False)
    assert [o.token_ids for o in outputs] == [hf_greedy(model, p, n) for p, n in jobs]
    assert all(o.stats.draft_tokens == 0 and o.stats.steps == 10 for o in outputs)


def test_the_recycle_table_learns_every_drafting_rows_forward_in_one_top_k(monkeypatch):
    """One top-k over the batch's verified positions, not one per row (~0.2 ms a row: 3 ms of a 16-row step);
    rows that do not draft teach it nothing, as before."""
    from lookahead.drafting.recycle import RecycleTable
    calls = []
    update = RecycleTable.update
    monkeypatch.setattr(RecycleTable, "update", lambda self, inputs, logits: calls.append(
        (list(inputs), logits.shape[0])) or update(self, inputs, logits))
    engine = Engine(tiny_model("llama", seed=1), IdTokenizer(), FIXED)
    decoder = engine.decoder()
    requests = [engine.request(p, max_new_tokens=6, draft=d) for p, d in ((BASE, True), ([9, 1, 4], True),
                                                                        ([7, 7, 3], False))]
    for request in requests:
        decoder.add(request)
    verify, trees = decoder.verifier.verify, []
    decoder.verifier.verify = lambda t: trees.append(t) or verify(t)
    decoder.step()
    assert len(calls) == 1
    assert calls[0][0] == trees[0][0].tokens + trees[0][1].tokens and calls[0][1] == len(calls[0][0])


def test_a_request_alone_spends_no_forward_more_than_model_generate():
    """Its prompt's last chunk is prefilled by the forward that verifies its first tree: n tokens
    without drafting take n forwards, prefill included, as model.generate's; the output is the same.
    With a chunked prefill (the server), the chunks before the last run alone."""
    model = tiny_model("llama", seed=1)
    engine = Engine(model, IdTokenizer(), FIXED)
    calls = []
    hook = model.register_forward_hook(lambda module, args, kwargs, out: calls.append(1), with_kwargs=True)
    try:
        for chunk, forwards in ((None, 10), (16, 10 + 2)):  # 41 prompt tokens: chunks of 16, 16, then 8 + tree
            calls.clear()
            request = engine.request(BASE + BASE[:15], 10, draft=False)
            decoder = engine.decoder(prefill_chunk=chunk)
            decoder.add(request)
            while len(decoder):
                decoder.step()
            assert len(calls) == forwards, chunk
            assert request.ids == hf_greedy(model, request.prompt, 10)
            assert request.stats.steps == 10 and request.stats.prefill_s > 0
    finally:
        hook.remove()


def test_a_second_request_joining_prefills_the_first_ones_pending_tail():
    model = tiny_model("llama", seed=1)
    engine = Engine(model, IdTokenizer(), FIXED)
    decoder = engine.decoder()
    first, second = engine.request(BASE, 12), engine.request([3, 4, 9], 12)
    decoder.add(first)
    assert decoder.verifier.pending == [BASE[:-1]]  # alone: left to the first step
    decoder.add(second)
    assert decoder.verifier.pending == [[], []]
    while len(decoder):
        decoder.step()
    assert first.ids == hf_greedy(model, BASE, 12) and second.ids == hf_greedy(model, [3, 4, 9], 12)


def test_a_request_that_fails_alone_leaves_the_batch_running():
    model = tiny_model("llama", seed=1)
    engine = Engine(model, IdTokenizer(), FIXED)
    good, bad = engine.request(BASE, 12), engine.request([3, 4], 12)

    def broken(tree, logits, context):
        raise RuntimeError("sampler exploded")
    bad.accept = broken
    decoder = engine.decoder()
    decoder.add(good)
    decoder.add(bad)
    while len(decoder):
        decoder.step()
    assert isinstance(bad.error, RuntimeError) and good.error is None
    assert good.ids == hf_greedy(model, BASE, 12)


def test_a_request_can_cap_or_turn_off_its_own_drafting():
    model = tiny_model("llama", seed=1)
    engine = Engine(model, IdTokenizer(), FIXED)
    for _ in range(2):  # the shared trie learns the continuation (twice: 2/3 a token, not 1/2): drafts will be long
        engine.generate(BASE, max_new_tokens=24)
    capped, off, free = (engine.request(BASE, 24, max_draft=2), engine.request(BASE, 24, draft=False),
                         engine.request(BASE, 24))
    outs = engine.generate_batch([capped, off, free], progress=False)
    assert outs[0].token_ids == outs[1].token_ids == outs[2].token_ids == hf_greedy(model, BASE, 24)
    assert 0 < outs[0].stats.draft_tokens <= 2 * outs[0].stats.steps
    assert outs[1].stats.draft_tokens == 0 and outs[1].stats.steps == 24
    assert outs[2].stats.draft_tokens > 2 * outs[2].stats.steps


def test_chunked_prefill_is_exact_and_lets_running_rows_go_on(arch):
    """A long prompt joining a running batch is prefilled a chunk per step: the running row keeps emitting
    meanwhile, and both outputs equal model.generate()."""
    model = tiny_model(arch, seed=1)
    engine = Engine(model, IdTokenizer(), FIXED)
    long_prompt = (BASE * 8)[:150]
    decoder = engine.decoder(prefill_chunk=16)
    running = engine.request([3, 4, 9], 30)
    decoder.add(running)
    decoder.step()                                     # prefilled, joins
    joining = engine.request(long_prompt, 12)
    decoder.add(joining)
    emitted_while_joining = []
    while decoder.prefilling:
        before = len(running.ids)
        decoder.step()
        emitted_while_joining.append(len(running.ids) - before if not running.done else 1)
    assert len(emitted_while_joining) >= 150 // 16 and all(n >= 1 for n in emitted_while_joining)
    while len(decoder):
        decoder.step()
    assert running.ids == hf_greedy(model, [3, 4, 9], 30)
    assert joining.ids == hf_greedy(model, long_prompt, 12)


def test_the_padded_cache_stays_within_max_cache_tokens():
    """A long prompt among short requests: every row's cache is padded to the longest, so the long one joins
    only when rows x its length fits the bound (it waits its turn in order), and outputs are unchanged."""
    from lookahead.decoding.step import run
    model = tiny_model("llama", seed=1)
    engine = Engine(model, IdTokenizer(), FIXED)
    long_prompt = (BASE * 8)[:150]
    prompts = [[3, 4, 9], [7, 8], long_prompt, [5, 6, 7, 5, 6], [11, 12], [40, 41, 42]]

    def peak(bound: int | None) -> tuple[int, list]:
        decoder = engine.decoder(max_cache_tokens=bound)
        requests = [engine.request(p, 20) for p in prompts]
        step, most = decoder.step, [0]

        def measured_step():
            finished = step()
            most[0] = max(most[0], len(decoder.verifier) * decoder.verifier.length)
            return finished
        decoder.step = measured_step
        run(decoder, requests, max_batch=8)
        return most[0], requests

    unbounded, _ = peak(None)
    assert unbounded > 3 * 170                              # the long row multiplied the others' caches
    bounded, requests = peak(300)
    assert bounded <= 300
    assert [r.ids for r in requests] == [hf_greedy(model, p, 20) for p in prompts]


def test_a_joining_prompt_is_prefilled_in_chunks_no_dearer_than_the_running_rows_step():
    """Alone, a prompt is prefilled a whole chunk (64) per step; while a row runs, only as many tokens as
    cost no more than that row's own step on the cost curve (here flat up to 32 tokens, then steep)."""
    from lookahead.decoding.cost import CostModel
    model = tiny_model("llama", seed=1)
    engine = Engine(model, IdTokenizer(), FIXED)
    decoder = engine.decoder(prefill_chunk=64)
    decoder.cost = CostModel([1, 32, 64], [1.0, 1.0, 8.0])
    decoder.cost.observe = lambda *args: None               # the curve stays as given
    alone = engine.request((BASE * 8)[:150], 30)
    decoder.add(alone)
    decoder.step()
    assert decoder.prefilling[0].filled == 64               # nobody waits: a whole chunk
    while decoder.prefilling:
        decoder.step()
    joining = engine.request(list(reversed(BASE * 4)), 4)
    decoder.add(joining)
    filled = []
    while decoder.prefilling:
        before = decoder.prefilling[0].filled
        decoder.step()
        filled.append((decoder.prefilling[0].filled if decoder.prefilling else len(joining.prompt) - 1) - before)
    assert filled[:-1] and set(filled[:-1]) == {32}, filled  # the running row's step costs t(13) = t(32)
    while len(decoder):
        decoder.step()
    assert alone.ids == hf_greedy(model, (BASE * 8)[:150], 30)
    assert joining.ids == hf_greedy(model, list(reversed(BASE * 4)), 4)


def test_prefill_time_is_shared_per_request_not_per_phase():
    """Three prompts waiting next to one running row get three times its step's cost in chunk (64 tokens on
    this curve, not 32): a crowd of arrivals is not starved by one running row."""
    from lookahead.decoding.cost import CostModel
    model = tiny_model("llama", seed=1)
    engine = Engine(model, IdTokenizer(), FIXED)
    decoder = engine.decoder(prefill_chunk=128)
    decoder.cost = CostModel([1, 32, 64, 128], [1.0, 1.0, 2.5, 8.0])
    decoder.cost.observe = lambda *args: None
    decoder.add(engine.request([3, 4, 9], 40))
    decoder.step()
    decoder.step()
    for p in (BASE * 4, list(reversed(BASE * 4)), (BASE * 4)[3:]):
        decoder.add(engine.request(p, 4))
    decoder.step()
    assert len(decoder.prefilling) == 3 and sum(row.filled for row in decoder.prefilling) == 64
