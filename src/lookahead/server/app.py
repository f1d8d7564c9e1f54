"""The OpenAI-compatible HTTP API (FastAPI): chat and text completions, models, health, metrics.

Handlers validate and tokenize a request, build the engine's own `Request` for it (limits, stop
strings, accept rule), and hand it to the `Scheduler`'s decode thread (the engine's decode core);
tokens come back as events on an asyncio queue and leave as one JSON body or as server-sent events.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..decoding.kernels import running_kernels
from ..decoding.sampling import SamplingParams
from ..decoding.step import MAX_CACHE_TOKENS
from ..drafting.state import StateFileError
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .scheduler import Event, Job, QueueFull, Scheduler
from .schemas import APIError, ChatRequest, CompletionRequest, parse, refuse_unsupported

log = logging.getLogger("lookahead.server")

MAX_JSON_DEPTH = 64  # nesting deeper than any OpenAI body needs; json/pydantic recurse per level
UNMATCHED = "unmatched"  # the metrics label of requests no route matched


def clip(text: object, limit: int = 200) -> str:
    """Client-controlled text as it may appear in a log line or an error message: one line, bounded."""
    text = str(text)
    cut = text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates become escapes
    cut = cut.replace("\r", "\\r").replace("\n", "\\n")
    return cut + f"...(+{len(text) - limit} chars)" if len(text) > limit else cut


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)


def json_too_deep(raw: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text nests arrays/objects more than `limit` deep (brackets inside strings ignored).

    Cheap enough to run on every body before parsing: a C-level count in the common case, then a
    vectorised running sum over the bracket characters.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    import numpy as np

    chars = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    step = ((chars == ord("[")) | (chars == ord("{"))).astype(np.int32)
    step -= ((chars == ord("]")) | (chars == ord("}"))).astype(np.int32)
    return int(np.cumsum(step).max(initial=0)) > limit


def route_label(request: Request) -> str:
    """The metrics label of a request: its route's template, never the raw path (which clients choose)."""
    path = getattr(request.scope.get("route"), "path", None)
    return path if isinstance(path, str) else UNMATCHED


