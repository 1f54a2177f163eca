"""``QuotaMiddleware``: the check API's decision, enforced inside any Django project.

Add ``"limits.middleware.QuotaMiddleware"`` to ``MIDDLEWARE`` and say which requests it
guards::

    QUOTA_MIDDLEWARE = {"paths": ["/v1/"]}

A guarded request (a POST under one of the path prefixes) is mapped to (API key, end user,
model, estimated tokens) and checked with the engine in this process, no HTTP hop:

- the key: ``Authorization: Bearer qk_…`` (``"key_header"`` names another header whose whole
  value is the key); the key's tenant is the one counted, and its tier's fail mode answers
  when Redis is away, exactly as on ``/api/v1/check``;
- the end user: the body's ``user`` field (OpenAI's), else the ``X-Quota-User`` header,
  else the API key itself (``key:<key prefix>``), so clients that name no user are limited
  per key;
- the model: the body's ``model``, else ``X-Quota-Model``;
- the estimate: ``X-Quota-Tokens`` when the caller sends it; otherwise the prompt's length
  (``messages``, ``prompt`` or ``input``) at about four characters a token, plus the output
  allowance (``max_tokens``, ``max_completion_tokens`` or ``max_output_tokens``, times ``n``).

A denied request is answered ``429`` with the check API's JSON body and headers and never
reaches the view. An allowed one goes on with ``request.quota_grant`` set, and its response
carries the rate-limit headers and ``X-Quota-Request-Id``. Then the grant is settled with
what the inference really used: the ``usage`` object of an OpenAI-style JSON response, or
of the last server-sent event that carries one in a streamed response. Without a usage
object it settles on the input estimate plus the output actually sent (again about four
characters a token). A streamed response the client abandons settles as ``cancelled`` on
what was sent; an error response or an exception settles as ``error`` on the input estimate.

Requests outside the guarded prefixes cost one string comparison per prefix; their body is
never read. Other settings keys (all optional): ``"methods"`` (default ``["POST"]``),
``"user_header"``, ``"model_header"``, ``"tokens_header"``, ``"chars_per_token"`` (4),
``"default_output_tokens"`` (0: reserve the input only when the body sets no allowance),
``"request_id_header"`` (none: a caller-sent value would be an idempotency key, and a retry
with it is not counted twice), and ``"mapper"``, the dotted path of a function
``(request) -> QuotaRequest`` that replaces the default mapping.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.utils.module_loading import import_string

from limits import engine
from limits.apikeys import apikey_parse
from limits.authentication import api_client_for
from limits.headers import ratelimit_headers
from limits.identifiers import InvalidIdentifier, normalize_model_id, normalize_user_id
from limits.usage import UsageOutcome, usage_report

logger = logging.getLogger(__name__)

MAX_TOKENS = 10_000_000
MAX_EVENT_BYTES = 1024 * 1024  # a longer SSE line is not a usage chunk; it is skipped
REQUEST_ID_HEADER = "X-Quota-Request-Id"
OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
DEFAULTS: dict[str, Any] = {
    "paths": [],
    "methods": ["POST"],
    "key_header": "Authorization",
    "user_header": "X-Quota-User",
    "model_header": "X-Quota-Model",
    "tokens_header": "X-Quota-Tokens",
    "request_id_header": None,
    "chars_per_token": 4,
    "default_output_tokens": 0,
    "mapper": None,
}


class QuotaRequestError(Exception):
    """The request cannot be mapped to a check; answered with ``status`` and a JSON body."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"detail": message, **extra}


@dataclass(frozen=True)
class QuotaRequest:
    """What one request asks of the quota: whose key, which end user, model and estimate."""

    key: str
    user_id: str
    model: str
    tokens: int
    input_tokens: int  # the part of ``tokens`` that is the prompt; settled on errors
    request_id: str | None = None


