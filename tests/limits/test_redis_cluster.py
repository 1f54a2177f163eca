"""On a real three-primary Redis Cluster: the policy store (publishing, reading it in a fresh
process state, reconciling after the keys are lost), and a class's global capacity, which
lives in a slot of its own and is taken in a call of its own (docs/engine.md). The engine's
whole contract runs on the cluster too, in test_engine.py."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.conf import settings as django_settings

from limits import engine, services
from limits.backends import BackendUnavailable
from limits.engine import Decision
from limits.models import Tenant
from limits.policystore import _keys, policy_reconcile
from limits.redis_client import redis_client
from tests.conftest import World
from tests.factories import LimitRuleFactory, TenantFactory
from tests.processes import free_port


def cluster_client() -> redis.RedisCluster:
    return redis.RedisCluster.from_url(django_settings.REDIS_URL, decode_responses=True)


def test_a_published_policy_is_read_back_from_the_cluster(on_cluster, world):
    version = services.policy_publish(actor=services.SYSTEM, reason="cluster")
    assert version is not None
    engine.policy_store().publish(version.version, version.document)

    version_key, document_key = _keys()
    client = cluster_client()
    assert client.keyslot(version_key) == client.keyslot(document_key)
    assert int(client.get(version_key)) == version.version

    engine.reset_state()  # a new process: it knows only what the cluster holds
    assert engine.policy_store().current().version == version.version


def test_reconcile_restores_the_policy_the_cluster_lost(on_cluster, world):
    version = services.policy_publish(actor=services.SYSTEM, reason="cluster")
    assert version is not None
    client = cluster_client()
    client.delete(*_keys())

    assert policy_reconcile().outcome == "restored"
    assert int(client.get(_keys()[0])) == version.version
    assert policy_reconcile().outcome == "in sync"


# -- global capacity across slots ------------------------------------------------------
GPT = "gpt-4o"  # class frontier
LLAMA = "llama-3-8b"  # class small, without a global capacity


def node_of(client: redis.RedisCluster, key: str) -> str:
    return client.get_node_from_key(key).name


def capacity_key(client: redis.RedisCluster) -> str:
    """The frontier class's one global capacity key of this test."""
    (key,) = client.scan_iter(match=f"{django_settings.QUOTA_KEY_PREFIX}:{{g:*", count=1000)
    return key


def tenants_on_two_nodes(world: World, client: redis.RedisCluster) -> tuple[Tenant, Tenant]:
    """Alice, and a tenant of the same tier whose slot is on neither alice's node nor the
    frontier class's capacity node. Made before the policy is published."""
    capacity_node = node_of(client, f"{django_settings.QUOTA_KEY_PREFIX}:{{g:frontier}}")
    taken = {node_of(client, engine.tenant_tag(world.alice.pk)), capacity_node}
    for number in range(50):
        other = TenantFactory(slug=f"other-{number}", name=f"Other {number}", tier=world.tier)
        if node_of(client, engine.tenant_tag(other.pk)) not in taken:
            return world.alice, other
    pytest.fail("no tenant landed on another node in 50 tries")


def publish_capacity(world: World, capacity: int, *, tenant_limit: int | None = None) -> None:
    """Frontier's global capacity in requests a minute, and optionally a tenant-wide limit of
    alice's tier that denies first (the rule of ``world`` is removed)."""
    world.rule.delete()
    LimitRuleFactory(
        tier=None,
        scope="global",
        metric="requests",
        limit=capacity,
        window_seconds=60,
        model_class=world.frontier,
    )
    if tenant_limit is not None:
        LimitRuleFactory(
            tier=None,
            tenant=world.alice,
            scope="tenant",
            metric="requests",
            limit=tenant_limit,
            window_seconds=60,
        )
    version = services.policy_publish(actor=services.SYSTEM, reason="cluster", force=True)
    assert version is not None
    engine.policy_store().publish(version.version, version.document)


