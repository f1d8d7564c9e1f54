"""The benchmark harness on tiny random models: aggregation math, equality column, reports, a tiny run."""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

import pytest
import torch

from conftest import IdTokenizer, tiny_model
from lookahead import DraftConfig, Engine
from lookahead.benchmark import cost
from lookahead.benchmark.cli import _rerender, _resolve_dtype, add_parser, run_facts
from lookahead.benchmark.harness import Item, mark_equality, rotated, run_interleaved, warm_pairs, warm_up_methods
from lookahead.benchmark.methods import Context, parse_method, run_method
from lookahead.benchmark.oracle import OracleDrafter, OracleState, copied
from lookahead.benchmark.report import equality_cell, markdown, write_all
from lookahead.benchmark.stats import (
    Record,
    first_difference,
    geomean,
    is_oracle,
    median,
    quantile,
    speedups,
    summarize,
)


def rec(pid, cat, method, wall, tokens=None, **kw) -> Record:
    return Record(prompt_id=pid, category=cat, method=method, prompt_tokens=10,
                  token_ids=tokens if tokens is not None else list(range(10)), wall_s=wall, **kw)


# -- math ------------------------------------------------------------------------------------
def test_geomean_quantiles_first_difference():
    assert geomean([1, 4]) == pytest.approx(2.0)
    assert geomean([2.0]) == 2.0 and geomean([]) is None
    with pytest.raises(ValueError):
        geomean([1.0, 0.0])
    assert median([3, 1, 2]) == 2 and median([1, 2, 3, 4]) == 2.5
    assert quantile([1, 2, 3, 4, 5], 0.25) == 2 and quantile([0, 10], 0.75) == 7.5
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2  # one stopped earlier


def test_speedup_is_per_prompt_ratio_and_overall_is_geomean_of_categories():
    # baseline 10 tokens in 1 s on each prompt; the method is 2x and 8x on "a", 2x on "b".
    records = [rec("a1", "a", "baseline", 1.0), rec("a1", "a", "fast", 0.5),
               rec("a2", "a", "baseline", 2.0), rec("a2", "a", "fast", 0.25),
               rec("b1", "b", "baseline", 1.0), rec("b1", "b", "fast", 0.5)]
    ratios = speedups(records)
    assert ratios[("fast", "a1")] == pytest.approx(2) and ratios[("fast", "a2")] == pytest.approx(8)
    s = summarize(records, ["baseline", "fast"], ["a", "b"])
    assert s["by_category"]["fast"]["a"]["speedup_geomean"] == pytest.approx(4.0)
    assert s["by_category"]["fast"]["b"]["speedup_geomean"] == pytest.approx(2.0)
    assert s["overall"]["fast"]["speedup_geomean"] == pytest.approx(math.sqrt(8))  # categories weigh the same
    assert s["overall"]["fast"]["speedup_geomean_prompts"] == pytest.approx((2 * 8 * 2) ** (1 / 3))
    assert s["by_category"]["baseline"]["a"]["speedup_geomean"] == pytest.approx(1.0)
    a = s["by_category"]["fast"]["a"]
    assert a["tokens_per_s_median"] == pytest.approx(30.0)  # 20 and 40 tok/s
    assert (a["tokens_per_s_min"], a["tokens_per_s_max"]) == (20.0, 40.0)


def test_accepted_and_draft_share():
    la = rec("a1", "a", "lookahead", 1.0, accepted=[3, 3, 2, 2], draft_s=0.1, step_s=0.8)
    hf = rec("a1", "a", "pld", 1.0, forward_calls=4)
    base = rec("a1", "a", "baseline", 1.0, forward_calls=10)
    assert la.mean_accepted == 2.5 and la.draft_share == pytest.approx(0.125)
    assert hf.mean_accepted == 2.5 and hf.draft_share is None
    assert base.mean_accepted == 1.0
    s = summarize([la, hf, base], ["baseline", "pld", "lookahead"], ["a"])
    assert s["by_category"]["lookahead"]["a"]["mean_accepted"] == 2.5
    assert s["by_category"]["lookahead"]["a"]["draft_share"] == pytest.approx(0.125)
    assert s["by_category"]["pld"]["a"]["draft_share"] is None


