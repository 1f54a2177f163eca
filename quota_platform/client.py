"""A Python client of the quota platform's check API, for services that run inference.

Standard library only, and no Django: copy this one file into a service, or install the
package. ::

    client = QuotaClient("http://quota.internal:8000", "qk_…", timeout=2.0, fail_open=False)
    with client.guard("user-42", "gpt-4o", tokens=1200) as guard:
        reply = call_the_model(...)
        guard.report(reply.usage.prompt_tokens, reply.usage.completion_tokens)

``guard`` checks (raising ``QuotaExceeded``, with ``retry_after`` in seconds, when denied),
runs the block, then reports what was used; when the block raises, it reports an error so
the reservation is released. ``check``, ``commit`` and ``quota`` are the three calls
underneath.

Retries: a request that times out, cannot connect, or gets a 5xx is sent again (``retries``
times, with a short growing pause) with the *same* ``request_id``, generated here once per
check: the platform answers a repeated id with its first decision and consumes nothing
more, so a retry after a timeout never counts twice. One keep-alive connection per thread
is reused across calls. When the platform stays unreachable, ``fail_open`` chooses: allow
(the decision is marked ``degraded``) or deny.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

logger = logging.getLogger(__name__)

RETRIED_STATUSES = {500, 502, 503, 504}


class QuotaError(Exception):
    """The platform refused the request itself (bad input, bad key): retrying won't help."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"quota platform answered {status}: {body}")
        self.status = status
        self.body = body


class QuotaUnavailable(Exception):
    """The platform could not be reached (or kept failing) after every retry."""


@dataclass(frozen=True)
class Decision:
    """The platform's answer to a check (the check API's JSON body)."""

    allowed: bool
    request_id: str
    retry_after: float | None = None  # seconds; None when allowed or when it can never pass
    denied_by: dict[str, Any] | None = None
    limits: list[dict[str, Any]] = field(default_factory=list)
    policy_version: int = 0
    degraded: bool = False  # decided by a fail mode, not by the shared counters
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, body: dict[str, Any], headers: dict[str, str]) -> Decision:
        return cls(
            allowed=bool(body["allowed"]),
            request_id=str(body["request_id"]),
            retry_after=body.get("retry_after"),
            denied_by=body.get("denied_by"),
            limits=list(body.get("limits") or []),
            policy_version=int(body.get("policy_version") or 0),
            degraded=bool(body.get("degraded", False)),
            headers=headers,
        )


class QuotaExceeded(Exception):
    """A guarded call was denied; ``retry_after`` says when to try again (None: not soon)."""

    def __init__(self, decision: Decision) -> None:
        denied = decision.denied_by
        reason = (
            f"{denied['scope']} {denied['metric']} limit {denied['limit']}"
            if denied
            else "the quota platform is unreachable"
            if decision.degraded
            else "denied"
        )
        super().__init__(f"quota exceeded: {reason}; retry after {decision.retry_after} s")
        self.decision = decision
        self.retry_after = decision.retry_after


class Guard:
    """What ``QuotaClient.guard`` yields: the decision, and where to report usage."""

    def __init__(self, decision: Decision, estimate: int) -> None:
        self.decision = decision
        self.estimate = estimate
        self.usage: tuple[int, int] | None = None

    @property
    def request_id(self) -> str:
        return self.decision.request_id

    def report(self, input_tokens: int, output_tokens: int) -> None:
        """What the inference really used; reported when the ``with`` block ends."""
        self.usage = (int(input_tokens), int(output_tokens))