@dataclass
class QuotaGrant:
    """An allowed check of one request (``request.quota_grant``), settled exactly once."""

    tenant_id: int
    decision: engine.Decision
    tokens: int
    input_tokens: int
    settlement: UsageOutcome | None = None
    settled: bool = False

    @property
    def request_id(self) -> str:
        return self.decision.request_id

    def settle(self, input_tokens: int, output_tokens: int, status: str = "ok") -> None:
        """Report what the inference used; later calls change nothing.

        Never raises: the response is already on its way. While Redis is away the report
        is kept in Postgres and applied when Redis is back; only with Postgres away too does
        the estimate stand (and a concurrency slot frees itself after its lease).
        """
        if self.settled:
            return
        self.settled = True
        try:
            self.settlement = usage_report(
                tenant_id=self.tenant_id,
                request_id=self.request_id,
                input_tokens=min(max(0, input_tokens), MAX_TOKENS),
                output_tokens=min(max(0, output_tokens), MAX_TOKENS),
                status=status,
            )
        except engine.EngineUnavailable:
            logger.warning("quota: could not settle request %s; its estimate stands", self)
        except Exception:
            logger.exception("quota: settling request %s failed", self.request_id)

    def __str__(self) -> str:
        return self.request_id


@dataclass
class _Config:
    prefixes: tuple[str, ...]
    methods: frozenset[str]
    options: dict[str, Any]
    mapper: Callable[[HttpRequest], QuotaRequest]


_configs: dict[int, tuple[Any, _Config]] = {}


def _config() -> _Config:
    raw = settings.QUOTA_MIDDLEWARE
    cached = _configs.get(id(raw))
    if cached is not None and cached[0] is raw:
        return cached[1]
    options = {**DEFAULTS, **raw}
    mapper = import_string(options["mapper"]) if options["mapper"] else openai_request
    config = _Config(
        prefixes=tuple(options["paths"]),
        methods=frozenset(method.upper() for method in options["methods"]),
        options=options,
        mapper=mapper,
    )
    _configs.clear()
    _configs[id(raw)] = (raw, config)
    return config


