"""10,000 checks and commits with random tokens across three tenants on a real Redis,
while a drain process is SIGKILLed twice in the middle of a batch and started again:
Postgres holds exactly 10,000 events and the rollups equal what was sent, to the token and
to the cent.

The first kill lands while the drain writes a batch to Postgres (read, not committed). The
second lands after a batch committed but before its XACK: the test holds Redis writes
(CLIENT PAUSE WRITE, on a Redis server of its own) while the drain writes, waits for the
commit, and kills the drain while its XACK waits. The next drain must take that batch over
and write nothing of it twice."""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import pytest
import redis
from django.conf import settings as django_settings
from django.db import connection
from django.db.models import Sum

from billing import ingest
from billing.models import (
    DailyRollup,
    DailyUserRollup,
    HourlyRollup,
    MonthlyRollup,
    MonthlyUserRollup,
    PendingCommit,
    UsageEvent,
)
from billing.rollups import rollups_reconcile
from limits import engine
from tests.billing.conftest import publish
from tests.factories import TenantFactory

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

REPOSITORY = Path(__file__).resolve().parents[2]
EVENTS = 10_000
USERS = 150
PRICES = {
    "gpt-4o": (Decimal("0.0025"), Decimal("0.0100")),
    "llama-3-8b": (Decimal("0.0025"), Decimal("0.0100")),
}
DEADLINE = 90


