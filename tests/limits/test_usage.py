"""Usage reports while Redis is away: kept in Postgres, answered 202, applied when Redis is
back, and dropped (counted) when Redis came back without the check they settle.

Every outage is real: a redis-server of this module's own, frozen (SIGSTOP: connections are
accepted, nobody answers, nothing is lost) or killed and started again empty.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from asgiref.sync import async_to_sync
from prometheus_client import REGISTRY

from limits import engine, services
from limits.middleware import QuotaGrant
from limits.models import DeferredUsageReport, FailMode, Metric, Scope
from limits.tasks import deferred_usage_apply_task
from limits.usage import UsageOutcome, usage_report
from limits.views import DEFERRED_DETAIL
from tests.factories import LimitRuleFactory

TOKENS_PER_HOUR = 1000


@pytest.fixture
def metered(world, own_redis):
    """Alice's users: 1,000 tokens an hour each, tier fail mode open."""
    world.tier.fail_mode = FailMode.OPEN
    world.tier.save()
    LimitRuleFactory(tier=world.tier, scope=Scope.USER, metric=Metric.TOKENS, limit=TOKENS_PER_HOUR)
    version = services.policy_publish(actor=services.SYSTEM, reason="metered")
    assert version is not None
    engine.policy_store().publish(version.version, version.document)
    return world


def tokens_left(tenant, user: str = "u1") -> int:
    deadline = time.monotonic() + 3  # past a breaker opened by the test's outage
    while (answer := engine.quota(tenant.pk, user, "gpt-4o")).degraded:
        assert time.monotonic() < deadline, "Redis did not answer again"
        time.sleep(0.05)
    (state,) = [s for s in answer.limits if s.metric == "tokens"]
    return int(state.remaining)


def checked(tenant, request_id: str, tokens: int = 100) -> None:
    decision = engine.check(tenant.pk, "u1", "gpt-4o", tokens=tokens, request_id=request_id)
    assert (decision.allowed, decision.degraded) == (True, False)


def report(tenant, request_id: str, input_tokens: int = 150, output_tokens: int = 50):
    return usage_report(
        tenant_id=tenant.pk,
        request_id=request_id,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
    )


def applied_as(applied: int, unknown: int, still_unavailable: bool, **lost: int) -> dict:
    """What deferred_usage_apply_task returns."""
    return {
        "applied": applied,
        "unknown": unknown,
        "still_unavailable": still_unavailable,
        "lost_cancelled": lost.get("cancelled", 0),
        "lost_nothing_to_cancel": lost.get("nothing_to_cancel", 0),
    }


def counted(outcome: str) -> float:
    value = REGISTRY.get_sample_value("quota_deferred_usage_reports_total", {"outcome": outcome})
    return value or 0.0


def kept() -> list[tuple[int, str, int, int, str, int]]:
    return list(
        DeferredUsageReport.objects.values_list(
            "tenant_id", "request_id", "input_tokens", "output_tokens", "status", "attempts"
        )
    )


def post_usage(client, key: str, request_id: str, input_tokens: int, output_tokens: int):
    body = {"request_id": request_id, "input_tokens": input_tokens, "output_tokens": output_tokens}
    return client.post(
        "/api/v1/usage",
        json.dumps(body),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {key}",
    )


def test_a_report_while_redis_is_away_is_answered_202_and_kept_once(client, metered, own_redis):
    _, key = services.apikey_create(tenant=metered.alice, name="svc", actor=services.SYSTEM)
    checked(metered.alice, "r1")
    deferred_before = counted("deferred")
    own_redis.freeze()
    try:
        first = post_usage(client, key, "r1", 150, 50)
        again = post_usage(client, key, "r1", 10, 10)  # the caller retried: the first stands
    finally:
        own_redis.thaw()

    expected = {
        "request_id": "r1",
        "input_tokens": 150,
        "output_tokens": 50,
        "status": "ok",
        "deferred": True,
        "detail": DEFERRED_DETAIL,
    }
    assert (first.status_code, first.json()) == (202, {**expected, "repeated": False})
    assert (again.status_code, again.json()) == (202, {**expected, "repeated": True})
    assert kept() == [(metered.alice.pk, "r1", 150, 50, "ok", 0)]
    assert counted("deferred") == deferred_before + 1


