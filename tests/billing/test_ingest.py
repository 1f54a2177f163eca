"""The drain: every allowed check lands in Postgres exactly once, amended by its commit,
with rollups that move only with what was really written."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import pytest
import redis
from django.conf import settings as django_settings
from django.db.models import Sum

from billing import ingest
from billing.ingest import Entry, RedisSource, drain, ledger_write, stream_key
from billing.models import (
    DailyRollup,
    DailyUserRollup,
    HourlyRollup,
    ModelPrice,
    MonthlyRollup,
    MonthlyUserRollup,
    PendingCommit,
    UsageEvent,
)
from billing.rollups import rollups_reconcile
from limits import engine, services
from tests.billing.conftest import publish

pytestmark = pytest.mark.django_db

# 2030-03-10 12:30:00 UTC
NOON_US = int(dt.datetime(2030, 3, 10, 12, 30, tzinfo=dt.UTC).timestamp()) * 1_000_000
HOUR = dt.datetime(2030, 3, 10, 12, tzinfo=dt.UTC)


@pytest.fixture
def clock(settings):
    settings.QUOTA_TEST_NOW_US = NOON_US
    return settings


def rollup_totals(**filters):
    return HourlyRollup.objects.filter(**filters).aggregate(
        requests=Sum("requests"),
        denied=Sum("denied"),
        input=Sum("input_tokens"),
        output=Sum("output_tokens"),
        estimated=Sum("estimated_requests"),
        cost=Sum("cost"),
    )


def snapshot():
    """Everything the drain writes, in a comparable form."""
    return (
        sorted(
            UsageEvent.objects.values_list(
                "tenant_id",
                "event_id",
                "billed_input_tokens",
                "billed_output_tokens",
                "is_estimate",
                "cost",
                "commit_event_id",
            )
        ),
        sorted(
            HourlyRollup.objects.values_list(
                "hour",
                "tenant_id",
                "model_id",
                "price_id",
                "requests",
                "denied",
                "input_tokens",
                "output_tokens",
                "estimated_requests",
                "cost",
            )
        ),
        sorted(
            DailyRollup.objects.values_list(
                "day",
                "tenant_id",
                "model_id",
                "requests",
                "denied",
                "input_tokens",
                "output_tokens",
                "estimated_requests",
                "cost",
            )
        ),
        sorted(
            DailyUserRollup.objects.values_list(
                "day", "tenant_id", "user_id", "requests", "input_tokens", "output_tokens", "cost"
            )
        ),
        sorted(
            MonthlyRollup.objects.values_list(
                "month",
                "tenant_id",
                "model_id",
                "requests",
                "denied",
                "input_tokens",
                "output_tokens",
                "estimated_requests",
                "cost",
            )
        ),
        sorted(
            MonthlyUserRollup.objects.values_list(
                "month", "tenant_id", "user_id", "requests", "input_tokens", "output_tokens", "cost"
            )
        ),
    )


def redis_client():
    return redis.Redis.from_url(django_settings.REDIS_URL, decode_responses=True)


def test_each_allowed_check_lands_once_amended_by_its_commit(published, clock):
    world = published
    first = engine.check(world.alice.pk, "u1", "gpt-4o", tokens=500, request_id="r1")
    engine.check(world.alice.pk, "u2", "llama-3-8b", tokens=40, request_id="r2")
    engine.check(world.bob.pk, "u1", "gpt-4o", tokens=7, request_id="r3")
    assert first.allowed
    engine.commit(world.alice.pk, "r1", input_tokens=300, output_tokens=120)

    report = drain()

    assert report.written.inserted == 3
    assert report.written.read == 4
    events = {event.request_id: event for event in UsageEvent.objects.all()}
    assert set(events) == {"r1", "r2", "r3"}
    r1 = events["r1"]
    assert (r1.tenant_id, r1.user_id, r1.model_id, r1.estimated_tokens) == (
        world.alice.pk,
        "u1",
        "gpt-4o",
        500,
    )
    assert (r1.input_tokens, r1.output_tokens, r1.status, r1.is_estimate) == (300, 120, "ok", False)
    # gpt-4o: 0.0025 per 1K input, 0.0100 per 1K output
    assert r1.cost == Decimal("0.00075") + Decimal("0.0012")
    assert r1.occurred_at == dt.datetime(2030, 3, 10, 12, 30, tzinfo=dt.UTC)
    r2 = events["r2"]
    assert (r2.input_tokens, r2.billed_input_tokens, r2.billed_output_tokens, r2.is_estimate) == (
        None,
        40,
        0,
        True,
    )

    alice_gpt = rollup_totals(tenant_id=world.alice.pk, model_id="gpt-4o")
    assert alice_gpt == {
        "requests": 1,
        "denied": 0,
        "input": 300,
        "output": 120,
        "estimated": 0,
        "cost": Decimal("0.00195"),
    }
    assert rollup_totals(tenant_id=world.alice.pk, model_id="llama-3-8b")["estimated"] == 1
    assert rollup_totals(tenant_id=world.bob.pk)["requests"] == 1
    assert (
        HourlyRollup.objects.filter(requests__gt=0).values_list("hour", flat=True).distinct()[0]
        == HOUR
    )
    users = dict(
        DailyUserRollup.objects.filter(tenant_id=world.alice.pk).values_list("user_id", "requests")
    )
    assert users == {"u1": 1, "u2": 1}


def test_a_commit_drained_after_its_check_amends_the_stored_event_and_the_rollups(published, clock):
    world = published
    engine.check(world.alice.pk, "u1", "gpt-4o", tokens=1000, request_id="r1")
    drain()
    assert rollup_totals(tenant_id=world.alice.pk)["estimated"] == 1
    assert rollup_totals(tenant_id=world.alice.pk)["input"] == 1000

    engine.commit(world.alice.pk, "r1", input_tokens=10, output_tokens=20, status="error")
    report = drain()

    assert (report.written.inserted, report.written.amended) == (0, 1)
    event = UsageEvent.objects.get()
    assert (event.input_tokens, event.output_tokens, event.status) == (10, 20, "error")
    totals = rollup_totals(tenant_id=world.alice.pk)
    assert (totals["requests"], totals["input"], totals["output"], totals["estimated"]) == (
        1,
        10,
        20,
        0,
    )
    assert totals["cost"] == Decimal("0.000225")
    day = DailyRollup.objects.get(tenant_id=world.alice.pk)
    assert (day.requests, day.input_tokens, day.output_tokens, day.estimated_requests) == (
        1,
        10,
        20,
        0,
    )
    assert day.cost == Decimal("0.000225")


def test_draining_again_changes_nothing(published, clock):
    world = published
    for index in range(5):
        engine.check(world.alice.pk, f"u{index}", "gpt-4o", tokens=index, request_id=f"r{index}")
        engine.commit(world.alice.pk, f"r{index}", input_tokens=index, output_tokens=1)
    drain()
    before = snapshot()

    report = drain()

    assert report.written.read == 0
    assert snapshot() == before


def test_a_batch_written_but_never_acknowledged_is_taken_over_and_written_once(
    published, clock, settings
):
    """The drain that died after its transaction committed but before XACK: the next one
    claims the batch, writes nothing twice, and the rollups do not move."""
    world = published
    for index in range(20):
        engine.check(world.bob.pk, "u", "gpt-4o", tokens=10, request_id=f"r{index}")
        engine.commit(world.bob.pk, f"r{index}", input_tokens=5, output_tokens=5)
    dying = RedisSource(consumer="dying")
    batch = dying.read(1000)
    ledger_write(batch.entries, batch.denied)  # ... and never acknowledged
    written = snapshot()
    assert UsageEvent.objects.count() == 20
    client = redis_client()
    assert client.xpending(stream_key(world.bob.pk), ingest.GROUP)["pending"] == 40

    settings.BILLING_CLAIM_IDLE_SECONDS = 0
    report = drain(source=RedisSource(consumer="heir"))

    assert report.written.read == 40
    assert (report.written.inserted, report.written.amended) == (0, 0)
    assert report.written.duplicates == 20
    assert snapshot() == written
    assert client.xpending(stream_key(world.bob.pk), ingest.GROUP)["pending"] == 0
    assert client.xlen(stream_key(world.bob.pk)) == 0


def test_a_batch_read_but_not_written_is_taken_over_only_once_it_is_idle(
    published, clock, settings
):
    world = published
    engine.check(world.bob.pk, "u", "gpt-4o", tokens=10, request_id="r1")
    RedisSource(consumer="dying").read(1000)  # read, then the process died

    settings.BILLING_CLAIM_IDLE_SECONDS = 3600
    assert drain(source=RedisSource(consumer="heir")).written.read == 0
    assert UsageEvent.objects.count() == 0

    settings.BILLING_CLAIM_IDLE_SECONDS = 0
    assert drain(source=RedisSource(consumer="heir")).written.inserted == 1
    assert UsageEvent.objects.count() == 1


def test_the_stream_is_trimmed_only_below_the_oldest_pending_entry(published, clock, settings):
    world = published
    for index in range(3):
        engine.check(world.alice.pk, "u", "gpt-4o", tokens=1, request_id=f"old{index}")
    client = redis_client()
    key = stream_key(world.alice.pk)
    slow = RedisSource(consumer="slow")
    held = slow.read(1000)  # a live consumer still working on these
    for index in range(4):
        engine.check(world.alice.pk, "u", "gpt-4o", tokens=1, request_id=f"new{index}")

    settings.BILLING_CLAIM_IDLE_SECONDS = 3600
    drain(source=RedisSource(consumer="fast"))

    # The four newer entries are written and acknowledged, but the three held ones and
    # everything after them stay until they are acknowledged.
    assert UsageEvent.objects.count() == 4
    assert client.xlen(key) == 7
    ledger_write(held.entries, held.denied)
    slow.ack(held)
    assert client.xlen(key) == 0
    assert UsageEvent.objects.count() == 7


def test_a_commit_that_arrives_before_its_check_still_settles_it(published, clock):
    """Entries built as a drain would read them out of order: in one batch, and across
    batches (the check held by another consumer)."""
    world = published
    tenant = world.alice.pk
    check = Entry(
        tenant,
        "1-1",
        "check",
        {
            "request_id": "r1",
            "tenant": tenant,
            "key": None,
            "user": "u",
            "model": "gpt-4o",
            "tokens": 100,
            "version": 1,
        },
        NOON_US,
    )
    commit = Entry(
        tenant,
        "1-2",
        "commit",
        {
            "request_id": "r1",
            "tenant": tenant,
            "key": None,
            "user": "u",
            "model": "gpt-4o",
            "input_tokens": 1000,
            "output_tokens": 2000,
            "status": "ok",
        },
        NOON_US + 5,
    )
    ledger_write([commit, check], {})
    event = UsageEvent.objects.get()
    assert (event.input_tokens, event.output_tokens, event.commit_event_id) == (1000, 2000, "1-2")

    later_check = Entry(tenant, "2-1", "check", {**check.data, "request_id": "r2"}, NOON_US)
    later_commit = Entry(tenant, "2-2", "commit", {**commit.data, "request_id": "r2"}, NOON_US)
    report = ledger_write([later_commit], {})
    assert report.pending_commits == 1
    assert PendingCommit.objects.count() == 1
    report = ledger_write([later_check], {})
    assert (report.inserted, report.pending_commits) == (1, 0)
    assert PendingCommit.objects.count() == 0
    settled = UsageEvent.objects.get(request_id="r2")
    assert (settled.input_tokens, settled.output_tokens, settled.is_estimate) == (1000, 2000, False)
    totals = rollup_totals(tenant_id=tenant)
    assert (totals["requests"], totals["input"], totals["output"], totals["estimated"]) == (
        2,
        2000,
        4000,
        0,
    )
    assert totals["cost"] == 2 * (Decimal("0.0025") + Decimal("0.02"))


def test_denied_checks_are_counted_per_hour_and_model_and_never_doubled(published, clock, settings):
    world = published
    for _ in range(100):
        assert engine.check(world.alice.pk, "u1", "gpt-4o").allowed
    for _ in range(3):
        assert not engine.check(world.alice.pk, "u1", "gpt-4o").allowed
    drain()
    assert rollup_totals(tenant_id=world.alice.pk)["denied"] == 3
    assert DailyRollup.objects.get(tenant_id=world.alice.pk).denied == 3

    drain()  # the counter did not change: nothing to write
    engine.check(world.alice.pk, "u1", "gpt-4o")
    drain()
    drain()

    totals = rollup_totals(tenant_id=world.alice.pk)
    assert (totals["requests"], totals["denied"]) == (100, 4)
    assert DailyRollup.objects.get(tenant_id=world.alice.pk).denied == 4
    assert rollup_totals(tenant_id=world.bob.pk)["denied"] is None


def test_old_denied_counters_are_dropped_from_redis_once_stored(published, clock, settings):
    world = published
    for _ in range(101):
        engine.check(world.alice.pk, "u1", "gpt-4o")
    drain()
    settings.QUOTA_TEST_NOW_US = NOON_US + 3 * 3600 * 1_000_000
    for _ in range(101):
        engine.check(world.alice.pk, "u1", "gpt-4o")
    drain()

    counts = redis_client().hgetall(ingest.denied_key(world.alice.pk))
    assert list(counts) == [f"{NOON_US // 3_600_000_000 + 3}|gpt-4o"]
    assert rollup_totals(tenant_id=world.alice.pk)["denied"] == 2


def test_a_price_change_prices_later_usage_only(published, clock, settings):
    world = published
    engine.check(world.alice.pk, "u", "gpt-4o", tokens=0, request_id="before")
    engine.commit(world.alice.pk, "before", input_tokens=1000, output_tokens=1000)
    drain()

    settings.QUOTA_TEST_NOW_US = NOON_US + 10 * 60 * 1_000_000
    gpt = world.gpt
    gpt.input_price_per_1k = Decimal("1.000000")
    gpt.output_price_per_1k = Decimal("2.000000")
    services.object_save(instance=gpt, actor=services.SYSTEM)
    publish()
    engine.check(world.alice.pk, "u", "gpt-4o", tokens=0, request_id="after")
    engine.commit(world.alice.pk, "after", input_tokens=1000, output_tokens=1000)
    drain()

    costs = dict(UsageEvent.objects.values_list("request_id", "cost"))
    assert costs == {"before": Decimal("0.0125"), "after": Decimal("3")}
    prices = list(
        ModelPrice.objects.filter(model_id="gpt-4o").values_list(
            "input_price_per_1k", "valid_until"
        )
    )
    change = dt.datetime(2030, 3, 10, 12, 40, tzinfo=dt.UTC)
    assert prices == [(Decimal("0.0025"), change), (Decimal("1"), None)]
    # One hour, two prices: two buckets, so each statement line keeps one unit price.
    assert HourlyRollup.objects.filter(tenant_id=world.alice.pk, requests__gt=0).count() == 2
    assert rollups_reconcile(start=HOUR, end=HOUR + dt.timedelta(hours=1)).repaired == 0


def test_reconcile_repairs_a_rollup_that_differs_from_the_raw_events(published, clock):
    world = published
    engine.check(world.alice.pk, "u", "gpt-4o", tokens=10, request_id="r1")
    engine.commit(world.alice.pk, "r1", input_tokens=1000, output_tokens=0)
    drain()
    right = snapshot()
    HourlyRollup.objects.filter(tenant_id=world.alice.pk, requests__gt=0).update(
        requests=5, cost=Decimal("9")
    )
    DailyRollup.objects.filter(tenant_id=world.alice.pk).update(requests=5, cost=Decimal("9"))
    MonthlyRollup.objects.filter(tenant_id=world.alice.pk).update(requests=5, cost=Decimal("9"))

    report = rollups_reconcile(start=HOUR, end=HOUR + dt.timedelta(hours=1))

    assert report.repaired == 1
    # The day and month above it are corrected by the same difference (they had been
    # tampered with the same way).
    assert snapshot() == right
    assert rollups_reconcile(start=HOUR, end=HOUR + dt.timedelta(hours=1)).repaired == 0


def test_the_in_process_limiter_drains_the_same_way(world, clock, settings):
    settings.QUOTA_BACKEND = "local"
    engine.reset_state()
    publish()
    engine.check(world.alice.pk, "u", "gpt-4o", tokens=5, request_id="r1")
    engine.commit(world.alice.pk, "r1", input_tokens=7, output_tokens=9)
    engine.check(world.bob.pk, "u", "llama-3-8b", tokens=3, request_id="r2")
    for _ in range(101):
        engine.check(world.bob.pk, "v", "llama-3-8b")

    report = drain()

    assert report.written.inserted == 102
    assert engine.local_backend().events == []
    event = UsageEvent.objects.get(request_id="r1")
    assert (event.input_tokens, event.output_tokens) == (7, 9)
    assert rollup_totals(tenant_id=world.bob.pk)["denied"] == 1
    assert drain().written.read == 0


def test_a_malformed_entry_is_skipped_and_acknowledged(published, clock, caplog):
    world = published
    client = redis_client()
    key = stream_key(world.alice.pk)
    client.xadd(key, {"k": "check", "e": "{not json", "t": "1"})
    engine.check(world.alice.pk, "u", "gpt-4o", tokens=1, request_id="good")

    report = drain()

    assert report.written.inserted == 1
    assert UsageEvent.objects.get().request_id == "good"
    assert "malformed usage entry" in caplog.text
    assert client.xlen(key) == 0
    assert json.loads(json.dumps(report.as_dict()))["inserted"] == 1
