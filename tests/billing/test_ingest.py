"""The drain: every allowed check lands in Postgres exactly once, amended by its commit,
with rollups that move only with what was really written."""

from __future__ import annotations

import datetime as dt
import json
import random
import time
from decimal import Decimal

import pytest
import redis
from django.conf import settings as django_settings
from django.db import connection, transaction
from django.db.models import Sum

from billing import ingest, ledger_postgres
from billing.ingest import (
    Entry,
    RedisSource,
    drain,
    ledger_write,
    ledger_write_portable,
    stream_key,
    user_rollups_fold,
)
from billing.models import (
    DailyRollup,
    DailyUserRollup,
    HourlyRollup,
    ModelPrice,
    MonthlyRollup,
    MonthlyUserRollup,
    PendingCommit,
    Statement,
    StatementAdjustment,
    UsageEvent,
    UserUsageDelta,
)
from billing.rollups import rollups_reconcile
from billing.services import model_price_seed
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
    user_rollups_fold()

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


def claims_sent(source, monkeypatch):
    """The streams ``source`` sends XAUTOCLAIM for, as it sends them."""
    sent: list[str] = []
    make = source.entries_client.pipeline

    def pipeline(*args, **kwargs):
        pipe = make(*args, **kwargs)
        claim = pipe.xautoclaim

        def xautoclaim(name, *more, **options):
            sent.append(name)
            return claim(name, *more, **options)

        pipe.xautoclaim = xautoclaim
        return pipe

    monkeypatch.setattr(source.entries_client, "pipeline", pipeline)
    return sent


def consumers(world) -> dict[str, int]:
    """The billing group's consumers of bob's stream, with what each holds pending."""
    found = redis_client().xinfo_consumers(stream_key(world.bob.pk), ingest.GROUP)
    return {consumer["name"]: consumer["pending"] for consumer in found}


def test_a_drain_leaves_no_consumer_behind_but_one_that_holds_entries(published, clock, settings):
    world = published
    for index in range(3):
        engine.check(world.bob.pk, "u", "gpt-4o", tokens=10, request_id=f"r{index}")
        source = RedisSource(consumer=f"drain-{index}")
        drain(source=source)
        source.close()
        assert consumers(world) == {}
    engine.check(world.bob.pk, "u", "gpt-4o", tokens=10, request_id="r-dying")
    RedisSource(consumer="dying").read(1000)  # read, then the process died
    settings.BILLING_CLAIM_IDLE_SECONDS = 3600
    source = RedisSource(consumer="heir")
    drain(source=source)
    source.close()
    assert consumers(world) == {"dying": 1}  # what it holds is claimed later, not dropped

    settings.BILLING_CLAIM_IDLE_SECONDS = 0.05
    time.sleep(0.1)
    source = RedisSource(consumer="heir")
    assert drain(source=source).written.inserted == 1
    assert consumers(world) == {"heir": 0, "dying": 0}
    time.sleep(0.6)  # ten claim periods idle, holding nothing: gone with the next close
    source.close()
    assert consumers(world) == {}
    assert UsageEvent.objects.count() == 4


def test_a_stream_nobody_else_left_entries_in_is_not_searched_for_entries_to_claim(
    published, clock, settings, monkeypatch
):
    world = published
    settings.BILLING_CLAIM_IDLE_SECONDS = 0  # anything pending may be claimed at once
    for index in range(10):
        engine.check(world.alice.pk, "u", "gpt-4o", tokens=1, request_id=f"r{index}")
    alone = RedisSource(consumer="alone")
    sent = claims_sent(alone, monkeypatch)

    assert drain(source=alone, batch_size=2).written.inserted == 10
    assert sent == []  # only its own read-ahead was ever pending

    engine.check(world.alice.pk, "u", "gpt-4o", tokens=1, request_id="left")
    RedisSource(consumer="dying").read(1000)
    heir = RedisSource(consumer="heir")
    sent = claims_sent(heir, monkeypatch)

    assert drain(source=heir).written.inserted == 1
    assert sent == [stream_key(world.alice.pk)]

    engine.check(world.alice.pk, "u", "gpt-4o", tokens=1, request_id="again")
    RedisSource(consumer="again").read(1000)  # read, then the process died
    again = RedisSource(consumer="again")  # started again under the same name
    sent = claims_sent(again, monkeypatch)

    assert drain(source=again).written.inserted == 1
    assert sent == [stream_key(world.alice.pk)]
    assert redis_client().xlen(stream_key(world.alice.pk)) == 0


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