def test_a_report_with_redis_up_is_answered_200_as_before_and_kept_nowhere(client, metered):
    _, key = services.apikey_create(tenant=metered.alice, name="svc", actor=services.SYSTEM)
    checked(metered.alice, "r1")

    answer = post_usage(client, key, "r1", 150, 50)

    assert answer.status_code == 200
    assert answer.json() == {
        "request_id": "r1",
        "input_tokens": 150,
        "output_tokens": 50,
        "status": "ok",
        "repeated": False,
    }
    assert kept() == []
    assert tokens_left(metered.alice) == TOKENS_PER_HOUR - 200


def test_a_kept_report_waits_while_redis_is_away_and_is_applied_when_it_is_back(metered, own_redis):
    checked(metered.alice, "r1")
    checked(metered.alice, "r2")
    assert tokens_left(metered.alice) == TOKENS_PER_HOUR - 200
    applied_before = counted("applied")
    own_redis.freeze()
    try:
        assert report(metered.alice, "r1", 150, 50) == UsageOutcome(
            "r1", 150, 50, "ok", repeated=False, deferred=True
        )
        assert report(metered.alice, "r2", 30, 20).deferred

        waited = deferred_usage_apply_task()
    finally:
        own_redis.thaw()

    assert waited == applied_as(0, 0, True)
    # The oldest was tried and is marked; the run stopped before the next.
    assert kept() == [
        (metered.alice.pk, "r1", 150, 50, "ok", 1),
        (metered.alice.pk, "r2", 30, 20, "ok", 0),
    ]
    assert DeferredUsageReport.objects.get(request_id="r1").last_error

    applied = deferred_usage_apply_task()

    assert applied == applied_as(2, 0, False)
    assert kept() == []
    # Estimates of 100 each replaced by 200 and 50.
    assert tokens_left(metered.alice) == TOKENS_PER_HOUR - 250
    assert engine.commit(metered.alice.pk, "r1", 1, 1) == engine.Settlement(
        "r1", 150, 50, "ok", repeated=True
    )
    assert counted("applied") == applied_before + 2
    assert deferred_usage_apply_task() == applied_as(0, 0, False)


def test_a_kept_report_whose_check_was_lost_with_redis_is_dropped_and_counted_unknown(
    metered, own_redis, caplog
):
    checked(metered.alice, "r1")
    unknown_before = counted("unknown")
    own_redis.stop()
    assert report(metered.alice, "r1").deferred
    own_redis.start()  # same port, empty: the check's record is gone

    with caplog.at_level(logging.WARNING, logger="limits.usage"):
        result = deferred_usage_apply_task()

    assert result == applied_as(0, 1, False)
    assert kept() == []
    assert counted("unknown") == unknown_before + 1
    (warning,) = [r for r in caplog.records if r.name == "limits.usage"]
    assert warning.levelno == logging.WARNING
    assert "r1" in warning.getMessage()


def test_a_report_kept_for_one_tenant_is_not_another_tenants(metered, own_redis):
    checked(metered.alice, "r1")
    checked(metered.bob, "r1")
    own_redis.freeze()
    try:
        assert report(metered.alice, "r1", 150, 50).deferred
        assert report(metered.bob, "r1", 30, 20).repeated is False
    finally:
        own_redis.thaw()

    assert sorted(row[:4] for row in kept()) == sorted(
        [(metered.alice.pk, "r1", 150, 50), (metered.bob.pk, "r1", 30, 20)]
    )