class _ClipAccessLog(logging.Filter):
    """Bounds the path uvicorn's access log writes per request (a client picks it, up to the HTTP line limit)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (*args[:2], clip(args[2]), *args[3:])
        return True


def _clip_access_log() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _ClipAccessLog) for f in access.filters):
        access.addFilter(_ClipAccessLog())


# -- what drafting learned, on disk ------------------------------------------------------------
def load_state(engine, path: str | os.PathLike | None) -> str:
    """Load `path` into the engine's drafting state if it exists; a bad file is moved aside and the
    state starts empty. Returns a one-line status, also logged (and shown by /health)."""
    if path is None:
        return "not persisted (no --trie)"
    path = Path(path)
    if not path.exists():
        status = f"{path} does not exist yet; starting with an empty trie (saved there later)"
        log.info("trie: %s", status)
        return status
    try:
        engine.load_state(path)
    except StateFileError as e:
        aside = path.with_name(path.name + ".corrupt")
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        status = f"refused {e}; starting with an EMPTY trie (the bad file was moved to {aside})"
        log.error("trie: %s", status)
        return status
    status = f"loaded {len(engine.state.trie)} nodes from {path}"
    log.info("trie: %s", status)
    return status


class StateKeeper:
    """Saves the drafting state every `every` seconds when it has learned something, and at shutdown."""

    def __init__(self, engine, scheduler: Scheduler, path: str | os.PathLike, every: float) -> None:
        self.engine, self.scheduler, self.path, self.every = engine, scheduler, Path(path), every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._saved = self._marker()
        self.saves = 0

    def _marker(self) -> tuple[int, int, int]:
        return id(self.engine.state), self.scheduler.stats.emitted, len(self.engine.state.trie)

    def save_if_changed(self) -> bool:
        marker = self._marker()
        if marker == self._saved:
            return False
        try:
            self.engine.save_state(self.path)
        except OSError as e:  # a full disk must not take the server down
            log.error("trie: could not save to %s: %s", self.path, e)
            return False
        self._saved, self.saves = marker, self.saves + 1
        log.info("trie: saved %d nodes to %s", len(self.engine.state.trie), self.path)
        return True

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.every):
                self.save_if_changed()
        if self.every > 0:
            self._thread = threading.Thread(target=loop, name="lookahead-trie-saver", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.save_if_changed()


# Below this, sampling is greedy to within float precision, while logits / temperature overflow to inf
# (1e-40 gave "probability tensor contains either inf, nan or element < 0"): treat it as 0.
MIN_SAMPLING_TEMPERATURE = 1e-5


def _sampling_args(req, default_temperature: float) -> dict[str, Any]:
    temperature = default_temperature if req.temperature is None else float(req.temperature)
    args: dict[str, Any] = {"presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty}
    if temperature >= MIN_SAMPLING_TEMPERATURE:
        # OpenAI semantics: no top-k; top_p only when given.
        args.update(do_sample=True, temperature=temperature, top_k=0, top_p=req.top_p, seed=req.seed)
    return {k: (float(v) if isinstance(v, float | int) and k.endswith("penalty") else v)
            for k, v in args.items() if v is not None}


# -- the app --------------------------------------------------------------------------------------
def create_app(engine, *, model_name: str = "smollm2-135m", api_key: str | None = None,
               trie_path: str | os.PathLike | None = None, save_every: float = 300.0, max_batch: int = 32,
               max_waiting: int = 512, draft: bool = True, max_tokens_limit: int | None = None,
               default_temperature: float = 0.0, max_body_bytes: int = 4 << 20, protect_ops: bool = False,
               max_cache_tokens: int | None = MAX_CACHE_TOKENS) -> FastAPI:
    """An ASGI app serving `engine`; its decode thread starts and stops with the app's lifespan.

    `protect_ops` puts /metrics, /openapi.json and the details of /health behind `api_key` too (an
    unauthenticated /health then answers only {"status"}, for liveness probes).
    """
    if protect_ops and api_key is None:
        raise ValueError("protect_ops needs an api_key to protect /health, /metrics and /openapi.json with")
    _clip_access_log()
    trie_status = load_state(engine, trie_path)
    scheduler = Scheduler(engine, max_batch=max_batch, max_waiting=max_waiting, max_cache_tokens=max_cache_tokens)
    metrics = Metrics(scheduler, lambda: engine.state.trie)
    keeper = StateKeeper(engine, scheduler, trie_path, save_every) if trie_path is not None else None
    encode_lock = threading.Lock()  # HF tokenizers are not safe to call from several threads at once
    max_positions = engine.max_positions
    limit = max_tokens_limit or max_positions or 4096
    vocab = engine.model.get_input_embeddings().num_embeddings
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        if keeper:
            keeper.start()
        log.info("serving %s: drafting %s, max batch %d, cost %s", model_name, "on" if draft else "off", max_batch,
                 engine.cost)
        try:
            yield
        finally:
            scheduler.shutdown()
            if keeper:
                keeper.stop()

    app = FastAPI(title="lookahead", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None if protect_ops else "/openapi.json")
    app.state.engine, app.state.scheduler, app.state.metrics = engine, scheduler, metrics
    app.state.keeper, app.state.trie_status, app.state.model_name = keeper, trie_status, model_name

    # -- errors: always an OpenAI-style body ----------------------------------------------------
    # Metrics are labelled by route template (bounded), and log lines carry clipped client text only.
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.count(route_label(request), exc.status)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        metrics.count(route_label(request), exc.status_code)
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    def internal_error(what: str, detail: str, exc: BaseException | None = None) -> APIError:
        """A 500 whose body says only what a client can use; the details go to the log under a reference."""
        ref = uuid.uuid4().hex[:12]
        trace = "".join(traceback.format_tb(exc.__traceback__))[-4000:] if exc is not None else ""
        log.error("%s (reference %s): %s%s", what, ref, clip(detail, 500), "\n" + trace if trace else "")
        return APIError(500, f"internal error {what}; the server log has the details under reference {ref}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        metrics.count(route_label(request), 500)
        error = internal_error(f"in {request.method} {route_label(request)}", f"{type(exc).__name__}: {exc}", exc)
        return JSONResponse(error.body(), status_code=500)

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("api-key", "")
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), api_key.encode())

    def authorize(request: Request) -> None:
        if not authorized(request):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    async def read_json(request: Request) -> tuple[Any, bytes]:
        """The decoded body, and its bytes."""
        too_large = APIError(413, f"request body larger than {max_body_bytes} bytes")
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            raise too_large
        # Stop reading at the limit: a chunked body (no content-length) is never buffered past it.
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_body_bytes:
                raise too_large
            chunks.append(chunk)
        raw = b"".join(chunks)
        # json and pydantic recurse once per nesting level: refuse deep bodies before they reach either.
        if json_too_deep(raw):
            raise APIError(400, f"the request body nests arrays/objects more than {MAX_JSON_DEPTH} deep",
                           code="invalid_json")
        try:
            return json.loads(raw), raw
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {clip(e)}", code="invalid_json") from None
        except RecursionError:  # (the depth scan should have caught it)
            raise APIError(400, "the request body nests too deeply", code="invalid_json") from None

    def encode(prompt: Any, chat: bool) -> list[int]:
        with encode_lock:  # chat contents are tokenized as text (Engine.encode): they cannot forge turns
            return engine.encode(prompt)

    async def prepare(req, chat: bool) -> Job:
        refuse_unsupported(req)
        if req.model != model_name:
            raise APIError(404, f"the model '{clip(req.model, 100)}' does not exist; this server serves "
                           f"'{model_name}'", param="model", code="model_not_found")
        if chat:
            prompt: Any = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                           for m in req.messages]
        else:
            prompt = req.prompt[0] if isinstance(req.prompt, list) and isinstance(req.prompt[0], str) else req.prompt
            if isinstance(prompt, list) and any(not 0 <= t < vocab for t in prompt):
                raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt",
                               code="invalid_value")
        try:
            ids = await run_in_threadpool(encode, prompt, chat)
        except ValueError as e:
            raise APIError(400, clip(e, 500), param="messages" if chat else "prompt") from None
        if not ids:
            raise APIError(400, "the prompt is empty", param="messages" if chat else "prompt")
        if max_positions and len(ids) >= max_positions:
            raise APIError(400, f"this model's maximum context length is {max_positions} tokens; the prompt has "
                           f"{len(ids)}", param="messages" if chat else "prompt", code="context_length_exceeded")
        max_tokens = req.max_completion_tokens if chat and req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"
        room = (max_positions - len(ids)) if max_positions else limit
        if max_tokens is None:
            max_tokens = min(limit, room)
        elif max_tokens < 1:
            raise APIError(400, f"{param} must be at least 1, got {max_tokens}", param=param, code="invalid_value")
        elif max_tokens > limit:
            raise APIError(400, f"{param} must be at most {limit}, got {max_tokens}", param=param,
                           code="invalid_value")
        elif max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {max_positions} tokens; you requested "
                           f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} for the completion)",
                           param=param, code="context_length_exceeded")
        sampling = _sampling_args(req, default_temperature)
        try:
            gen = await run_in_threadpool(engine.request, ids, max_tokens, req.stops(), draft and req.drafting,
                                          SamplingParams.of(**sampling), req.max_draft_tokens)
        except ValueError as e:  # the engine's own checks (sampling parameters, limits)
            raise APIError(400, str(e)) from None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        job = Job(gen, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        job.queue = queue  # type: ignore[attr-defined]
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise APIError(503, str(e), code="overloaded") from None
        return job

    def usage_of(done: Event) -> dict[str, Any]:
        """OpenAI's usage, plus this request's speculation stats (an extension field)."""
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens, "speculation": done.speculation}

    def event_error(event: Event) -> APIError:
        """The decode thread's error as the client sees it: its 500s carry exception text, which stays in the log."""
        if event.status >= 500 and event.status != 503:
            return internal_error("while generating", event.message)
        return APIError(event.status, event.message)

    async def guarded(path: str, request: Request, chat: bool) -> Response:
        """`complete`, with unexpected errors answered here: past this point Starlette re-raises them to
        uvicorn, which logs the whole exception text (client text included) and the client gets a bare 500."""
        try:
            return await complete(path, request, chat)
        except APIError:
            raise
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            metrics.count(path, 499)
            return Response(status_code=499)
        except Exception as e:
            raise internal_error(f"in POST {path}", f"{type(e).__name__}: {e}", e) from None

    async def complete(path: str, request: Request, chat: bool) -> Response:
        authorize(request)
        body, raw = await read_json(request)
        req = parse(ChatRequest if chat else CompletionRequest, body, raw=raw)
        gen = await prepare(req, chat)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        now = int(time.time())
        if req.stream:
            metrics.count(path, 200)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            # The background task also frees the slot if the stream never started (client gone at once).
            return StreamingResponse(stream(gen, rid, now, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(scheduler.cancel, gen))
        pieces, done = [], None
        try:
            while done is None:
                try:
                    event = await asyncio.wait_for(gen.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        scheduler.cancel(gen)
                        metrics.count(path, 499)
                        return Response(status_code=499)
                    continue
                if event.kind == "text":
                    pieces.append(event.text)
                elif event.kind == "error":
                    raise event_error(event)
                else:
                    done = event
        finally:
            if done is None:
                scheduler.cancel(gen)
        text = "".join(pieces)
        usage = usage_of(done)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": done.finish_reason, "logprobs": None}
            body = {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                    "choices": [choice], "usage": usage, "system_fingerprint": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": done.finish_reason, "logprobs": None}
            body = {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                    "choices": [choice], "usage": usage, "system_fingerprint": None}
        metrics.count(path, 200)
        return JSONResponse(body)

    async def stream(gen: Job, rid: str, now: int, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
                    {"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            body = {"id": rid, "object": obj, "created": now, "model": model_name, "choices": [choice]}
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        finished = False
        try:
            if chat:
                yield chunk(None, None, first=True)
            while True:
                event = await gen.queue.get()
                if event.kind == "text":
                    yield chunk(event.text, None)
                elif event.kind == "error":
                    finished = True
                    yield f"data: {json.dumps(event_error(event).body())}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                else:
                    finished = True
                    yield chunk(None, event.finish_reason)
                    if include_usage:
                        usage = usage_of(event)
                        body = {"id": rid, "object": obj, "created": now, "model": model_name, "choices": [],
                                "usage": usage}
                        yield f"data: {json.dumps(body)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not finished:  # the client went away (or the stream was cancelled): free the batch slot now
                scheduler.cancel(gen)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await guarded("/v1/chat/completions", request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await guarded("/v1/completions", request, chat=False)

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "lookahead",
                "max_model_len": max_positions}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        metrics.count("/v1/models", 200)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict[str, Any]:
        authorize(request)
        if name != model_name:
            raise APIError(404, f"the model '{clip(name, 100)}' does not exist", param="model",
                           code="model_not_found")
        metrics.count(route_label(request), 200)
        return model_card()

    # What `--dtype auto` chose here, and why: a benchmark of this server reports what ran, not "auto".
    numerics = {"dtype": str(next(engine.model.parameters()).dtype).removeprefix("torch."),
                "kernels": running_kernels(engine.model), "reason": engine.dtype_reason}

    chat_template = bool(getattr(engine.tokenizer, "chat_template", None))  # else only /v1/completions serves it

    def policy_info() -> dict[str, Any]:
        cfg, sizing = engine.draft_config, engine.sizing
        info: dict[str, Any] = {"max_nodes": engine.max_nodes, "max_depth": cfg.max_depth, "copy_depth": cfg.copy_depth,
                                "sizing": cfg.sizing}
        if engine.cost is not None:
            info["cost_ms"] = {t: round(1000 * s, 2) for t, s in zip(engine.cost.tokens, engine.cost.seconds,
                                                                      strict=True)}
            info["drafting_loses_at_batch"] = [b for b in (1, 2, 4, 8, 16, 32) if sizing.drafting_loses(b)]
        return info

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        ok = scheduler.alive
        body: dict[str, Any] = {"status": "ok" if ok else "error"}
        if not protect_ops or authorized(request):  # protected: liveness only, without the key
            body.update(model=model_name, decode_thread=ok, batch=scheduler.active, queue=scheduler.queue_depth,
                        trie_nodes=len(engine.state.trie), trie=trie_status, drafting=draft, draft_policy=policy_info(),
                        numerics=numerics, chat_template=chat_template)
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        if protect_ops:
            authorize(request)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if protect_ops:  # FastAPI's own /openapi.json is off: serve the schema behind the key
        @app.get("/openapi.json", include_in_schema=False)
        async def openapi(request: Request) -> JSONResponse:
            authorize(request)
            return JSONResponse(app.openapi())

    return app