# -- the PostgreSQL write next to the portable one ---------------------------------------
def ledger_contents():
    """snapshot() and what else a write leaves: commits waiting, statement adjustments."""
    return (
        snapshot(),
        sorted(
            UsageEvent.objects.values_list(
                "tenant_id",
                "event_id",
                "request_id",
                "api_key_id",
                "user_id",
                "model_id",
                "policy_version",
                "occurred_at",
                "estimated_tokens",
                "input_tokens",
                "output_tokens",
                "status",
                "committed_at",
                "price_id",
            )
        ),
        sorted(
            PendingCommit.objects.values_list("tenant_id", "event_id", "request_id", "occurred_at")
        ),
        # What each event adds to which statement. (A commit that waited for its check is
        # applied once the check is stored on PostgreSQL: the adjustment of a sent month is
        # the event at its estimate plus the commit's difference, where the portable write
        # records the settled event. The amounts are the same.)
        sorted(
            StatementAdjustment.objects.values(
                "tenant_id", "event_id", "request_id", "usage_month", "statement_month"
            )
            .annotate(
                input_tokens=Sum("input_tokens"),
                output_tokens=Sum("output_tokens"),
                cost=Sum("cost"),
            )
            .values_list(
                "tenant_id",
                "event_id",
                "request_id",
                "usage_month",
                "statement_month",
                "input_tokens",
                "output_tokens",
                "cost",
            )
        ),
    )


def mixed_batches(world, seed):
    """Checks and commits of two tenants as drains could meet them: commits in the batch of
    their check, before it, batches later or never; request ids used twice; a batch written
    twice; an unknown model; usage either side of a price change and in a month whose
    statement was sent."""
    rng = random.Random(seed)
    start = dt.datetime(2030, 2, 28, 20, tzinfo=dt.UTC)  # the month's last hours, and the next
    entries = []
    sequence = {world.alice.pk: 0, world.bob.pk: 0}

    def entry(tenant, kind, data, at):
        at_us = int(at.timestamp() * 1_000_000)
        sequence[tenant] += 1
        entry_id = f"{at_us // 1000}-{sequence[tenant]}"
        return Entry(tenant, entry_id, kind, {"tenant": tenant, **data}, at_us)

    for number in range(60):
        tenant = rng.choice([world.alice.pk, world.bob.pk])
        request_id = f"r{number % 50}"  # ten ids come back, hours later
        at = start + dt.timedelta(minutes=number * 7 + rng.randrange(5))
        model = rng.choice(["gpt-4o", "gpt-4o", "llama-3-8b", "mystery-model"])
        check = {
            "request_id": request_id,
            "key": rng.choice([None, 7]),
            "user": f"u{rng.randrange(4)}",
            "model": model,
            "tokens": rng.randrange(0, 3000),
            "version": 3,
        }
        entries.append(entry(tenant, "check", check, at))
        if rng.random() < 0.85:
            used = {
                "request_id": request_id,
                "input_tokens": rng.randrange(0, 4000),
                "output_tokens": rng.randrange(0, 2000),
                "status": rng.choice(["ok", "error"]),
            }
            later = at + dt.timedelta(seconds=rng.choice([-1, 2, 30, 600]))
            entries.append(entry(tenant, "commit", used, later))
        if rng.random() < 0.05:  # a second commit for the same request: changes nothing
            entries.append(
                entry(
                    tenant,
                    "commit",
                    {"request_id": request_id, "input_tokens": 1, "output_tokens": 1},
                    at + dt.timedelta(seconds=5),
                )
            )
    rng.shuffle(entries)
    cuts = sorted(rng.sample(range(1, len(entries)), 4))
    batches = [entries[a:b] for a, b in zip([0, *cuts], [*cuts, len(entries)], strict=True)]
    batches.append(batches[1])  # a batch written again, as after a drain died before XACK
    return batches


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_postgres_write_leaves_what_the_portable_write_leaves(published, seed):
    world = published
    # Prices in place before either write: a price one of them made would get another id.
    model_price_seed(model_id="llama-3-8b")
    change = dt.datetime(2030, 3, 1, 0, 30, tzinfo=dt.UTC)
    ModelPrice.objects.filter(model_id="gpt-4o", valid_until__isnull=True).update(
        valid_until=change
    )
    ModelPrice.objects.create(
        model_id="gpt-4o",
        input_price_per_1k=Decimal("0.004"),
        output_price_per_1k=Decimal("0.011"),
        valid_from=change,
    )
    Statement.objects.create(
        tenant=world.alice,
        month=dt.date(2030, 2, 1),
        currency="USD",
        subtotal=Decimal(0),
        adjustments_total=Decimal(0),
        total=Decimal(0),
        finalised_at=change,
    )
    batches = mixed_batches(world, seed)
    denied = {world.bob.pk: {f"{to_hour(dt.datetime(2030, 3, 1, 2, tzinfo=dt.UTC))}|gpt-4o": 3}}

    def write_all(write):
        reports = []
        for number, batch in enumerate(batches):
            report = write(batch, denied if number == 2 else {})
            # (A commit that waited counts as amending its check on PostgreSQL, where it is
            # tried once the batch's checks are stored; as settling it in the portable
            # write. The rows are the same.)
            reports.append(
                (
                    report.read,
                    report.inserted,
                    report.duplicates,
                    report.pending_commits,
                    sorted(report.hours),
                )
            )
        return reports, ledger_contents()

    class Portable(Exception):
        pass

    try:
        with transaction.atomic():
            portable = write_all(ledger_write_portable)
            raise Portable
    except Portable:
        pass
    assert UsageEvent.objects.count() == 0
    written = write_all(ledger_write)

    reports, contents = written
    assert reports == portable[0]
    for got, want in zip(contents, portable[1], strict=True):
        assert got == want
    _, events, waiting, adjustments = contents
    assert sum(report[2] for report in reports) > 0  # the batch written again
    assert any(event[5] == "mystery-model" for event in events)
    assert adjustments  # usage of February, whose statement was sent
    assert any(report[3] for report in reports)  # commits that waited for their check


