"""How a published policy reaches every process, and how Redis gets it back when it is lost.

Two stores take part: this test process and a second process started for the test that has
no database, so it can learn a policy only from Redis (its poller)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import pytest
import redis
from django.apps import apps as django_apps
from django.conf import settings as django_settings
from django.urls import reverse

from limits import engine, services
from limits.models import Metric, PolicyVersion, Scope
from limits.policystore import PolicyStore, Reconciled, policy_reconcile
from limits.roles import role_permissions_sync
from limits.tasks import policy_reconcile_task
from quota_platform.celery_app import app as celery_app
from tests.factories import UserFactory
from tests.limits.test_admin import form_data, with_new_rule
from tests.processes import EngineProcess, free_port

StartEngine = Callable[..., EngineProcess]


@pytest.fixture
def start_engine_process(settings, tmp_path) -> Iterator[StartEngine]:
    """Starts second engine processes on this test's key prefix; stops them afterwards."""
    started: list[EngineProcess] = []

    def start(redis_url: str | None = None) -> EngineProcess:
        process = EngineProcess(
            prefix=settings.QUOTA_KEY_PREFIX,
            redis_url=redis_url or settings.REDIS_URL,
            log_path=tmp_path / f"engine-{len(started)}.log",
        )
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


def shared_redis() -> redis.Redis:
    return redis.Redis.from_url(django_settings.REDIS_URL)


def policy_keys() -> tuple[str, str]:
    prefix = django_settings.QUOTA_KEY_PREFIX
    return f"{prefix}:{{policy}}:version", f"{prefix}:{{policy}}:document"


def delete_this_tests_keys(client: redis.Redis) -> int:
    """Every key under this test's prefix: policy and windows. Never anyone else's."""
    keys = list(client.scan_iter(match=f"{django_settings.QUOTA_KEY_PREFIX}:*", count=1000))
    return int(client.delete(*keys)) if keys else 0


def redis_version(client: redis.Redis) -> int | None:
    raw = client.get(policy_keys()[0])
    return None if raw is None else int(raw)


def publish_limit(world, limit: int) -> PolicyVersion:
    """The tier's user_model rule at ``limit`` requests an hour, published to Redis."""
    world.rule.limit = limit
    world.rule.save()
    version = services.policy_publish(actor=services.SYSTEM, reason=f"limit {limit}")
    assert version is not None
    engine.policy_store().publish(version.version, version.document)
    return version


def wait_for_version(process: EngineProcess, tenant_id: int, version: int, seconds: float) -> dict:
    """Ask ``process`` until it enforces ``version``; its last answer."""
    deadline = time.monotonic() + seconds
    probe = 0
    while True:
        probe += 1
        answer = process.check(tenant_id, f"probe-{probe}", "gpt-4o")
        if answer["policy_version"] == version or time.monotonic() > deadline:
            return answer
        time.sleep(0.02)


# Picking up a change


@pytest.fixture
def committed_operator(transactional_db):
    """An operator in a test whose writes commit. Such tests empty every table when they
    end, the groups of the data migration included, so they are put back first."""
    role_permissions_sync(django_apps)
    return UserFactory(username="olivia", groups=["operators"])


