"""The OpenAI-compatible server on the real embedded model (fp32), driven by the official `openai` client.

One server (uvicorn in a thread on a free loopback port) serves the whole module; a few tests
start their own app (api key, trie files). Generations are short: the module has to stay
within a few minutes on a 2-core CPU.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from conftest import hf_greedy
from lookahead import DraftConfig, Engine
from lookahead.decoding.kernels import running_kernels
from lookahead.server.app import create_app
from lookahead.server.harness import ServerThread
from lookahead.server.scheduler import Job, Scheduler

pytestmark = pytest.mark.real_model
MODEL = "smollm2-135m"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def fresh_engine(real_engine, **config) -> Engine:
    """The session's model and tokenizer with a trie of its own (nothing shared with other test modules)."""
    return Engine(real_engine.model, real_engine.tokenizer, DraftConfig(**config))


@pytest.fixture(scope="module")
def server(real_engine):
    engine = fresh_engine(real_engine, capacity=5000)
    with ServerThread(create_app(engine, model_name=MODEL)) as s:
        s.engine = engine
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def wait_until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# -- the API through the official client ---------------------------------------------------------
def test_chat_completion_equals_engine_generate(client, server):
    reply = client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=12)
    expected = server.engine.generate(CAPITAL, max_new_tokens=12, draft=False)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == len(server.engine.encode(CAPITAL))
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.object == "chat.completion" and reply.model == MODEL


def test_text_completion_and_token_id_prompts(client, server):
    reply = client.completions.create(model=MODEL, prompt="Monday, Tuesday, Wednesday,", max_tokens=6)
    expected = server.engine.generate("Monday, Tuesday, Wednesday,", max_new_tokens=6, draft=False)
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6
    ids = server.engine.encode("Monday, Tuesday, Wednesday,")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6)
    assert by_ids.choices[0].text == expected.text and by_ids.usage.prompt_tokens == len(ids)


def test_streaming_equals_non_streaming(client):
    question = [{"role": "user", "content": "Name three colours."}]
    stream = client.chat.completions.create(model=MODEL, messages=question, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)  # first: a fresh answer comes in pieces (the trie has not learned it yet)
    whole = client.chat.completions.create(model=MODEL, messages=question, max_tokens=12)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1  # really streamed, not one blob
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    text_stream = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5, 6,", max_tokens=8, stream=True)
    text = "".join(c.choices[0].text for c in text_stream)
    assert text == client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5, 6,", max_tokens=8).choices[0].text


def test_stop_strings_cut_like_the_engine(client, server):
    prompt = "1, 2, 3, 4, 5, 6,"
    free = server.engine.generate(prompt, max_new_tokens=12, draft=False).text
    stop = free.strip().split(",")[2].strip()  # a number the model will write
    expected = server.engine.generate(prompt, max_new_tokens=12, stop=[stop], draft=False)
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, stop=[stop, "never-seen"])
    assert reply.choices[0].text == expected.text and stop not in reply.choices[0].text
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == len(expected.token_ids)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, stop=stop, stream=True))
    assert streamed == expected.text


def test_seeded_sampling_is_reproducible_and_equals_the_engine(client, server):
    question = [{"role": "user", "content": "Invent a name for a cat."}]
    args = dict(model=MODEL, messages=question, max_tokens=8, temperature=0.9, top_p=0.95, seed=11)
    first = client.chat.completions.create(**args).choices[0].message.content
    assert client.chat.completions.create(**args).choices[0].message.content == first
    # OpenAI semantics: no top-k unless asked.
    alone = server.engine.generate(question, max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.95, top_k=0,
                                   seed=11, draft=False)
    assert first == alone.text


