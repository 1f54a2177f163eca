"""Shared fixtures: two tenants on one tier (so every feature can also prove isolation),
users in each group, a Redis key prefix of each test's own, a Redis Cluster, and a
redis-server of a test module's own for tests that stop, freeze or empty it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from django.contrib.auth.models import AbstractUser

from limits import engine
from limits.models import AIModel, LimitRule, ModelClass, Tenant, Tier
from tests.factories import (
    AIModelFactory,
    LimitRuleFactory,
    ModelClassFactory,
    TenantFactory,
    TierFactory,
    UserFactory,
)
from tests.processes import RedisServer


@pytest.fixture(autouse=True)
def isolated_quota_state(settings):
    """A fresh Redis key namespace and empty in-process engine state for every test."""
    settings.QUOTA_KEY_PREFIX = f"qt{uuid.uuid4().hex[:12]}"
    engine.reset_state()
    yield
    engine.reset_state()


@dataclass
class World:
    tier: Tier
    frontier: ModelClass
    small: ModelClass
    gpt: AIModel
    llama: AIModel
    alice: Tenant
    bob: Tenant
    rule: LimitRule


@pytest.fixture
def world(db) -> World:
    tier = TierFactory(name="standard")
    frontier = ModelClassFactory(name="frontier")
    small = ModelClassFactory(name="small")
    gpt = AIModelFactory(model_id="gpt-4o", model_class=frontier)
    llama = AIModelFactory(model_id="llama-3-8b", model_class=small)
    alice = TenantFactory(slug="alice", name="Alice Labs", tier=tier)
    bob = TenantFactory(slug="bob", name="Bob Systems", tier=tier)
    rule = LimitRuleFactory(tier=tier, limit=100, window_seconds=3600)
    return World(tier, frontier, small, gpt, llama, alice, bob, rule)


@pytest.fixture
def operator(db) -> AbstractUser:
    return UserFactory(username="olivia", groups=["operators"])


@pytest.fixture
def finance_user(db) -> AbstractUser:
    return UserFactory(username="fiona", groups=["finance"])


@pytest.fixture
def superuser(db) -> AbstractUser:
    return UserFactory(username="root", is_superuser=True)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A real three-primary Redis Cluster on loopback, started once for the whole run."""
    from tests.processes import RedisCluster

    if not RedisCluster.available():
        pytest.skip("redis-server and redis-cli are not installed; a cluster needs both")
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def on_cluster(redis_cluster, settings):
    """This test's engine, policy store and drain on the cluster."""
    settings.REDIS_URL = redis_cluster.url
    settings.REDIS_CLUSTER = True
    settings.QUOTA_BACKEND = "redis"
    engine.reset_state()
    yield redis_cluster
    engine.reset_state()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    if not RedisServer.available():
        pytest.skip("redis-server is not installed; these tests run a Redis server of their own")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(redis_server, settings) -> Iterator[RedisServer]:
    """This test's engine on the module's Redis server, running and answering; the test may
    stop, freeze or empty it, and the next test finds it running and thawed again."""
    redis_server.thaw()
    redis_server.start()
    settings.REDIS_URL = redis_server.url
    engine.reset_state()
    yield redis_server
    redis_server.thaw()
    engine.reset_state()
    redis_server.start()
