"""Request bodies of the OpenAI API subset we serve, validated strictly, and OpenAI-style errors.

Types are strict (a string where a number belongs is a 400, never coerced); unknown fields are
ignored, as OpenAI clients send many optional ones. Parameters we cannot honour (n > 1,
logprobs, tools, ...), and parameters that only mean something beside another one that is absent
(top_logprobs without logprobs, ...), are refused with a 400 naming them rather than silently ignored.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

Number = StrictFloat | StrictInt
MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_STOP_CHARS = 256  # per stop sequence: stops are matched against the tail of the text at every step
MAX_DRAFT_TOKENS = 1024  # sanity bound of the per-request draft cap (the server's own caps are far lower)


class APIError(Exception):
    """Becomes an OpenAI-style error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error",
                             429: "rate_limit_error", 500: "server_error", 503: "server_error"}.get(
            status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class _Common(_Strict):
    model: StrictStr
    max_tokens: StrictInt | None = None
    stop: Any = None  # a string or a list of at most 4: checked by `_stop`, whose errors say which rule failed
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    seed: StrictInt | None = None
    n: StrictInt | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    logprobs: Any = None
    user: StrictStr | None = None
    # Extensions (not OpenAI's): per-request drafting. speculative=false decodes this request without
    # drafts; max_draft_tokens caps its draft tree (0 = no drafts). Output is the same either way.
    speculative: StrictBool | None = None
    max_draft_tokens: Annotated[StrictInt, Field(ge=0, le=MAX_DRAFT_TOKENS)] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: Any) -> Any:
        def check(text: Any, where: str) -> None:
            if not isinstance(text, str):
                raise PydanticCustomError("stop_type", "{where} must be a string, got {kind}",
                                          {"where": where, "kind": type(text).__name__})
            if len(text) > MAX_STOP_CHARS:
                raise PydanticCustomError("stop_length", "{where} has {n} characters; at most {limit} are allowed",
                                          {"where": where, "n": len(text), "limit": MAX_STOP_CHARS})
        if stop is None:
            return None
        if isinstance(stop, str):
            check(stop, "the stop sequence")
        elif isinstance(stop, list):
            if len(stop) > MAX_STOP_SEQUENCES:
                raise PydanticCustomError("stop_count", "at most {limit} stop sequences are allowed, got {n}",
                                          {"limit": MAX_STOP_SEQUENCES, "n": len(stop)})
            for i, text in enumerate(stop):
                check(text, f"stop sequence {i}")
        else:
            raise PydanticCustomError("stop_type", "stop must be a string or a list of at most {limit} strings",
                                      {"limit": MAX_STOP_SEQUENCES})
        return stop

    @property
    def drafting(self) -> bool:
        """Whether this request asks for drafts at all (the server's own switch still applies)."""
        return self.speculative is not False and self.max_draft_tokens != 0

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = None
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Common):
    prompt: StrictStr | Annotated[list[StrictInt], Field(min_length=1)] | Annotated[
        list[StrictStr], Field(min_length=1, max_length=1)]
    echo: StrictBool | None = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None


def _lone_surrogate(body: Any) -> str | None:
    """The path ("messages.0.content") of the first string in `body` holding a lone UTF-16 surrogate.

    JSON may escape one ("\\ud800"); Python keeps it in the str, and the tokenizer (or the UTF-8 encoding
    of a response echoing it) then fails.
    """
    def bad(text: str) -> bool:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False

    def shown(path: tuple) -> str:
        return ".".join(str(k) for k in path).encode("utf-8", "backslashreplace").decode()[:200]

    stack: list[tuple[tuple, Any]] = [((), body)]
    while stack:
        path, value = stack.pop()
        # Only strings and containers can hold one: skip numbers in C (a prompt of a million token ids).
        if isinstance(value, dict):
            for key in value:
                if isinstance(key, str) and bad(key):
                    return shown((*path, key))
            items = [(k, v) for k, v in value.items() if isinstance(v, str | list | dict)]
        else:
            items = [(k, v) for k, v in enumerate(value) if isinstance(v, str | list | dict)]
        for key, item in reversed(items):  # first problem first
            if isinstance(item, str):
                if bad(item):
                    return shown((*path, key))
            else:
                stack.append(((*path, key), item))
    return None


# How JSON spells a surrogate code point: the only way one gets into a str (UTF-8 cannot encode it).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse(model: type[BaseModel], body: Any, raw: bytes | None = None) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its parameter.

    `raw`, the body's bytes when known, lets bodies without a surrogate escape skip the walk over
    every string (a Python loop: slow on a large body).
    """
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    bad = _lone_surrogate(body) if raw is None or _SURROGATE_ESCAPE.search(raw) else None
    if bad is not None:
        raise APIError(400, f"invalid value for '{bad}': the text holds a lone UTF-16 surrogate (such as "
                       "\\ud800), which is not valid Unicode", param=bad, code="invalid_value")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if not str(x).startswith(("function-", "constrained-"))]
        # Drop pydantic's union-branch labels ("str", "list[...]") from the parameter path.
        loc = [x for x in loc if not (x in {"str", "int", "float", "bool"} or x.startswith(("list[", "lax-", "json-")))]
        param = ".".join(loc) or None
        kind, msg = err.get("type", ""), err.get("msg", "invalid value")
        if kind == "missing":
            message = f"missing required parameter '{param}'"
        else:
            message = f"invalid value for '{param}': {msg}"
        raise APIError(400, message, param=param, code="missing_required_parameter" if kind == "missing"
                       else "invalid_value") from None


def refuse_unsupported(req: _Common) -> None:
    """400 for parameters we would otherwise have to ignore."""
    # Parameters that only mean something beside another one (OpenAI refuses these alone too).
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options",
                       code="invalid_value")
    if isinstance(req, ChatRequest) and req.top_logprobs is not None and req.logprobs is not True:
        raise APIError(400, "top_logprobs is only allowed when logprobs is true", param="top_logprobs",
                       code="invalid_value")
    if isinstance(req, ChatRequest) and req.tool_choice is not None and not req.tools:
        raise APIError(400, "tool_choice is only allowed when tools are given", param="tool_choice",
                       code="invalid_value")
    if req.speculative is False and req.max_draft_tokens:
        raise APIError(400, "max_draft_tokens caps drafts, but speculative is false (no drafts): give one of them",
                       param="max_draft_tokens", code="invalid_value")
    if req.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n", code="unsupported_value")
    if req.logprobs not in (None, False, 0):
        raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_value")
    if isinstance(req, ChatRequest):
        if req.tools:
            raise APIError(400, "tools are not supported", param="tools", code="unsupported_value")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format type 'text' is supported", param="response_format",
                           code="unsupported_value")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo", code="unsupported_value")
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix", code="unsupported_value")
        if req.best_of not in (None, 1):
            raise APIError(400, "only best_of=1 is supported", param="best_of", code="unsupported_value")