def _limit_records() -> list[Record]:
    """Baseline 10 tok/s everywhere; plain 1.25x; lookahead 2x; oracle-L8 best on "a" (5x vs 4x), oracle-L4 on
    "b" (5x vs 2x) and overall (sqrt(20) vs sqrt(10))."""
    walls = {"baseline": (1.0, 1.0), "plain": (0.8, 0.8), "lookahead": (0.5, 0.5),
             "oracle-L4": (0.25, 0.2), "oracle-L8": (0.2, 0.5)}
    return [rec(f"{c}1", c, m, w[i]) for m, w in walls.items() for i, c in enumerate("ab")]


def test_summary_vs_plain_and_fraction_of_the_best_oracle():
    methods = ["baseline", "plain", "lookahead", "oracle-L4", "oracle-L8"]
    s = summarize(_limit_records(), methods, ["a", "b"])
    a, b, all_ = (s["by_category"]["lookahead"]["a"], s["by_category"]["lookahead"]["b"],
                  s["overall"]["lookahead"])
    assert a["speedup_vs_plain_geomean"] == pytest.approx(2 / 1.25) and all_["speedup_vs_plain_geomean"] == \
        pytest.approx(1.6)
    assert s["overall"]["baseline"]["speedup_vs_plain_geomean"] == pytest.approx(0.8)
    assert s["best_oracle"] == {"a": "oracle-L8", "b": "oracle-L4", "all": "oracle-L4"}
    assert a["oracle_fraction"] == pytest.approx(2 / 5) and b["oracle_fraction"] == pytest.approx(2 / 5)
    assert all_["oracle_fraction"] == pytest.approx(2 / math.sqrt(20))  # of the best oracle overall, not per column
    assert s["by_category"]["oracle-L4"]["a"]["oracle_fraction"] == pytest.approx(4 / 5)
    assert s["overall"]["oracle-L4"]["oracle_fraction"] == pytest.approx(1.0)
    bare = summarize(_limit_records(), ["baseline", "lookahead"], ["a", "b"])  # neither ran: no such figures
    assert bare["overall"]["lookahead"]["speedup_vs_plain_geomean"] is None
    assert bare["overall"]["lookahead"]["oracle_fraction"] is None and bare["best_oracle"]["all"] is None


def test_report_shows_the_limit_columns_only_when_their_methods_ran(tmp_path):
    meta = {"command": "x", "model": "tiny", "dtype": "float32", "mode": "greedy", "categories": ["a", "b"],
            "limit": 1, "prompts": 2, "max_new_tokens": 10, "machine": "test", "torch": "x", "transformers": "y",
            "near_tie": 1e-3, "definitions": {"cold": "cold.", "warm": "warm."}}  # an old file's meta
    records = _limit_records()
    full = ["baseline", "plain", "lookahead", "oracle-L4", "oracle-L8"]
    md = markdown({"meta": {**meta, "methods": full}, "summary": summarize(records, full, ["a", "b"])})
    assert "## Speedup over our own loop without drafting (`plain`)" in md and "| vs plain | % of oracle |" in md
    assert "overall: `oracle-L4`" in md and "| lookahead | 40.0% | 40.0% | **44.7%** |" in md
    assert "| lookahead | 1.60x | 1.60x | **1.60x** |" in md
    old = ["baseline", "lookahead"]
    kept = [r for r in records if r.method in old]
    (tmp_path / "results.json").write_text(json.dumps({"meta": {**meta, "methods": old}, "summary": {},
                                                       "records": [r.to_json() for r in kept]}))
    assert _rerender(tmp_path, plots=False) == 0  # `--report` on a results.json from before these columns
    md = (tmp_path / "results.md").read_text()
    assert "| lookahead | 2.00x | 2.00x | **2.00x** |" in md
    assert "vs plain" not in md and "`plain`" not in md and "oracle" not in md


