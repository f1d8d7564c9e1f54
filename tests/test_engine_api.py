"""Engine API: prompts of every form, stats, streaming, clear errors for bad input."""
from __future__ import annotations

import pytest

from conftest import IdTokenizer, hf_greedy, tiny_model
from lookahead import DraftConfig, Engine
from lookahead.decoding.cost import CostModel
from lookahead.decoding.sizing import SizingPolicy
from lookahead.drafting.fusion import Budget

PROMPT = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]


@pytest.fixture
def engine():
    return Engine(tiny_model("llama"), IdTokenizer())


def test_stats_describe_the_run(engine):
    out = engine.generate(PROMPT, max_new_tokens=20)
    s = out.stats
    assert s.prompt_tokens == len(PROMPT) and s.new_tokens == len(out.token_ids) == 20
    assert sum(s.accepted) == s.new_tokens and len(s.accepted) == s.steps
    assert s.mean_accepted == pytest.approx(s.new_tokens / s.steps)
    assert s.total_s >= s.draft_s + s.forward_s > 0 and 0 <= s.draft_share < 1
    assert "accepted tokens/step" in s.summary()


def test_draft_false_is_plain_decoding(engine):
    out = engine.generate(PROMPT, max_new_tokens=10, draft=False)
    assert out.stats.steps == 10 and out.stats.draft_tokens == 0
    assert out.token_ids == hf_greedy(engine.model, PROMPT, 10)


def test_stream_yields_the_same_text_as_generate(engine):
    stream = engine.stream(PROMPT, max_new_tokens=16)
    pieces = list(stream)
    assert len(pieces) > 1
    assert "".join(pieces) == stream.output.text == engine.generate(PROMPT, max_new_tokens=16).text


def test_draft_budget_is_respected():
    engine = Engine(tiny_model("llama"), IdTokenizer(),
                    DraftConfig(max_nodes=3, max_depth=2, copy_depth=2, sizing="fixed"))
    engine.generate(PROMPT, max_new_tokens=30)
    out = engine.generate(PROMPT, max_new_tokens=30)
    assert max(out.stats.accepted) <= 3  # depth 2 + bonus token
    assert out.stats.draft_tokens <= 3 * out.stats.steps


def test_a_row_copying_its_context_drafts_as_deep_as_copy_depth():
    """Once the output has copied its context for a whole branch, the copy chain may run to copy_depth: steps
    accept more than max_depth + 1 tokens there, never more than copy_depth + 1, and the output is the same."""
    model = tiny_model("llama")
    prompt = [5, 17, 33, 2, 61, 8, 40, 12, 71, 3, 29, 54] * 4  # the tiny model continues the repeat
    runs = {}
    for copy_depth in (4, 10):
        engine = Engine(model, IdTokenizer(), DraftConfig(max_nodes=4, max_depth=4, copy_depth=copy_depth,
                                                          sizing="fixed"))
        runs[copy_depth] = engine.generate(prompt, max_new_tokens=60)
    assert runs[4].token_ids == runs[10].token_ids
    assert max(runs[4].stats.accepted) <= 5 < max(runs[10].stats.accepted) <= 11


def test_a_long_copy_drafts_deeper_by_doubling_up_to_copy_depth():
    """A copying row's caps double once it has copied a whole branch, and again after copying a whole branch at
    that depth, up to copy_depth (with as many more nodes): at copy_depth 48, 12 deep, 24 from 12 copied tokens,
    48 from 36; by default 24 at most."""
    model = tiny_model("llama")
    assert Engine(model, IdTokenizer(), DraftConfig(max_nodes=12)).decoder().caps_for(500) == Budget(24, 24)
    deep = Engine(model, IdTokenizer(), DraftConfig(max_nodes=12, copy_depth=48)).decoder()
    assert {run: (deep.caps_for(run).depth, deep.caps_for(run).nodes) for run in (0, 11, 12, 35, 36, 500)} \
        == {0: (12, 12), 11: (12, 12), 12: (24, 24), 35: (24, 24), 36: (48, 48), 500: (48, 48)}
    small = Engine(model, IdTokenizer(), DraftConfig(max_nodes=4, max_depth=4, copy_depth=10)).decoder()
    assert [(small.caps_for(run).depth, small.caps_for(run).nodes) for run in (3, 4, 11, 12)] \
        == [(4, 4), (8, 8), (8, 8), (10, 10)]
    level = Engine(model, IdTokenizer(), DraftConfig(max_nodes=4, max_depth=4, copy_depth=4)).decoder()
    assert level.caps_for(100) == level.caps


