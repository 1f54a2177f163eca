"""The drain on a real three-primary Redis Cluster (``REDIS_CLUSTER``): the streams of
tenants whose slots live on different nodes are read on their own nodes, written to
Postgres exactly once, acknowledged, claimed from a consumer that died, trimmed only below
what is acknowledged, and their denied counters stored.

The stream entries and denied counters are written through the cluster client exactly as
check.lua and commit.lua lay them out, so these tests do not wait for the engine to run on a
cluster; the last test goes through ``engine.check`` and ``engine.commit`` and turns itself
on once it does."""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal

import pytest
import redis
from django.conf import settings as django_settings
from django.db.models import Sum
from prometheus_client import REGISTRY

from billing import ingest, ledger_postgres
from billing.ingest import RedisSource, denied_key, drain, ledger_write, stream_key
from billing.models import HourlyRollup, UsageEvent
from billing.tasks import RETRIED
from limits import engine, metrics
from limits.backends import BackendUnavailable
from limits.models import Tenant
from tests.billing.conftest import publish
from tests.billing.test_ingest import snapshot
from tests.factories import TenantFactory
from tests.processes import free_port

pytestmark = pytest.mark.django_db

# 2030-03-10 12:30:00 UTC
NOON_US = int(dt.datetime(2030, 3, 10, 12, 30, tzinfo=dt.UTC).timestamp()) * 1_000_000
HOUR_INDEX = NOON_US // 3_600_000_000
# gpt-4o: 0.0025 per 1K input tokens, 0.0100 per 1K output tokens
INPUT_PRICE, OUTPUT_PRICE = Decimal("0.0025"), Decimal("0.0100")


def cluster_client() -> redis.RedisCluster:
    return redis.RedisCluster.from_url(django_settings.REDIS_URL, decode_responses=True)


@dataclass
class Spread:
    """Tenants whose streams live on every primary, one primary holding two of them."""

    tenants: list[int]
    node_of: dict[int, str]


@pytest.fixture
def spread(on_cluster, published, settings) -> Spread:
    settings.QUOTA_TEST_NOW_US = NOON_US
    client = cluster_client()
    primaries = {node.name for node in client.get_primaries()}
    node_of: dict[int, str] = {}

    def add(tenant_id: int) -> None:
        node_of[tenant_id] = client.get_node_from_key(stream_key(tenant_id)).name

    add(published.alice.pk)
    add(published.bob.pk)
    while set(node_of.values()) != primaries or len(node_of) == len(set(node_of.values())):
        add(TenantFactory(tier=published.tier).pk)
    publish()  # the engine knows the tenants made here too
    return Spread(sorted(node_of), node_of)


def check_entry(client, tenant, request_id, *, tokens, user="u", at_us=NOON_US):
    """XADD as check.lua does for an allowed check (the document as engine.check builds it)."""
    document = json.dumps(
        {
            "request_id": request_id,
            "tenant": tenant,
            "key": None,
            "user": user,
            "model": "gpt-4o",
            "tokens": tokens,
            "version": 1,
        },
        separators=(",", ":"),
    )
    return client.xadd(stream_key(tenant), {"k": "check", "e": document, "t": str(at_us)})


def commit_entry(client, tenant, request_id, *, input_tokens, output_tokens, user="u"):
    """XADD as commit.lua does (the document as engine.commit builds it)."""
    document = json.dumps(
        {
            "request_id": request_id,
            "tenant": tenant,
            "key": None,
            "user": user,
            "model": "gpt-4o",
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "status": "ok",
        },
        separators=(",", ":"),
    )
    return client.xadd(stream_key(tenant), {"k": "commit", "e": document, "t": str(NOON_US + 1000)})