# -- equality column ---------------------------------------------------------------------------
def test_equality_column_and_near_tie_check():
    model = tiny_model("llama")
    ids = [5, 6, 7, 8]
    with torch.inference_mode():
        top = model(torch.tensor([ids])).logits[0, -1].topk(3)
    t1, t2, t3 = top.indices.tolist()
    gap, gap3 = float(top.values[0] - top.values[1]), float(top.values[0] - top.values[2])
    records = [rec("p", "c", "baseline", 1.0, tokens=[t1, 1, 2]),
               rec("p", "c", "same", 1.0, tokens=[t1, 1, 2]),
               rec("p", "c", "tie", 1.0, tokens=[t2, 1, 2]),
               rec("p", "c", "short", 1.0, tokens=[t1, 1]),
               rec("p", "c", "third", 1.0, tokens=[t3, 1, 2])]
    mark_equality(records, {"p": Item("p", "c", ids)}, model, threshold=gap + 1e-6)
    same, tie, short, third = records[1:]
    assert third.tie_gap == pytest.approx(gap3, abs=1e-5) and not third.near_tie  # measured from the top
    assert same.same_as_baseline and same.diverged_at is None
    assert tie.same_as_baseline is False and tie.diverged_at == 0
    assert tie.tie_gap == pytest.approx(gap, abs=1e-5) and tie.near_tie
    assert short.diverged_at == 2 and short.near_tie is False
    mark_equality(records, {"p": Item("p", "c", ids)}, model, threshold=gap / 2)
    assert records[2].near_tie is False  # same divergence, a tighter threshold: not a near-tie
    g = summarize(records, ["baseline", "tie", "same"], ["c"])["by_category"]
    assert equality_cell(g["same"]["c"]) == "1/1"
    assert equality_cell(g["tie"]["c"]) == "0/1 (0/1 near-ties)"
    assert equality_cell(g["baseline"]["c"]) == "–"


def test_sampling_counts_equality_without_near_tie_check():
    records = [rec("p", "c", "baseline", 1.0), rec("p", "c", "x", 1.0, tokens=[9]), rec("p", "c", "y", 1.0)]
    mark_equality(records, {}, None, threshold=None)
    assert records[1].same_as_baseline is False and records[1].diverged_at == 0 and records[1].near_tie is None
    assert records[2].same_as_baseline is True


# -- methods -----------------------------------------------------------------------------------
def test_parse_method_names():
    assert parse_method("baseline").kind == "baseline"
    assert parse_method("pld").ngram == 3 and parse_method("pld-n2").ngram == 2
    assert parse_method("assisted").kind == "assisted"
    cold, warm = parse_method("lookahead"), parse_method("lookahead-warm")
    assert (cold.kind, cold.warm, cold.draft_config) == ("lookahead", False, None) and warm.warm
    v = parse_method("lookahead-warm-n16-d8-m3", DraftConfig(capacity=1000))
    assert v.warm and (v.draft_config.max_nodes, v.draft_config.max_depth, v.draft_config.max_match) == (16, 8, 3)
    assert v.draft_config.capacity == 1000
    deep = parse_method("lookahead-c32").draft_config
    assert (deep.copy_depth, deep.max_depth) == (32, DraftConfig().max_depth)
    assert parse_method("lookahead-n8-d8-m2-c16").draft_config.copy_depth == 16
    only = parse_method("lookahead-warm-sprompt+history", DraftConfig(max_nodes=5))
    assert only.warm and only.draft_config.sources == ("prompt", "history") and only.draft_config.max_nodes == 5
    fixed = parse_method("lookahead-n24-d12-srecycle-fixed").draft_config
    assert (fixed.max_nodes, fixed.sources, fixed.sizing) == (24, ("recycle",), "fixed")
    assert parse_method("lookahead-fixed").draft_config.sources == DraftConfig().sources
    with pytest.raises(ValueError, match="unknown draft sources"):
        parse_method("lookahead-smedusa")
    with pytest.raises(ValueError):
        parse_method("medusa")
    assert parse_method("plain").kind == "plain"
    l8, bare = parse_method("oracle-L8"), parse_method("oracle")
    assert l8.kind == bare.kind == "oracle"
    assert (l8.draft_config.max_nodes, l8.draft_config.max_depth, l8.draft_config.sizing) == (8, 8, "fixed")
    assert bare.draft_config.max_nodes == 16
    copy8 = parse_method("copy-oracle-L8")
    assert copy8.kind == parse_method("copy-oracle").kind == "copy-oracle" and copy8.draft_config.max_nodes == 8
    assert not is_oracle("copy-oracle")  # a bound on copying drafters, not the limit shares are taken of
    for bad in ("oracle-L0", "oracle-8", "oracle-n8", "copy-oracle-L0", "oracle-copy"):
        with pytest.raises(ValueError):
            parse_method(bad)


def test_rotation_gives_every_method_every_position():
    specs = [parse_method(n) for n in ("baseline", "pld", "lookahead")]
    firsts = [rotated(specs, i)[0].name for i in range(3)]
    assert sorted(firsts) == ["baseline", "lookahead", "pld"]


