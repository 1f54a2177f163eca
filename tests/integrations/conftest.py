"""Shared pieces of the integration tests: a fake inference server, and a guarded world."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from limits import engine, services
from limits.models import Metric, Scope
from tests.factories import LimitRuleFactory
from tests.integrations.upstream import Behaviour, FakeUpstream

TOKENS_PER_HOUR = 1000
IN_FLIGHT = 2


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