@pytest.mark.django_db(transaction=True)
def test_limits_edited_in_admin_are_enforced_here_and_in_another_process_within_a_second(
    client, committed_operator, world, start_engine_process
):
    first = services.policy_publish(actor=services.SYSTEM, reason="first")  # pushed on commit
    assert first is not None
    other = start_engine_process()
    assert other.check(world.alice.pk, "warm-up", "gpt-4o")["policy_version"] == first.version
    client.force_login(committed_operator)

    # The tier's rule, on the tier's page: 100 → 1 request an hour.
    tier_url = reverse("admin:limits_tier_change", args=[world.tier.pk])
    data = form_data(client.get(tier_url))
    data["limits-0-limit"] = "1"
    assert client.post(tier_url, data).status_code == 302
    edited = PolicyVersion.objects.order_by("-version").first()
    assert edited.version > first.version

    answer = wait_for_version(other, world.alice.pk, edited.version, seconds=1.0)
    assert answer["policy_version"] == edited.version
    assert answer["limits"] == [["user_model", "requests", 1]]
    assert other.check(world.alice.pk, "there", "gpt-4o")["allowed"]
    assert other.check(world.alice.pk, "there", "gpt-4o")["denied_by"] == "user_model"
    here = engine.check(world.alice.pk, "here", "gpt-4o")
    assert (here.allowed, here.policy_version) == (True, edited.version)
    assert not engine.check(world.alice.pk, "here", "gpt-4o").allowed

    # An override on alice's page: 3 an hour for alice only.
    tenant_url = reverse("admin:limits_tenant_change", args=[world.alice.pk])
    data = with_new_rule(
        form_data(client.get(tenant_url)),
        "limits",
        scope=Scope.USER_MODEL,
        metric=Metric.REQUESTS,
        window_seconds="1h",
        limit="3",
    )
    assert client.post(tenant_url, data).status_code == 302
    overridden = PolicyVersion.objects.order_by("-version").first()
    assert overridden.version > edited.version

    answer = wait_for_version(other, world.alice.pk, overridden.version, seconds=1.0)
    assert answer["policy_version"] == overridden.version
    assert answer["limits"] == [["user_model", "requests", 3]]
    assert other.check(world.bob.pk, "someone", "gpt-4o")["limits"] == [
        ["user_model", "requests", 1]
    ]
    assert [other.check(world.alice.pk, "again", "gpt-4o")["allowed"] for _ in range(4)] == [
        True,
        True,
        True,
        False,
    ]
    assert engine.check(world.alice.pk, "here", "gpt-4o").policy_version == overridden.version


def test_a_poll_never_puts_an_older_version_back_over_a_publish(world, settings):
    """The poller reads Redis while this process publishes; the newer version must stay."""
    settings.QUOTA_POLICY_REFRESH_SECONDS = 0.0  # poll back to back: the race at its widest
    document = services.policy_publish(actor=services.SYSTEM, reason="first").document
    store = engine.policy_store()
    store.publish(1, document)
    store.current()  # starts the poller

    seen = []
    for number in range(2, 402):
        store.publish(number, document)
        seen.append(store.current().version)

    assert seen == list(range(2, 402))


def test_a_store_started_without_redis_and_database_enforces_nothing_until_published(
    world, settings, start_engine_process
):
    other = start_engine_process()

    answer = other.ask(op="version")

    assert answer == {"version": 0, "loaded": False}
    decision = other.check(world.alice.pk, "u1", "gpt-4o")
    assert (decision["allowed"], decision["degraded"]) == (False, True)


# Reconcile


def test_reconcile_task_restores_deleted_policy_keys_and_enforcement(world, start_engine_process):
    version = publish_limit(world, 2)
    client = shared_redis()
    assert [engine.check(world.alice.pk, "u1", "gpt-4o").allowed for _ in range(3)] == [
        True,
        True,
        False,
    ]
    engine.reset_state()  # no process holds the policy any more to write it back
    assert delete_this_tests_keys(client) >= 3  # the policy's two keys and u1's window
    assert client.exists(*policy_keys()) == 0
    blind = start_engine_process()
    assert blind.check(world.alice.pk, "u1", "gpt-4o")["degraded"]

    result = policy_reconcile_task.apply()

    assert result.get() == {"outcome": "restored", "version": version.version}
    assert redis_version(client) == version.version
    fresh = start_engine_process()
    answers = [fresh.check(world.alice.pk, "u1", "gpt-4o") for _ in range(3)]
    assert [answer["allowed"] for answer in answers] == [True, True, False]
    assert {answer["policy_version"] for answer in answers} == {version.version}
    assert {answer["degraded"] for answer in answers} == {False}
    # The process that had found nothing learns it too, through its poller.
    assert wait_for_version(blind, world.alice.pk, version.version, 1.0)["degraded"] is False


def test_reconcile_task_run_again_changes_nothing(world):
    version = publish_limit(world, 2)
    client = shared_redis()
    document_before = client.get(policy_keys()[1])

    first = policy_reconcile_task.apply().get()
    second = policy_reconcile_task.apply().get()

    assert first == second == {"outcome": "in sync", "version": version.version}
    assert client.get(policy_keys()[1]) == document_before


def test_reconcile_puts_back_a_lost_document_of_the_current_version(world):
    version = publish_limit(world, 2)
    client = shared_redis()
    client.delete(policy_keys()[1])

    assert policy_reconcile() == Reconciled("restored", version.version)
    store = PolicyStore()
    try:
        assert store.current().version == version.version
        assert store.current().tenants[str(world.alice.pk)]["rules"][0]["limit"] == 2
    finally:
        store.stop()