@pytest.mark.parametrize("length", [1, 3, 4])
def test_oracle_accepts_whole_chains_and_equals_plain(tiny_ctx, length):
    ctx, items = tiny_ctx
    ids = items[0].ids
    plain = run_method(ctx, parse_method("plain"), ids)
    r = run_method(ctx, parse_method(f"oracle-L{length}"), ids)
    assert r.token_ids == plain.token_ids and len(r.token_ids) == ctx.max_new_tokens
    assert all(a == length + 1 for a in r.accepted[:-1])  # every chain accepted whole, plus the bonus token
    assert 1 <= r.accepted[-1] <= length + 1  # the tail: only the room left
    assert r.draft_tokens == r.new_tokens - len(r.accepted)  # every verified draft node was accepted
    assert plain.accepted == [1] * ctx.max_new_tokens and plain.draft_tokens == 0


def test_copied_is_the_longest_prefix_found_in_the_context():
    context = [1, 2, 3, 4, 2, 3, 9]
    assert copied(context, [2, 3, 4, 5]) == [2, 3, 4]   # the best of two places, not the latest
    assert copied(context, [2, 3, 9, 1]) == [2, 3, 9]   # stops at the context's end
    assert copied(context, [7, 1, 2]) == [] and copied(context, []) == []


def test_the_copy_oracle_drafts_only_what_the_context_holds(tiny_ctx, monkeypatch):
    """Same output as plain decoding, every draft accepted whole, and every draft a stretch of the context: on
    a prompt that repeats itself (so the answer does too) it drafts, and it drafts less than the oracle."""
    ctx, items = tiny_ctx
    ids = items[0].ids
    plain = run_method(ctx, parse_method("plain"), ids)
    oracle = run_method(ctx, parse_method("oracle-L4"), ids)
    proposed = []
    original = OracleDrafter.propose

    def spy(self, context, budget):
        tree = original(self, context, budget)
        proposed.append((list(context), tree.tokens[1:]))
        return tree

    monkeypatch.setattr(OracleDrafter, "propose", spy)
    r = run_method(ctx, parse_method("copy-oracle-L4"), ids)
    assert r.token_ids == plain.token_ids
    assert r.draft_tokens == r.new_tokens - len(r.accepted)  # every verified draft node was accepted
    assert 0 < r.draft_tokens < oracle.draft_tokens
    assert all(copied(context, chain) == chain for context, chain in proposed)


def test_oracle_refuses_what_it_cannot_know(tiny_ctx):
    ctx, items = tiny_ctx
    engine = Engine(ctx.model, ctx.engine.tokenizer, parse_method("oracle-L4").draft_config, state=OracleState())
    with pytest.raises(KeyError, match="not prepared"):
        engine.generate(items[1].ids, max_new_tokens=4)
    sampling = replace(ctx, sampling={"do_sample": True, "temperature": 0.7})
    with pytest.raises(ValueError, match="greedy only"):
        run_method(sampling, parse_method("oracle"), items[1].ids)


# -- a tiny end-to-end run ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ctx():
    model = tiny_model("llama").float()
    cfg = DraftConfig(max_nodes=8, max_depth=4)
    cfg = replace(cfg, sizing="fixed")  # no per-engine cost measurement: keeps the test fast
    engine = Engine(model, IdTokenizer(), cfg)
    # The answers a random model gives to repetitive prompts repeat too: drafts get accepted.
    items = [Item("t/0", "code", [3, 4, 5, 6, 3, 4, 5, 6, 3, 4]), Item("t/1", "chat", [7, 8, 9, 7, 8, 9, 7])]
    draft = tiny_model("llama", seed=1).float()
    ctx = Context(engine, max_new_tokens=12, assistant=draft)
    answers = {"w/0": {"prompt_tail": [3, 4], "answer": [5, 6, 3, 4, 5, 6]}}
    ctx.warm_corpus = warm_pairs(answers, [Item("w/0", "code", [1, 3, 4]), Item("w/1", "code", [2])])
    return ctx, items


