"""Shared pieces of the integration tests: a fake inference server; a guarded world for
tests in this process; and, for modules that ask for them, a committed world
(``tests.api.live``) with gunicorn serving it, one of each per module."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from limits import engine, services
from limits.models import Metric, Scope
from tests.api.live import (
    CONCURRENT,
    Gunicorn,
    LiveWorld,
    live_world_create,
    live_world_delete,
    new_prefix,
)
from tests.factories import LimitRuleFactory
from tests.integrations.upstream import Behaviour, FakeUpstream

TOKENS_PER_HOUR = 1000
IN_FLIGHT = 2
LIVE_IN_FLIGHT = CONCURRENT


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture
def upstream(upstream_server, settings) -> FakeUpstream:
    """The fake inference server, fresh behaviour, and the platform pointed at it."""
    upstream_server.reset()
    settings.UPSTREAM_URL = upstream_server.url
    return upstream_server


@pytest.fixture
def behaviour(upstream) -> Behaviour:
    return upstream.behaviour


@dataclass
class Guarded:
    alice_key: str
    bob_key: str


def publish() -> None:
    version = services.policy_publish(actor=services.SYSTEM, reason="integration test", force=True)
    assert version is not None
    engine.policy_store().publish(version.version, version.document)


@pytest.fixture
def guarded(world) -> Guarded:
    """The world's tier with, per end user and model, 100 requests and 1000 tokens an hour,
    and 2 requests in flight per end user; an API key for alice and one for bob."""
    LimitRuleFactory(
        tier=world.tier, metric=Metric.TOKENS, limit=TOKENS_PER_HOUR, window_seconds=3600
    )
    LimitRuleFactory(
        tier=world.tier,
        scope=Scope.USER,
        metric=Metric.CONCURRENCY,
        limit=IN_FLIGHT,
        window_seconds=None,
    )
    _, alice_key = services.apikey_create(tenant=world.alice, name="svc", actor=services.SYSTEM)
    _, bob_key = services.apikey_create(tenant=world.bob, name="svc", actor=services.SYSTEM)
    publish()
    return Guarded(alice_key, bob_key)


@pytest.fixture
def fake(upstream_server) -> Behaviour:
    """The fake inference server's fresh behaviour (for the gunicorn it serves)."""
    return upstream_server.reset()


@pytest.fixture(scope="module")
def live_world(django_db_setup, django_db_blocker) -> Iterator[LiveWorld]:
    prefix = new_prefix()
    with django_db_blocker.unblock():
        try:
            yield live_world_create(prefix)
        finally:
            live_world_delete(prefix)
            engine.reset_state()


@pytest.fixture(scope="module")
def platform(live_world, upstream_server, tmp_path_factory) -> Iterator[Gunicorn]:
    """gunicorn serving the committed world, its pass-through pointed at the fake server."""
    gunicorn = Gunicorn(
        tmp_path_factory.mktemp("gunicorn"),
        prefix=live_world.prefix,
        environ={"UPSTREAM_URL": upstream_server.url},
    )
    gunicorn.start()
    yield gunicorn
    gunicorn.stop()


@pytest.fixture
def user() -> str:
    """An end-user id of this test's own: nothing was counted for it before."""
    return f"user-{uuid.uuid4().hex[:10]}"
