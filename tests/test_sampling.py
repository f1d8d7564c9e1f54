"""Sampling and logits processors: per-path processing, equality with model.generate, seeds, errors."""
from __future__ import annotations

import pytest
import torch

from conftest import FIXED, IdTokenizer, tiny_model
from lookahead import DraftTree, Engine, SamplingParams
from lookahead.decoding.accept import accept_walk
from lookahead.decoding.sampling import PresenceFrequencyPenalty, Sampler

PROMPT = [5, 9, 12, 7, 30, 5, 9, 12, 7, 30, 5, 9]
VOCAB = 96


def hf(model, ids: list[int], new: int, seed: int | None = None, **kwargs) -> list[int]:
    """Reference: transformers' own generate (its sampler draws from the global generator)."""
    x = torch.tensor([ids])
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, **kwargs)[0, len(ids):].tolist()


# -- processors see each node's own path ---------------------------------------------------
#    root 5 ─┬─ a=1 ── x=3   (node 3: path 5 1 3)
#            └─ b=2 ── x=3   (node 4: path 5 2 3)
TREE = DraftTree([5, 1, 2, 3, 3], [-1, 0, 0, 1, 2])


def test_repetition_penalty_differs_between_branches_that_share_a_token():
    sampler = SamplingParams(repetition_penalty=2.0).sampler(tiny_model("llama"), prompt_len=1, eos_ids=[])
    raw = torch.zeros(VOCAB)
    raw[1] = raw[2] = 4.0
    via_a = sampler.process([5, 1, 3], raw)  # node 3
    via_b = sampler.process([5, 2, 3], raw)  # node 4: same token, same logits, other history
    assert (via_a[1], via_a[2]) == (2.0, 4.0)
    assert (via_b[1], via_b[2]) == (4.0, 2.0)


def test_walk_processes_visited_nodes_only_each_with_its_path():
    sampler = SamplingParams(repetition_penalty=1000.0).sampler(tiny_model("llama"), prompt_len=1, eos_ids=[])
    logits = torch.zeros(len(TREE), VOCAB)
    logits[0, 2] = 10.0                      # root -> b
    logits[2, 3] = 10.0                      # b -> x (node 4)
    logits[3:, 2], logits[3:, 1] = 10.0, 9.0  # at x: 2 is best unless penalised; then 1
    seen = []

    def process(ids, row):
        seen.append(list(ids))
        return Sampler.process(sampler, ids, row)

    sampler.process = process
    nodes, tokens = sampler.accept(TREE, logits, [5])
    assert nodes == [0, 2, 4]
    assert seen == [[5], [5, 2], [5, 2, 3]]  # node 1 and node 3 never processed
    # On path 5 2 3 token 2 is penalised, token 1 is not: the bonus token is 1. (Penalising the
    # flat tree, i.e. tokens 1, 2, 3 and 5, would have emitted 0.)
    assert tokens == [2, 3, 1]


def test_siblings_with_the_same_token_share_one_draw():
    tree = DraftTree([5, 7, 7, 8], [-1, 0, 0, 2])  # two children carry 7; only the second goes on to 8
    draws = []

    def choose(ids, row):
        draws.append(list(ids))
        return int(row.argmax())

    logits = torch.zeros(len(tree), VOCAB)
    logits[:, 7] = 1.0
    nodes, tokens = accept_walk(tree, logits, [5], choose)
    assert nodes == [0, 1] and tokens == [7, 7] and draws == [[5], [5, 7]]


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    proc = PresenceFrequencyPenalty(presence=0.5, frequency=0.25, prompt_len=2)
    scores = proc(torch.tensor([[4, 4, 4, 6, 6]]), torch.zeros(1, 8))[0]
    assert scores[4] == -0.75 and scores[6] == -1.0 and scores[0] == 0.0  # 4 once, 6 twice after the prompt


# -- equality with model.generate() on tiny models, drafts accepted -------------------------
GREEDY_SETTINGS = [
    dict(repetition_penalty=1.5),
    dict(repetition_penalty=0.7),  # < 1 rewards repeats: long drafts get accepted
    dict(no_repeat_ngram_size=2),
    dict(bad_words_ids=[[7], [30, 5]]),
    dict(repetition_penalty=1.2, no_repeat_ngram_size=3, bad_words_ids=[[9]]),
]


@pytest.mark.parametrize("settings", GREEDY_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_greedy_with_processors_equals_model_generate(settings):
    model = tiny_model("llama")
    engine = Engine(model, IdTokenizer(), FIXED)
    expected = hf(model, PROMPT, 16, do_sample=False, **settings)
    engine.generate(PROMPT, max_new_tokens=16, **settings)  # the trie learns the output: drafts accepted
    out = engine.generate(PROMPT, max_new_tokens=16, **settings)
    assert out.token_ids == expected
    assert out.stats.mean_accepted > 1.5


def test_processors_equal_model_generate_on_every_architecture(arch):
    settings = dict(repetition_penalty=1.3, no_repeat_ngram_size=3, bad_words_ids=[[7], [30, 5]])
    model = tiny_model(arch)
    engine = Engine(model, IdTokenizer(), FIXED)
    expected = hf(model, PROMPT, 16, do_sample=False, **settings)
    engine.generate(PROMPT, max_new_tokens=16, **settings)
    out = engine.generate(PROMPT, max_new_tokens=16, **settings)
    assert out.token_ids == expected and out.stats.mean_accepted > 1.5


def test_min_new_tokens_counts_the_path_of_each_node():
    model = tiny_model("gemma3")
    model.generation_config.eos_token_id = hf(model, PROMPT, 1)[0]  # greedy stops after one token
    engine = Engine(model, IdTokenizer(), FIXED)
    assert len(engine.generate(PROMPT, max_new_tokens=20).token_ids) == 1
    expected = hf(model, PROMPT, 20, min_new_tokens=6)
    assert len(expected) > 6
    engine.generate(PROMPT, max_new_tokens=20, min_new_tokens=6)
    out = engine.generate(PROMPT, max_new_tokens=20, min_new_tokens=6)
    assert out.token_ids == expected and out.stats.mean_accepted > 1.5


def test_presence_frequency_equal_model_generate_with_the_same_processor():
    model = tiny_model("qwen3")
    engine = Engine(model, IdTokenizer(), FIXED)
    proc = PresenceFrequencyPenalty(0.8, 0.4, prompt_len=len(PROMPT))
    expected = hf(model, PROMPT, 20, do_sample=False, logits_processor=[proc])
    engine.generate(PROMPT, max_new_tokens=20, presence_penalty=0.8, frequency_penalty=0.4)
    assert engine.generate(PROMPT, max_new_tokens=20, presence_penalty=0.8, frequency_penalty=0.4).token_ids == expected


SAMPLE_SETTINGS = [
    dict(do_sample=True),  # transformers' default top_k=50
    dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=0),
    dict(do_sample=True, temperature=1.3, min_p=0.05, repetition_penalty=1.3),
]


