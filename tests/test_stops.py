"""Stops inside an accepted draft chunk cut the output exactly where plain decoding stops."""
from __future__ import annotations

import pytest

from conftest import FIXED, IdTokenizer, hf_greedy, tiny_model
from lookahead import Engine

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12] * 3 + [5, 6]


def warmed_engine(model) -> Engine:
    """An engine whose shared trie already holds this prompt's output, so whole chunks get accepted."""
    engine = Engine(model, IdTokenizer(), FIXED)
    engine.generate(PROMPT, max_new_tokens=40)
    return engine


def test_eos_inside_an_accepted_chunk_stops_there():
    model = tiny_model("llama", seed=1)
    free = hf_greedy(model, PROMPT, 40)
    k = 20
    eos = free[k]
    first = free.index(eos)  # generation stops at the first occurrence
    engine = warmed_engine(model)
    engine.eos_ids = {eos}
    out = engine.generate(PROMPT, max_new_tokens=40)
    assert out.token_ids == hf_greedy(model, PROMPT, 40, eos_token_id=eos) == free[: first + 1]
    assert out.finish_reason == "stop"
    assert out.stats.steps < len(out.token_ids)  # chunks of several tokens were accepted


def test_max_new_tokens_inside_an_accepted_chunk():
    model = tiny_model("qwen2", seed=1)
    engine = warmed_engine(model)
    out = engine.generate(PROMPT, max_new_tokens=13)
    assert out.token_ids == hf_greedy(model, PROMPT, 13)
    assert out.finish_reason == "length"


def test_stop_string_inside_an_accepted_chunk():
    model = tiny_model("llama", seed=1)
    free = hf_greedy(model, PROMPT, 40)
    engine = warmed_engine(model)
    stop = "".join(f" {t}" for t in free[17:19])  # completed by token 18
    cut = IdTokenizer().decode(free).find(stop)
    end = next(i for i in range(len(free)) if len(IdTokenizer().decode(free[: i + 1])) >= cut + len(stop))
    out = engine.generate(PROMPT, max_new_tokens=40, stop=[stop])
    assert out.token_ids == free[: end + 1]
    assert out.text == IdTokenizer().decode(free)[:cut]  # the stop string itself is not returned
    assert out.finish_reason == "stop"


def test_stream_never_emits_text_past_a_stop_string():
    model = tiny_model("llama", seed=1)
    free = hf_greedy(model, PROMPT, 40)
    engine = warmed_engine(model)
    stop = "".join(f" {t}" for t in free[10:13])
    stream = engine.stream(PROMPT, max_new_tokens=40, stop=stop)
    text = "".join(stream)
    assert text == stream.output.text == IdTokenizer().decode(free)[: IdTokenizer().decode(free).find(stop)]


@pytest.mark.real_model
def test_stop_string_matches_transformers_stop_strings(real_engine):
    prompt = [{"role": "user", "content": "Repeat exactly: The Rhine flows through Basel, Strasbourg, "
                                          "Mannheim, Cologne and Rotterdam to the North Sea."}]
    ids = real_engine.encode(prompt)
    real_engine.generate(prompt, max_new_tokens=40)  # warm the shared trie: long accepted chunks
    tok = real_engine.tokenizer
    expected = hf_greedy(real_engine.model, ids, 40, stop_strings=["Cologne"], tokenizer=tok,
                         pad_token_id=real_engine.model.generation_config.eos_token_id)
    out = real_engine.generate(prompt, max_new_tokens=40, stop=["Cologne"])
    assert out.token_ids == expected
    assert "Cologne" in tok.decode(expected) and "Cologne" not in out.text
    assert out.stats.mean_accepted > 1.5


class CountingTokenizer(IdTokenizer):
    """Counts the token ids it decodes: the work stop matching does."""
    decoded = 0

    def decode(self, ids, skip_special_tokens=True):
        CountingTokenizer.decoded += len(ids)
        return super().decode(ids, skip_special_tokens)


def test_stop_matching_decodes_once_per_step_whatever_the_stops():
    """Stop strings are matched on each step's new text: decoding work grows with the output once per step,
    not once per token, and a huge stop string costs no more than a short one (it once stalled a server)."""
    from lookahead import Request
    huge = ["Q" * 999_999 + "A", "Z" * 300_000, " 999 998", "x" * 256]
    request = Request([1, 2], CountingTokenizer(), max_new_tokens=2000, stops=huge)
    CountingTokenizer.decoded = 0
    chunks = [[(7 * i + j) % 90 for j in range(4)] for i in range(400)]  # 1,600 tokens in 400 steps
    for chunk in chunks:
        assert request.append(chunk) == 4
        request.text(final=False)                    # what a stream asks after every step
    steps, tokens = len(chunks), len(request.ids)
    assert request.finish_reason == "length" and tokens == 1600
    assert CountingTokenizer.decoded <= steps * tokens  # one decode of the output per step (O(n) each)
    request.append([999, 998])                        # completes " 999 998": found within the step
    assert request.finish_reason == "stop" and " 999 998" not in request.text() and request.ids[-1] == 998
