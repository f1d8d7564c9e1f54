"""The cost curve and the sizing policy: how much each step verifies, and the never-slower guard.

The guard tests drive a real tiny model whose forward time we control (a sleep per query token),
so "drafting loses" and "drafting wins" are facts of the run, not of a stub.
"""
from __future__ import annotations

import functools
import json
import time

import pytest
import torch

from conftest import IdTokenizer, hf_greedy, tiny_model
from lookahead import DraftConfig, DraftTree, Engine
from lookahead.decoding.cost import CostModel, flat_span, measure_cost
from lookahead.decoding.sizing import PROBE_EVERY, PROBE_NODES, Choice, SizingPolicy, best_cut, best_cuts

COPY = [5, 6, 7, 8, 9, 10, 11, 12] * 3 + [5, 6]


def chain(expected: list[float]) -> DraftTree:
    tree = DraftTree.chain(1, list(range(2, 2 + len(expected))))
    tree.expected = [1.0, *expected]
    return tree


def test_cost_model_interpolates_and_extrapolates():
    cost = CostModel([1, 2, 4], [10.0, 20.0, 24.0])
    assert (cost(1), cost(2), cost(3), cost(4), cost(6)) == (10.0, 20.0, 22.0, 24.0, 28.0)
    assert cost.ratio(3) == pytest.approx(2.2)
    with pytest.raises(ValueError):
        CostModel([2, 4], [1.0, 2.0])


def test_best_cut_verifies_the_prefix_that_pays():
    tree = [chain([0.9, 0.8, 0.5, 0.2, 0.05])]
    assert best_cut(tree, CostModel([1, 2], [1.0, 1.0])) == 5                # free: verify everything
    assert best_cut(tree, CostModel([1, 2], [1.0, 3.0])) == 0                # steep: no draft pays off
    step = CostModel([1, 2, 16, 32], [1.0, 1.4, 1.45, 3.0])                   # fp32-like: a step at k=2, then flat
    assert best_cut(tree, step) == 5
    assert best_cut([chain([0.2, 0.1])], step) == 0


def test_a_batch_shares_one_forward_so_trees_shrink_as_it_grows():
    """Flat to 16 query tokens, then linear: what pays for one row does not for sixteen."""
    cost = CostModel([1, 16, 256], [1.0, 1.0, 16.0])
    sizes = [best_cut([chain([0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])] * rows, cost) for rows in (1, 2, 4, 16)]
    assert sizes[0] == 7 and sizes == sorted(sizes, reverse=True) and sizes[-1] == 0
    # Rows with nothing to draft cost a query token each but add no draft gain.
    mixed = [chain([0.9, 0.9, 0.9])] + [DraftTree.root_only(1)] * 3
    assert best_cut(mixed, cost) == 3


def test_live_forwards_correct_the_curve_and_heal_a_poisoned_cache(tmp_path):
    path = tmp_path / "cost.json"
    poisoned = CostModel([1, 2, 4, 8], [0.010, 0.010, 0.010, 0.010], path=path)   # says: verification is free
    poisoned.save(path)
    for _ in range(60):                                                        # the machine says: 4x dearer at 8
        poisoned.observe(8, 0.040)
        poisoned.observe(1, 0.010)
    assert poisoned.ratio(8) == pytest.approx(4.0, rel=0.05)
    saved = json.loads(path.read_text())
    # Written back (once it drifted past 1.5x): the next run starts right.
    assert saved["seconds"][-1] > 0.03
    for _ in range(60):                               # a loaded spell slows one-token forwards only:
        poisoned.observe(1, 0.200)
    curve = [poisoned(t) for t in poisoned.tokens]
    assert curve == sorted(curve)                     # the curve never says more tokens cost less
    for _ in range(150):                              # the spell ends: the ratios come back, as before it
        poisoned.observe(1, 0.010)
    assert poisoned.ratio(8) == pytest.approx(4.0, rel=0.1)   # not stuck at the spell's level (was 20x)


def test_engines_saving_one_cached_curve_at_once_do_not_collide(tmp_path):
    """Two processes loading one model at once both measure and save its curve (measured: the second one's
    rename found the first one's temporary file gone and the load failed with FileNotFoundError)."""
    from concurrent.futures import ThreadPoolExecutor
    path = tmp_path / "cost.json"
    curves = [CostModel([1, 2], [0.01, 0.01 * (1 + i)], path=path) for i in range(4)]

    def save_often(cost: CostModel) -> None:
        for _ in range(300):
            cost.save(path)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(save_often, curves))  # raises what a save raised
    assert json.loads(path.read_text())["seconds"][0] == 0.01
    assert [p.name for p in tmp_path.iterdir()] == ["cost.json"]  # no temporary file left behind


def test_forwards_next_to_a_higher_neighbour_do_not_pull_a_point_down():
    """t(8) measured a little high, live forwards of 12 tokens (nearest point: 16) at 27 ms: t(16) settles at
    what they say. Scaled by the non-decreasing read (t(16) read as t(8)), every such forward pulled t(16)
    lower, towards zero (a cached curve on a Zen 5 held t(16) = 0.5 ms against 21 ms for t(1))."""
    cost = CostModel([1, 2, 4, 8, 16, 32], [0.021, 0.021, 0.021, 0.030, 0.029, 0.036])
    for _ in range(300):
        cost.observe(12, 0.027)
    assert cost.seconds[4] == pytest.approx(0.027, rel=0.05)


