"""Checks the over-limit cache already knows to be denied, answered in front of Django.

A tenant far over a limit sends many checks that are all denied; with the over-limit cache
on, the engine answers each with one small script (``limits/overlimit.py``), yet every one
still went through Django's middleware, DRF's request, authentication, content negotiation
and rendering: about a millisecond and a half of a worker's CPU here, taken from every other
tenant's checks on the same cores. This WSGI front answers such a check itself, in a few
hundred microseconds, and hands everything else to Django untouched.

It answers only when every step the full path would take is known to end the same way:

- ``POST`` to the check endpoint's exact path, a JSON body of at most
  ``QUOTA_API_MAX_BODY_BYTES`` that the check's own serializer accepts, not a dry run;
- a Host that Django accepts (``ALLOWED_HOSTS``), and none of the settings that make
  Django's middleware redirect or refuse requests (``SECURE_SSL_REDIRECT``,
  ``PREPEND_WWW``, ``DISALLOWED_USER_AGENTS``);
- an API key this process verified moments ago (``limits.authentication``; never a query);
- the engine's over-limit cache answering (``engine.check_known_denied``).

Anything else, including an error of any kind on the way, goes to Django with the body it
read put back. The answer is the one Django would give: the body is rendered by the same
function and renderer, and the headers Django's middleware adds are those of the last check
Django answered in this process (the front answers nothing before it has seen one).
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.core.handlers.wsgi import WSGIRequest
from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.renderers import JSONRenderer

from limits import engine
from limits.authentication import ApiClient, api_client_cached
from limits.headers import ratelimit_headers
from limits.parsers import json_from_body
from limits.serializers import CheckRequestSerializer
from limits.views import decision_json

logger = logging.getLogger(__name__)

CHECK_PATH = "/api/v1/check"
# The view sets these per decision (limits/headers.py); everything else Django adds is the
# same for every check answer and is learnt, in its order, from the last one.
_DECISION_HEADERS = frozenset({"ratelimit", "ratelimit-policy", "retry-after"})
_DECISION_PREFIX = "x-ratelimit-"
_DECISION, _LENGTH = ("", "decision"), ("Content-Length", "")

StartResponse = Callable[..., Any]


def _template(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Django's headers with the decision's replaced by one mark, the length by another."""
    template: list[tuple[str, str]] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered in _DECISION_HEADERS or lowered.startswith(_DECISION_PREFIX):
            if _DECISION not in template:
                template.append(_DECISION)
        elif lowered == "content-length":
            template.append(_LENGTH)
        else:
            template.append((name, value))
    if _DECISION not in template:  # an allowed check with no limit: after the content type
        template.insert(1, _DECISION)
    return template


class CachedDenialsFront:
    """WSGI application: known denials of the check endpoint here, the rest to ``app``."""

    def __init__(self, app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]]) -> None:
        self.app = app
        self._headers: list[tuple[str, str]] | None = None  # _template() of Django's last
        self._lock = threading.Lock()
        self._enabled: bool | None = None
        self._renderer = JSONRenderer()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != CHECK_PATH or environ.get("REQUEST_METHOD") != "POST":
            return self.app(environ, start_response)
        if self._headers is not None and self._is_enabled():
            try:
                answered = self._answer(environ, start_response)
            except Exception:  # noqa: BLE001 - whatever it was, Django decides this one
                logger.exception("cached denials: a check is handed to Django")
                answered = None
            if answered is not None:
                return answered
        return self.app(environ, self._learning(start_response))

    def _is_enabled(self) -> bool:
        if self._enabled is None:
            self._enabled = bool(
                float(settings.QUOTA_OVER_LIMIT_CACHE_SECONDS) > 0
                and not settings.SECURE_SSL_REDIRECT
                and not settings.PREPEND_WWW
                and not settings.DISALLOWED_USER_AGENTS
            )
        return self._enabled

    def _learning(self, start_response: StartResponse) -> StartResponse:
        """``start_response`` that keeps the common headers of Django's check answers."""

        def learn(status: str, headers: list[tuple[str, str]], *rest: Any) -> Any:
            if status.startswith("200 "):
                template = _template(headers)
                if template != self._headers:
                    with self._lock:
                        self._headers = template
            return start_response(status, headers, *rest)

        return learn

    def _answer(
        self, environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes] | None:
        authorization = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        client = api_client_cached(credentials)
        if client is None or not engine.known_denials_possible(client.tenant_id):
            return None
        content_type = environ.get("CONTENT_TYPE", "")
        if content_type.split(";", 1)[0].strip().lower() != "application/json":
            return None
        try:
            length = int(environ.get("CONTENT_LENGTH") or "")
        except ValueError:
            return None
        if not 0 < length <= settings.QUOTA_API_MAX_BODY_BYTES:
            return None
        body = environ["wsgi.input"].read(length)
        # From here on, Django must find the body where it looks for it.
        environ["wsgi.input"] = io.BytesIO(body)
        if len(body) != length:
            return None
        request = WSGIRequest(environ)
        try:
            request.get_host()
        except DisallowedHost:
            return None
        decision = _known_denial(body, client)
        if decision is None:
            return None
        content = self._renderer.render(decision_json(decision))
        headers: list[tuple[str, str]] = []
        for header in self._headers or ():
            if header is _DECISION:
                headers.extend(ratelimit_headers(decision).items())
            elif header is _LENGTH:
                headers.append(("Content-Length", str(len(content))))
            else:
                headers.append(header)
        start_response("200 OK", headers)
        return [content]


def _known_denial(body: bytes, client: ApiClient) -> engine.Decision | None:
    try:
        data = json_from_body(body)
        valid = CheckRequestSerializer.validated(data)
    except (ParseError, ValidationError):
        return None
    if valid["dry_run"]:
        return None
    return engine.check_known_denied(
        client.tenant_id,
        valid["user_id"],
        valid["model"],
        tokens=valid["tokens"],
        request_id=valid.get("request_id"),
        api_key_id=client.key_id,
    )