def test_reconcile_puts_redis_back_to_the_database_when_redis_is_ahead(world):
    """After a database restore, Postgres (the source of truth) wins, and processes follow."""
    version = publish_limit(world, 2)
    store = engine.policy_store()
    store.publish(version.version + 5, {**version.document, "tenants": {}})
    assert store.current().version == version.version + 5

    assert policy_reconcile() == Reconciled("rolled back", version.version)

    assert redis_version(shared_redis()) == version.version
    assert store.current().version == version.version
    assert engine.check(world.alice.pk, "u1", "gpt-4o").allowed


def test_reconcile_with_nothing_published_writes_nothing(db):
    assert policy_reconcile() == Reconciled("nothing published", None)
    assert shared_redis().exists(*policy_keys()) == 0


def test_reconcile_without_redis_gives_this_process_the_latest_version(world, settings):
    settings.REDIS_URL = None
    settings.QUOTA_BACKEND = "local"
    engine.reset_state()
    version = services.policy_publish(actor=services.SYSTEM, reason="first")

    assert policy_reconcile() == Reconciled("in-process", version.version)
    assert engine.policy_store().current().version == version.version


def test_reconcile_task_retries_with_backoff_while_redis_is_unreachable(
    world, settings, caplog, monkeypatch
):
    publish_limit(world, 2)
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    engine.reset_state()
    caplog.set_level(logging.INFO, logger="celery")
    # Run eagerly, an error ends the chain of retries at once unless it is kept in the result.
    monkeypatch.setitem(celery_app.conf, "task_eager_propagates", False)

    result = policy_reconcile_task.apply()

    assert result.state == "FAILURE"
    assert isinstance(result.result, redis.ConnectionError)
    retries = [record for record in caplog.records if " retry: " in record.getMessage()]
    assert len(retries) == policy_reconcile_task.max_retries == 3
    assert all("Retry in " in record.getMessage() for record in retries)


def test_beat_runs_the_reconcile_task_every_ten_seconds():
    (entry,) = [
        entry
        for entry in django_settings.CELERY_BEAT_SCHEDULE.values()
        if entry["task"] == "limits.tasks.policy_reconcile"
    ]

    assert entry["schedule"] == 10.0
    task = celery_app.tasks["limits.tasks.policy_reconcile"]
    assert task.name == policy_reconcile_task.name
    assert (task.soft_time_limit, task.time_limit, task.ignore_result) == (8, 10, True)


# A real FLUSHALL, on a Redis server of this module's own


def test_after_a_flushall_reconcile_restores_enforcement_with_the_latest_version(
    world, own_redis, start_engine_process
):
    version = publish_limit(world, 2)
    assert engine.check(world.alice.pk, "u1", "gpt-4o").policy_version == version.version
    engine.reset_state()  # no process holds the policy any more to write it back
    client = own_redis.client()
    client.flushall()
    assert client.dbsize() == 0

    assert policy_reconcile_task.apply().get() == {
        "outcome": "restored",
        "version": version.version,
    }

    assert redis_version(client) == version.version
    fresh = start_engine_process(redis_url=own_redis.url)
    answers = [fresh.check(world.alice.pk, "u1", "gpt-4o") for _ in range(3)]
    assert [answer["allowed"] for answer in answers] == [True, True, False]
    assert {answer["policy_version"] for answer in answers} == {version.version}
    here = [engine.check(world.alice.pk, "u2", "gpt-4o") for _ in range(3)]
    assert [(d.allowed, d.policy_version, d.degraded) for d in here] == [
        (True, version.version, False),
        (True, version.version, False),
        (False, version.version, False),
    ]


def test_a_process_holding_the_policy_writes_it_back_after_a_flushall(world, own_redis):
    version = publish_limit(world, 2)
    engine.policy_store().current()  # holding it, with its poller running
    client = own_redis.client()
    client.flushall()

    deadline = time.monotonic() + 5
    while redis_version(client) is None and time.monotonic() < deadline:
        time.sleep(0.05)

    assert redis_version(client) == version.version
    assert policy_reconcile() == Reconciled("in sync", version.version)