class Drainer:
    """``manage.py drain_usage --follow`` as its own process, against this test's database
    and key prefix."""

    def __init__(self, log: Path, redis_url: str) -> None:
        self.log = log
        self.redis_url = redis_url
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, stop_when_idle: float | None = None) -> None:
        database = connection.settings_dict
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "DATABASE_URL": (
                f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/"
                f"{database['NAME']}"
            ),
            "REDIS_URL": self.redis_url,
            "QUOTA_KEY_PREFIX": django_settings.QUOTA_KEY_PREFIX,
            # What a killed drain had read is taken over after a second, not a minute.
            "BILLING_CLAIM_IDLE_SECONDS": "1",
            "BILLING_DRAIN_BATCH": "400",
        }
        command = [sys.executable, "manage.py", "drain_usage", "--follow", "--interval", "0.05"]
        command += ["--max-seconds", str(DEADLINE)]
        if stop_when_idle is not None:
            command += ["--stop-when-idle", str(stop_when_idle)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=REPOSITORY, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


def pending(client: redis.Redis, tenants: list[int]) -> int:
    total = 0
    for tenant in tenants:
        try:
            total += int(client.xpending(ingest.stream_key(tenant), ingest.GROUP)["pending"])
        except redis.ResponseError:
            pass  # the group does not exist yet
    return total


def wait_for_batch_in_hand(
    drainer: Drainer, client: redis.Redis, tenants: list[int], stored: int
) -> None:
    """Until the drain has stored ``stored`` events and holds a batch it read but has not
    acknowledged."""
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        assert drainer.process is not None and drainer.process.poll() is None, "drain ended"
        if UsageEvent.objects.count() >= stored and pending(client, tenants):
            return
        time.sleep(0.002)
    raise AssertionError(f"the drain never stored {stored} events with a batch in hand")


def kill_while_writing(
    drainer: Drainer, client: redis.Redis, tenants: list[int], stored: int
) -> int:
    """SIGKILL the drain while it holds a read batch; returns the entries left pending."""
    wait_for_batch_in_hand(drainer, client, tenants, stored)
    drainer.kill()
    return pending(client, tenants)


def kill_between_commit_and_ack(
    drainer: Drainer, client: redis.Redis, tenants: list[int], stored: int
) -> int:
    """SIGKILL the drain after its batch committed, while its XACK is held; returns how
    many events that committed batch wrote."""
    for _attempt in range(30):
        wait_for_batch_in_hand(drainer, client, tenants, stored)
        client.client_pause(3000, all=False)  # writes wait (XACK, XREADGROUP, scripts)
        try:
            before = UsageEvent.objects.count()
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                committed = UsageEvent.objects.count() - before
                if committed:
                    drainer.kill()
                    return committed
                time.sleep(0.002)
        finally:
            client.client_unpause()
    raise AssertionError("never caught a committed batch before its XACK")


def test_ten_thousand_events_survive_two_sigkilled_drains_exactly_once(
    world, settings, tmp_path, own_redis
):
    # The drain shares the CPUs, and Redis writes are held for a moment: slow is not down.
    settings.QUOTA_REDIS_TIMEOUT_MS = 5000
    carol = TenantFactory(slug="carol", name="Carol Inc", tier=world.tier)
    tenants = [world.alice.pk, world.bob.pk, carol.pk]
    publish()
    client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)

    rng = random.Random(20300310)
    sent: dict[tuple[int, str], Counter[str]] = defaultdict(Counter)
    cost: dict[tuple[int, str], Decimal] = defaultdict(Decimal)
    per_user: dict[tuple[int, str], Counter[str]] = defaultdict(Counter)
    denied: Counter[tuple[int, str]] = Counter()
    failures: list[BaseException] = []

    def produce() -> None:
        try:
            allowed = 0
            attempts = 0
            while allowed < EVENTS:
                attempts += 1
                assert attempts < EVENTS * 2
                tenant = rng.choice(tenants)
                model = rng.choice(list(PRICES))
                # One greedy user per tenant goes past its 100 requests an hour.
                user = "greedy" if rng.random() < 0.08 else f"user{rng.randrange(USERS)}"
                estimate = rng.randrange(0, 5000)
                decision = engine.check(tenant, user, model, tokens=estimate)
                assert not decision.degraded
                if not decision.allowed:
                    denied[(tenant, model)] += 1
                    continue
                allowed += 1
                key = (tenant, model)
                sent[key]["requests"] += 1
                input_price, output_price = PRICES[model]
                if rng.random() < 0.03:
                    # Never reported: billed at the estimate, as input tokens.
                    sent[key]["estimated"] += 1
                    sent[key]["input"] += estimate
                    cost[key] += estimate * input_price / 1000
                    per_user[(tenant, user)]["tokens"] += estimate
                    continue
                used_in, used_out = rng.randrange(0, 8000), rng.randrange(0, 4000)
                settled = engine.commit(
                    tenant,
                    decision.request_id,
                    used_in,
                    used_out,
                    status=rng.choice(["ok", "ok", "ok", "error"]),
                )
                assert settled is not None and not settled.repeated
                sent[key]["input"] += used_in
                sent[key]["output"] += used_out
                cost[key] += (used_in * input_price + used_out * output_price) / 1000
                per_user[(tenant, user)]["tokens"] += used_in + used_out
        except BaseException as error:  # noqa: BLE001 - reported by the test thread
            failures.append(error)

    producer = threading.Thread(target=produce, daemon=True)
    drainer = Drainer(tmp_path / "drain.log", own_redis.url)
    try:
        producer.start()
        drainer.start()
        held_first = kill_while_writing(drainer, client, tenants, stored=1500)
        drainer.start()
        committed_unacknowledged = kill_between_commit_and_ack(
            drainer, client, tenants, stored=5000
        )
        held_second = pending(client, tenants)
        producer.join(timeout=DEADLINE)
        assert not producer.is_alive(), "the checks took too long"
        assert not failures, failures
        drainer.start(stop_when_idle=2)
        assert drainer.wait(timeout=DEADLINE) == 0, (tmp_path / "drain.log").read_text()
    finally:
        producer.join(timeout=5)
        drainer.stop()

    log = (tmp_path / "drain.log").read_text()
    assert held_first and held_second, "each kill left a batch read but unacknowledged"
    assert committed_unacknowledged > 0
    assert "Traceback" not in log, log
    # The batch that was committed but never acknowledged came back and was recognised.
    duplicates = sum(
        int(line.split(" already stored")[0].rsplit(" ", 1)[1])
        for line in log.splitlines()
        if " already stored" in line
    )
    assert duplicates >= committed_unacknowledged
    # The rollups the drain kept were right by themselves: checking them against the raw
    # events after every drain never had anything to repair.
    repaired = [line for line in log.splitlines() if " repaired" in line]
    assert repaired and all(line.endswith(", 0 repaired") for line in repaired), log

    # Exactly once: every allowed check is one row, every commit applied, nothing waiting.
    assert UsageEvent.objects.count() == EVENTS
    assert PendingCommit.objects.count() == 0
    assert pending(client, tenants) == 0
    for tenant in tenants:
        assert client.xlen(ingest.stream_key(tenant)) == 0

    for (tenant, model), expected in sent.items():
        stored = HourlyRollup.objects.filter(tenant_id=tenant, model_id=model).aggregate(
            requests=Sum("requests"),
            denied=Sum("denied"),
            input=Sum("input_tokens"),
            output=Sum("output_tokens"),
            estimated=Sum("estimated_requests"),
            cost=Sum("cost"),
        )
        assert stored["requests"] == expected["requests"]
        assert stored["input"] == expected["input"]
        assert stored["output"] == expected["output"]
        assert stored["estimated"] == expected["estimated"]
        assert stored["denied"] == denied[(tenant, model)]
        assert stored["cost"] == cost[(tenant, model)]
        cents = Decimal("0.01")
        assert stored["cost"].quantize(cents, ROUND_HALF_EVEN) == cost[(tenant, model)].quantize(
            cents, ROUND_HALF_EVEN
        )
        for coarser in (DailyRollup, MonthlyRollup):
            summed = coarser.objects.filter(tenant_id=tenant, model_id=model).aggregate(
                requests=Sum("requests"),
                denied=Sum("denied"),
                tokens=Sum("input_tokens") + Sum("output_tokens"),
                cost=Sum("cost"),
            )
            assert summed == {
                "requests": expected["requests"],
                "denied": denied[(tenant, model)],
                "tokens": expected["input"] + expected["output"],
                "cost": cost[(tenant, model)],
            }
    assert sum(denied.values()) > 0
    for user_rollup in (DailyUserRollup, MonthlyUserRollup):
        users = {
            (row["tenant_id"], row["user_id"]): row["tokens"]
            for row in user_rollup.objects.values("tenant_id", "user_id").annotate(
                tokens=Sum("input_tokens") + Sum("output_tokens")
            )
        }
        assert users == {key: value["tokens"] for key, value in per_user.items()}

    hours = list(HourlyRollup.objects.values_list("hour", flat=True).distinct())
    check = rollups_reconcile(start=min(hours), end=max(hours) + dt.timedelta(hours=1))
    assert check.repaired == 0
    engine.reset_state()