def test_tiny_end_to_end_run(tiny_ctx, tmp_path):
    ctx, items = tiny_ctx
    names = ["baseline", "pld", "pld-n2", "assisted", "lookahead", "lookahead-warm", "lookahead-n4-d2", "plain",
             "oracle-L4"]
    specs = [parse_method(n, ctx.engine.draft_config) for n in names]
    assert len(ctx.warm_corpus) == 1
    warm_up_methods(ctx, specs, items[1].ids, tokens=2)
    seen = []
    records = run_interleaved(ctx, items, specs, progress=seen.append)
    assert len(records) == len(seen) == len(items) * len(names)
    mark_equality(records, {it.id: it for it in items}, ctx.model, threshold=1e-3)
    for r in records:
        assert r.new_tokens == 12 and r.wall_s > 0 and r.forward_calls >= 1
        if r.method != "baseline":
            assert r.same_as_baseline, (r.method, r.prompt_id, r.diverged_at)  # fp32: exact
    base = [r for r in records if r.method == "baseline"]
    assert all(r.mean_accepted == 1.0 and r.forward_calls == 12 for r in base)
    la = [r for r in records if r.method.startswith(("lookahead", "oracle", "plain"))]
    assert all(sum(r.accepted) == 12 and r.draft_s is not None for r in la)
    assert all(r.draft_s is not None for r in records if r.method == "assisted")

    summary = summarize(records, names, ["code", "chat"])
    results = {"meta": {"command": "lookahead bench --test", "model": "tiny", "dtype": "float32", "mode": "greedy",
                        "categories": ["code", "chat"], "methods": names, "limit": 1, "prompts": 2,
                        "max_new_tokens": 12, "machine": "test", "torch": "x", "transformers": "y", "near_tie": 1e-3,
                        "definitions": {"cold": "cold.", "warm": "warm."}},
               "summary": summary, "records": [r.to_json() for r in records]}
    written = write_all(tmp_path, results, records, plots=False)
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["records"]) == len(records)
    assert Record.from_json(data["records"][0]).token_ids == records[0].token_ids
    md = (tmp_path / "results.md").read_text()
    assert md == markdown(results) and "| code | lookahead-warm |" in md and "2/2" not in md
    assert "| lookahead |" in md and "| 1/1 |" in md
    assert "| vs plain | % of oracle |" in md and "| code | oracle-L4 |" in md
    assert [p.name for p in written] == ["results.json", "results.md"]
    (tmp_path / "results.md").unlink()
    assert _rerender(tmp_path, plots=False) == 0  # `lookahead bench --report DIR`
    assert (tmp_path / "results.md").read_text() == md


def test_plots_are_written(tiny_ctx, tmp_path):
    pytest.importorskip("matplotlib")
    ctx, items = tiny_ctx
    names = ["baseline", "lookahead"]
    records = run_interleaved(ctx, items[:1], [parse_method(n) for n in names], repeats=2)
    assert all(len(r.walls) == 2 and r.wall_s == min(r.walls) for r in records)
    results = {"meta": {"model": "tiny", "dtype": "float32", "mode": "greedy", "categories": ["code"],
                        "methods": names, "max_new_tokens": 12},
               "summary": summarize(records, names, ["code"])}
    from lookahead.benchmark.report import plot_accepted, plot_speedups

    plot_speedups(tmp_path / "s.png", results)
    assert plot_accepted(tmp_path / "h.png", results, records)
    assert (tmp_path / "s.png").stat().st_size > 1000 and (tmp_path / "h.png").stat().st_size > 1000


def test_trie_scope_prompt_gives_fresh_state_run_keeps_it(tiny_ctx):
    ctx, _ = tiny_ctx
    cold, warm = parse_method("lookahead"), parse_method("lookahead-warm")
    assert len(ctx.engine_for(cold).state.trie) == 0 and len(ctx.engine_for(warm).state.trie) > 0
    assert ctx.engine_for(cold) is not ctx.engine_for(cold)
    assert ctx.engine_for(cold).model is ctx.model  # one model in memory
    ctx.trie_scope = "run"
    try:
        assert ctx.engine_for(warm) is ctx.engine_for(warm)
    finally:
        ctx.trie_scope, ctx._engines = "prompt", {}


def test_cost_curve_on_tiny_model(tmp_path):
    model = tiny_model("qwen2")
    ids = list(range(1, 60))
    curve = cost.cost_curve(model, ids, context=32, ks=(1, 2, 4), reps=2, warmup=1)
    assert curve["ks"] == [1, 2, 4]
    for path in ("tree", "plain"):
        assert curve[path]["ratio"][0] == 1.0 and len(curve[path]["median_ms"]) == 3
    assert "| 4 |" in cost.markdown(curve, "tiny")
    with pytest.raises(ValueError):
        cost.cost_curve(model, ids[:10], context=32, ks=(1, 2))