@pytest.mark.parametrize("settings", SAMPLE_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_seeded_sampling_draws_what_model_generate_draws(settings):
    """One draw per emitted token from a per-request generator: with the same seed, transformers'
    sampler, plain decoding and tree decoding make the same draws from the same distributions."""
    model = tiny_model("llama")
    engine = Engine(model, IdTokenizer(), FIXED)
    for seed in (1, 2):
        expected = hf(model, PROMPT, 24, seed=seed, **settings)
        first = engine.generate(PROMPT, max_new_tokens=24, seed=seed, **settings)
        plain = engine.generate(PROMPT, max_new_tokens=24, draft=False, seed=seed, **settings)
        drafted = engine.generate(PROMPT, max_new_tokens=24, seed=seed, **settings)
        assert first.token_ids == plain.token_ids == drafted.token_ids == expected
        assert drafted.stats.mean_accepted > 1.5  # the trie learned this output from the first run


def test_same_seed_same_output_other_seed_other_output():
    engine = Engine(tiny_model("qwen2"), IdTokenizer(), FIXED)
    runs = [engine.generate(PROMPT, max_new_tokens=16, do_sample=True, seed=s).token_ids for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]
    params = SamplingParams(do_sample=True, temperature=0.8, seed=7)
    stream = engine.stream(PROMPT, max_new_tokens=16, sampling=params)
    list(stream)
    assert stream.output.token_ids == engine.generate(PROMPT, max_new_tokens=16, sampling=params).token_ids


def test_temperature_zero_is_greedy():
    engine = Engine(tiny_model("llama"), IdTokenizer(), FIXED)
    greedy = engine.generate(PROMPT, max_new_tokens=12).token_ids
    assert engine.generate(PROMPT, max_new_tokens=12, do_sample=True, temperature=0.0).token_ids == greedy


# -- parameters -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
    ("top_k", 2.5), ("min_p", 1.5), ("repetition_penalty", 0.0), ("presence_penalty", 3.0),
    ("frequency_penalty", -2.5), ("no_repeat_ngram_size", -1), ("bad_words_ids", [[]]), ("bad_words_ids", [3]),
    ("bad_words_ids", [[-1]]), ("min_new_tokens", -2), ("seed", -1), ("seed", "abc"), ("do_sample", "yes"),
])
def test_invalid_parameters_name_the_parameter(name, value):
    engine = Engine(tiny_model("llama"), IdTokenizer(), FIXED)
    with pytest.raises(ValueError, match=name):
        engine.generate(PROMPT, max_new_tokens=4, **{"do_sample": True, name: value})
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


def test_unknown_parameters_are_refused_with_a_suggestion():
    engine = Engine(tiny_model("llama"), IdTokenizer(), FIXED)
    with pytest.raises(ValueError, match="unknown generation parameter 'temprature'.*did you mean 'temperature'"):
        engine.generate(PROMPT, temprature=0.5)
    with pytest.raises(ValueError, match="unknown generation parameter 'num_beams'"):
        engine.stream(PROMPT, num_beams=4)


def test_bad_word_outside_the_vocabulary_fails_at_the_call():
    engine = Engine(tiny_model("llama"), IdTokenizer(), FIXED)
    with pytest.raises(ValueError, match="bad_words_ids"):
        engine.stream(PROMPT, bad_words_ids=[[VOCAB + 5]])


def test_sampling_only_settings_without_do_sample_warn():
    with pytest.warns(UserWarning, match="do_sample is False, so temperature is ignored"):
        SamplingParams(temperature=0.7)


def test_numbers_are_normalised_for_transformers():
    params = SamplingParams(repetition_penalty=2, temperature=1, seed=torch.tensor(3).numpy()[()])
    assert isinstance(params.repetition_penalty, float) and isinstance(params.temperature, float)
    assert type(params.seed) is int
    Engine(tiny_model("llama"), IdTokenizer(), FIXED).generate(PROMPT, max_new_tokens=2, sampling=params)


def test_params_from_a_generation_config():
    from transformers import GenerationConfig
    params = SamplingParams.from_generation_config(
        GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95, top_k=20, repetition_penalty=1.05), seed=3)
    assert (params.do_sample, params.temperature, params.top_p, params.top_k, params.seed) == (True, 0.6, 0.95, 20, 3)
    assert params.repetition_penalty == 1.05 and params.min_p is None