class QuotaClient:
    """The check API over HTTP(S): ``check``, ``commit``, ``quota`` and ``guard``."""

    def __init__(
        self,
        url: str,
        key: str,
        *,
        timeout: float = 2.0,
        retries: int = 2,
        fail_open: bool = False,
        backoff: float = 0.05,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host[:port][/path], not {url!r}")
        self.url = url
        self.timeout = timeout
        self.retries = max(0, retries)
        self.fail_open = fail_open
        self.backoff = backoff
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port
        self._base_path = parts.path.rstrip("/")
        self._headers = {
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": "quota-platform-client/1",
        }
        self._local = threading.local()
        self._connections: list[http.client.HTTPConnection] = []
        self._connections_lock = threading.Lock()

    def __repr__(self) -> str:  # the key stays out of logs
        return f"QuotaClient({self.url!r})"

    # -- the three calls -------------------------------------------------------------
    def check(
        self,
        user_id: str,
        model: str,
        tokens: int = 0,
        request_id: str | None = None,
        dry_run: bool = False,
    ) -> Decision:
        """Ask before an inference. Every retry sends the same ``request_id``."""
        request_id = request_id or uuid.uuid4().hex
        body = {
            "user_id": user_id,
            "model": model,
            "tokens": tokens,
            "request_id": request_id,
            "dry_run": dry_run,
        }
        try:
            status, answer, headers = self._call("POST", "/api/v1/check", body)
        except QuotaUnavailable as error:
            logger.warning("quota: %s; failing %s", error, "open" if self.fail_open else "closed")
            return Decision(allowed=self.fail_open, request_id=request_id, degraded=True)
        if status != 200:
            raise QuotaError(status, answer)
        return Decision.from_json(answer, headers)

    def commit(
        self, request_id: str, input_tokens: int, output_tokens: int, status: str = "ok"
    ) -> dict[str, Any] | None:
        """Report what a checked inference used (idempotent); None for an unknown id.

        While the platform's Redis is away the platform keeps the report and applies it
        later: the answer then says ``"deferred": true``, and there is nothing to resend.
        """
        body = {
            "request_id": request_id,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "status": status,
        }
        code, answer, _headers = self._call("POST", "/api/v1/usage", body)
        if code == 404:
            return None
        if code not in (200, 202):
            raise QuotaError(code, answer)
        return dict(answer)

    def quota(self, user_id: str, model: str) -> dict[str, Any]:
        """Where a user stands on every limit of a model, consuming nothing."""
        query = urlencode({"user_id": user_id, "model": model})
        code, answer, _headers = self._call("GET", f"/api/v1/quota?{query}", None)
        if code != 200:
            raise QuotaError(code, answer)
        return dict(answer)

    @contextmanager
    def guard(
        self, user_id: str, model: str, tokens: int = 0, request_id: str | None = None
    ) -> Iterator[Guard]:
        """Check, run the block, report its usage. Raises ``QuotaExceeded`` when denied.

        Reported usage is committed as ``ok``; without a report the estimate stands. When the
        block raises, the reported usage (or nothing) is committed as an error, releasing
        the reservation, and the exception goes on.
        """
        decision = self.check(user_id, model, tokens, request_id)
        if not decision.allowed:
            raise QuotaExceeded(decision)
        guard = Guard(decision, tokens)
        status = "ok"
        try:
            yield guard
        except BaseException as error:
            status = "cancelled" if isinstance(error, KeyboardInterrupt) else "error"
            raise
        finally:
            if not decision.degraded:  # an outage's decision: the platform never saw it
                if guard.usage is not None:
                    used = guard.usage
                else:
                    used = (tokens, 0) if status == "ok" else (0, 0)
                try:
                    self.commit(decision.request_id, *used, status=status)
                except (QuotaUnavailable, QuotaError) as error:
                    logger.warning(
                        "quota: usage of %s not reported: %s", decision.request_id, error
                    )

    # -- transport -------------------------------------------------------------------
    def close(self) -> None:
        with self._connections_lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()
        self._local.__dict__.clear()

    def __enter__(self) -> QuotaClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _connection(self) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is None:
            factory = (
                http.client.HTTPSConnection
                if self._scheme == "https"
                else http.client.HTTPConnection
            )
            connection = factory(self._host, self._port, timeout=self.timeout)
            self._local.connection = connection
            with self._connections_lock:
                self._connections.append(connection)
        return connection

    def _drop_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None
            with self._connections_lock:
                if connection in self._connections:
                    self._connections.remove(connection)

    def _call(
        self, method: str, path: str, body: dict[str, Any] | None
    ) -> tuple[int, Any, dict[str, str]]:
        payload = None if body is None else json.dumps(body).encode()
        last_error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                pause = self.backoff * (2 ** (attempt - 1))
                time.sleep(pause + random.uniform(0, pause))  # noqa: S311 - jitter, not secrets
            try:
                connection = self._connection()
                connection.request(method, self._base_path + path, payload, self._headers)
                response = connection.getresponse()
                raw = response.read()
                headers = {name.lower(): value for name, value in response.getheaders()}
                if response.will_close:
                    self._drop_connection()
            except (OSError, http.client.HTTPException) as error:
                # A timeout, refused or reset connection, or a keep-alive connection the
                # server closed meanwhile: the state of the connection is unknown, drop it.
                self._drop_connection()
                last_error = f"{type(error).__name__}: {error}" if str(error) else repr(error)
                if isinstance(error, socket.timeout):
                    last_error = f"no answer within {self.timeout} s"
                continue
            if response.status in RETRIED_STATUSES:
                last_error = f"HTTP {response.status}"
                continue
            try:
                answer = json.loads(raw) if raw else None
            except ValueError:
                answer = raw.decode("utf-8", "replace")
            return response.status, answer, headers
        raise QuotaUnavailable(
            f"{self.url} did not answer {method} {path.split('?')[0]} "
            f"after {self.retries + 1} attempts ({last_error})"
        )
