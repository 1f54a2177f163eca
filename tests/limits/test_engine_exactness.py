"""Exactness under real concurrency: checks from many processes, each with several threads,
released together against one shared limit, admit exactly the limit, never one more.

The checking processes are started fresh (spawn) with the test settings, this test's key
prefix and no reachable database: they enforce only what Redis tells them, as a second web
server would. Each reports how many of its checks were admitted; Redis is then asked what it
counted, so the callers and the store must agree too. The engine's races run on one Redis and
on a three-primary Redis Cluster (fewer attempts there: the race is at the limit, and every
attempt after it is one more denial).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from django.conf import settings as django_settings

from limits.redis_client import Client, redis_client
from tests.processes import NO_DATABASE

pytestmark = pytest.mark.slow

PROCESSES = 8
THREADS = 4
ATTEMPTS = 1000
RUNS = 5
# On the cluster the same number of racers in fewer processes, with fewer attempts and runs:
# starting a process and every call through the cluster client cost several times what they
# cost on one Redis on these two cores, and the race is decided at the limit anyway.
CLUSTER_PROCESSES = 4
CLUSTER_ATTEMPTS = 150
CLUSTER_RUNS = 2
# The checking processes and their threads share two cores with Redis here: a call may wait
# longer than the production timeout for its turn on a CPU. Outages are the fail-mode tests'
# subject; this one counts, so a slow answer must still be an answer (and none is degraded).
PATIENT_TIMEOUT_MS = "5000"
SETUP_SECONDS = 120
RUN_SECONDS = 120


@dataclass(frozen=True)
class Tally:
    admitted: int
    denied: int
    degraded: int


def _engine_checks(tenant_id: int, model: str, tokens: int) -> Callable[[str], Any]:
    from limits import engine

    # Learn the policy from Redis and load the scripts before the barrier, consuming
    # nothing, so that only the checks themselves race.
    if engine.policy_store().current().version == 0:
        raise RuntimeError("no policy in Redis under this prefix")
    engine.quota(tenant_id, "warm-up", model)
    return lambda user: engine.check(tenant_id, user, model, tokens)


def _throttle_checks(prefix: str) -> Callable[[str], Any]:
    """DRF's UserRateThrottle at the same limit, on the test settings' Redis cache: a read
    of the history, then a write of it, the check-then-act DRF's documentation warns of."""
    from rest_framework.throttling import UserRateThrottle

    class Throttle(UserRateThrottle):
        rate = "100/hour"

    def check(user: str) -> Any:
        end_user = SimpleNamespace(is_authenticated=True, pk=f"{prefix}-{user}")
        allowed = Throttle().allow_request(SimpleNamespace(user=end_user), None)
        return SimpleNamespace(allowed=allowed, degraded=False)

    return check