def test_api_key_is_required_when_set(real_engine):
    app = create_app(fresh_engine(real_engine), model_name=MODEL, api_key="s3cret")
    with ServerThread(app) as s:
        wrong = openai.OpenAI(base_url=s.url + "/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            wrong.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=2)
        assert info.value.status_code == 401 and "API key" in info.value.body["message"]
        assert httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 401
        right = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0, timeout=120)
        assert [m.id for m in right.models.list()] == [MODEL]
        assert right.completions.create(model=MODEL, prompt="Hello", max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(s.url + "/health").status_code == 200  # health stays open for probes


def test_models_health_and_metrics(client, server):
    client.completions.create(model=MODEL, prompt="one two three one two three", max_tokens=4)  # feeds the trie
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["decode_thread"] is True
    # What ran, for benchmarks of a `--dtype auto` server: the fixture's engine is float32, given explicitly.
    kernels = running_kernels(server.engine.model)
    assert health["numerics"] == {"dtype": "float32", "kernels": kernels, "reason": "given"}
    assert health["chat_template"] is True  # else clients (the load test) send text to /v1/completions
    text = httpx.get(server.url + "/metrics").text
    for name in ("lookahead_requests_total", "lookahead_completion_tokens_total",
                 "lookahead_mean_accepted_tokens_per_step", "lookahead_draft_hit_rate", "lookahead_queue_depth",
                 "lookahead_trie_nodes", "lookahead_batch_size", "lookahead_draft_nodes_per_row"):
        assert name in text, name
    assert metric(server.url, "lookahead_trie_nodes") == len(server.engine.state.trie) > 0
    assert metric(server.url, "lookahead_mean_accepted_tokens_per_step") >= 1.0
    per_source = [line for line in text.splitlines() if line.startswith("lookahead_source_draft_tokens_total{")]
    assert {line.split('source="')[1].split('"')[0] for line in per_source} == set(server.engine.draft_config.sources)


# -- bad input: a 4xx with an OpenAI error body, and the server keeps serving ---------------------
CHAT_URL, TEXT_URL = "/v1/chat/completions", "/v1/completions"
OK = {"model": MODEL, "messages": CAPITAL, "max_tokens": 2}
BAD = [
    (CHAT_URL, b"{not json", 400, None),
    (CHAT_URL, b"[1, 2]", 400, None),
    (CHAT_URL, {}, 400, "model"),
    (CHAT_URL, {"model": MODEL}, 400, "messages"),
    (CHAT_URL, {**OK, "messages": "hi"}, 400, "messages"),
    (CHAT_URL, {**OK, "messages": []}, 400, "messages"),
    (CHAT_URL, {**OK, "messages": [{"content": "hi"}]}, 400, "messages.0.role"),
    (CHAT_URL, {**OK, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    (CHAT_URL, {**OK, "model": "gpt-9"}, 404, "model"),
    (CHAT_URL, {**OK, "model": 7}, 400, "model"),
    (CHAT_URL, {**OK, "max_tokens": "5"}, 400, "max_tokens"),
    (CHAT_URL, {**OK, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT_URL, {**OK, "max_tokens": -3}, 400, "max_tokens"),
    (CHAT_URL, {**OK, "max_tokens": 10**9}, 400, "max_tokens"),
    (CHAT_URL, {**OK, "max_tokens": 2.5}, 400, "max_tokens"),
    (CHAT_URL, {**OK, "temperature": "hot"}, 400, "temperature"),
    (CHAT_URL, {**OK, "temperature": 5}, 400, "temperature"),
    (CHAT_URL, {**OK, "top_p": 0}, 400, "top_p"),
    (CHAT_URL, {**OK, "stop": 5}, 400, "stop"),
    (CHAT_URL, {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    (CHAT_URL, {**OK, "n": 2}, 400, "n"),
    (CHAT_URL, {**OK, "stream": "yes"}, 400, "stream"),
    (CHAT_URL, {**OK, "logprobs": True}, 400, "logprobs"),
    (TEXT_URL, {"model": MODEL}, 400, "prompt"),
    (TEXT_URL, {"model": MODEL, "prompt": [1.5]}, 400, "prompt"),
    (TEXT_URL, {"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
    (TEXT_URL, {"model": MODEL, "prompt": ""}, 400, "prompt"),
    (TEXT_URL, {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
]


@pytest.mark.parametrize("url, body, status, param", BAD, ids=[f"{i}-{b[0].split('/')[-1]}" for i, b in enumerate(BAD)])
def test_malformed_requests_get_openai_errors(server, url, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + url, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if param:
        assert error["param"] == param, error


def test_errors_never_kill_the_server(client, server):
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    huge = httpx.post(server.url + CHAT_URL, content=b"x" * (5 << 20), headers={"content-type": "application/json"})
    assert huge.status_code == 413 and "error" in huge.json()
    too_long = "lorem ipsum " * 5000  # > the 8192-token context window
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=too_long, max_tokens=4)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="lorem ipsum " * 3000, max_tokens=4000)
    assert info.value.code == "context_length_exceeded"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=3).usage.completion_tokens == 3


def test_disconnect_mid_stream_frees_the_slot(client, server):
    cancelled = metric(server.url, "lookahead_cancelled_requests_total")
    body = {"model": MODEL, "prompt": "Once upon a time,", "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", server.url + TEXT_URL, json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [line for line in (next(lines) for _ in range(6)) if line.startswith("data:")]
        assert got
    # The client hung up after a few tokens: its row leaves the batch before the next forward.
    assert wait_until(lambda: metric(server.url, "lookahead_cancelled_requests_total") == cancelled + 1, 30)
    assert httpx.get(server.url + "/health").json()["batch"] == 0
    assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=3).usage.completion_tokens == 3


# -- batching --------------------------------------------------------------------------------------
BATCH_PROMPTS = [
    [{"role": "user", "content": "Repeat exactly: The Rhine flows through Basel, Strasbourg, Mannheim and Cologne."}],
    [{"role": "user", "content": "Write a haiku about autumn rain."}],
    "def quicksort(arr):",
    [{"role": "user", "content": "Sort this list alphabetically:\napples: 3\nbread: 1 loaf\nmilk: 2 litres"}],
    "Monday, Tuesday,",
]


def test_concurrent_greedy_requests_equal_model_generate(real_engine):
    """N requests decoded in one ragged batch: each gets exactly its own model.generate() tokens (fp32)."""
    engine = fresh_engine(real_engine)
    model, eos = engine.model, engine.model.generation_config.eos_token_id
    limits = [24, 16, 20, 12, 8]  # rows finish at different steps
    ids = [engine.encode(p) for p in BATCH_PROMPTS]
    expected = [hf_greedy(model, i, n, pad_token_id=eos) for i, n in zip(ids, limits, strict=True)]
    scheduler = Scheduler(engine)
    done = threading.Semaphore(0)
    runs = [engine.request(i, n) for i, n in zip(ids, limits, strict=True)]
    for run in runs:
        scheduler.submit(Job(run, lambda e: e.kind != "text" and done.release()))
    scheduler.start()  # all five are waiting: they are admitted together
    try:
        assert all(done.acquire(timeout=120) for _ in runs)
    finally:
        scheduler.shutdown()
    assert [r.ids for r in runs] == expected
    assert scheduler.stats.max_batch_seen == len(runs)
    assert scheduler.stats.accepted_draft > 0  # drafts (from the prompts) were verified inside the batch


def test_load_32_concurrent_streaming_clients(real_engine):
    """32 streaming clients at once: all complete in time, none loses or mixes output, the trie stays bounded."""
    engine = fresh_engine(real_engine, capacity=400)
    prompts = [f"Item {k}: the {w} is" for k, w in enumerate(["cat", "river", "engine", "garden"] * 2)]
    expected = {p: engine.generate(p, max_new_tokens=6, draft=False).text for p in prompts}
    clients = [prompts[i % len(prompts)] for i in range(32)]

    async def one(http: httpx.AsyncClient, prompt: str) -> tuple[str, str | None]:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "stream": True}
        text, finish = [], None
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                text.append(choice["text"])
                finish = choice["finish_reason"] or finish
        return "".join(text), finish

    async def all_clients(url: str):
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            return await asyncio.gather(*(one(http, p) for p in clients))

    app = create_app(engine, model_name=MODEL)
    with ServerThread(app) as s:
        results = asyncio.run(asyncio.wait_for(all_clients(s.url), timeout=150))  # raises past 150 s
        stats = app.state.scheduler.stats
        assert httpx.get(s.url + "/health").json()["batch"] == 0
    assert [text for text, _ in results] == [expected[p] for p in clients]  # nothing lost, nothing mixed
    assert all(finish in ("length", "stop") for _, finish in results)
    assert stats.finished == 32 and stats.max_batch_seen >= 16
    assert 0 < len(engine.state.trie) <= 400  # the shared trie learned and stayed under its bound


# -- the shared trie on disk -------------------------------------------------------------------------
def test_trie_survives_a_restart_and_a_corrupted_file_is_refused(real_engine, tmp_path, caplog):
    path = tmp_path / "shared.trie"
    first = fresh_engine(real_engine)
    with ServerThread(create_app(first, model_name=MODEL, trie_path=path, save_every=0)) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)
        c.completions.create(model=MODEL, prompt="Roses are red,", max_tokens=8)
        learned = len(first.state.trie)
    assert path.exists() and learned > 0  # saved at shutdown

    second = fresh_engine(real_engine)
    app = create_app(second, model_name=MODEL, trie_path=path)
    assert len(second.state.trie) == learned and "loaded" in app.state.trie_status

    path.write_bytes(path.read_bytes()[:100] + b"garbage" * 10)
    third = fresh_engine(real_engine)
    with caplog.at_level("ERROR", logger="lookahead.server"):
        app = create_app(third, model_name=MODEL, trie_path=path)
    assert len(third.state.trie) == 0 and "refused" in app.state.trie_status and "EMPTY" in app.state.trie_status
    assert any("refused" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "shared.trie.corrupt").exists()
    with ServerThread(app) as s:
        assert "refused" in httpx.get(s.url + "/health").json()["trie"]
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)
        assert c.completions.create(model=MODEL, prompt="Hello", max_tokens=2).usage.completion_tokens == 2