def to_hour(moment):
    return int(moment.timestamp()) // 3600


def raw_stream(entries):
    """Entries as XREADGROUP returns them, per tenant."""
    streams: dict[int, list] = {}
    for entry in entries:
        fields = [
            b"k",
            entry.kind.encode(),
            b"e",
            json.dumps(entry.data, separators=(",", ":")).encode(),
            b"t",
            str(entry.at_us).encode(),
        ]
        streams.setdefault(entry.tenant_id, []).append([entry.entry_id.encode(), fields])
    return list(streams.items())


def test_entries_laid_out_quickly_are_those_laid_out_carefully(published):
    batch = [entry for batch in mixed_batches(published, 4)[:4] for entry in batch]
    by_stream = sorted(batch, key=lambda entry: (entry.tenant_id, entry.entry_id))

    quick = ledger_postgres.staged_from_stream(raw_stream(by_stream))
    careful = ledger_postgres.staged_from_entries(by_stream)

    assert quick is not None
    assert (quick.entries, quick.checks, quick.models) == (
        careful.entries,
        careful.checks,
        careful.models,
    )
    # The same rows (entries not written as the engine writes them are laid out last).
    assert quick.checks_text == careful.checks_text
    assert sorted(quick.commits_text.splitlines()) == sorted(careful.commits_text.splitlines())
    assert quick.entries == len(batch)


def test_names_with_tabs_line_breaks_and_backslashes_are_stored_as_they_are(published, clock):
    world = published
    user = 'tab\there, line\nbreak, back\\slash, quote"'
    engine.check(world.alice.pk, user, "gpt-4o", tokens=5, request_id="r\\1\t")
    engine.commit(world.alice.pk, "r\\1\t", input_tokens=3, output_tokens=4)

    assert drain().written.inserted == 1
    user_rollups_fold()

    event = UsageEvent.objects.get()
    assert (event.user_id, event.request_id, event.input_tokens) == (user, "r\\1\t", 3)
    assert DailyUserRollup.objects.get().user_id == user