# -- estimating ------------------------------------------------------------------------
def _text_size(value: Any) -> int:
    """Characters of prompt text in an OpenAI-style field; a token id counts four."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return 4
    if isinstance(value, list):
        return sum(_text_size(item) for item in value)
    if isinstance(value, dict):
        # A chat message ({"role", "content"}) or a content part ({"type": "text", "text"}).
        return _text_size(value.get("content")) + _text_size(value.get("text"))
    return 0


def estimate_tokens(text_size: int, chars_per_token: int) -> int:
    return math.ceil(text_size / max(1, chars_per_token))


def _whole(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def openai_request(request: HttpRequest) -> QuotaRequest:
    """The default mapping, for OpenAI-style JSON bodies (chat, completions, embeddings)."""
    options = _config().options
    body: dict[str, Any] = {}
    if request.body:
        try:
            parsed = json.loads(request.body)
        except (ValueError, RecursionError):
            raise QuotaRequestError(400, "The body is not valid JSON.") from None
        if not isinstance(parsed, dict):
            raise QuotaRequestError(400, "The body must be a JSON object.")
        body = parsed
    key = _key(request, options["key_header"])
    user = body.get("user")
    if user is None:
        user = request.headers.get(options["user_header"])
    if user is None:
        # A client that names no end user (an OpenAI SDK left as it is) is one user: its key.
        parsed_key = apikey_parse(key)
        if parsed_key is None:
            raise QuotaRequestError(401, "The API key is not valid, or it was revoked.")
        user = f"key:{parsed_key.prefix}"
    model = body.get("model")
    if model is None:
        model = request.headers.get(options["model_header"])
    if not isinstance(user, str) or not user:
        raise QuotaRequestError(400, "The end user ('user' in the body) must be a string.")
    if not isinstance(model, str) or not model:
        raise QuotaRequestError(400, "Name the model: a 'model' field in the body.")
    chars_per_token = options["chars_per_token"]
    size = sum(_text_size(body.get(name)) for name in ("messages", "prompt", "input"))
    input_tokens = estimate_tokens(size, chars_per_token)
    allowance = next(
        (found for name in OUTPUT_FIELDS if (found := _whole(body.get(name))) is not None),
        options["default_output_tokens"],
    )
    choices = _whole(body.get("n")) or 1
    tokens = input_tokens + allowance * min(choices, 128)
    sent = request.headers.get(options["tokens_header"])
    if sent is not None:
        tokens = _header_tokens(sent, options["tokens_header"])
        input_tokens = min(input_tokens, tokens)
    request_id = None
    if options["request_id_header"]:
        request_id = request.headers.get(options["request_id_header"]) or None
    return QuotaRequest(key, user, model, min(tokens, MAX_TOKENS), input_tokens, request_id)


def _key(request: HttpRequest, header: str) -> str:
    value = request.headers.get(header, "")
    if header.lower() == "authorization":
        scheme, _, credentials = value.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise QuotaRequestError(401, "Send the API key as 'Authorization: Bearer <key>'.")
        return credentials.strip()
    if not value.strip():
        raise QuotaRequestError(401, f"Send the API key in the {header} header.")
    return value.strip()


def _header_tokens(value: str, header: str) -> int:
    text = value.strip()
    if not text.isdigit() or int(text) > MAX_TOKENS:
        raise QuotaRequestError(400, f"{header} must be a whole number from 0 to {MAX_TOKENS}.")
    return int(text)


# -- usage in responses ----------------------------------------------------------------
def usage_tokens(value: Any) -> tuple[int, int] | None:
    """(input, output) of an OpenAI ``usage`` object, or None when there is none."""
    if not isinstance(value, dict):
        return None
    prompt = _whole(value.get("prompt_tokens", value.get("input_tokens")))
    completion = _whole(value.get("completion_tokens", value.get("output_tokens", 0)))
    if prompt is None:
        return None
    return prompt, completion or 0


def _choice_text_size(choices: Any) -> int:
    if not isinstance(choices, list):
        return 0
    size = 0
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        for part in (choice.get("delta"), choice.get("message")):
            if isinstance(part, dict):
                size += _text_size(part.get("content"))
        size += _text_size(choice.get("text"))
    return size


@dataclass
class StreamUsage:
    """Reads an OpenAI-style server-sent event stream as it passes: the last ``usage`` seen,
    and how much text went out, for a stream that never reports its usage."""

    usage: tuple[int, int] | None = None
    text_size: int = 0
    finished: bool = False  # the ``data: [DONE]`` line went out
    _pending: bytes = field(default=b"", repr=False)

    def feed(self, chunk: bytes | str) -> None:
        if isinstance(chunk, str):
            chunk = chunk.encode()
        if b"\n" not in chunk:
            self._pending += chunk
            if len(self._pending) > MAX_EVENT_BYTES:
                self._pending = b""
            return
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        for line in lines:
            self._line(line.strip())

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.finished = True
            return
        try:
            event = json.loads(payload)
        except (ValueError, RecursionError):
            return
        if not isinstance(event, dict):
            return
        usage = usage_tokens(event.get("usage"))
        if usage is not None:
            self.usage = usage
        self.text_size += _choice_text_size(event.get("choices"))


class _Settler:
    """Settles a streamed response's grant on what the stream showed."""

    def __init__(self, grant: QuotaGrant, chars_per_token: int) -> None:
        self.grant = grant
        self.chars_per_token = chars_per_token
        self.reader = StreamUsage()

    def finish(self, status: str) -> None:
        if self.grant.settled:
            return
        reader = self.reader
        if reader.usage is not None:
            input_tokens, output_tokens = reader.usage
        else:
            input_tokens = self.grant.input_tokens
            output_tokens = estimate_tokens(reader.text_size, self.chars_per_token)
        self.grant.settle(input_tokens, output_tokens, status)


class _SettlingStream:
    """The streamed body of an allowed request: passes every chunk on unchanged and settles
    the grant when the stream ends, fails, or is closed early (the client went away).

    A class, not a generator: a generator closed before its first chunk never runs its
    ``finally``, and a client can leave before the first chunk."""

    def __init__(self, inner: Any, settler: _Settler) -> None:
        self._inner = inner
        self._chunks = iter(inner)
        self._settler = settler

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self._settler.finish("ok")
            raise
        except BaseException:
            self._settler.finish("error")
            raise
        self._settler.reader.feed(chunk)
        return chunk

    def close(self) -> None:
        # Django calls this when the server is done with the response: after the last
        # chunk, or when writing to a client that went away failed.
        self._settler.finish("cancelled")
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()