def test_the_middleware_keeps_its_settlement_while_redis_is_away(metered, own_redis):
    decision = engine.check(metered.alice.pk, "u1", "gpt-4o", tokens=100, request_id="r1")
    grant = QuotaGrant(tenant_id=metered.alice.pk, decision=decision, tokens=100, input_tokens=40)
    own_redis.freeze()
    try:
        grant.settle(40, 60)
    finally:
        own_redis.thaw()

    assert grant.settlement == UsageOutcome("r1", 40, 60, "ok", repeated=False, deferred=True)
    assert kept() == [(metered.alice.pk, "r1", 40, 60, "ok", 0)]
    assert deferred_usage_apply_task()["applied"] == 1
    assert tokens_left(metered.alice) == TOKENS_PER_HOUR - 100


def test_a_report_settled_on_an_event_loop_is_kept_too(transactional_db, metered, own_redis):
    """The middleware settles an async stream on its event loop, where Django refuses
    queries."""
    checked(metered.alice, "r1")

    async def settle_on_the_loop():
        return report(metered.alice, "r1", 150, 50)

    own_redis.freeze()
    try:
        outcome = async_to_sync(settle_on_the_loop)()
    finally:
        own_redis.thaw()

    assert outcome == UsageOutcome("r1", 150, 50, "ok", repeated=False, deferred=True)
    assert kept() == [(metered.alice.pk, "r1", 150, 50, "ok", 0)]


def test_beat_applies_kept_reports_every_five_seconds(settings):
    (entry,) = [
        entry
        for entry in settings.CELERY_BEAT_SCHEDULE.values()
        if entry["task"] == "limits.tasks.deferred_usage_apply"
    ]

    assert entry["schedule"] == 5.0
    task = deferred_usage_apply_task
    assert task.name == "limits.tasks.deferred_usage_apply"
    assert (task.soft_time_limit, task.time_limit, task.ignore_result) == (8, 10, True)


# A check whose answer was lost while its caller was told it is denied


@pytest.fixture
def closed(metered):
    metered.tier.fail_mode = FailMode.CLOSED
    metered.tier.save()
    version = services.policy_publish(actor=services.SYSTEM, reason="closed")
    engine.policy_store().publish(version.version, version.document)
    return metered


BUSY_SCRIPT = """
local started = redis.call('TIME')
repeat
  local now = redis.call('TIME')
until (now[1] - started[1]) * 1000000 + (now[2] - started[2]) > tonumber(ARGV[1])
return 1
"""


def lost_check(world, own_redis, request_id: str) -> engine.Decision:
    """A check sent while Redis is busy for half a second with another client's script:
    the engine's call times out and the tier's fail mode answers, but the check is in
    Redis's hands, and Redis runs it once the script is done."""
    # A connection of the engine's own, opened and its scripts loaded, before Redis is busy.
    assert not engine.check(world.alice.pk, "warm-up", "gpt-4o").degraded
    busy = threading.Thread(
        target=own_redis.client().eval, args=(BUSY_SCRIPT, 0, 500_000), daemon=True
    )
    busy.start()
    time.sleep(0.1)  # the script is running
    try:
        return engine.check(world.alice.pk, "u1", "gpt-4o", tokens=100, request_id=request_id)
    finally:
        busy.join(timeout=5)


def usage_stream(world) -> list[tuple[str, dict]]:
    """The tenant's usage stream: (kind, event) of each entry, oldest first."""
    stream = f"{engine.tenant_tag(world.alice.pk)}:events"
    entries = engine.backend()._client().xrange(stream)
    return [(fields["k"], json.loads(fields["e"])) for _, fields in entries]