def test_the_node_cap_widens_only_where_the_measured_verify_cost_is_flat():
    """A GPU-like curve (four times the tokens for 1.05x the time) widens the default tree to 4 x 12 nodes; a
    CPU-like one keeps 12; a cap the user gives is kept either way."""
    model = tiny_model("llama")
    flat = CostModel([1, 16, 64, 128], [1.0, 1.0, 1.05, 1.1])
    steep = CostModel([1, 16, 64, 128], [1.0, 1.9, 3.5, 6.0])
    assert Engine(model, IdTokenizer(), cost=flat).decoder().caps.nodes == 48
    assert Engine(model, IdTokenizer(), cost=steep).decoder().caps.nodes == 12
    assert Engine(model, IdTokenizer(), DraftConfig(max_nodes=12), cost=flat).decoder().caps.nodes == 12


def test_a_widened_node_cap_is_shared_by_a_batchs_rows(monkeypatch):
    """Building a tree costs CPU time per node, which the verify curve does not count: under a cap widened to 48,
    four rows in one batch draft 12 nodes each, a lone request 48."""
    from lookahead.drafting.drafter import Drafter
    asked, propose = [], Drafter.propose
    monkeypatch.setattr(Drafter, "propose", lambda self, context, budget: asked.append(budget.nodes)
                        or propose(self, context, budget))
    flat = CostModel([1, 16, 64, 128], [1.0, 1.0, 1.05, 1.1])
    engine = Engine(tiny_model("llama"), IdTokenizer(), DraftConfig(copy_depth=12), cost=flat,
                    sizing=SizingPolicy(flat, guard=False))
    engine.generate_batch([PROMPT] * 4, max_new_tokens=8, max_batch=4, progress=False)
    in_batch = set(asked)
    asked.clear()
    engine.generate(PROMPT, max_new_tokens=8)
    assert in_batch == {12} and set(asked) == {48}


@pytest.mark.parametrize("bad, message", [
    ([], "empty"),
    ([{"role": "user"}], "prompt must be"),
    (3.5, "prompt must be"),
])
def test_bad_prompts_get_clear_errors(engine, bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        engine.generate(bad)


def test_chat_messages_need_a_chat_template(engine):
    with pytest.raises(ValueError, match="chat template"):
        engine.generate([{"role": "user", "content": "hi"}])


def test_bad_limits_get_clear_errors(engine):
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate(PROMPT, max_new_tokens=0)
    with pytest.raises(ValueError, match="context window"):
        engine.generate(list(range(5)) * 200)
    with pytest.raises(ValueError, match="max_depth"):
        DraftConfig(max_depth=0)


def test_generation_near_the_context_window_never_exceeds_it():
    model = tiny_model("gpt2")  # absolute positions: an index past the window would crash
    engine = Engine(model, IdTokenizer())
    prompt = list(range(2, 50)) * 10 + [2, 3]  # 482 tokens of a 512-token window
    engine.generate(prompt, max_new_tokens=20)
    out = engine.generate(prompt, max_new_tokens=100)
    assert len(prompt) + len(out.token_ids) <= 512


def test_stats_report_acceptance_per_draft_source():
    engine = Engine(tiny_model("llama"), IdTokenizer(),
                    DraftConfig(sizing="fixed", sources=("prompt", "history", "recycle", "ngram")))
    engine.generate(PROMPT, max_new_tokens=20)
    out = engine.generate(PROMPT, max_new_tokens=20)
    assert set(out.stats.sources) == {"prompt", "history", "recycle", "ngram"}
    assert all(0 <= accepted <= proposed for proposed, accepted in out.stats.sources.values())
    assert sum(accepted for _, accepted in out.stats.sources.values()) > 0


def test_load_freezes_the_loaded_heap(real_engine):
    """The model and libraries are kept out of Python's full collections, which drafting's trie nodes trigger."""
    import gc
    assert gc.get_freeze_count() > 10_000