def test_entries_written_differently_are_read_as_the_portable_write_reads_them(
    published, clock, caplog
):
    world = published
    client = redis_client()
    key = stream_key(world.alice.pk)
    at = str(NOON_US)
    odd = {"request_id": "odd", "user": None, "model": "gpt-4o", "tokens": "12", "version": 2.0}
    client.xadd(key, {"k": "check", "e": json.dumps(odd), "t": at})
    client.xadd(key, {"e": json.dumps({**odd, "request_id": "reordered"}), "t": at, "k": "check"})
    long_id = {"request_id": "x" * 201, "model": "gpt-4o", "tokens": 1}
    client.xadd(key, {"k": "check", "e": json.dumps(long_id), "t": at})
    engine.check(world.alice.pk, "u", "gpt-4o", tokens=1, request_id="plain")

    report = drain()

    assert report.written.inserted == 3
    events = {
        event.request_id: (event.user_id, event.estimated_tokens, event.policy_version)
        for event in UsageEvent.objects.all()
    }
    assert events == {"odd": ("", 12, 2), "reordered": ("", 12, 2), "plain": ("u", 1, 1)}
    assert "malformed usage entry" in caplog.text  # the request id too long to store
    assert client.xlen(key) == 0


def test_the_top_user_rollups_take_the_events_a_drain_wrote_once_when_it_folds(published, clock):
    world = published
    for index in range(6):
        engine.check(world.alice.pk, f"u{index % 2}", "gpt-4o", tokens=10, request_id=f"r{index}")
    batch = RedisSource(consumer="first").read(1000)

    ledger_write(batch.entries, batch.denied, defer_user_rollups=True)

    assert DailyUserRollup.objects.count() == 0
    assert UserUsageDelta.objects.count() == 0  # new events are read from their table
    assert user_rollups_fold() == 6
    assert user_rollups_fold() == 0
    assert dict(DailyUserRollup.objects.values_list("user_id", "requests")) == {"u0": 3, "u1": 3}
    assert dict(MonthlyUserRollup.objects.values_list("user_id", "input_tokens")) == {
        "u0": 30,
        "u1": 30,
    }


def test_a_drain_leaves_the_top_users_to_their_fold_which_takes_a_backlog_in_parts(
    published, clock, monkeypatch
):
    world = published
    for index in range(7):
        engine.check(world.alice.pk, f"u{index % 2}", "gpt-4o", tokens=10, request_id=f"r{index}")
        engine.commit(world.alice.pk, f"r{index}", input_tokens=index, output_tokens=1)

    assert drain().written.inserted == 7
    assert DailyUserRollup.objects.count() == 0
    parts = []
    fold_part = ledger_postgres.user_rollups_fold

    def counted(*, most: int) -> tuple[int, bool]:
        parts.append(fold_part(most=most))
        return parts[-1]

    monkeypatch.setattr(ingest, "FOLD_MOST", 3)
    monkeypatch.setattr(ledger_postgres, "user_rollups_fold", counted)

    assert user_rollups_fold() == 7
    assert parts == [(3, False), (3, False), (1, True)]
    assert user_rollups_fold() == 0
    assert dict(DailyUserRollup.objects.values_list("user_id", "input_tokens")) == {
        "u0": 0 + 2 + 4 + 6,
        "u1": 1 + 3 + 5,
    }
    assert dict(MonthlyUserRollup.objects.values_list("user_id", "requests")) == {"u0": 4, "u1": 3}


def test_beat_folds_the_top_users_every_minute_in_a_thin_task():
    from billing import inprocess
    from billing.tasks import user_rollups_task

    (entry,) = [
        entry
        for entry in django_settings.CELERY_BEAT_SCHEDULE.values()
        if entry["task"] == "billing.tasks.user_rollups"
    ]

    assert entry["schedule"] == 60.0
    assert user_rollups_task.name == "billing.tasks.user_rollups"
    # (and the in-process scheduler of the embedded default runs it too)
    assert ("billing-user-rollups", 60.0, user_rollups_fold) in inprocess._jobs()


