"""The over-limit cache (limits/overlimit.py, lua/deny.lua): a request window that Redis
said is full denies the checks that meet it without the full check, and never admits,
never hides a request id's first decision, and lets go the moment the window frees, a newer
policy raises the limit, or a user is reset (also in another process)."""

from __future__ import annotations

import math
import multiprocessing
import threading
import time
from typing import Any

import pytest

from limits import engine
from limits.backends import RedisBackend
from limits.models import LimitRule
from limits.overlimit import OverLimitCache
from tests.limits.test_engine import GPT, LLAMA, Clock, PolicyBuilder, check
from tests.limits.test_engine import store as store  # noqa: F401 - the fixture, shared

pytestmark = pytest.mark.django_db


@pytest.fixture(params=["redis", "cluster"])
def backend(request, settings) -> str:
    settings.QUOTA_OVER_LIMIT_CACHE_SECONDS = 5  # off unless set
    if request.param == "cluster":
        settings.QUOTA_REDIS_TIMEOUT_MS = 1000  # see test_engine's fixture of the same name
        request.getfixturevalue("on_cluster")
    else:
        settings.QUOTA_BACKEND = "redis"
        engine.reset_state()
    return request.param


@pytest.fixture
def clock(settings) -> Clock:
    from tests.limits.test_engine import START

    moved = Clock(settings)
    moved.set(START)
    return moved


@pytest.fixture
def policy(world, backend, clock) -> PolicyBuilder:
    world.rule.delete()
    return PolicyBuilder(world)


class Calls:
    """How many full checks (check.lua) and cached denials (deny.lua) went to Redis."""

    def __init__(self, monkeypatch) -> None:
        self.full = self.cached = self.refused = 0
        full, cached = RedisBackend.check, RedisBackend.deny

        def counted_check(backend: RedisBackend, call: Any) -> Any:
            self.full += 1
            return full(backend, call)

        def counted_deny(backend: RedisBackend, *args: Any) -> Any:
            answer = cached(backend, *args)
            if answer is None:
                self.refused += 1
            else:
                self.cached += 1
            return answer

        monkeypatch.setattr(RedisBackend, "check", counted_check)
        monkeypatch.setattr(RedisBackend, "deny", counted_deny)


@pytest.fixture
def calls(monkeypatch) -> Calls:
    return Calls(monkeypatch)


def tenant_full(policy: PolicyBuilder, limit: int = 3) -> float:
    """Alice's tenant window (``limit`` an hour) filled by as many users; the denial that
    follows comes from the full check. Returns its retry_after."""
    policy.rule("tenant", "requests", limit)
    policy.publish()
    for number in range(limit):
        assert check(policy.alice, f"filler-{number}").allowed
    denied = check(policy.alice, "first-denied")
    assert not denied.allowed and denied.retry_after is not None
    return denied.retry_after


def test_a_full_tenant_window_denies_the_tenants_other_users_without_the_full_check(
    policy, calls, store, clock
):
    retry_after = tenant_full(policy)
    full = calls.full
    clock.advance(0.25)
    denied = check(policy.alice, "someone-else", LLAMA, request_id="r-cached")
    assert (calls.full, calls.cached) == (full, 1)
    assert not denied.allowed and not denied.degraded and not denied.repeated
    assert (denied.denied_by.scope, denied.denied_by.metric) == ("tenant", "requests")
    assert denied.retry_after == pytest.approx(retry_after - 0.25, abs=1e-6)
    # Only the denying window was read for it: the answer lists that one, with nothing left.
    assert [(s.scope, s.remaining) for s in denied.limits] == [("tenant", 0)]
    assert denied.limits[0].reset == pytest.approx(retry_after - 0.25, abs=1e-6)
    # Counted for the deny-rate charts like any denial: the first one and this one.
    assert sum(store.tally(f"{engine.tenant_tag(policy.alice.pk)}:denied").values()) == 2
    # Its request id keeps it: a repeat answers the same, consuming nothing.
    again = check(policy.alice, "someone-else", LLAMA, request_id="r-cached")
    assert again.repeated and not again.allowed
    assert again.retry_after == denied.retry_after
    assert again.limits == denied.limits
    # Bob's window is his own.
    assert check(policy.bob, "someone-else").allowed


