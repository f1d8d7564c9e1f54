"""Our proposer inside vLLM on the real embedded SmolLM2-135M-Instruct (fp32, greedy)."""
from __future__ import annotations

from conftest import TRIE_CAPACITY, counters, read_metrics
from real_prompts import CHAT, CODE, COPY

from vllm import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=96)
PROMPTS = [[{"role": "user", "content": p}] for p in CHAT[:8] + COPY[:10] + CODE[:6]]  # 24


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_greedy_output_is_identical_to_vllm_without_speculation(reference, lookahead_llm):
    expected = token_ids(reference.chat(PROMPTS, GREEDY, use_tqdm=False))
    got = token_ids(lookahead_llm.chat(PROMPTS, GREEDY, use_tqdm=False))
    different = [i for i, (a, b) in enumerate(zip(expected, got, strict=True)) if a != b]
    assert not different, f"{len(different)}/{len(PROMPTS)} prompts differ: {different}"
    assert sum(map(len, got)) > 40 * len(got)  # real answers, not empty ones


def test_copy_heavy_prompts_accept_more_than_one_token_per_step(lookahead_llm):
    before = counters(lookahead_llm)
    lookahead_llm.chat([[{"role": "user", "content": p}] for p in COPY], GREEDY, use_tqdm=False)
    after = counters(lookahead_llm)
    generated = after["generation_tokens"] - before["generation_tokens"]
    accepted = after["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
    # Each request-step emits one token of the model's own plus the accepted drafts.
    per_step = generated / (generated - accepted)
    print(f"copy prompts: {per_step:.2f} tokens per step")
    assert per_step > 1.3


def test_concurrent_requests_keep_their_own_outputs(reference, lookahead_llm):
    # One long shared prefix, different questions: rows a proposer mixed up would draft the wrong text.
    prefix = COPY[0]
    questions = ["Now count its words.", "Which country is mentioned first?", "Translate it to German.",
                 "Give it a title.", "List the cities.", "How long is the river?", "Rewrite it in the past tense.",
                 "Make it one sentence."]
    prompts = [[{"role": "user", "content": f"{prefix}\n\n{q}"}] for q in questions]
    one_by_one = [token_ids(reference.chat([p], GREEDY, use_tqdm=False))[0] for p in prompts]
    together = token_ids(lookahead_llm.chat(prompts, GREEDY, use_tqdm=False))
    assert together == one_by_one
    assert len({tuple(ids) for ids in together}) > 4  # the answers do differ from each other


def test_shared_trie_stays_within_its_bound_and_counters_are_exported(lookahead_llm, metrics_file):
    lookahead_llm.chat(PROMPTS[:8], GREEDY, use_tqdm=False)
    metrics = read_metrics(metrics_file)
    assert 0 < metrics["trie_nodes"] <= TRIE_CAPACITY == metrics["trie_capacity_nodes"]
    assert metrics["trie_bytes_estimate"] <= TRIE_CAPACITY * 320
    for source in ("prompt", "history", "ngram"):
        assert metrics[f'source_proposed{{source="{source}"}}'] > 0
    assert metrics['source_accepted{source="prompt"}'] > 0
    assert metrics["accepted_tokens"] > 0 and metrics["steps"] > 0
