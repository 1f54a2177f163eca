"""What a check answers when Redis is gone, slow or silent, and how it comes back.

Every outage here is real: a redis-server of this module's own, killed, restarted on the
same port, paused or frozen (SIGSTOP: the kernel still accepts connections, nobody answers).
"""

from __future__ import annotations

import math
import threading
import time

import pytest
from prometheus_client import REGISTRY

from limits import engine, services
from limits.engine import Decision
from limits.models import FailMode

FAIL_MODES = [FailMode.OPEN, FailMode.CLOSED, FailMode.LOCAL]


def publish(world, fail_mode: str, limit: int) -> int:
    """The tier in ``fail_mode`` with its user_model rule at ``limit`` requests an hour."""
    world.tier.fail_mode = fail_mode
    world.tier.save()
    world.rule.limit = limit
    world.rule.save()
    version = services.policy_publish(actor=services.SYSTEM, reason=f"{fail_mode} {limit}")
    assert version is not None
    engine.policy_store().publish(version.version, version.document)
    return version.version


def check(world, user_id: str = "u1") -> Decision:
    return engine.check(world.alice.pk, user_id, "gpt-4o")


def check_until_redis_answers(world, seconds: float) -> Decision:
    """Check back to back until a check is decided by Redis again, or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while True:
        decision = check(world, "after")
        if not decision.degraded or time.monotonic() > deadline:
            return decision
        time.sleep(0.02)


def redis_errors() -> float:
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "quota_redis_errors"
        for sample in metric.samples
        if sample.name == "quota_redis_errors_total"
    )


def expected_outcomes(mode: str, limit: int, checks: int) -> list[bool]:
    if mode == FailMode.OPEN:
        return [True] * checks
    if mode == FailMode.CLOSED:
        return [False] * checks
    return [True] * limit + [False] * (checks - limit)


# Redis stopped


@pytest.mark.parametrize("mode", FAIL_MODES)
def test_with_redis_stopped_the_tiers_fail_mode_answers_until_redis_is_back(
    world, own_redis, settings, mode
):
    version = publish(world, mode, limit=3)
    assert check(world).degraded is False  # one use counted in Redis
    own_redis.stop()

    answers = [check(world) for _ in range(5)]

    assert [answer.allowed for answer in answers] == expected_outcomes(mode, 3, 5)
    assert {answer.degraded for answer in answers} == {True}
    assert {answer.policy_version for answer in answers} == {version}
    if mode == FailMode.LOCAL:
        # This process's own limiter, with the tier's rules: it never saw Redis's count.
        assert [answer.limits[0].remaining for answer in answers[:3]] == [2, 1, 0]
        assert answers[3].denied_by.scope == "user_model"
        assert answers[3].retry_after > 3590
    elif mode == FailMode.CLOSED:
        assert {(answer.retry_after, answer.denied_by) for answer in answers} == {
            (settings.QUOTA_BREAKER_SECONDS, None)
        }
    else:
        assert {(answer.limits, answer.retry_after) for answer in answers} == {((), None)}
    assert engine.backend().circuit_open

    own_redis.start()  # same port, empty: the outage lost what Redis held
    back = check_until_redis_answers(world, seconds=2 * settings.QUOTA_BREAKER_SECONDS)

    assert (back.allowed, back.degraded, back.policy_version) == (True, False, version)
    assert back.limits[0].remaining == 2
    assert not engine.backend().circuit_open


def test_a_commit_while_redis_is_stopped_says_so_instead_of_losing_the_report(world, own_redis):
    publish(world, FailMode.OPEN, limit=3)
    decision = check(world)
    own_redis.stop()

    with pytest.raises(engine.EngineUnavailable):
        engine.commit(world.alice.pk, decision.request_id, 10, 20)


@pytest.mark.parametrize("mode", [FailMode.OPEN, FailMode.CLOSED])
def test_a_commit_gets_through_while_one_slow_call_holds_the_breaker_open(
    world, own_redis, settings, mode
):
    """A breaker opened by one slow call answers checks by the fail mode, but a usage
    report (the inference ran) is still tried: refused, it would leave the request billed
    at its estimate although Redis answers. Getting through, it closes the breaker."""
    settings.QUOTA_BREAKER_SECONDS = 30.0  # open for the whole test unless a call closes it
    publish(world, mode, limit=3)
    decision = check(world)
    assert decision.degraded is False
    own_redis.freeze()
    try:
        assert check(world).degraded is True  # one timeout: the breaker opens
    finally:
        own_redis.thaw()
    assert engine.backend().circuit_open
    assert check(world).degraded is True  # checks still go around Redis

    settlement = engine.commit(world.alice.pk, decision.request_id, 10, 20)

    assert settlement is not None
    assert (settlement.input_tokens, settlement.output_tokens) == (10, 20)
    assert not engine.backend().circuit_open
    assert check(world).degraded is False


def test_a_commit_while_redis_stays_stopped_waits_out_no_more_than_its_own_call(
    world, own_redis, settings
):
    settings.QUOTA_BREAKER_SECONDS = 30.0
    publish(world, FailMode.OPEN, limit=3)
    decision = check(world)
    own_redis.stop()
    assert check(world).degraded is True
    assert engine.backend().circuit_open

    with pytest.raises(engine.EngineUnavailable):
        engine.commit(world.alice.pk, decision.request_id, 10, 20)
    assert engine.backend().circuit_open  # still open: checks keep going around Redis


# Redis slow


@pytest.mark.slow
@pytest.mark.parametrize("mode", [FailMode.CLOSED, FailMode.LOCAL])
def test_a_redis_slower_than_the_timeout_gets_the_fail_mode_answer(
    world, own_redis, settings, mode
):
    publish(world, mode, limit=3)
    assert check(world).degraded is False
    pause_seconds = 1.0
    # Every write, scripts included, waits out the pause; the connection that asks does not.
    own_redis.client().execute_command("CLIENT", "PAUSE", int(pause_seconds * 1000), "WRITE")
    paused_at = time.monotonic()

    answer = check(world)

    assert time.monotonic() - paused_at < pause_seconds  # answered during the pause
    assert answer.degraded is True
    assert answer.allowed is (mode == FailMode.LOCAL)
    back = check_until_redis_answers(
        world, seconds=pause_seconds + 2 * settings.QUOTA_BREAKER_SECONDS
    )
    assert (back.allowed, back.degraded) == (True, False)


# Redis silent


@pytest.mark.slow
def test_a_silent_redis_costs_at_most_one_timeout_per_breaker_interval(world, own_redis, settings):
    publish(world, FailMode.OPEN, limit=1_000_000)
    assert check(world).degraded is False
    timeout = settings.QUOTA_REDIS_TIMEOUT_MS / 1000
    duration = 3.0
    bound = math.ceil(duration / settings.QUOTA_BREAKER_SECONDS) + 1
    errors_before = redis_errors()
    own_redis.freeze()
    try:
        waits = []
        started = time.monotonic()
        while time.monotonic() - started < duration:
            before = time.perf_counter()
            answer = check(world)
            waits.append(time.perf_counter() - before)
            assert (answer.allowed, answer.degraded) == (True, True)
    finally:
        own_redis.thaw()

    waited = [elapsed for elapsed in waits if elapsed > timeout * 0.8]
    assert 1 <= len(waited) <= bound
    assert 1 <= redis_errors() - errors_before <= bound
    # Each of them waited one timeout, not two: a call that timed out is not retried.
    assert max(waited) < 1.9 * timeout
    assert len(waits) > 4 * bound  # the rest went around Redis


@pytest.mark.slow
def test_threads_checking_during_a_silent_redis_share_one_probe_per_interval(
    world, own_redis, settings
):
    publish(world, FailMode.OPEN, limit=1_000_000)
    assert check(world).degraded is False
    duration = 2.0
    thread_count = 6
    # The calls already on their way when Redis fell silent each wait once (nothing has
    # failed yet to open the breaker); after that, one probe per interval for all threads.
    bound = thread_count + math.ceil(duration / settings.QUOTA_BREAKER_SECONDS)
    errors_before = redis_errors()
    answers: list[Decision] = []
    failures: list[BaseException] = []

    def keep_checking(user_id: str) -> None:
        try:
            started = time.monotonic()
            while time.monotonic() - started < duration:
                answers.append(check(world, user_id))
        except BaseException as error:  # noqa: BLE001 - reported below, the test fails
            failures.append(error)

    threads = [
        threading.Thread(target=keep_checking, args=(f"t{index}",)) for index in range(thread_count)
    ]
    own_redis.freeze()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=duration + 10)
    finally:
        own_redis.thaw()

    assert failures == []
    assert not any(thread.is_alive() for thread in threads)
    assert {(answer.allowed, answer.degraded) for answer in answers} == {(True, True)}
    assert 1 <= redis_errors() - errors_before <= bound