def test_a_request_id_allowed_before_gets_its_allowed_decision_back(policy, calls):
    policy.rule("tenant", "requests", 2)
    policy.publish()
    first = check(policy.alice, "u1", request_id="r-1")
    assert first.allowed
    assert check(policy.alice, "u2").allowed
    assert not check(policy.alice, "u3").allowed  # the window is known full from here
    # The caller timed out on r-1 and asks again: it was allowed (and is billed), so the
    # answer must say allowed, whatever the window holds now.
    repeated = check(policy.alice, "u1", request_id="r-1")
    assert repeated.allowed and repeated.repeated
    assert calls.cached == 1  # deny.lua found the record and answered it


def test_the_window_frees_at_retry_after_to_the_microsecond(policy, calls, clock):
    retry_after = tenant_full(policy)
    clock.advance(retry_after - 0.000001)
    late = check(policy.alice, "u9")
    assert not late.allowed
    assert late.retry_after == pytest.approx(0.000001, abs=1e-9)
    assert calls.cached == 1
    clock.advance(0.000001)
    assert check(policy.alice, "u9").allowed
    # The cache offered the window, Redis's clock said it had moved on: the full check ran.
    assert (calls.cached, calls.refused) == (1, 1)


def test_a_publish_that_raises_the_limit_lets_the_next_check_in(policy, calls):
    tenant_full(policy)
    assert not check(policy.alice, "u9").allowed
    assert calls.cached == 1
    rule = LimitRule.objects.get(tier=policy.world.tier, scope="tenant")
    rule.limit = 4
    rule.save()
    policy.publish()
    assert check(policy.alice, "u9").allowed
    assert calls.cached == 1


def test_dry_runs_and_quota_reads_always_read_every_window(policy, calls):
    tenant_full(policy)
    full = calls.full
    dry = check(policy.alice, "u9", dry_run=True)
    quota = engine.quota(policy.alice.pk, "u9", GPT)
    assert not dry.allowed and len(dry.limits) == 1 and quota.limits[0].remaining == 0
    assert (calls.full, calls.cached) == (full + 2, 0)


def _child_checks_after_reset(prefix: str, ready: Any, go: Any, answers: Any) -> None:
    """Another app process: it holds the full window (inherited with the fork, as a worker
    that denied earlier would), waits for the reset, and checks again."""
    from django.conf import settings

    settings.QUOTA_KEY_PREFIX = prefix
    try:
        tenant_id = ready.recv()
        before = engine.check(tenant_id, "u1", GPT)
        ready.send(("before", before.allowed, len(engine.over_limit_cache())))
        go.recv()
        after = engine.check(tenant_id, "u1", GPT)
        answers.send(("after", after.allowed, after.degraded))
    except Exception as error:  # the parent asserts on what it gets
        answers.send(("error", repr(error), False))


def test_a_reset_frees_the_user_in_a_process_that_holds_the_window_as_full(
    policy, settings, backend
):
    policy.rule("user_model", "requests", 2)
    policy.publish()
    assert check(policy.alice, "u1").allowed and check(policy.alice, "u1").allowed
    assert not check(policy.alice, "u1").allowed
    assert len(engine.over_limit_cache()) == 1
    context = multiprocessing.get_context("fork")
    ready, child_ready = context.Pipe()
    go, child_go = context.Pipe()
    answers, child_answers = context.Pipe()
    child = context.Process(
        target=_child_checks_after_reset,
        args=(settings.QUOTA_KEY_PREFIX, child_ready, child_go, child_answers),
    )
    child.start()
    try:
        ready.send(policy.alice.pk)
        assert ready.poll(30)
        label, allowed, held = ready.recv()
        assert (label, allowed, held) == ("before", False, 1)
        assert engine.reset(policy.alice.pk, "u1") > 0
        go.send(True)
        assert answers.poll(30)
        assert answers.recv() == ("after", True, False)
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    # And here, where the reset ran.
    assert check(policy.alice, "u1").allowed


def test_an_entry_lives_no_longer_than_the_setting(policy, calls, settings):
    settings.QUOTA_OVER_LIMIT_CACHE_SECONDS = 0.2
    engine.reset_state()
    tenant_full(policy)
    assert not check(policy.alice, "u9").allowed
    assert calls.cached == 1
    time.sleep(0.25)
    full = calls.full
    assert not check(policy.alice, "u9").allowed
    assert (calls.full, calls.cached) == (full + 1, 1)


