"""Server hardening (issue 13): bounded metrics and logs, ops endpoints behind the key on request, 4xx instead
of 500 on hostile input, no role injection through special-token text, bounded body reading, error bodies
without internals, error messages that say what is wrong, per-request drafting fields.

Runs on the real embedded model (fp32); generations are a few tokens long.
"""
from __future__ import annotations

import json

import httpx
import pytest

from lookahead import DraftConfig, Engine
from lookahead.server.app import create_app
from lookahead.server.harness import ServerThread
from lookahead.server.schemas import MAX_STOP_CHARS, ChatRequest, CompletionRequest, parse

pytestmark = pytest.mark.real_model
MODEL = "smollm2-135m"
CHAT_URL, TEXT_URL = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "Hi"}]
OK = {"model": MODEL, "messages": HI, "max_tokens": 3}


def fresh_engine(real_engine) -> Engine:
    return Engine(real_engine.model, real_engine.tokenizer, DraftConfig(capacity=2000))


@pytest.fixture(scope="module")
def server(real_engine):
    engine = fresh_engine(real_engine)
    with ServerThread(create_app(engine, model_name=MODEL)) as s:
        s.engine = engine
        yield s


def post(url: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=120, **kwargs)


# -- 10: errors that say what is wrong -----------------------------------------------------------------------
@pytest.mark.parametrize("body, param, says", [
    ({**OK, "stop": [f"s{k}" for k in range(20)]}, "stop", "at most 4 stop sequences"),
    ({**OK, "stop": "x" * (MAX_STOP_CHARS + 1)}, "stop", f"at most {MAX_STOP_CHARS}"),
    ({**OK, "stop": ["ok", "x" * (MAX_STOP_CHARS + 1)]}, "stop", f"at most {MAX_STOP_CHARS}"),
    ({**OK, "stop": ["ok", 3]}, "stop", "must be a string"),
    ({**OK, "top_logprobs": 2}, "top_logprobs", "logprobs"),
    ({**OK, "tool_choice": "auto"}, "tool_choice", "tools"),
    ({**OK, "stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ({**OK, "stream": False, "stream_options": {"include_usage": True}}, "stream_options", "stream"),
])
def test_errors_name_the_parameter_and_the_rule(server, body, param, says):
    r = post(server.url + CHAT_URL, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_stop_at_the_limits_is_accepted(server):
    r = post(server.url + CHAT_URL, {**OK, "stop": ["a" * MAX_STOP_CHARS, "b", "c", "d"]})
    assert r.status_code == 200, r.text


# -- 3: text that is not valid Unicode -----------------------------------------------------------------------
@pytest.mark.parametrize("body, param", [
    ({**OK, "messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content"),
    ({**OK, "messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
     "messages.0.content.0.text"),
    ({**OK, "stop": ["ok", "\ud800"]}, "stop.1"),
    ({"model": MODEL, "prompt": "x\udc80", "max_tokens": 2}, "prompt"),
])
def test_lone_surrogate_is_refused_naming_the_field(server, body, param):
    url = server.url + (CHAT_URL if "messages" in body else TEXT_URL)
    raw = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as a "\ud800" escape
    assert b"\\ud" in raw
    r = post(url, raw)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and "surrogate" in r.json()["error"]["message"]


# -- 6: per-request drafting fields --------------------------------------------------------------------------
def test_per_request_drafting_fields_are_parsed_and_validated():
    chat = parse(ChatRequest, {**OK, "speculative": False})
    assert chat.speculative is False and chat.max_draft_tokens is None and not chat.drafting
    text = parse(CompletionRequest, {"model": MODEL, "prompt": "x", "max_draft_tokens": 3})
    assert text.max_draft_tokens == 3 and text.drafting
    assert not parse(ChatRequest, {**OK, "max_draft_tokens": 0}).drafting
    assert parse(ChatRequest, OK).drafting and parse(ChatRequest, OK).speculative is None


@pytest.mark.parametrize("extra, param", [
    ({"speculative": "no"}, "speculative"),
    ({"max_draft_tokens": -1}, "max_draft_tokens"),
    ({"max_draft_tokens": 2.5}, "max_draft_tokens"),
    ({"max_draft_tokens": 10**6}, "max_draft_tokens"),
    ({"speculative": False, "max_draft_tokens": 4}, "max_draft_tokens"),
])
def test_per_request_drafting_fields_refuse_bad_values(server, extra, param):
    r = post(server.url + CHAT_URL, {**OK, **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_per_request_drafting_fields_are_accepted(server):
    for extra in ({"speculative": False}, {"speculative": True, "max_draft_tokens": 2}, {"max_draft_tokens": 0}):
        r = post(server.url + CHAT_URL, {**OK, **extra})
        assert r.status_code == 200, r.text