def fill(client, spread: Spread) -> dict[int, tuple[int, int, int]]:
    """Per tenant (the n-th from 1): three checks of n × 100 estimated tokens, the first
    two committed with n × 10 input and n × 20 output tokens. Returns each tenant's
    expected (input, output, estimated requests) as billed."""
    expected = {}
    for number, tenant in enumerate(spread.tenants, start=1):
        for index in range(3):
            check_entry(client, tenant, f"r{index}", tokens=number * 100)
        for index in range(2):
            commit_entry(
                client, tenant, f"r{index}", input_tokens=number * 10, output_tokens=number * 20
            )
        # Two committed, one billed at its estimate (as input tokens).
        expected[tenant] = (2 * number * 10 + number * 100, 2 * number * 20, 1)
    return expected


def totals(tenant: int) -> dict:
    return HourlyRollup.objects.filter(tenant_id=tenant).aggregate(
        requests=Sum("requests"),
        denied=Sum("denied"),
        input=Sum("input_tokens"),
        output=Sum("output_tokens"),
        estimated=Sum("estimated_requests"),
        cost=Sum("cost"),
    )


def pending(client, tenant: int) -> int:
    return int(client.xpending(stream_key(tenant), ingest.GROUP)["pending"])


def test_the_fixture_spreads_the_tenants_over_every_primary(spread):
    client = cluster_client()
    assert set(spread.node_of.values()) == {node.name for node in client.get_primaries()}
    # The entries written here are those the drain reads by its quick pattern, as the
    # engine's are (tests/billing/test_ingest.py holds the engine to that pattern).
    tenant = spread.tenants[0]
    check_entry(client, tenant, "r1", tokens=5)
    commit_entry(client, tenant, "r1", input_tokens=1, output_tokens=2)
    raw = redis.RedisCluster.from_url(django_settings.REDIS_URL).xrange(stream_key(tenant))
    documents = {fields[b"k"]: fields[b"e"] for _, fields in raw}
    assert ledger_postgres._CHECK_DOCUMENT(documents[b"check"]) is not None
    assert ledger_postgres._COMMIT_DOCUMENT(documents[b"commit"]) is not None


def test_tenants_on_every_node_are_drained_once_with_their_tokens(spread):
    client = cluster_client()
    expected = fill(client, spread)

    report = drain()

    tenants = len(spread.tenants)
    assert (report.written.read, report.written.inserted) == (5 * tenants, 3 * tenants)
    assert report.written.duplicates == 0
    assert UsageEvent.objects.count() == 3 * tenants
    for tenant, (input_tokens, output_tokens, estimated) in expected.items():
        assert totals(tenant) == {
            "requests": 3,
            "denied": 0,
            "input": input_tokens,
            "output": output_tokens,
            "estimated": estimated,
            "cost": (input_tokens * INPUT_PRICE + output_tokens * OUTPUT_PRICE) / 1000,
        }
        assert sorted(
            UsageEvent.objects.filter(tenant_id=tenant).values_list("request_id", "is_estimate")
        ) == [("r0", False), ("r1", False), ("r2", True)]
        # Acknowledged, and trimmed: nothing is pending below the last entry read.
        assert pending(client, tenant) == 0
        assert client.xlen(stream_key(tenant)) == 0
        # And the drain's consumer is gone from the group again, on every node.
        assert client.xinfo_consumers(stream_key(tenant), ingest.GROUP) == []


def test_draining_again_changes_nothing(spread):
    fill(cluster_client(), spread)
    drain()
    before = snapshot()

    report = drain()

    assert (report.written.read, report.written.inserted, report.batches) == (0, 0, 0)
    assert snapshot() == before