def test_a_point_poisoned_far_below_its_neighbours_heals_from_forwards_near_it():
    cost = CostModel([1, 2, 4, 8, 16, 32], [0.021, 0.021, 0.021, 0.028, 0.0005, 0.036])   # as found cached
    for _ in range(100):
        cost.observe(14, 0.031)
    assert cost.seconds[4] > 0.029 and cost.ratio(16) == pytest.approx(0.031 / 0.021, rel=0.05)


def test_a_cap_on_the_instruction_sets_the_libraries_may_use_gets_its_own_cached_curves(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 (or MKL's, ATen's cap) runs other kernels on the same CPU: a curve measured
    without the cap must not be read with it."""
    from lookahead.decoding.cost import ISA_CAPS, machine_key
    for cap in ISA_CAPS:
        monkeypatch.delenv(cap, raising=False)
    plain = machine_key()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert machine_key() != plain


def test_cpus_a_vm_names_alike_are_told_apart_by_family_and_model(tmp_path):
    """Two VMs both called "AMD EPYC" (a Zen 3 with AVX2 only, a Zen 4 with AVX-512 bf16) must not share
    cached cost curves, and benchmark results must say which one ran."""
    from lookahead.decoding.cost import cpu_info

    def info(model: str, flags: str) -> tuple[str, list[str]]:
        (tmp_path / "cpuinfo").write_text("".join(  # two processors: the second repeats the first
            f"processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: {model}\n"
            f"model name\t: AMD EPYC\nflags\t\t: fpu {flags} sse4_2\n\n" for n in (0, 1)))
        return cpu_info(tmp_path / "cpuinfo")

    assert info("1", "avx2 fma") == ("AMD EPYC (family 25 model 1)", ["avx2", "fma", "sse4_2"])
    assert info("17", "avx2 avx512_bf16")[0] == "AMD EPYC (family 25 model 17)"
    assert cpu_info(tmp_path / "missing") == ("", [])


def test_a_cached_curve_that_disagrees_with_live_forwards_is_measured_again(monkeypatch, tmp_path):
    """A curve cached while the machine was loaded (100x too slow) is not believed at the next start."""
    from lookahead.decoding.cost import cost_path, load_cost
    monkeypatch.setenv("LOOKAHEAD_CACHE", str(tmp_path))
    # Forwards slow enough that a few ms of scheduling noise stay far inside the check's 1.5x tolerance
    # (at 20 ms one suite run in about ten re-measured a good curve).
    model = slow_forward(tiny_model("llama"), base_s=0.05)
    path = cost_path("tiny", torch.float32, "cpu")
    first = load_cost(model, "tiny")                       # measured and cached
    assert path.is_file() and first.path == path
    again = load_cost(model, "tiny")                       # agrees with live forwards: read, not measured
    assert [s / again.seconds[0] for s in again.seconds] == pytest.approx([s / first.seconds[0] for s in first.seconds])
    CostModel(first.tokens, [100 * s for s in first.seconds]).save(path)   # poisoned
    healed = load_cost(model, "tiny")
    assert healed(1) < 10 * first(1) and json.loads(path.read_text())["seconds"] == healed.seconds


def test_a_cached_curve_is_read_at_the_level_live_forwards_give(monkeypatch, tmp_path):
    """A curve cached when the machine ran 1.3x slower (within the check's tolerance) keeps its shape and takes
    the live level: `auto` compares candidates' levels, cached at different times. The live check's timings are
    given (real ones carry more noise than a 1.3x step leaves room for)."""
    from lookahead.decoding import cost as costs
    monkeypatch.setenv("LOOKAHEAD_CACHE", str(tmp_path))
    path = costs.cost_path("tiny", torch.float32, "cpu")
    cached = CostModel([1, 8, 128], [0.065, 0.070, 0.26])
    cached.save(path)
    live = CostModel([1, 8], [0.050, 0.054])

    def check_only(model, tokens=costs.TOKENS, **kwargs):
        assert tuple(tokens) == (1, 8), "an agreeing cached curve is not measured again"
        return live

    monkeypatch.setattr(costs, "measure_cost", check_only)
    again = costs.load_cost(tiny_model("llama"), "tiny")
    assert again(1) == pytest.approx(0.050, rel=0.01) and again(8) == pytest.approx(0.054, rel=0.01)  # the live level
    assert again.ratio(128) == pytest.approx(cached.ratio(128))             # the cached shape
    assert again.path == path                                               # still corrected and saved there


def slow_forward(model, base_s: float, per_token_s: float = 0.0, per_token2_s: float = 0.0):
    """Make every forward of `model` over T query tokens sleep base_s + per_token_s * T + per_token2_s * T^2
    first: a cost curve we control, far above the tiny model's own time."""
    forward = model.forward

    @functools.wraps(forward)  # keeps the signature: the verifier reads the cache keyword from it
    def timed(*args, **kwargs):
        t = kwargs.get("input_ids", args[0] if args else None).numel()
        time.sleep(base_s + per_token_s * t + per_token2_s * t * t)
        return forward(*args, **kwargs)

    model.forward = timed
    return model


def test_measure_cost_sees_the_cost_of_a_forward():
    model = slow_forward(tiny_model("llama"), base_s=0.05, per_token_s=0.025)
    cost = measure_cost(model, tokens=(1, 4, 16), context=16, reps=2)
    # 75 ms, 150 ms, 450 ms plus the tiny model's own few ms (more on a loaded machine): ratios near 2 and 6
    assert 1.4 < cost.ratio(4) < 2.6 and 3.5 < cost.ratio(16) < 7 and cost.ratio(16) > cost.ratio(4) + 1.5


def test_engine_drafts_only_what_the_cost_curve_pays_for():
    model = tiny_model("llama", seed=1)
    expected = hf_greedy(model, COPY, 36)
    never = Engine(model, IdTokenizer(), DraftConfig(), cost=CostModel([1, 2], [1.0, 50.0]))
    never.sizing.guard = False          # the cost curve alone decides here,
    never.cost = None                   # and live forwards do not correct it
    out = never.generate(COPY, max_new_tokens=36)
    assert out.token_ids == expected
    probes = out.stats.steps // PROBE_EVERY
    assert out.stats.draft_tokens <= probes * PROBE_NODES  # only the periodic probes verified drafts
    free = Engine(model, IdTokenizer(), DraftConfig(), cost=CostModel([1, 2], [1.0, 1.0]))
    free.sizing.guard, free.cost = False, None
    out = free.generate(COPY, max_new_tokens=36)
    assert out.token_ids == expected and out.stats.mean_accepted > 2


def guarded_run(model, steps: int = 60) -> tuple[Engine, list[str]]:
    """Decode with a cost curve that claims verification is free; return each step's sizing decision."""
    engine = Engine(model, IdTokenizer(), DraftConfig(max_nodes=6, max_depth=6), cost=CostModel([1, 2], [1.0, 1.0]))
    engine.cost = None                      # the lie stays: nothing corrects it
    decoder = engine.decoder()
    kinds = []
    prompt = [3, 9, 4, 1, 7] * 3 + COPY      # the model's own continuation is learned as it goes
    while len(kinds) < steps:
        request = engine.request(prompt, max_new_tokens=40)
        decoder.add(request)
        while not request.done and len(kinds) < steps:
            decoder.step()
            kinds.append(decoder.report.choice.kind)
        decoder.remove([request])
    return engine, kinds


def test_never_slower_drafting_that_loses_switches_itself_off():
    """A forward over T tokens costs 3 ms * T^2 (worse than k single-token forwards, as eager bf16 on
    AVX2): trees of 7 tokens lose to plain steps even when every draft is right, whatever the (lying)
    cost curve says. The guard measures it and stops drafting."""
    model = slow_forward(tiny_model("llama", seed=1), base_s=0.0, per_token2_s=0.003)
    engine, kinds = guarded_run(model, steps=48)
    assert engine.sizing.drafting_loses(1)
    tail = kinds[-20:]
    assert tail.count("sized") <= 2 and tail.count("off") >= 15, kinds


def test_drafting_that_wins_stays_on():
    """Forwards cost 20 ms however many tokens they hold: drafting wins and the guard keeps it on."""
    model = slow_forward(tiny_model("llama", seed=1), base_s=0.02)
    engine, kinds = guarded_run(model)
    assert not engine.sizing.drafting_loses(1)
    assert kinds[-24:].count("sized") >= 20, kinds


def test_sizing_policy_without_a_curve_verifies_whole_trees():
    policy = SizingPolicy(cost=None, guard=False)
    assert policy.plan(1) is None and policy.choose([chain([0.1, 0.1])]).nodes is None


# -- dtype="auto": chosen from the CPU's capabilities and the measured cost ---------------------------
def test_auto_dtype_keeps_fp32_on_a_cpu_without_native_bf16(monkeypatch, tmp_path):
    from lookahead.engine import _auto_choice
    monkeypatch.setenv("LOOKAHEAD_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    model, reason, _ = _auto_choice(tiny_model("llama"), "cpu")
    assert next(model.parameters()).dtype == torch.float32 and "no native bf16" in reason


FAST, SLOW = [0.010, 0.011, 0.012, 0.013, 0.015], [0.010, 0.020, 0.040, 0.080, 0.160]   # SLOW: k tokens, k forwards


@pytest.mark.parametrize("curves, chosen, linears", [
    ({("float32", "eager"): [0.012, 0.016, 0.018, 0.02, 0.03], ("bfloat16", "eager"): FAST}, torch.bfloat16, "eager"),
    ({("float32", "eager"): [0.012, 0.016, 0.018, 0.02, 0.03], ("bfloat16", "eager"): SLOW}, torch.float32, "eager"),
    ({("float32", "eager"): [0.012, 0.016, 0.018, 0.02, 0.03], ("bfloat16", "eager"): SLOW,
      ("bfloat16", "packed"): [0.005, 0.006, 0.006, 0.007, 0.008]}, torch.bfloat16, "packed"),
    ({("float32", "eager"): FAST, ("float32", "packed"): [0.0098, 0.0105, 0.011, 0.012, 0.014]},  # < 10 % faster:
     torch.float32, "eager"),                                                                   # the exact one
])
def test_auto_dtype_picks_what_decodes_fastest_with_drafting(monkeypatch, tmp_path, curves, chosen, linears):
    from lookahead.decoding.cost import cost_path
    from lookahead.decoding.kernels import linear_kernels
    from lookahead.engine import _auto_choice
    monkeypatch.setenv("LOOKAHEAD_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    model = tiny_model("llama")
    model.config._name_or_path = "tiny"
    tokens, params = [1, 2, 4, 8, 16], sum(p.numel() for p in model.parameters())
    for dtype in (torch.float32, torch.bfloat16):                    # as measured on an earlier run
        for kind in ("eager", "packed"):
            seconds = curves.get((str(dtype).removeprefix("torch."), kind), [1.0] * 5)   # absent: very slow
            key = f"tiny-{params}" + ("-packed" if kind == "packed" else "")
            CostModel(tokens, seconds).save(cost_path(key, dtype, "cpu"))
    monkeypatch.setattr("lookahead.decoding.cost.agrees", lambda cached, live: True)  # and still true now,
    monkeypatch.setattr("lookahead.decoding.cost.at_level", lambda cached, live: cached)  # at the level cached

    def mark(kind):  # the choice is under test, not oneDNN (whose bf16 packing a CPU without bf16 lacks)
        return lambda m: setattr(m, "_lookahead_kernels", kind)
    monkeypatch.setattr("lookahead.engine.pack_linears", mark("packed"))
    monkeypatch.setattr("lookahead.engine.unpack_linears", mark("eager"))
    model, reason, cost = _auto_choice(model, "cpu")
    assert next(model.parameters()).dtype == chosen and linear_kernels(model) == linears, reason
    assert "measured tok/s with drafting" in reason and cost.seconds[0] == curves[
        (str(chosen).removeprefix("torch."), linears)][0]  # the engine gets the chosen candidate's curve


def test_the_guard_turns_drafting_back_on_when_a_trial_wins():
    from lookahead.decoding.sizing import Choice
    policy = SizingPolicy(cost=CostModel([1, 2], [1.0, 1.0]))
    for _ in range(4):                       # chat: drafted steps slower per token than plain ones
        policy.observe(Choice(4, "sized"), 1, 1, 0, 0.012)
        policy.observe(Choice(0, "plain"), 1, 1, 0, 0.010)
    assert policy.drafting_loses(1)
    kinds = []
    while "trial" not in kinds:
        plan = policy.plan(1)
        kinds.append("trial" if plan is None and policy.trial else plan.kind if plan else "draft")
    assert kinds.count("off") >= 1
    policy.observe(Choice(8, "sized"), 1, 6, 5, 0.015)   # a copy: 6 tokens in 15 ms beats 10 ms per token
    assert not policy.drafting_loses(1)


def in_a_trial(drafted_s: float) -> SizingPolicy:
    """A policy whose drafted steps took `drafted_s` for one token against plain steps' 10 ms (drafting off),
    advanced to the guard's drafted trial."""
    policy = SizingPolicy(cost=CostModel([1, 2], [1.0, 1.0]))
    for _ in range(4):
        policy.observe(Choice(4, "sized"), 1, 1, 0, drafted_s)
        policy.observe(Choice(0, "plain"), 1, 1, 0, 0.010)
    assert policy.drafting_loses(1)
    while not (policy.plan(1) is None and policy.trial):
        pass
    return policy


def test_a_trial_is_judged_on_its_steps_together_where_drafts_land_now_and_then():
    """Chat-like text: a drafted step costs 1.2 plain ones and most emit one token, some several. A trial's
    first step emitting one token does not end it: its next step is drafted too and the two are judged
    together (1 then 3 tokens, 24 ms: 6 ms a token against plain's 10), so drafting comes back on; judged on
    its first step alone, the trial would have lost and the wait doubled."""
    policy = in_a_trial(drafted_s=0.012)
    policy.observe(Choice(4, "sized"), 1, 1, 0, 0.012)    # the trial's first step: one token, slower alone
    assert policy.plan(1) is None and policy.trial           # the trial goes on
    policy.observe(Choice(4, "sized"), 1, 3, 2, 0.012)    # 4 tokens in 24 ms: 6 ms a token
    assert not policy.drafting_loses(1)
    assert policy.trial_every == PROBE_EVERY and not policy.trial_steps


def test_a_trial_whose_steps_cost_too_much_to_win_back_ends_after_one_step():
    """A drafted step that costs more than TRIAL_REACH plain steps' tokens (3x here) would need nearly every
    draft right to win: the trial ends at its first losing step and the wait doubles, as one-step trials did."""
    from lookahead.decoding.sizing import TRIAL_REACH
    policy = in_a_trial(drafted_s=0.030)
    before = policy.trial_every
    assert 0.030 > TRIAL_REACH * 0.010
    policy.observe(Choice(4, "sized"), 1, 2, 1, 0.030)    # 15 ms a token: lost, and no run of drafts is near
    assert policy.plan(1).kind == "off" and not policy.trial_steps
    assert policy.trial_every == 2 * before


def test_a_lucky_trial_in_a_losing_stretch_is_outvoted_by_the_next_drafted_steps():
    """One winning trial turns drafting back on; it counts as one sample, so when the text is still
    unpredictable the drafted steps after it switch drafting off again within a few steps (5 here;
    counted as GUARD_MIN samples, the lucky trial kept drafting on for 11)."""
    policy = in_a_trial(drafted_s=0.012)
    policy.observe(Choice(8, "sized"), 1, 4, 3, 0.012)     # lucky: 4 tokens in 12 ms
    assert not policy.drafting_loses(1)
    for _ in range(5):                                     # then chat again: 1 token per 12 ms
        policy.observe(Choice(4, "sized"), 1, 1, 0, 0.012)
    assert policy.drafting_loses(1)


def test_the_guard_judges_realised_tokens_per_second_where_drafts_land_now_and_then():
    """One drafted step in ten emits 7 tokens (13 ms), the other nine emit 1 (11 ms each): drafted steps
    give 112 ms for 16 tokens, 7 ms per token against plain's 10 ms. A mean of per-step times per token
    (10.1 ms) would switch drafting off; realised speed keeps it on at every step."""
    from lookahead.decoding.sizing import Choice
    policy = SizingPolicy(cost=CostModel([1, 2], [1.0, 1.0]))
    for _ in range(3):
        policy.observe(Choice(0, "plain"), 1, 1, 0, 0.010)
    for step in range(60):
        hit = step % 10 == 0
        policy.observe(Choice(8, "sized"), 1, 7 if hit else 1, 6 if hit else 0, 0.013 if hit else 0.011)
        assert not policy.drafting_loses(1), step


def test_rows_that_come_and_go_between_batch_sizes_still_get_the_guards_verdict():
    """Under load a batch flips between 3 and 4 rows (two batch-size classes), so neither class alone
    gathers GUARD_MIN plain steps for a long time; the guard judges all sizes pooled meanwhile."""
    from lookahead.decoding.sizing import Choice
    policy = SizingPolicy(cost=CostModel([1, 2, 4, 8], [0.010, 0.011, 0.012, 0.016]))
    for rows in (3, 4, 3, 4):                  # drafted steps 20 % slower per token than plain ones
        policy.observe(Choice(1, "sized"), rows, rows, 0, 1.2 * policy.cost(rows))
        policy.observe(Choice(0, "plain"), rows, rows, 0, policy.cost(rows))
    assert policy.drafting_loses(3) and policy.drafting_loses(4)
    assert policy.plan(4) == Choice(0, "off")


def test_steps_of_different_batch_sizes_compare_in_units_of_a_plain_steps_cost():
    """Plain steps seen only at 2 rows (10 ms a step), drafted ones only at 4 rows (a plain step there
    costs 20 ms; drafted steps emit one token per row in 18 ms): drafting wins by 10 %, although raw
    seconds per token (18 ms vs 10 ms) would say it loses."""
    from lookahead.decoding.sizing import Choice
    policy = SizingPolicy(cost=CostModel([1, 2, 4], [0.008, 0.010, 0.020]))
    for _ in range(4):
        policy.observe(Choice(0, "plain"), 2, 2, 0, 0.010)
        policy.observe(Choice(2, "sized"), 4, 4, 0, 0.018)
    assert policy.advantage(4) == pytest.approx(20 / 18) and not policy.drafting_loses(2)


def test_the_guard_switches_drafting_off_when_drafted_steps_are_even_slightly_slower():
    """No tolerance on the way off: drafted steps 1 % slower per token than plain ones lose."""
    from lookahead.decoding.sizing import Choice
    policy = SizingPolicy(cost=CostModel([1, 2], [0.010, 0.011]))
    for _ in range(4):
        policy.observe(Choice(2, "sized"), 1, 1, 0, 0.0101)
        policy.observe(Choice(0, "plain"), 1, 1, 0, 0.0100)
    assert policy.drafting_loses(1)


def test_plain_steps_feed_the_trie_but_do_not_pay_for_the_recycle_table():
    """With drafting off (the guard's verdict) a step costs what a no-draft step costs: the recycle table's
    top-k over the vocabulary is skipped; the trie still learns the output."""
    from lookahead.decoding.sizing import Choice
    learned = []
    for new_tokens in (1, 12):
        engine = Engine(tiny_model("llama", seed=1), IdTokenizer(), DraftConfig())
        engine.sizing.plan = lambda rows, copy_run=0: Choice(0, "off")
        engine.generate(COPY, max_new_tokens=new_tokens)
        learned.append(len(engine.state.trie))
    assert not engine.state.recycle.probs.any() and learned[1] > learned[0]
    engine.sizing.plan = lambda rows, copy_run=0: None              # drafting on: the table learns
    engine.generate(COPY, max_new_tokens=12)
    assert engine.state.recycle.probs.any()


def test_the_guards_trial_verifies_a_draft_even_where_the_calibration_says_it_would_not_pay():
    """With drafting switched off, a trial is what can turn it back on: a trial whose cut is empty (cold or
    pessimistic calibration) could never win, so it verifies a probe's worth; with nothing drafted at all,
    the trial is tried again at the next step instead of counting as lost."""
    from lookahead.decoding.sizing import Choice
    policy = SizingPolicy(cost=CostModel([1, 2, 16], [0.010, 0.020, 0.030]))
    for _ in range(4):
        policy.observe(Choice(2, "sized"), 1, 1, 0, 0.020)
        policy.observe(Choice(0, "plain"), 1, 1, 0, 0.010)
    assert policy.drafting_loses(1)
    kinds = []
    while not policy.trial:
        kinds.append(policy.plan(1))
    assert all(k is not None and k.kind in ("off", "plain") for k in kinds[:-1]) and kinds[-1] is None
    assert policy.choose([chain([0.05] * 8)]).nodes == PROBE_NODES      # best_cut alone would verify none
    waited = policy.trial_every
    policy.choose([chain([])])
    policy.observe(Choice(0, "sized"), 1, 1, 0, 0.010)                 # nothing was drafted to try
    assert policy.trial_every == waited and policy.plan(1) is None and policy.trial


def test_a_probe_or_trial_costs_a_batch_no_more_than_it_costs_a_lone_request():
    """Every row is padded to the largest cut: a lone request's 4-node probe is 1.06x its plain step on this
    curve, the same probe over 8 rows would be 40 query tokens, 4.6x theirs; cut to 1 node a row (1.9x)."""
    from lookahead.decoding.sizing import Choice
    cost = CostModel([1, 8, 64], [1.0, 1.1, 8.0])                # flat to 8 query tokens, then linear
    weak = chain([0.0] * 8)                                      # no cut pays: only probes verify
    for rows, nodes in ((1, PROBE_NODES), (2, 2), (4, 1), (8, 1)):
        policy = SizingPolicy(cost=cost)
        probe = [policy.choose([weak] * rows) for _ in range(PROBE_EVERY)][-1]
        assert probe.kind == "probe" and probe.nodes == nodes, (rows, probe)
    policy = SizingPolicy(cost=cost)
    for _ in range(4):                                           # drafting measured slower: off, then a trial
        policy.observe(Choice(2, "sized"), 8, 8, 0, 2.0)
        policy.observe(Choice(0, "plain"), 8, 8, 0, 1.0)
    while not policy.trial:
        policy.plan(8)
    assert policy.choose([weak] * 8).nodes == 1
    assert policy.choose([weak]).nodes == PROBE_NODES           # the same trial for a lone request


def test_a_probe_that_does_not_pay_for_its_own_forward_doubles_the_wait():
    """One accepted token pays a lone request's probe on a flat curve; in a batch of 8 one row's token does not
    pay the probe's 1.9x forward, so the next probe waits twice as long instead of coming back at once."""
    from lookahead.decoding.sizing import Choice
    cost = CostModel([1, 8, 64], [1.0, 1.1, 8.0])
    lone, batch = SizingPolicy(cost=cost, probe_every=16), SizingPolicy(cost=cost, probe_every=16)
    lone.observe(Choice(PROBE_NODES, "probe"), 1, 2, 1, 1.0)
    batch.observe(Choice(1, "probe"), 8, 9, 1, 2.0)
    assert lone.probe_every == PROBE_EVERY and batch.probe_every == 32
    batch.observe(Choice(1, "probe"), 8, 16, 8, 2.0)               # every row accepted: it paid
    assert batch.probe_every == PROBE_EVERY


def test_a_joining_request_gets_a_trial_at_once_while_drafting_is_off_unless_one_of_many():
    from lookahead.decoding.sizing import Choice
    policy = SizingPolicy(cost=CostModel([1, 2, 16], [0.010, 0.020, 0.030]))
    for _ in range(4):
        policy.observe(Choice(2, "sized"), 1, 1, 0, 0.020)
        policy.observe(Choice(0, "plain"), 1, 1, 0, 0.010)
    policy.trial_every = 64                          # after a long losing stretch
    assert policy.plan(1).kind == "off"
    policy.new_text(16)                              # one row of sixteen: no trial for it
    assert policy.plan(16).kind == "off"
    policy.new_text()
    assert policy.plan(1) is None and policy.trial


def test_a_row_that_copies_its_context_gets_a_trial_while_drafting_is_off():
    """With drafting off after a long losing stretch, a row copying COPY_TRIAL tokens in a row (the text became
    predictable) gets a trial after PROBE_EVERY off steps instead of PROBE_MAX; a short run does not."""
    from lookahead.decoding.sizing import COPY_TRIAL, PROBE_MAX, Choice
    policy = SizingPolicy(cost=CostModel([1, 2, 16], [0.010, 0.020, 0.030]))
    for _ in range(4):
        policy.observe(Choice(2, "sized"), 1, 1, 0, 0.020)
        policy.observe(Choice(0, "plain"), 1, 1, 0, 0.010)
    policy.trial_every = PROBE_MAX

    def steps_to_trial(copy_run: int) -> int:
        policy.off = 0
        for step in range(1, 2 * PROBE_MAX):
            if policy.plan(1, copy_run) is None and policy.trial:
                return step
        raise AssertionError("no trial")

    assert steps_to_trial(COPY_TRIAL - 1) > PROBE_MAX - 1                 # the plain steps come on top
    assert PROBE_MAX // 4 <= steps_to_trial(COPY_TRIAL) <= PROBE_MAX // 4 + 1


def test_the_guards_plain_step_waits_while_a_row_is_copying():
    """A plain step inside a copy gives up a whole chain; it is taken later (at most twice its period)."""
    from lookahead.decoding.sizing import MIN_RUN, PLAIN_EVERY_COLD
    for copy_run, first in ((0, PLAIN_EVERY_COLD), (MIN_RUN, 2 * PLAIN_EVERY_COLD)):
        policy = SizingPolicy(cost=CostModel([1, 2], [1.0, 1.0]))
        plans = [policy.plan(1, copy_run) for _ in range(2 * PLAIN_EVERY_COLD)]
        assert [i + 1 for i, p in enumerate(plans) if p is not None][0] == first, (copy_run, plans)


def test_the_guards_plain_step_waits_while_drafts_land():
    """A plain step right after a step whose drafts landed gives up the next chain (traced on a Qwen2.5-Coder-1.5B
    edit: the cold guard's plain steps there made one answer take 15 steps instead of 10). It is taken at the first
    step after one whose drafts missed, or at twice its period."""
    from lookahead.decoding.sizing import PLAIN_EVERY_COLD
    for emitted, first in (([1] * 8, PLAIN_EVERY_COLD), ([3] * 8, 2 * PLAIN_EVERY_COLD),
                           ([3, 3, 3, 3, 3, 1, 3, 3], 7)):
        policy = SizingPolicy(cost=CostModel([1, 2], [1.0, 1.0]))
        plain_at = []
        for step, tokens in enumerate(emitted, start=1):
            choice = policy.plan(1) or Choice(4, "sized")
            if choice.plain:
                plain_at.append(step)
                tokens = 1
            policy.observe(choice, 1, tokens, tokens - 1, 1.0)
        assert plain_at[:1] == [first], (emitted, plain_at)


def test_the_guards_plain_steps_come_sooner_until_it_has_a_verdict():
    """A losing start (8 rows that do not copy) is judged after GUARD_MIN plain steps: they come every
    PLAIN_EVERY_COLD steps until then, every PLAIN_EVERY after."""
    from lookahead.decoding.sizing import GUARD_MIN, PLAIN_EVERY, PLAIN_EVERY_COLD
    assert PLAIN_EVERY_COLD < PLAIN_EVERY
    policy = SizingPolicy(cost=CostModel([1, 8, 16], [1.0, 1.0, 1.0]))
    plain_at = []
    for step in range(1, 6 * PLAIN_EVERY):
        choice = policy.plan(8) or Choice(1, "sized")
        if choice.plain:
            plain_at.append(step)
        policy.observe(choice, 8, 8 if choice.plain else 9, 0 if choice.plain else 1, 1.0)  # drafting wins a bit
    assert plain_at[:GUARD_MIN] == [PLAIN_EVERY_COLD * (i + 1) for i in range(GUARD_MIN)], plain_at
    assert plain_at[GUARD_MIN] - plain_at[GUARD_MIN - 1] == PLAIN_EVERY, plain_at


def test_steps_of_requests_that_do_not_draft_are_plain_steps_for_the_guard():
    """draft=False requests never draft: their steps must not be counted as drafted ones (they would make
    drafting look as cheap as plain decoding)."""
    engine = Engine(tiny_model("llama", seed=1), IdTokenizer(), DraftConfig(), cost=CostModel([1, 2], [1.0, 1.0]))
    engine.generate(COPY, max_new_tokens=12, draft=False)
    assert engine.sizing.speeds and not any(drafted for _, drafted in engine.sizing.speeds)


def test_a_packed_batchs_drafts_end_where_no_node_could_pay():
    """`least`: in a packed batch a node must bring about what a draft token costs over a row's plain token; the
    drafters stop building there, and the cut over the shorter trees is the cut over the whole ones. One row,
    a guard trial and a probe verify nodes that do not pay: there trees are built whole (least 0)."""
    rows, cost = 8, CostModel([1, 2, 4, 8, 16, 32, 64], [4.5, 5.0, 6.0, 8.0, 12.0, 20.0, 36.0])  # 0.5 a token
    policy = SizingPolicy(cost)
    least = policy.least(rows, 12)
    assert least == pytest.approx(0.25)  # WORTH_SLACK x a token's cost (0.5) over a row's share of a plain step (1)
    assert policy.least(1, 12) == 0.0
    policy.trial = True
    assert policy.least(rows, 12) == 0.0
    policy.trial, policy.idle = False, policy.probe_every - 1
    assert policy.least(rows, 12) == 0.0
    gen = torch.Generator().manual_seed(0)
    differ = 0
    for _ in range(200):
        trees = [chain(sorted(torch.rand(12, generator=gen).pow(0.3).tolist(), reverse=True)) for _ in range(rows)]
        for t in trees:
            t.expected[1:] = [e if torch.rand(1, generator=gen) < 0.8 else e / 4 for e in t.expected[1:]]
        pruned = []
        for t in trees:
            floors = [min(t.expected[1:i + 1]) for i in range(1, len(t))]
            pruned.append(t.prefix(1 + sum(f >= least for f in floors)))
        whole = best_cuts(trees, cost)
        assert best_cuts(pruned, cost) == whole
        differ += any(len(p) < len(t) for p, t in zip(pruned, trees, strict=True)) and any(whole)
    assert differ > 50  # pruned trees, and cuts that draft: the comparison was not vacuous


def test_a_static_batch_is_judged_by_its_furthest_behind_rows():
    """With nothing waiting to take a finished row's place, a batch ends when its furthest-behind row does: the cut
    is judged by what those rows expect, and the guard credits each step, for every row, with how much closer that
    end came (measured, 16 mixed prompts in one generate_batch: crediting each row its own, drafting ran 0.89-0.93x
    of draft=False). A server's batch is not static: there each row counts its own tokens."""
    model, credited, counted = tiny_model("llama", seed=1), [], []
    for static in (True, False):
        engine = Engine(model, IdTokenizer(), DraftConfig(), cost=CostModel([1, 2], [1.0, 1.0]))
        observe, choose = engine.sizing.observe, engine.sizing.choose

        def record(choice, rows, emitted, *args, observe=observe, **kwargs):
            credited.append(emitted)
            observe(choice, rows, emitted, *args, **kwargs)

        def cut(trees, tail=0, rows=None, packed=False, choose=choose):
            counted.append(rows)
            return choose(trees, tail, rows, packed)

        engine.sizing.observe, engine.sizing.choose = record, cut
        decoder = engine.decoder()
        requests = [engine.request(prompt, max_new_tokens=40) for prompt in (COPY, [40, 41, 42, 43, 44, 45] * 3)]
        for request in requests:
            decoder.add(request)
        uneven = cuts = ahead = 0
        while True:
            decoder.static = static
            before = [(r.room, len(r.ids)) for r in requests]
            credited.clear()
            counted.clear()
            decoder.step()
            if any(r.done for r in requests):  # a finishing row's tokens may be cut at its limit
                break
            emitted = [len(r.ids) - n for r, (_, n) in zip(requests, before, strict=True)]
            most = max(room for room, _ in before)
            behind = [i for i, (room, _) in enumerate(before) if room == most]
            closer = most - max(room - n for (room, _), n in zip(before, emitted, strict=True))
            assert credited == [2 * closer if static else sum(emitted)]
            ahead += static and closer < min(emitted[i] for i in behind)  # a behind row went past the next one
            assert counted in ([], [behind if static else None])  # [] where the guard planned a plain step
            uneven += emitted[0] != emitted[1]
            cuts += bool(counted)
        assert uneven and cuts  # the rows did progress apart, where the two ways of judging differ
        assert ahead or not static  # and the end came less close than the furthest-behind rows' tokens say


def test_a_static_batch_is_cut_by_the_least_its_furthest_behind_rows_expect():
    """A copying row's drafts pay where others take its place as it leaves; in a static batch they only let it leave
    sooner while every row pays for the padded cut (measured, 16 mixed prompts in one generate_batch: drafting at
    0.91-0.92x of draft=False cut by every row's expected tokens, 0.92-0.95x by the least of the furthest-behind
    rows')."""
    cost = CostModel([1, 2, 16], [1.0, 1.2, 2.0])
    copying, chatting = chain([0.95, 0.9, 0.9, 0.85]), chain([0.05, 0.02, 0.01, 0.01])
    assert best_cut([copying, chatting], cost) > 0                 # the two rows' tokens together pay
    assert best_cut([copying, chatting], cost, counted=[0, 1]) == 0  # the chatting row decides the batch's end
    assert best_cut([copying, chatting], cost, counted=[0]) == best_cut([copying, copying], cost) > 0


def test_packed_rows_are_cut_each_on_its_own():
    """Where a forward costs its real tokens, the copying row drafts deep and the chatting row drafts nothing;
    padded, every row pays the largest cut, so both get the same one."""
    cost = CostModel([1, 2, 4, 8, 16, 32], [1.0, 1.05, 1.1, 1.3, 1.8, 3.0])
    copying, chatting = chain([0.95, 0.9, 0.9, 0.85, 0.8, 0.8]), chain([0.1, 0.05, 0.01])
    assert best_cuts([copying, chatting, chatting, chatting], cost) == [6, 0, 0, 0]
    assert best_cut([copying, chatting, chatting, chatting], cost) < 6
    # The likeliest nodes wherever they are: a node below a doubtful one counts at most as that one.
    dip = chain([0.2, 0.9, 0.9])
    assert best_cuts([dip, copying], CostModel([1, 2, 8], [1.0, 1.0, 1.4])) == [0, 6]


def test_a_batch_forward_teaches_what_rows_and_their_drafts_cost_not_the_one_row_curve():
    """Fifteen rows of one token cost more than one row of fifteen (each row attends to its own keys), and a
    batch's draft tokens more than the one-row curve's slope says: batch forwards learn both, and the one-row
    curve that single requests are sized on stays."""
    cost = CostModel([1, 16, 64], [0.010, 0.020, 0.044])   # one row: 0.5 ms a token from 16 on
    curve = [cost(t) for t in (1, 8, 16, 32)]
    plain = 0.0195 + 14 * 0.0005                          # t(15) on the curve, plus 0.5 ms for each row past one
    for _ in range(50):
        cost.observe(15, plain, rows=15)
        cost.observe(31, plain + 2 * (cost(31) - cost(15)), rows=15)  # drafts: twice the curve's slope
    assert [cost(t) for t in (1, 8, 16, 32)] == curve
    assert cost.per_row == pytest.approx(0.0005, rel=0.05) and cost.marginal == pytest.approx(2.0, rel=0.05)
    assert cost(15, 15) == pytest.approx(plain, rel=0.02)
    assert cost(47, 15) - cost(15, 15) == pytest.approx(2 * (cost(47) - cost(15)), rel=0.05)
    assert cost(1, 1) == cost(1)


def test_a_batch_cut_is_judged_by_what_its_expected_tokens_realised():
    """Picking the likeliest nodes across rows picks estimates that run high: a batch's accepted over expected
    draft tokens scales what its cut expects (never up); a single request's cut reads its calibration as is."""
    policy = SizingPolicy(cost=CostModel([1, 2, 4, 16, 64], [1.0, 1.05, 1.1, 1.5, 3.0]))
    trees = [chain([0.6, 0.5, 0.4]) for _ in range(4)]
    assert policy.choose(trees).nodes > 0 and policy.realised == 1.0
    for _ in range(3):
        choice = policy.choose(trees)
        policy.observe(choice, 4, 4 + 12, 12, 1.0)       # as expected (4 x 1.5) or better: trusted as is
    assert policy.realised == 1.0 and policy.choose(trees).nodes > 0
    for _ in range(40):
        choice = policy.choose(trees)
        if not choice.nodes:
            break
        policy.observe(choice, 4, 4, 0, 1.0)            # nothing accepted: the estimates ran high
    assert policy.realised < 0.2 and policy.choose(trees).nodes == 0
    assert policy.choose(trees[:1]).nodes > 0             # a lone request: unchanged


def test_a_static_packed_batch_drafts_only_its_furthest_behind_rows():
    """The batch ends with its furthest-behind rows; packed, another row's draft would cost the step its tokens
    and only let that row leave sooner: it verifies its root alone."""
    engine = Engine(tiny_model("llama", seed=1), IdTokenizer(), DraftConfig(), cost=CostModel([1, 2], [1.0, 1.0]))
    decoder = engine.decoder()
    assert decoder.verifier.packs
    requests = [engine.request(prompt, max_new_tokens=40) for prompt in (COPY, COPY[3:] + [40, 41])]
    for request in requests:
        decoder.add(request)
    verify, seen = decoder.verifier.verify, []
    decoder.verifier.verify = lambda trees: seen.append([len(t) for t in trees]) or verify(trees)
    ahead = 0
    while not any(r.done for r in requests):
        decoder.static = True
        rooms = [r.room for r in requests]
        decoder.step()
        if rooms[0] != rooms[1]:
            behind = rooms.index(max(rooms))
            assert seen[-1][1 - behind] == 1
            ahead += 1
    assert ahead and any(max(sizes) > 1 for sizes in seen)


def test_flat_span_is_how_much_wider_a_tree_costs_next_to_nothing():
    assert flat_span(CostModel([1, 16, 128], [1.0, 1.0, 1.05]), 13) == 4        # a GPU: flat to 128 tokens
    assert flat_span(CostModel([1, 32, 64], [1.0, 1.0, 2.0]), 13) == 2         # flat to 32, then steep
    assert flat_span(CostModel([1, 2, 16, 128], [1.0, 1.6, 1.9, 6.0]), 13) == 1  # a CPU