async def _settling_async_stream(
    inner: AsyncIterator[Any], settler: _Settler
) -> AsyncIterator[Any]:
    status = "cancelled"
    try:
        async for chunk in inner:
            settler.reader.feed(chunk)
            yield chunk
        status = "ok"
    except Exception:
        status = "error"
        raise
    finally:
        settler.finish(status)


# -- the middleware --------------------------------------------------------------------
class QuotaMiddleware:
    """Checks guarded requests before the view and settles their usage after it."""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        config = _config()
        path = request.path_info
        if not any(path.startswith(prefix) for prefix in config.prefixes):
            return self.get_response(request)
        if request.method not in config.methods:
            return self.get_response(request)
        answer = self._check(request, config)
        if isinstance(answer, HttpResponseBase):
            return answer
        grant = answer
        request.quota_grant = grant  # type: ignore[attr-defined]
        try:
            response = self.get_response(request)
        except BaseException:
            grant.settle(grant.input_tokens, 0, "error")
            raise
        for name, value in ratelimit_headers(grant.decision).items():
            response[name] = value
        response[REQUEST_ID_HEADER] = grant.request_id
        if not grant.settled:
            self._settle(response, grant, config.options["chars_per_token"])
        return response

    def _check(self, request: HttpRequest, config: _Config) -> QuotaGrant | HttpResponseBase:
        from limits.views import decision_json

        try:
            asked = config.mapper(request)
            user_id = normalize_user_id(asked.user_id)
            model = normalize_model_id(asked.model)
        except QuotaRequestError as error:
            return _error(error.status, error.body)
        except InvalidIdentifier as error:
            return _error(400, {"detail": f"The user or model id {error}."})
        except RequestDataTooBig:
            return _error(413, {"detail": "The body is too large."})
        client = api_client_for(asked.key)
        if client is None:
            return _error(401, {"detail": "The API key is not valid, or it was revoked."})
        try:
            decision = engine.check(
                client.tenant_id,
                user_id,
                model,
                tokens=asked.tokens,
                request_id=asked.request_id,
                api_key_id=client.key_id,
                fail_mode=client.fail_mode,
            )
        except engine.UnknownModel:
            return _error(400, {"model": [f"Unknown model {model!r}."]})
        except engine.UnknownTenant:
            return _error(403, {"detail": "This key's tenant is not active."})
        if not decision.allowed:
            response = JsonResponse(decision_json(decision), status=429)
            for name, value in ratelimit_headers(decision).items():
                response[name] = value
            response[REQUEST_ID_HEADER] = decision.request_id
            return response
        return QuotaGrant(
            tenant_id=client.tenant_id,
            decision=decision,
            tokens=asked.tokens,
            input_tokens=asked.input_tokens,
        )

    def _settle(self, response: HttpResponseBase, grant: QuotaGrant, chars_per_token: int) -> None:
        if isinstance(response, StreamingHttpResponse):
            if response.status_code >= 400:
                grant.settle(grant.input_tokens, 0, "error")
                return
            settler = _Settler(grant, chars_per_token)
            if response.is_async:
                response.streaming_content = _settling_async_stream(
                    response.streaming_content,  # type: ignore[arg-type]
                    settler,
                )
            else:
                response.streaming_content = _SettlingStream(response.streaming_content, settler)
            return
        body = None
        if response.get("Content-Type", "").startswith("application/json"):
            try:
                body = json.loads(response.content)  # type: ignore[attr-defined]
            except (ValueError, RecursionError):
                body = None
        if not isinstance(body, dict):
            body = {}
        usage = usage_tokens(body.get("usage"))
        if response.status_code >= 400:
            input_tokens, output_tokens = usage or (grant.input_tokens, 0)
            grant.settle(input_tokens, output_tokens, "error")
        elif usage is not None:
            grant.settle(*usage)
        else:
            sent = estimate_tokens(_choice_text_size(body.get("choices")), chars_per_token)
            grant.settle(grant.input_tokens, sent)


def _error(status: int, body: dict[str, Any]) -> JsonResponse:
    response = JsonResponse(body, status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="api"'
    return response
