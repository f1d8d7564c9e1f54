"""`lookahead warm`: a shared trie built from a JSONL corpus, loaded by a server or an Engine."""
from __future__ import annotations

import json

import pytest

from lookahead import DraftConfig, DraftState, Engine
from lookahead.cli import main
from lookahead.drafting.warm import Sequencer, warm

pytestmark = pytest.mark.real_model
QUESTION = "List the first five planets of the solar system, one per line."


def write_jsonl(path, lines) -> None:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")


def test_every_record_form_is_learned_and_bad_lines_are_skipped(real_engine, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                      {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
        {"prompt": "Say yes.", "completion": "Yes."},
        {"prompt": "Say no.", "response": "No."},
        {"text": "def add(a, b):\n    return a + b\n"},
        "{this is not json",
        {"unrelated": 1},
        "",
    ])
    trie = DraftConfig().new_trie()
    out = tmp_path / "warm.trie"
    report = warm(corpus, out, real_engine.tokenizer, trie, progress=True)
    assert (report.records, report.skipped, report.sequences) == (6, 2, 5)
    assert report.nodes == len(trie) > 0 and len(DraftState.load(out).trie) == len(trie)
    assert "warming trie" in capsys.readouterr().err  # the progress bar

    with pytest.raises(ValueError, match="no usable record"):
        bad = tmp_path / "bad.jsonl"
        write_jsonl(bad, [{"nothing": True}, "nope"])
        warm(bad, None, real_engine.tokenizer, DraftConfig().new_trie(), progress=False)


def test_answer_sequence_is_what_a_live_request_feeds_the_shared_scope(real_engine):
    tok, trie = real_engine.tokenizer, DraftConfig().new_trie()
    seq = Sequencer(tok, lead_in=trie.max_match)
    [ids] = seq({"prompt": QUESTION, "completion": "Mercury"})
    prompt = real_engine.encode([{"role": "user", "content": QUESTION}])
    assert ids == prompt[-trie.max_match:] + tok("Mercury", add_special_tokens=False).input_ids + [tok.eos_token_id]


def test_a_warmed_trie_drafts_the_answer_from_the_first_request(real_engine, tmp_path):
    """Warm from a corpus holding an answer; a fresh engine loading that file drafts it at once, losslessly."""
    messages = [{"role": "user", "content": QUESTION}]
    cold = Engine(real_engine.model, real_engine.tokenizer).generate(messages, max_new_tokens=16)
    corpus, out = tmp_path / "answers.jsonl", tmp_path / "warm.trie"
    write_jsonl(corpus, [{"messages": [*messages, {"role": "assistant", "content": cold.text}]}])
    # Through the CLI, with the tokenizer read from a local directory (no model weights needed).
    model_dir = tmp_path / "tok"
    real_engine.tokenizer.save_pretrained(model_dir)
    real_engine.model.config.save_pretrained(model_dir)
    assert main(["warm", "--corpus", str(corpus), "--out", str(out), "--model", str(model_dir), "--no-progress"]) == 0
    warmed = Engine(real_engine.model, real_engine.tokenizer)
    warmed.load_state(out)  # a trie-only file: the rest of the state starts empty
    hot = warmed.generate(messages, max_new_tokens=16)
    assert hot.token_ids == cold.token_ids
    assert hot.stats.mean_accepted > 2 * cold.stats.mean_accepted