@pytest.mark.parametrize("folded_between", [False, True])
def test_a_commit_after_its_check_moves_the_top_users_once_folded_or_not(
    published, clock, folded_between
):
    """A commit amending an event not folded in yet changes what the fold reads; one
    amending an event folded in already waits as a delta. Either way it counts once."""
    world = published
    engine.check(world.alice.pk, "u", "gpt-4o", tokens=100, request_id="r1")
    ledger_write(RedisSource(consumer="a").read(1000).entries, {}, defer_user_rollups=True)
    if folded_between:
        user_rollups_fold()
    engine.commit(world.alice.pk, "r1", input_tokens=7, output_tokens=9)
    ledger_write(RedisSource(consumer="b").read(1000).entries, {}, defer_user_rollups=True)

    assert UserUsageDelta.objects.count() == int(folded_between)
    user_rollups_fold()

    for rollup in (DailyUserRollup, MonthlyUserRollup):
        assert list(rollup.objects.values_list("requests", "input_tokens", "output_tokens")) == [
            (1, 7, 9)
        ]
    assert UserUsageDelta.objects.count() == 0


def test_reading_ahead_never_hands_the_batch_being_written_back_to_its_drain(
    published, clock, settings
):
    world = published
    settings.BILLING_CLAIM_IDLE_SECONDS = 0  # anything pending may be claimed at once
    for index in range(30):
        engine.check(world.bob.pk, "u", "gpt-4o", tokens=1, request_id=f"r{index}")
        engine.commit(world.bob.pk, f"r{index}", input_tokens=2, output_tokens=3)

    report = drain(batch_size=4)

    assert (report.written.read, report.written.inserted) == (60, 30)
    assert report.written.duplicates == 0
    assert report.batches == 15
    assert UsageEvent.objects.filter(is_estimate=False).count() == 30
    assert UserUsageDelta.objects.count() == 0
    assert redis_client().xlen(stream_key(world.bob.pk)) == 0


def test_a_drain_starts_with_small_batches(published, clock, monkeypatch):
    """The first batch is read while Postgres waits for it: small, then doubling to the batch
    size."""
    world = published
    for index in range(90):
        engine.check(world.bob.pk, "u", "gpt-4o", tokens=1, request_id=f"r{index}")
    monkeypatch.setattr(ingest, "FIRST_READ_LEAST", 1)
    sizes = []
    read = RedisSource.read

    def recorded(self, count, **options):
        sizes.append(count)
        return read(self, count, **options)

    monkeypatch.setattr(RedisSource, "read", recorded)

    report = drain(batch_size=80)

    assert sizes == [10, 20, 40, 80, 80]  # the last one finds nothing left
    assert (report.batches, report.written.inserted) == (4, 90)


def test_the_engines_documents_are_read_by_the_quick_pattern_not_parsed_as_json(published, clock):
    """The drain reads entries laid out as the engine lays them out without a JSON parser;
    anything else still works, only slower. This says when the two drift apart."""
    world = published
    engine.check(world.alice.pk, "u1", "gpt-4o", tokens=7, request_id="r1")
    engine.commit(world.alice.pk, "r1", input_tokens=3, output_tokens=4, status="error")
    entries = redis.Redis.from_url(django_settings.REDIS_URL).xrange(stream_key(world.alice.pk))

    documents = {fields[b"k"]: fields[b"e"] for _, fields in entries}

    assert ledger_postgres._CHECK_DOCUMENT(documents[b"check"]) is not None
    assert ledger_postgres._COMMIT_DOCUMENT(documents[b"commit"]) is not None


def test_the_ledger_statements_leave_the_planner_settings_of_the_transaction_as_they_were(
    published, clock
):
    """The write and the fold turn JIT compilation (and the fold sorting) off for their own
    statements only; what the transaction runs afterwards is planned as before."""
    world = published
    engine.check(world.alice.pk, "u", "gpt-4o", tokens=100, request_id="r1")
    RedisSource(consumer="a").read(1000)  # the check is held by another consumer
    engine.commit(world.alice.pk, "r1", input_tokens=7, output_tokens=9)
    ledger_write(RedisSource(consumer="b").read(1000).entries, {})  # the commit waits
    engine.check(world.alice.pk, "u", "gpt-4o", tokens=100, request_id="r2")

    def planner_settings():
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_setting('jit'), current_setting('enable_sort')")
            return cursor.fetchone()

    with transaction.atomic():
        before = planner_settings()
        # A commit waits: the statement runs a second time, for the commits that wait.
        report = ledger_write(RedisSource(consumer="b").read(1000).entries, {})
        assert planner_settings() == before
        assert user_rollups_fold() == 0
        assert planner_settings() == before

    assert (report.inserted, report.pending_commits) == (1, 1)
    assert PendingCommit.objects.count() == 1