@pytest.fixture
def cluster(on_cluster, settings) -> Iterator[redis.RedisCluster]:
    # Threads share two cores with three Redis nodes: a slow answer must still be an answer.
    settings.QUOTA_REDIS_TIMEOUT_MS = 5000
    client = redis_client(settings.REDIS_URL, decode_responses=True)
    yield client
    client.close()


def test_a_tenants_denial_gives_the_global_capacity_back(cluster, world):
    alice, other = tenants_on_two_nodes(world, cluster)
    publish_capacity(world, 2, tenant_limit=1)
    assert engine.check(alice.pk, "u1", GPT).allowed
    key = capacity_key(cluster)
    assert cluster.zcard(key) == 1

    denied = engine.check(alice.pk, "u2", GPT)

    assert not denied.allowed and denied.denied_by.scope == "tenant"
    assert cluster.zcard(key) == 1  # taken, then given back
    (global_state,) = [s for s in denied.limits if s.scope == "global"]
    assert global_state.remaining == 1
    assert engine.check(other.pk, "u1", GPT).allowed
    full = engine.check(other.pk, "u2", GPT)
    assert (full.allowed, full.denied_by.scope) == (False, "global")
    assert cluster.zcard(key) == 2


def test_two_tenants_on_two_nodes_racing_for_a_global_capacity_never_exceed_it(cluster, world):
    """Eight threads, four a tenant; alice's tenant limit denies most of her checks after
    the capacity was taken for them, so units are given back while others race for them."""
    capacity = 30
    alice, other = tenants_on_two_nodes(world, cluster)
    publish_capacity(world, capacity, tenant_limit=5)
    engine.quota(alice.pk, "warm-up", GPT)  # the policy and the scripts, before the race
    barrier = threading.Barrier(8)
    decisions: list[tuple[int, Decision]] = []

    def race(tenant: Tenant, thread: int) -> None:
        barrier.wait(timeout=10)
        for attempt in range(15):
            decision = engine.check(tenant.pk, f"u{thread}-{attempt}", GPT)
            decisions.append((tenant.pk, decision))

    threads = [
        threading.Thread(target=race, args=(tenant, index))
        for index, tenant in enumerate([alice, other] * 4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert len(decisions) == 8 * 15
    assert not any(decision.degraded for _, decision in decisions)
    admitted = [tenant for tenant, decision in decisions if decision.allowed]
    assert len(admitted) <= capacity
    assert admitted.count(alice.pk) <= 5
    key = capacity_key(cluster)
    assert cluster.zcard(key) == len(admitted)  # every unit taken for a denial came back
    # What the race left is still there to take, exactly.
    rest = [engine.check(other.pk, f"after-{n}", GPT).allowed for n in range(capacity + 5)]
    assert rest.count(True) == capacity - len(admitted)
    assert cluster.zcard(key) == capacity


def test_concurrent_checks_of_one_request_id_take_the_global_capacity_once(cluster, world):
    publish_capacity(world, 10)
    engine.quota(world.alice.pk, "warm-up", GPT)
    barrier = threading.Barrier(20)
    decisions: list[Decision] = []

    def repeat() -> None:
        barrier.wait(timeout=10)
        decisions.append(engine.check(world.alice.pk, "u1", GPT, request_id="same"))

    threads = [threading.Thread(target=repeat) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert len(decisions) == 20
    assert [d.repeated for d in decisions].count(False) == 1
    assert all(d.allowed and not d.degraded for d in decisions)
    assert cluster.zcard(capacity_key(cluster)) == 1
    assert engine.commit(world.alice.pk, "same", 10, 10) is not None
    assert cluster.zcard(capacity_key(cluster)) == 1  # requests are not settled


def test_a_repeat_of_a_denied_check_takes_no_global_capacity(cluster, world):
    publish_capacity(world, 5, tenant_limit=1)
    assert engine.check(world.alice.pk, "u1", GPT).allowed
    first = engine.check(world.alice.pk, "u2", GPT, request_id="r-denied")
    again = engine.check(world.alice.pk, "u2", GPT, request_id="r-denied")

    assert (first.allowed, again.allowed, again.repeated) == (False, False, True)
    assert cluster.zcard(capacity_key(cluster)) == 1


def publish_global(world: World, metric: str, limit: int, window: int | None) -> None:
    world.rule.delete()
    LimitRuleFactory(
        tier=None,
        scope="global",
        metric=metric,
        limit=limit,
        window_seconds=window,
        model_class=world.frontier,
    )
    version = services.policy_publish(actor=services.SYSTEM, reason="cluster", force=True)
    assert version is not None
    engine.policy_store().publish(version.version, version.document)


def global_keys(client: redis.RedisCluster) -> list[str]:
    pattern = f"{django_settings.QUOTA_KEY_PREFIX}:{{g:*"
    return sorted(client.scan_iter(match=pattern, count=1000))


def test_a_repeat_after_the_usage_report_holds_no_global_lease(cluster, world):
    """The report freed the request's lease; a repeat of its id answers the first decision
    and must not take the lease again (nothing would ever free it)."""
    publish_global(world, "concurrency", 5, None)
    assert engine.check(world.alice.pk, "u1", GPT, request_id="R").allowed
    (key,) = global_keys(cluster)
    assert cluster.zcard(key) == 1
    assert engine.commit(world.alice.pk, "R", 1, 1) is not None
    assert cluster.zcard(key) == 0

    again = engine.check(world.alice.pk, "u1", GPT, request_id="R")

    assert again.repeated and again.allowed
    assert cluster.zcard(key) == 0


def test_a_repeat_after_the_usage_report_adds_no_global_tokens(cluster, world):
    publish_global(world, "tokens", 1000, 60)
    assert engine.check(world.alice.pk, "u1", GPT, tokens=100, request_id="R").allowed
    assert engine.commit(world.alice.pk, "R", 20, 30) is not None
    (total,) = [key for key in global_keys(cluster) if key.endswith(":sum")]
    assert int(cluster.get(total)) == 50

    again = engine.check(world.alice.pk, "u1", GPT, tokens=100, request_id="R")

    assert again.repeated and again.allowed
    assert int(cluster.get(total)) == 50


def test_a_class_without_global_capacity_is_one_round_trip_on_a_cluster(
    cluster, world, monkeypatch
):
    publish_capacity(world, 5)
    assert engine.check(world.alice.pk, "warm-up", LLAMA).allowed
    sent: list[Any] = []
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> Any:
        sent.append(command)
        return original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    assert engine.check(world.alice.pk, "u1", LLAMA).allowed
    assert len(sent) == 1


def test_a_tenant_call_that_times_out_gives_the_global_capacity_back(
    cluster, world, on_cluster, settings
):
    _, tenant = tenants_on_two_nodes(world, cluster)  # not on the capacity's node
    publish_capacity(world, 5)
    assert engine.check(tenant.pk, "u1", GPT).allowed
    key = capacity_key(cluster)
    settings.QUOTA_REDIS_TIMEOUT_MS = 200
    engine.reset_state()
    engine.quota(tenant.pk, "warm-up", GPT)  # a backend with the short timeout, warmed up
    port = int(node_of(cluster, engine.tenant_tag(tenant.pk)).rsplit(":", 1)[1])
    node = on_cluster.processes[on_cluster.ports.index(port)]

    os.kill(node.pid, signal.SIGSTOP)  # the tenant's node takes the call and never answers
    try:
        decision = engine.check(tenant.pk, "u2", GPT)
        held = cluster.zcard(key)  # read on the capacity's node, which still answers
    finally:
        os.kill(node.pid, signal.SIGCONT)

    assert decision.degraded and not decision.allowed  # the tier fails closed
    assert held == 1


def test_a_limiter_made_while_no_cluster_node_answers_opens_its_breaker_instead_of_failing(
    settings,
):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings.REDIS_CLUSTER = True
    settings.QUOTA_BACKEND = "redis"
    engine.reset_state()

    limiter = engine.backend()  # the cluster's layout is not asked for yet

    with pytest.raises(BackendUnavailable):
        limiter.stored_request("any")
    assert limiter.circuit_open
