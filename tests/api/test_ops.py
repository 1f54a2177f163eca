"""/healthz, /readyz and /metrics of a gunicorn with two workers."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from limits.models import DeferredUsageReport, PolicyVersion
from limits.views import DEFERRED_DETAIL
from quota_platform.client import QuotaClient
from tests.api.live import Gunicorn
from tests.processes import free_port

pytestmark = pytest.mark.django_db


def scrape(server: Gunicorn) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = server.call("GET", "/metrics")
    assert answer.status == 200
    assert answer.header("Content-Type").startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(answer.raw.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def decisions(samples: dict, outcome: str) -> float:
    labels = (("model_class", "frontier"), ("outcome", outcome), ("tier", "standard"))
    return samples.get(("quota_decisions_total", labels), 0.0)


def worker_pids(metrics_dir: Path) -> set[str]:
    """The processes that counted a decision: prometheus-client keeps a file for each."""
    return {path.stem.rsplit("_", 1)[1] for path in metrics_dir.glob("counter_*.db")}


def test_healthz_answers_while_the_process_is_up(server):
    answer = server.call("GET", "/healthz")

    assert answer.status == 200
    assert answer.json == {"status": "ok"}


def test_the_access_log_has_a_line_per_request_in_gunicorns_format(server):
    server.call(
        "GET", "/healthz", headers={"User-Agent": 'probe "7"', "Referer": "https://r.test/"}
    )
    expected = re.compile(
        r"127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "
        r'"GET /healthz HTTP/1\.1" 200 \d+ "https://r\.test/" "probe \\"7\\""'
    )

    # gunicorn writes the line after the answer has gone out, so the client can be first.
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in server.log().splitlines() if "GET /healthz" in line]
        if any(expected.fullmatch(line) for line in lines) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert any(expected.fullmatch(line) for line in lines), lines[-3:]


def test_readyz_is_200_with_postgres_redis_and_a_policy(server):
    answer = server.call("GET", "/readyz")

    assert answer.status == 200
    assert answer.json == {
        "ready": True,
        "checks": {
            "database": "ok",
            "redis": "ok",
            "policy": f"version {PolicyVersion.objects.latest().version}",
        },
    }


def test_metrics_count_the_decisions_of_both_workers(server, live_world):
    before = scrape(server)
    allowed = denied = 0

    def one(number: int) -> bool:
        # Every seventh request repeats a user until it is denied.
        user = f"metrics-{number // 7}" if number % 7 < 2 else f"m-{uuid.uuid4().hex}"
        body = {"user_id": user, "model": "gpt-4o"}
        return server.call("POST", "/api/v1/check", body, key=live_world.alice_key).json["allowed"]

    sent = 0
    with ThreadPoolExecutor(max_workers=4) as pool:
        while sent < 400 and (sent < 40 or len(worker_pids(server.metrics_dir)) < 2):
            outcomes = list(pool.map(one, range(sent, sent + 20)))
            allowed += sum(outcomes)
            denied += len(outcomes) - sum(outcomes)
            sent += 20
    after = scrape(server)

    assert len(worker_pids(server.metrics_dir)) == 2
    assert decisions(after, "allowed") - decisions(before, "allowed") == allowed
    assert decisions(after, "denied") - decisions(before, "denied") == denied
    checks = after[("quota_check_seconds_count", ())] - before[("quota_check_seconds_count", ())]
    assert checks == allowed + denied
    assert (
        after[("quota_check_seconds_bucket", (("le", "+Inf"),))]
        == after[("quota_check_seconds_count", ())]
    )
    assert ("quota_usage_backlog_events", ()) in after


@pytest.fixture(scope="module")
def without_redis(live_world, tmp_path_factory) -> Iterator[Gunicorn]:
    """The same world, served by a gunicorn whose Redis is a port nobody listens on."""
    gunicorn = Gunicorn(
        tmp_path_factory.mktemp("no-redis"),
        prefix=live_world.prefix,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
    )
    gunicorn.start()
    yield gunicorn
    gunicorn.stop()


def test_readyz_is_503_when_redis_is_unreachable(without_redis):
    answer = without_redis.call("GET", "/readyz")

    assert answer.status == 503
    body = answer.json
    assert body["ready"] is False
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["redis"].startswith("unreachable")
    # The policy still comes from Postgres, the source of truth.
    assert body["checks"]["policy"] == f"version {PolicyVersion.objects.latest().version}"
    assert without_redis.call("GET", "/healthz").status == 200


def test_without_redis_a_closed_tier_denies_degraded_and_metrics_say_so(without_redis, live_world):
    answer = without_redis.call(
        "POST", "/api/v1/check", {"user_id": "u", "model": "gpt-4o"}, key=live_world.alice_key
    )

    assert answer.status == 200
    assert answer.json["allowed"] is False
    assert answer.json["degraded"] is True
    assert answer.json["limits"] == []
    assert answer.header("Retry-After") == "1"
    samples = scrape(without_redis)
    assert samples[("quota_degraded_decisions_total", (("fail_mode", "closed"),))] >= 1
    assert (
        sum(value for (name, _), value in samples.items() if name == "quota_redis_errors_total")
        >= 1
    )


def test_without_redis_a_usage_report_is_kept_and_answered_202_never_503(without_redis, live_world):
    request_id = f"r-{uuid.uuid4().hex[:10]}"
    body = {"request_id": request_id, "input_tokens": 30, "output_tokens": 20}

    answers = [
        without_redis.call("POST", "/api/v1/usage", body, key=live_world.alice_key)
        for _ in range(2)
    ]
    client = QuotaClient(without_redis.base_url, live_world.alice_key, timeout=5, retries=0)
    from_client = client.commit(request_id, 1, 1)
    client.close()

    kept = {
        "request_id": request_id,
        "input_tokens": 30,
        "output_tokens": 20,
        "status": "ok",
        "deferred": True,
        "detail": DEFERRED_DETAIL,
    }
    assert [answer.status for answer in answers] == [202, 202]
    assert answers[0].json == {**kept, "repeated": False}
    assert answers[1].json == {**kept, "repeated": True}
    assert from_client == {**kept, "repeated": True}  # the client takes it as reported
    assert list(
        DeferredUsageReport.objects.filter(request_id=request_id).values_list(
            "tenant__slug", "input_tokens", "output_tokens"
        )
    ) == [(live_world.alice.slug, 30, 20)]
    waiting = scrape(without_redis)[("quota_deferred_usage_reports_waiting", ())]
    assert waiting == DeferredUsageReport.objects.count() >= 1