def test_each_stream_is_read_on_its_own_node_without_asking_for_its_keys(spread):
    """One XREADGROUP per stream, sent to the node of its slot: a multi-stream read across
    slots is refused on a cluster, and redis-py left to route XREADGROUP itself asks a node
    for its keys (COMMAND GETKEYS) first, a round trip per stream."""
    client = cluster_client()
    fill(client, spread)
    source = RedisSource(consumer="counted")
    source.read(1000)  # the consumer groups exist from here on
    check_entry(client, spread.tenants[0], "late", tokens=1)
    primaries = client.get_primaries()
    for node in primaries:
        node.redis_connection.config_resetstat()

    batch = source.read(1000)

    assert sum(len(ids) for ids in batch.ids.values()) == 1
    streams_on: dict[str, int] = defaultdict(int)
    for tenant in Tenant.objects.values_list("pk", flat=True):
        streams_on[client.get_node_from_key(stream_key(tenant)).name] += 1
    for node in primaries:
        calls = {
            name: stats["calls"]
            for name, stats in node.redis_connection.info("commandstats").items()
        }
        assert calls.get("cmdstat_xreadgroup") == streams_on[node.name]
        assert "cmdstat_command|getkeys" not in calls
    source.close()


@pytest.mark.parametrize("written_before_dying", [False, True])
def test_a_dead_consumers_entries_on_every_node_are_claimed_and_written_once(
    spread, settings, written_before_dying
):
    client = cluster_client()
    expected = fill(client, spread)
    dying = RedisSource(consumer="dying")
    batch = dying.read(1000)  # ... and the process died
    if written_before_dying:
        ledger_write(batch.entries, batch.denied)  # but not acknowledged
    written = snapshot()
    for tenant in spread.tenants:
        owners = client.xpending(stream_key(tenant), ingest.GROUP)["consumers"]
        assert owners == [{"name": "dying", "pending": 5}]

    settings.BILLING_CLAIM_IDLE_SECONDS = 0
    report = drain(source=RedisSource(consumer="heir"))

    tenants = len(spread.tenants)
    assert report.written.read == 5 * tenants
    if written_before_dying:
        assert (report.written.inserted, report.written.duplicates) == (0, 3 * tenants)
        assert snapshot() == written
    else:
        assert (report.written.inserted, report.written.duplicates) == (3 * tenants, 0)
    assert UsageEvent.objects.count() == 3 * tenants
    for tenant, (input_tokens, output_tokens, _) in expected.items():
        assert (totals(tenant)["input"], totals(tenant)["output"]) == (input_tokens, output_tokens)
        assert pending(client, tenant) == 0
        assert client.xlen(stream_key(tenant)) == 0


def test_a_stream_is_trimmed_only_below_what_is_acknowledged(spread, settings):
    client = cluster_client()
    for tenant in spread.tenants:
        for index in range(3):
            check_entry(client, tenant, f"old{index}", tokens=1)
    slow = RedisSource(consumer="slow")
    held = slow.read(1000)  # a live consumer still working on these
    for tenant in spread.tenants:
        for index in range(4):
            check_entry(client, tenant, f"new{index}", tokens=1)

    settings.BILLING_CLAIM_IDLE_SECONDS = 3600
    drain(source=RedisSource(consumer="fast"))

    tenants = len(spread.tenants)
    # The newer entries are written and acknowledged, but the held ones and everything
    # after them stay until they are acknowledged.
    assert UsageEvent.objects.count() == 4 * tenants
    assert [client.xlen(stream_key(tenant)) for tenant in spread.tenants] == [7] * tenants
    assert [pending(client, tenant) for tenant in spread.tenants] == [3] * tenants

    ledger_write(held.entries, held.denied)
    slow.ack(held)

    assert [client.xlen(stream_key(tenant)) for tenant in spread.tenants] == [0] * tenants
    assert UsageEvent.objects.count() == 7 * tenants


