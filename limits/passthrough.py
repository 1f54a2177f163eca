"""The guarded pass-through: OpenAI-compatible routes forwarded to ``UPSTREAM_URL``.

``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` go to the
inference server untouched, behind ``QuotaMiddleware`` (which checks before and settles
after), so a team puts the platform in front of an existing OpenAI-compatible server
(vLLM, TGI, llama.cpp, Ollama, a LiteLLM proxy) without changing it or its clients.
``UPSTREAM_URL`` is the server's base URL as OpenAI clients take it
(``http://127.0.0.1:8001/v1``): ``/v1/chat/completions`` goes to
``<UPSTREAM_URL>/chat/completions``.

- The body and ``Content-Type``/``Accept`` go as they came. The caller's ``Authorization``
  (the platform's API key) never reaches the upstream; ``UPSTREAM_API_KEY``, when set, is
  sent instead. ``X-Quota-Request-Id`` tells the upstream which check it serves.
- Server-sent events (``text/event-stream``) pass chunk by chunk as the upstream sends them.
- Upstream answers of any status pass through with their body.
- An upstream that cannot be reached (refused, reset, or silent past
  ``UPSTREAM_TIMEOUT_SECONDS``) is answered ``502`` with a JSON error, and the check's
  reservation is released: settled as an error with no tokens.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import urllib3
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from limits.middleware import REQUEST_ID_HEADER, QuotaGrant

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
CONNECT_TIMEOUT_SECONDS = 5.0
POOL_SIZE = 32
FORWARDED_REQUEST_HEADERS = ("Content-Type", "Accept", "User-Agent", "X-Request-Id")
# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the platform sets itself.
DROPPED_RESPONSE_HEADERS = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "content-encoding",
    "date",
    "server",
}

_pools: dict[int, urllib3.PoolManager] = {}


def _pool() -> urllib3.PoolManager:
    """One connection pool per process (never shared across a fork)."""
    pid = os.getpid()
    pool = _pools.get(pid)
    if pool is None:
        pool = _pools[pid] = urllib3.PoolManager(
            num_pools=4,
            maxsize=POOL_SIZE,
            retries=False,
            timeout=urllib3.Timeout(
                connect=CONNECT_TIMEOUT_SECONDS, read=settings.UPSTREAM_TIMEOUT_SECONDS
            ),
        )
    return pool


def _error(status: int, message: str, kind: str) -> JsonResponse:
    # OpenAI's error shape, which OpenAI-compatible clients already know how to show.
    return JsonResponse({"error": {"message": message, "type": kind, "code": None}}, status=status)


class _Relay:
    """An upstream event stream, chunk by chunk as it arrives; closing it early drops the
    upstream connection, which tells the inference server to stop generating."""

    def __init__(self, upstream: urllib3.BaseHTTPResponse) -> None:
        self._upstream = upstream
        self._done = False

    def __iter__(self) -> _Relay:
        return self

    def __next__(self) -> bytes:
        if self._done:
            raise StopIteration
        try:
            chunk = self._upstream.read1(CHUNK_BYTES)
        except BaseException:
            self._drop()
            raise
        if not chunk:
            self._done = True
            self._upstream.release_conn()
            raise StopIteration
        return chunk

    def _drop(self) -> None:
        self._done = True
        self._upstream.close()
        self._upstream.release_conn()

    def close(self) -> None:
        if not self._done:
            self._drop()


def _forward(request: HttpRequest, target: str) -> HttpResponse | StreamingHttpResponse:
    grant: QuotaGrant | None = getattr(request, "quota_grant", None)
    if grant is None:
        # Forwarding without a check would hand out free inference: refuse loudly.
        logger.error("pass-through: %s is not guarded by QuotaMiddleware", request.path)
        return _error(
            500,
            "This route is not guarded by QuotaMiddleware (QUOTA_MIDDLEWARE['paths']).",
            "server_error",
        )
    base = settings.UPSTREAM_URL
    if not base:
        grant.settle(0, 0, "error")
        return _error(503, "No inference server is configured (UPSTREAM_URL).", "server_error")
    headers = {
        name: request.headers[name] for name in FORWARDED_REQUEST_HEADERS if name in request.headers
    }
    headers[REQUEST_ID_HEADER] = grant.request_id
    if settings.UPSTREAM_API_KEY:
        headers["Authorization"] = f"Bearer {settings.UPSTREAM_API_KEY}"
    url = f"{base.rstrip('/')}/{target}"
    try:
        upstream = _pool().request(
            "POST",
            url,
            body=request.body,
            headers=headers,
            preload_content=False,
            redirect=False,
        )
    except urllib3.exceptions.HTTPError as error:
        return _unreachable(grant, url, error)
    content_type = upstream.headers.get("Content-Type", "")
    response: HttpResponse | StreamingHttpResponse
    if content_type.startswith("text/event-stream"):
        response = StreamingHttpResponse(
            _Relay(upstream), status=upstream.status, content_type=content_type
        )
        # Proxies in front of us (nginx) must not hold events back to fill a buffer.
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
    else:
        try:
            body = upstream.read()
        except urllib3.exceptions.HTTPError as error:
            upstream.close()
            return _unreachable(grant, url, error)
        finally:
            upstream.release_conn()
        response = HttpResponse(
            body, status=upstream.status, content_type=content_type or "application/json"
        )
    for name, value in upstream.headers.items():
        if name.lower() not in DROPPED_RESPONSE_HEADERS and name.lower() != "content-type":
            response[name] = value
    return response


def _unreachable(grant: QuotaGrant, url: str, error: Exception) -> JsonResponse:
    logger.warning("pass-through: %s is unreachable: %s", url, error)
    grant.settle(0, 0, "error")
    return _error(502, "The inference server is unreachable; try again.", "upstream_unavailable")


def _view(target: str) -> Any:
    @csrf_exempt
    @require_POST
    def view(request: HttpRequest) -> HttpResponse | StreamingHttpResponse:
        return _forward(request, target)

    view.__name__ = view.__qualname__ = f"passthrough_{target.replace('/', '_')}"
    return view


chat_completions = _view("chat/completions")
completions = _view("completions")
embeddings = _view("embeddings")
