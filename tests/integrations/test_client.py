"""quota_platform.client against the platform in gunicorn (real PostgreSQL and Redis), and
through a proxy that holds answers back past the client's timeout.

The world (tests.api.live): per end user and model 5 requests and 10,000 frontier tokens an
hour, 50 in flight per user. Each test uses end-user ids of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from quota_platform.client import QuotaClient, QuotaError, QuotaExceeded
from tests.api.live import REQUESTS_PER_HOUR, TOKENS_PER_HOUR
from tests.integrations.conftest import LIVE_IN_FLIGHT
from tests.integrations.live import DelayingProxy
from tests.processes import REPOSITORY, free_port

pytestmark = [pytest.mark.django_db, pytest.mark.slow]
TIMEOUT = 0.5


def standing(platform, key, user, model="gpt-4o"):
    answer = platform.call("GET", f"/api/v1/quota?user_id={user}&model={model}", key=key)
    assert answer.status == 200, answer.raw
    return {(item["scope"], item["metric"]): item["remaining"] for item in answer.json["limits"]}


def requests_left(platform, key, user):
    return standing(platform, key, user)[("user_model", "requests")]


def test_a_check_retried_after_a_timeout_is_counted_once(platform, live_world, user):
    with DelayingProxy(platform.port, hold=1, delay=TIMEOUT * 3) as proxy:
        client = QuotaClient(proxy.url, live_world.alice_key, timeout=TIMEOUT, retries=2)
        decision = client.check(user, "gpt-4o", tokens=300)
        client.close()

    assert decision.allowed
    assert not decision.degraded
    # The platform got the check twice (the first answer was held past the timeout) ...
    checks = [json.loads(body) for method, path, body in proxy.forwarded if path == "/api/v1/check"]
    assert len(checks) == 2
    assert checks[0]["request_id"] == checks[1]["request_id"] == decision.request_id
    # ... and counted it once.
    left = standing(platform, live_world.alice_key, user)
    assert left[("user_model", "requests")] == REQUESTS_PER_HOUR - 1
    assert left[("user_model", "tokens")] == TOKENS_PER_HOUR - 300
    assert left[("user", "concurrency")] == LIVE_IN_FLIGHT - 1


def test_a_report_retried_after_a_timeout_is_settled_once(platform, live_world, user):
    client = QuotaClient(platform.base_url, live_world.alice_key, timeout=5)
    decision = client.check(user, "gpt-4o", tokens=300)
    with DelayingProxy(platform.port, hold=1, delay=TIMEOUT * 3) as proxy:
        slow = QuotaClient(proxy.url, live_world.alice_key, timeout=TIMEOUT, retries=2)
        settled = slow.commit(decision.request_id, 40, 60)
        slow.close()

    reports = [body for _method, path, body in proxy.forwarded if path == "/api/v1/usage"]
    assert len(reports) == 2
    assert settled is not None
    assert settled["repeated"] is True  # the retry was told the first report stands
    assert (settled["input_tokens"], settled["output_tokens"]) == (40, 60)
    left = standing(platform, live_world.alice_key, user)
    assert left[("user_model", "tokens")] == TOKENS_PER_HOUR - 100
    assert left[("user", "concurrency")] == LIVE_IN_FLIGHT


def test_calls_reuse_one_keep_alive_connection(platform, live_world, user):
    with DelayingProxy(platform.port) as proxy:
        client = QuotaClient(proxy.url, live_world.alice_key, timeout=5)
        decision = client.check(user, "gpt-4o")
        client.commit(decision.request_id, 1, 1)
        client.quota(user, "gpt-4o")
        client.close()

    assert len(proxy.forwarded) == 3
    assert proxy.connections == 1


def test_the_guard_commits_what_the_block_reports(platform, live_world, user):
    client = QuotaClient(platform.base_url, live_world.alice_key)

    with client.guard(user, "gpt-4o", tokens=500) as guard:
        assert standing(platform, live_world.alice_key, user)[("user_model", "tokens")] == (
            TOKENS_PER_HOUR - 500
        )
        guard.report(120, 80)

    left = standing(platform, live_world.alice_key, user)
    assert left[("user_model", "tokens")] == TOKENS_PER_HOUR - 200
    assert left[("user", "concurrency")] == LIVE_IN_FLIGHT


def test_the_guard_releases_the_reservation_when_the_block_fails(platform, live_world, user):
    client = QuotaClient(platform.base_url, live_world.alice_key)

    with pytest.raises(RuntimeError), client.guard(user, "gpt-4o", tokens=500):
        raise RuntimeError("the model server fell over")

    left = standing(platform, live_world.alice_key, user)
    assert left[("user_model", "tokens")] == TOKENS_PER_HOUR
    assert left[("user", "concurrency")] == LIVE_IN_FLIGHT
    assert left[("user_model", "requests")] == REQUESTS_PER_HOUR - 1


def test_a_denied_guard_raises_with_retry_after_and_never_runs_the_block(
    platform, live_world, user
):
    client = QuotaClient(platform.base_url, live_world.alice_key)
    for _ in range(REQUESTS_PER_HOUR):
        assert client.check(user, "gpt-4o").allowed
    ran = []

    with pytest.raises(QuotaExceeded) as denied, client.guard(user, "gpt-4o"):
        ran.append(True)

    assert ran == []
    assert 3500 < denied.value.retry_after <= 3600
    assert denied.value.decision.denied_by["metric"] == "requests"
    assert denied.value.decision.headers["retry-after"]
    assert requests_left(platform, live_world.alice_key, user) == 0


@pytest.mark.parametrize("fail_open", [True, False])
def test_an_unreachable_platform_answers_with_the_chosen_fail_mode(fail_open):
    client = QuotaClient(
        f"http://127.0.0.1:{free_port()}", "qk_x", timeout=TIMEOUT, retries=1, fail_open=fail_open
    )

    decision = client.check("u1", "gpt-4o")

    assert (decision.allowed, decision.degraded) == (fail_open, True)
    if not fail_open:
        with pytest.raises(QuotaExceeded, match="unreachable"), client.guard("u1", "gpt-4o"):
            pass


def test_refusals_of_the_platform_are_errors_and_not_retried(platform, live_world, user):
    with DelayingProxy(platform.port) as proxy:
        client = QuotaClient(proxy.url, "qk_not_a_real_key", retries=3)
        with pytest.raises(QuotaError) as refused:
            client.check(user, "gpt-4o")

    assert refused.value.status == 401
    assert len(proxy.forwarded) == 1


def test_the_client_module_needs_only_the_standard_library():
    program = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('client', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['client'] = module\n"
        "spec.loader.exec_module(module)\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('django', 'quota_platform')]\n"
        "print(module.QuotaClient.__name__)\n"
    )
    done = subprocess.run(
        # -I -S: no site-packages, no environment; only the standard library is there.
        [sys.executable, "-I", "-S", "-c", program, str(REPOSITORY / "quota_platform/client.py")],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "QuotaClient"


def test_the_example_script_runs_against_the_platform(platform, live_world, user):
    environ = {**os.environ, "QUOTA_URL": platform.base_url, "QUOTA_KEY": live_world.alice_key}

    done = subprocess.run(
        [sys.executable, "examples/client_example.py", user, "gpt-4o"],
        cwd=REPOSITORY,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "reply: Quotas protect shared GPUs" in done.stdout
    assert "used 26 tokens" in done.stdout  # 15 in, 11 out, as reported
    assert standing(platform, live_world.alice_key, user)[("user_model", "tokens")] == (
        TOKENS_PER_HOUR - 26
    )
    assert f"user_model requests per 3600 s: {REQUESTS_PER_HOUR - 1} left" in done.stdout