def wait_for_check_event(world, request_id: str) -> bool:
    """Whether Redis ran the check (its usage event is in the stream), within 5 s."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if ("check", request_id) in [(k, e["request_id"]) for k, e in usage_stream(world)]:
            return True
        time.sleep(0.05)
    return False


def test_a_check_admitted_while_its_caller_was_told_denied_is_settled_as_cancelled(
    closed, own_redis, caplog
):
    checked_before = counted("lost_answer")
    answer = lost_check(closed, own_redis, "lost-1")
    assert (answer.allowed, answer.degraded) == (False, True)
    assert kept() == [(closed.alice.pk, "lost-1", 0, 0, "cancelled", 0)]
    assert DeferredUsageReport.objects.get().lost_answer
    assert counted("lost_answer") == checked_before + 1
    # Redis runs the check after all: admitted, 100 tokens taken.
    assert wait_for_check_event(closed, "lost-1")
    assert tokens_left(closed.alice) == TOKENS_PER_HOUR - 100

    with caplog.at_level(logging.WARNING, logger="limits.usage"):
        result = deferred_usage_apply_task()

    assert result == applied_as(0, 0, False, cancelled=1)
    assert kept() == []
    assert tokens_left(closed.alice) == TOKENS_PER_HOUR  # its estimate given back
    # The usage stream says so: billing settles the check at no tokens, no cost.
    kind, event = usage_stream(closed)[-1]
    assert (kind, event["request_id"], event["input_tokens"], event["output_tokens"]) == (
        "commit",
        "lost-1",
        0,
        0,
    )
    assert event["status"] == "cancelled"
    assert "settled as cancelled" in caplog.text
    # Its caller, told it was denied, reports nothing; a report all the same changes nothing.
    assert report(closed.alice, "lost-1") == UsageOutcome(
        "lost-1", 0, 0, "cancelled", repeated=True, deferred=False
    )


def test_a_lost_check_redis_never_ran_leaves_nothing_to_cancel(closed, own_redis, caplog):
    own_redis.stop()
    answer = engine.check(closed.alice.pk, "u1", "gpt-4o", tokens=100, request_id="never-1")
    assert (answer.allowed, answer.degraded) == (False, True)
    assert kept() == [(closed.alice.pk, "never-1", 0, 0, "cancelled", 0)]
    own_redis.start()

    with caplog.at_level(logging.WARNING, logger="limits.usage"):
        result = deferred_usage_apply_task()

    assert result == applied_as(0, 0, False, nothing_to_cancel=1)
    assert kept() == []
    assert not [r for r in caplog.records if r.name == "limits.usage"]  # nothing to warn of


def test_a_check_answered_while_the_breaker_is_open_keeps_no_cancellation(closed, own_redis):
    own_redis.stop()
    engine.check(closed.alice.pk, "u1", "gpt-4o", request_id="sent-1")
    DeferredUsageReport.objects.all().delete()
    # Nothing is sent while the breaker is open: nothing can have run.
    answer = engine.check(closed.alice.pk, "u1", "gpt-4o", request_id="not-sent")
    assert (answer.allowed, answer.degraded) == (False, True)
    assert kept() == []


def test_a_lost_check_answered_allowed_by_the_fail_mode_keeps_no_cancellation(metered, own_redis):
    answer = lost_check(metered, own_redis, "open-1")  # the tier's fail mode is open
    assert (answer.allowed, answer.degraded) == (True, True)
    assert kept() == []


def test_the_clients_own_report_takes_the_place_of_a_kept_cancellation(closed, own_redis):
    lost_check(closed, own_redis, "lost-2")
    assert wait_for_check_event(closed, "lost-2")
    # The client repeats its request id once Redis answers: the first decision stands, it
    # was admitted, and runs the inference; its report comes while Redis is away.
    engine.reset_state()
    repeat = engine.check(closed.alice.pk, "u1", "gpt-4o", tokens=100, request_id="lost-2")
    assert (repeat.allowed, repeat.repeated) == (True, True)
    own_redis.freeze()
    try:
        assert report(closed.alice, "lost-2", 150, 50).deferred
    finally:
        own_redis.thaw()
    assert kept() == [(closed.alice.pk, "lost-2", 150, 50, "ok", 0)]
    assert not DeferredUsageReport.objects.get().lost_answer

    assert deferred_usage_apply_task() == applied_as(1, 0, False)
    assert engine.commit(closed.alice.pk, "lost-2", 1, 1) == engine.Settlement(
        "lost-2", 150, 50, "ok", repeated=True
    )