def test_denied_counters_on_every_node_are_stored_once_and_old_hours_dropped(spread):
    client = cluster_client()
    field = f"{HOUR_INDEX}|gpt-4o"
    for number, tenant in enumerate(spread.tenants, start=1):
        # As check.lua counts a denied check: HINCRBY on the tenant's denied hash.
        client.hincrby(denied_key(tenant), field, number)

    first = drain()
    again = drain()  # the counters did not change: nothing to write

    assert first.written.denied_buckets == len(spread.tenants)
    assert again.written.denied_buckets == 0
    for number, tenant in enumerate(spread.tenants, start=1):
        assert totals(tenant)["denied"] == number
        assert (totals(tenant)["requests"], totals(tenant)["input"]) == (0, 0)
    assert UsageEvent.objects.count() == 0

    later = f"{HOUR_INDEX + 3}|gpt-4o"
    for tenant in spread.tenants:
        client.hincrby(denied_key(tenant), field, 1)
        client.hincrby(denied_key(tenant), later, 2)
    drain()

    for number, tenant in enumerate(spread.tenants, start=1):
        assert totals(tenant)["denied"] == number + 1 + 2
        # Three hours before the newest counted hour cannot grow again: dropped once stored.
        assert client.hgetall(denied_key(tenant)) == {later: "2"}


def test_the_backlog_counts_unread_and_pending_entries_on_every_node(spread, settings):
    client = cluster_client()
    fill(client, spread)
    total = 5 * len(spread.tenants)
    source = RedisSource(consumer="counter")
    assert source.backlog() == 0  # no consumer group yet: nothing read, nothing counted

    settings.BILLING_CLAIM_IDLE_SECONDS = 3600
    RedisSource(consumer="slow").read(2)  # two of each stream read, still pending
    assert source.backlog() == total

    drain(source=RedisSource(consumer="fast"))
    assert source.backlog() == 2 * len(spread.tenants)
    source.close()
    # The exported metric counts what the streams still hold: the held entries and those
    # after them, which trimming keeps until they are acknowledged.
    metrics.backlog_refresh()
    assert REGISTRY.get_sample_value("quota_usage_backlog_events") == total


def test_an_unreachable_cluster_is_an_error_the_drain_task_retries(settings):
    settings.REDIS_CLUSTER = True
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"

    with pytest.raises(RETRIED):
        RedisSource()


ENGINE_NOT_ON_CLUSTER = (
    "engine.check on the cluster raised BackendUnavailable (answered by its fail mode, "
    "degraded): the engine does not run on a Redis Cluster yet; this test turns on once it does"
)


def engine_check_or_skip(tenant: int, user: str, tokens: int, request_id: str):
    try:
        decision = engine.check(tenant, user, "gpt-4o", tokens=tokens, request_id=request_id)
    except BackendUnavailable:
        pytest.skip(ENGINE_NOT_ON_CLUSTER)
    if decision.degraded:  # engine.check answers BackendUnavailable by the tier's fail mode
        pytest.skip(ENGINE_NOT_ON_CLUSTER)
    return decision


def test_checks_and_commits_through_the_engine_on_every_node_are_drained_once(spread):
    """End to end through the engine's scripts. Skipped while the engine does not run on a
    cluster (its calls for slots on other nodes than REDIS_URL's fail)."""
    for tenant in spread.tenants:
        decision = engine_check_or_skip(tenant, "u1", 50, "e1")
        assert decision.allowed
        engine.check(tenant, "u2", "gpt-4o", tokens=70, request_id="e2")
        engine.commit(tenant, "e1", input_tokens=30, output_tokens=40)
    first = spread.tenants[0]
    for index in range(100):  # the tier's rule: 100 requests per hour per user and model
        engine.check(first, "busy", "gpt-4o", request_id=f"b{index}")
    assert not engine.check(first, "busy", "gpt-4o", request_id="denied").allowed

    report = drain()

    tenants = len(spread.tenants)
    assert report.written.inserted == 2 * tenants + 100
    assert drain().written.read == 0
    for tenant in spread.tenants[1:]:
        assert totals(tenant) == {
            "requests": 2,
            "denied": 0,
            "input": 30 + 70,
            "output": 40,
            "estimated": 1,
            "cost": ((30 + 70) * INPUT_PRICE + 40 * OUTPUT_PRICE) / 1000,
        }
    assert (totals(first)["requests"], totals(first)["denied"]) == (102, 1)
    client = cluster_client()
    for tenant in spread.tenants:
        assert pending(client, tenant) == 0
        assert client.xlen(stream_key(tenant)) == 0