def checking_process(
    limiter: str,
    prefix: str,
    redis_url: str,
    is_cluster: bool,
    tenant_id: int,
    users: list[str],
    model: str,
    tokens: int,
    threads: int,
    attempts: int,
    barrier: Any,
    results: Any,
) -> None:
    """One checking process: for each user in turn, ``threads`` threads wait at the barrier
    shared by every process, then each makes ``attempts`` checks; one tally per user."""
    try:
        os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
        os.environ["QUOTA_KEY_PREFIX"] = prefix
        os.environ["DATABASE_URL"] = NO_DATABASE
        os.environ["QUOTA_REDIS_TIMEOUT_MS"] = PATIENT_TIMEOUT_MS
        os.environ["REDIS_URL"] = redis_url
        os.environ["REDIS_CLUSTER"] = "true" if is_cluster else "false"
        import django

        django.setup()
        if limiter == "engine":
            check = _engine_checks(tenant_id, model, tokens)
        else:
            check = _throttle_checks(prefix)

        for user in users:
            tallies = [Tally(0, 0, 0)] * threads
            failures: list[str] = []

            def attempt(
                index: int,
                user: str = user,
                tallies: list[Tally] = tallies,
                failures: list[str] = failures,
            ) -> None:
                admitted = denied = degraded = 0
                try:
                    # This thread's own connection, on an end user of its own.
                    check(f"warm-up-{os.getpid()}-{index}")
                    barrier.wait(timeout=SETUP_SECONDS)
                    for _ in range(attempts):
                        decision = check(user)
                        degraded += decision.degraded
                        if decision.allowed:
                            admitted += 1
                        else:
                            denied += 1
                except Exception:  # reported to the test, which fails
                    failures.append(traceback.format_exc())
                    barrier.abort()  # nobody waits for this thread any longer
                tallies[index] = Tally(admitted, denied, degraded)

            workers = [threading.Thread(target=attempt, args=(i,)) for i in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(timeout=RUN_SECONDS)
            if failures or any(worker.is_alive() for worker in workers):
                raise RuntimeError(failures[0] if failures else "a checking thread hung")
            results.put(
                (
                    "tally",
                    user,
                    Tally(
                        sum(t.admitted for t in tallies),
                        sum(t.denied for t in tallies),
                        sum(t.degraded for t in tallies),
                    ),
                )
            )
    except Exception:
        barrier.abort()  # the others stop waiting for this process
        results.put(("error", os.getpid(), traceback.format_exc()))


def race(
    *,
    limiter: str = "engine",
    tenant_id: int,
    users: list[str],
    model: str,
    tokens: int,
    processes: int,
    threads: int,
    attempts: int,
) -> dict[str, Tally]:
    """Runs the checking processes; returns every user's tally summed over all of them."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes * threads)
    results = context.Queue()
    started = [
        context.Process(
            target=checking_process,
            args=(
                limiter,
                django_settings.QUOTA_KEY_PREFIX,
                django_settings.REDIS_URL,
                django_settings.REDIS_CLUSTER,
                tenant_id,
                users,
                model,
                tokens,
                threads,
                attempts,
                barrier,
                results,
            ),
            daemon=True,
        )
        for _ in range(processes)
    ]
    for process in started:
        process.start()
    totals = {user: Tally(0, 0, 0) for user in users}
    try:
        for _ in range(processes * len(users)):
            try:
                message = results.get(timeout=SETUP_SECONDS + RUN_SECONDS)
            except queue.Empty:
                pytest.fail("a checking process neither reported nor failed in time")
            if message[0] == "error":
                pytest.fail(f"checking process {message[1]} failed:\n{message[2]}")
            _, user, tally = message
            total = totals[user]
            totals[user] = Tally(
                total.admitted + tally.admitted,
                total.denied + tally.denied,
                total.degraded + tally.degraded,
            )
    finally:
        for process in started:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
        results.close()
    return totals


def _cleaned_up() -> Iterator[Client]:
    """A client of the Redis in the settings; afterwards every key under this test's prefix
    goes."""
    client = redis_client(django_settings.REDIS_URL, decode_responses=True)
    yield client
    prefix = django_settings.QUOTA_KEY_PREFIX
    for pattern in (f"{prefix}:*", f"*:throttle_user_{prefix}-*"):
        batch: list[str] = []
        for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) == 1000:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)
    client.close()


@pytest.fixture
def shared_redis() -> Iterator[Client]:
    """The single Redis of the test settings (DRF's cache lives there)."""
    yield from _cleaned_up()


@pytest.fixture(params=["redis", "cluster"])
def engine_redis(request) -> Iterator[Client]:
    """The Redis the engine races on: the single one, or a three-primary cluster."""
    if request.param == "cluster":
        request.getfixturevalue("on_cluster")
    yield from _cleaned_up()


def publish() -> int:
    """Records the policy of the test database and puts it into Redis for every process."""
    from limits import engine, services

    version = services.policy_publish(actor=services.SYSTEM, reason="exactness test")
    assert version is not None
    engine.policy_store().publish(version.version, version.document)
    return int(version.version)


def window_keys(client: Client, metric: str, user: str) -> list[str]:
    pattern = f"{django_settings.QUOTA_KEY_PREFIX}:*:l:{metric}:*:u:{user}:*"
    return sorted(client.scan_iter(match=pattern, count=1000))


def test_thirty_two_racing_checkers_admit_exactly_the_request_limit_run_after_run(
    world, engine_redis
):
    publish()
    processes, threads, attempts, runs = (PROCESSES, THREADS, ATTEMPTS, RUNS)
    if django_settings.REDIS_CLUSTER:
        processes, attempts, runs = CLUSTER_PROCESSES, CLUSTER_ATTEMPTS, CLUSTER_RUNS
        threads = PROCESSES * THREADS // processes
    users = [f"racer-{run}" for run in range(runs)]

    totals = race(
        tenant_id=world.alice.pk,
        users=users,
        model="gpt-4o",
        tokens=0,
        processes=processes,
        threads=threads,
        attempts=attempts,
    )

    checks = processes * threads * attempts
    assert totals == {user: Tally(100, checks - 100, 0) for user in users}
    for user in users:
        (key,) = window_keys(engine_redis, "requests", user)
        assert engine_redis.llen(key) == 100


def test_fifty_simultaneous_token_checks_admit_exactly_what_the_token_limit_holds(
    world, engine_redis
):
    from limits.models import Metric
    from tests.factories import LimitRuleFactory

    LimitRuleFactory(tier=world.tier, metric=Metric.TOKENS, limit=10_000, window_seconds=3600)
    publish()
    processes, runs = (2, CLUSTER_RUNS) if django_settings.REDIS_CLUSTER else (5, RUNS)
    users = [f"spender-{run}" for run in range(runs)]

    totals = race(
        tenant_id=world.alice.pk,
        users=users,
        model="gpt-4o",
        tokens=1000,
        processes=processes,
        threads=50 // processes,
        attempts=1,
    )

    assert totals == {user: Tally(10, 40, 0) for user in users}
    for user in users:
        token_window, token_sum = window_keys(engine_redis, "tokens", user)
        assert token_sum.endswith(":sum")
        assert engine_redis.llen(token_window) == 10
        assert engine_redis.get(token_sum) == "10000"
        (request_window,) = window_keys(engine_redis, "requests", user)
        assert engine_redis.llen(request_window) == 10


def test_the_same_race_catches_a_limiter_that_reads_then_writes(world, shared_redis):
    """The harness is able to fail: DRF's throttle, at the same limit on the same Redis,
    admits more than 100 when the same processes and threads race for it."""
    totals = race(
        limiter="throttle",
        tenant_id=world.alice.pk,
        users=["throttled"],
        model="gpt-4o",
        tokens=0,
        processes=PROCESSES,
        threads=THREADS,
        attempts=100,
    )

    assert totals["throttled"].admitted > 100
    assert totals["throttled"].admitted + totals["throttled"].denied == PROCESSES * THREADS * 100