# -- command line --------------------------------------------------------------------------------
def test_bench_parser_reads_sampling_flags():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--model", "smollm2-135m", "--tasks", "code", "--methods",
                              "baseline,lookahead", "--limit", "2", "--sampling"])
    assert args.limit == 2 and args.sampling and args.temperature == 0.7 and args.top_p == 0.9


def test_warm_answers_are_cached_on_disk(tiny_ctx, tmp_path, monkeypatch):
    from lookahead.benchmark.harness import self_answers, warm_cache_path

    ctx, items = tiny_ctx
    path = warm_cache_path("tiny/model", "float32", 6, root=tmp_path)
    assert path.parent == tmp_path / "bench" / "warm" and "float32-6" in path.name
    answers = self_answers(ctx.engine, items, 6, path, {"model": "tiny"})
    assert set(answers) == {it.id for it in items} and all(len(a["answer"]) == 6 for a in answers.values())

    def no_generation(*a, **k):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr(Engine, "generate", no_generation)
    seen = []
    assert self_answers(ctx.engine, items, 6, path, {}, progress=seen.append) == answers
    assert seen == list(items)
    assert [len(a) for _, a in warm_pairs(answers, items)] == [6, 6]


def test_run_facts_record_the_machine(tiny_ctx, monkeypatch):
    ctx, _ = tiny_ctx
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # e.g. an AVX2-only CPU emulated: said in the results
    facts = run_facts(ctx.model, "given on the command line")
    assert facts["isa_caps"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"} and facts["aten_cpu_capability"]
    assert facts["threads"] == torch.get_num_threads() and facts["torch"] == torch.__version__
    assert (facts["device"], facts["torch_dtype"], facts["kernels"]) == ("cpu", "float32", "eager")
    assert facts["dtype_reason"] == "given on the command line" and facts["mkldnn_bf16"] in (True, False, None)
    assert facts["transformers"] and facts["cpu_model"] and facts["cores"] >= 1
    try:
        cpuinfo = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    flags = set(next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split(":", 1)[1].split())
    assert set(facts["cpu_flags"]) == {f for f in flags if f.startswith(("avx", "amx", "fma", "sse4"))}
    args = argparse.Namespace(dtype=None)
    _resolve_dtype(args)
    assert args.dtype == "auto" and args.dtype_reason.startswith("default")


def test_the_oracle_learns_the_answer_its_own_loop_emits(tiny_ctx):
    """Where tree-verified forwards part from plain ones (bf16, packed kernels: a near-tie), a plain answer is
    wrong from there on. Simulated with a plain answer wrong at one place: `prepare` takes what the oracle's loop
    emitted as the next answer and runs again until the two agree, so the timed run drafts what it will emit,
    all accepted."""
    ctx, items = tiny_ctx
    ids = items[1].ids
    engine = Engine(ctx.model, ctx.engine.tokenizer, parse_method("oracle-L4").draft_config, state=OracleState())
    truth = OracleState.plain(engine, ids, 12)
    wrong = truth[:5] + [(truth[5] + 1) % 32] + truth[6:]
    engine.state.prepare(engine, ids, 12, plain=wrong)
    key = (tuple(ids), 12)
    assert engine.state.answers[key] == truth and engine.state.rounds[key] == 2
    out = engine.generate(ids, max_new_tokens=12)
    assert out.token_ids == truth and out.stats.steps == -(-len(truth) // 5)   # every chain of 4 accepted whole


def test_the_bench_passes_its_kernels_to_load_and_records_them(monkeypatch):
    """`--kernels packed` reaches `lookahead.load` (with --dtype auto the choice can flip between runs where
    eager and packed measure within noise) and the recorded command says it."""
    import lookahead
    from lookahead.benchmark.cli import _command, _load_engine
    from lookahead.cli import build_parser
    seen = {}

    def fake_load(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")
    monkeypatch.setattr(lookahead, "load", fake_load)
    args = build_parser().parse_args(["bench", "--kernels", "packed", "--dtype", "auto"])
    with pytest.raises(RuntimeError, match="stop here"):
        _load_engine(args)
    assert seen["kernels"] == "packed"
    assert "--kernels packed" in _command(args, ["lookahead"])
    assert "--kernels" not in _command(build_parser().parse_args(["bench"]), ["lookahead"])
