"""The WSGI front that answers known denials before Django (limits/cached_denials.py): it
answers exactly what Django would, and hands Django every check it cannot answer so."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections

from limits import engine
from limits.cached_denials import CHECK_PATH, CachedDenialsFront
from tests.limits.test_engine import GPT, LLAMA, Clock, PolicyBuilder, check

pytestmark = pytest.mark.django_db


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


class Django:
    """Django's WSGI application, counting the requests that reach it."""

    def __init__(self) -> None:
        self.app = get_wsgi_application()
        self.calls = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        self.calls += 1
        return self.app(environ, start_response)


def call(
    app: Any,
    body: Any,
    *,
    key: str | None,
    path: str = CHECK_PATH,
    method: str = "POST",
    content_type: str = "application/json",
    host: str = "localhost",
) -> Answer:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": host,
        "CONTENT_TYPE": content_type,
        "CONTENT_LENGTH": str(len(raw)),
        "wsgi.input": io.BytesIO(raw),
        "wsgi.errors": io.StringIO(),
        "wsgi.url_scheme": "http",
        "wsgi.version": (1, 0),
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    if key is not None:
        environ["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    started: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started["status"], started["headers"] = status, headers

    chunks = app(environ, start_response)
    try:
        content = b"".join(chunks)
    finally:
        if hasattr(chunks, "close"):
            chunks.close()
    return Answer(int(started["status"].split()[0]), started["headers"], content)


@pytest.fixture
def policy(world, settings) -> PolicyBuilder:
    from tests.limits.test_engine import START

    settings.QUOTA_OVER_LIMIT_CACHE_SECONDS = 5
    settings.QUOTA_BACKEND = "redis"
    # Not a test of fail modes: a busy machine must not turn an answer into a degraded one.
    settings.QUOTA_REDIS_TIMEOUT_MS = 2000
    engine.reset_state()
    Clock(settings).set(START)
    world.rule.delete()
    return PolicyBuilder(world)


@pytest.fixture
def key(policy) -> str:
    from limits.services import SYSTEM, apikey_create

    _, raw = apikey_create(tenant=policy.alice, name="backend", actor=SYSTEM)
    return raw


@pytest.fixture
def django_app() -> Iterator[Django]:
    # As Django's test client does: the test's transaction holds the connection, which the
    # end of a request would otherwise close.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield Django()
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def front(django_app) -> CachedDenialsFront:
    return CachedDenialsFront(django_app)


def fill_tenant(policy: PolicyBuilder, front: CachedDenialsFront, key: str) -> None:
    """Alice's tenant window (3 an hour) filled over HTTP; the denial that follows, answered
    by Django, leaves it in the over-limit cache."""
    policy.rule("tenant", "requests", 3)
    policy.publish()
    for number in range(3):
        assert call(front, {"user_id": f"filler-{number}", "model": GPT}, key=key).json()["allowed"]
    assert call(front, {"user_id": "first-denied", "model": GPT}, key=key).json()["allowed"] is (
        False
    )


def test_a_known_denial_is_answered_in_front_as_django_answers_it(policy, key, front, django_app):
    fill_tenant(policy, front, key)
    before = django_app.calls
    ours = call(front, {"user_id": "someone", "model": LLAMA, "request_id": "r-front"}, key=key)
    assert django_app.calls == before  # answered in front
    # The same check, another request id, answered by Django (its engine path also
    # answers from the cache, so both list only the denying limit).
    theirs = call(
        django_app, {"user_id": "someone", "model": LLAMA, "request_id": "r-other"}, key=key
    )
    assert (ours.status, theirs.status) == (200, 200)
    assert ours.headers == theirs.headers
    mine, django = ours.json(), theirs.json()
    assert (mine.pop("request_id"), django.pop("request_id")) == ("r-front", "r-other")
    assert mine == django
    assert mine["allowed"] is False and mine["denied_by"]["scope"] == "tenant"
    assert ours.header("Retry-After") is not None and ours.header("X-Frame-Options") == "DENY"
    # The request id keeps its denial: a repeat through Django answers it as repeated.
    repeat = call(
        django_app, {"user_id": "someone", "model": LLAMA, "request_id": "r-front"}, key=key
    )
    assert repeat.json()["allowed"] is False
    assert engine.check_known_denied(policy.alice.pk, "someone", LLAMA, request_id="r-front")


def test_a_request_id_allowed_before_is_answered_allowed(policy, key, front, django_app):
    policy.rule("tenant", "requests", 2)
    policy.publish()
    assert call(front, {"user_id": "u1", "model": GPT, "request_id": "r-1"}, key=key).json()[
        "allowed"
    ]
    assert call(front, {"user_id": "u2", "model": GPT}, key=key).json()["allowed"]
    assert not call(front, {"user_id": "u3", "model": GPT}, key=key).json()["allowed"]
    before = django_app.calls
    again = call(front, {"user_id": "u1", "model": GPT, "request_id": "r-1"}, key=key)
    assert django_app.calls == before
    assert again.json()["allowed"] is True


@pytest.mark.parametrize(
    "case",
    [
        "no key",
        "unknown key",
        "form body",
        "not json",
        "repeated field",
        "no model",
        "negative tokens",
        "unknown model",
        "dry run",
        "bad host",
        "too large",
        "other path",
        "trailing slash",
        "GET",
    ],
)
def test_what_the_front_cannot_answer_as_django_would_goes_to_django(
    policy, key, front, django_app, case
):
    fill_tenant(policy, front, key)
    body: Any = {"user_id": "someone", "model": GPT}
    options: dict[str, Any] = {"key": key}
    if case == "no key":
        options["key"] = None
    elif case == "unknown key":
        options["key"] = key[:-4] + "0000"
    elif case == "form body":
        body = b"user_id=someone&model=gpt-4o"
        options["content_type"] = "application/x-www-form-urlencoded"
    elif case == "not json":
        body = b'{"user_id": "someone", "model": '
    elif case == "repeated field":
        body = b'{"user_id": "someone", "user_id": "other", "model": "gpt-4o"}'
    elif case == "no model":
        del body["model"]
    elif case == "negative tokens":
        body["tokens"] = -1
    elif case == "unknown model":
        body["model"] = "no-such-model"
    elif case == "dry run":
        body["dry_run"] = True
    elif case == "bad host":
        options["host"] = "evil.example"
    elif case == "too large":
        body["user_id"] = "x" * 70_000
    elif case == "other path":
        options["path"] = "/api/v1/quota"
    elif case == "trailing slash":
        options["path"] = CHECK_PATH + "/"
    elif case == "GET":
        options["method"] = "GET"
    before = django_app.calls
    ours = call(front, body, **options)
    assert django_app.calls == before + 1
    theirs = call(django_app, body, **options)
    assert ours.status == theirs.status
    if case == "dry run":
        assert ours.json()["allowed"] is False and len(ours.json()["limits"]) == 1
    else:
        assert ours.status >= 400
        assert ours.body == theirs.body


def test_nothing_is_answered_in_front_before_django_answered_a_check(
    policy, key, front, django_app
):
    policy.rule("tenant", "requests", 1)
    policy.publish()
    assert check(policy.alice, "filler").allowed
    assert not check(policy.alice, "first-denied").allowed  # the window is in the cache
    before = django_app.calls
    answer = call(front, {"user_id": "someone", "model": GPT}, key=key)
    assert django_app.calls == before + 1  # its headers were not known yet
    assert answer.json()["allowed"] is False
    call(front, {"user_id": "someone-else", "model": GPT}, key=key)
    assert django_app.calls == before + 1


def test_the_front_stands_aside_when_the_cache_is_off(policy, key, front, django_app, settings):
    settings.QUOTA_OVER_LIMIT_CACHE_SECONDS = 0
    engine.reset_state()
    policy.rule("tenant", "requests", 1)
    policy.publish()
    for user in ("a", "b", "c"):
        call(front, {"user_id": user, "model": GPT}, key=key)
    assert django_app.calls == 3


def test_an_allowed_check_is_never_answered_in_front(policy, key, front, django_app):
    fill_tenant(policy, front, key)
    before = django_app.calls
    # Bob's windows are not full: his check goes to Django and is admitted.
    from limits.services import SYSTEM, apikey_create

    _, bob_key = apikey_create(tenant=policy.bob, name="backend", actor=SYSTEM)
    answer = call(front, {"user_id": "someone", "model": GPT}, key=bob_key)
    assert django_app.calls == before + 1
    assert answer.json()["allowed"] is True