def test_the_cache_can_be_turned_off(policy, calls, settings):
    settings.QUOTA_OVER_LIMIT_CACHE_SECONDS = 0
    engine.reset_state()
    tenant_full(policy)
    for _ in range(3):
        assert not check(policy.alice, "u9").allowed
    assert calls.cached == 0
    assert engine.over_limit_cache() is None


def test_racing_threads_on_a_full_tenant_are_admitted_exactly_once_each_slot(policy, calls):
    """16 threads, 40 checks each, over many users of a tenant limited to 25: exactly 25
    admitted, while most denials come from the cache."""
    policy.rule("tenant", "requests", 25)
    policy.publish()
    barrier = threading.Barrier(16)
    admitted: list[int] = []

    def racer(number: int) -> None:
        barrier.wait()
        admitted.append(
            sum(check(policy.alice, f"user-{number}-{i % 7}").allowed for i in range(40))
        )

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sum(admitted) == 25
    assert calls.cached > 16 * 40 // 2


def test_the_cache_forgets_expired_entries_and_starts_again_when_full_of_live_ones():
    cache = OverLimitCache(seconds=60, max_entries=3)
    for number in range(3):
        cache.remember(f"k{number}", until_us=1, retry_seconds=60, version=1)
    cache.remember("k0", until_us=2, retry_seconds=60, version=1)  # replaced, not added
    assert len(cache) == 3
    cache.remember("k3", until_us=1, retry_seconds=60, version=1)
    assert len(cache) == 1
    cache.remember("gone", until_us=1, retry_seconds=0, version=1)
    cache.remember("k4", until_us=1, retry_seconds=60, version=1)
    cache.remember("k5", until_us=1, retry_seconds=60, version=1)
    assert len(cache) == 3  # "gone" had expired and made room
    assert cache.find(["gone", "k5"], ((1, 0), (2, 1)), 1)[:2] == (2, "k5")
    assert cache.find(["k5"], ((1, 0),), 2) is None  # another policy version
    assert "k5" not in cache._windows


def test_the_cache_says_which_tenants_it_could_answer_before_a_body_is_read():
    cache = OverLimitCache(seconds=60, max_entries=10)
    assert not cache.may_deny("q:{t:1}")
    cache.remember("q:{t:1}:w:u1:gpt", until_us=1, retry_seconds=60, version=1)
    cache.remember("q:{t:1}:w:all", until_us=1, retry_seconds=60, version=1)
    assert cache.may_deny("q:{t:1}") and not cache.may_deny("q:{t:2}")
    cache.forget("q:{t:1}:w:all")
    assert cache.may_deny("q:{t:1}")
    cache.forget("q:{t:1}:w:u1:gpt")
    assert not cache.may_deny("q:{t:1}")
    # A full global capacity denies every tenant's checks of its class.
    cache.remember("q:{g:frontier}:w:all", until_us=1, retry_seconds=60, version=1)
    assert cache.may_deny("q:{t:2}")
    cache.clear()
    assert not cache.may_deny("q:{t:2}")
    # Entries that expired stop counting by the next sweep (at most a second later), even
    # when no check of theirs comes to find them.
    cache.remember("q:{t:3}:w:u9:gpt", until_us=1, retry_seconds=0, version=1)
    cache.remember("q:{t:4}:w:all", until_us=1, retry_seconds=60, version=1)
    cache._next_sweep = 0.0
    assert not cache.may_deny("q:{t:3}") and cache.may_deny("q:{t:4}")
    assert len(cache) == 1


def test_a_cached_denial_over_http_has_the_check_apis_body_and_headers(policy, client, calls):
    from limits.services import SYSTEM, apikey_create

    retry_after = tenant_full(policy)
    _, key = apikey_create(tenant=policy.alice, name="backend", actor=SYSTEM)
    answer = client.post(
        "/api/v1/check",
        {"user_id": "over-http", "model": GPT, "request_id": "r-http"},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {key}",
    )
    assert answer.status_code == 200 and calls.cached == 1
    body = answer.json()
    assert body["allowed"] is False and body["degraded"] is False
    assert body["denied_by"] == {
        "scope": "tenant",
        "metric": "requests",
        "window": 3600,
        "limit": 3,
    }
    assert body["retry_after"] == round(retry_after, 3)
    assert [(s["scope"], s["remaining"]) for s in body["limits"]] == [("tenant", 0)]
    assert answer.headers["Retry-After"] == str(math.ceil(retry_after))
    assert answer.headers["x-ratelimit-remaining-requests"] == "0"
