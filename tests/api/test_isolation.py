"""A key only ever sees and touches its own tenant, whatever ids, fields or headers the
request carries. Through gunicorn; Alice and Bob share a tier, so their limits look alike
and only the tenant tells them apart."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.api.live import REQUESTS_PER_HOUR, Answer, Gunicorn, LiveWorld

pytestmark = pytest.mark.django_db

NOT_FOUND = {"detail": "No allowed check with this request_id."}


def _quota(server: Gunicorn, key: str, user: str, **extra: str) -> Answer:
    query = urlencode({"user_id": user, "model": "gpt-4o", **extra})
    return server.call("GET", f"/api/v1/quota?{query}", key=key)


def _left(answer: Answer) -> list[Any]:
    return [(item["scope"], item["metric"], item["remaining"]) for item in answer.json["limits"]]


@pytest.fixture
def bobs_request(server, live_world) -> dict[str, Any]:
    """An allowed check of Bob's, not yet settled, with ids nobody else uses."""
    user = f"u-{uuid.uuid4().hex[:12]}"
    request_id = f"r-{uuid.uuid4().hex[:12]}"
    answer = server.call(
        "POST",
        "/api/v1/check",
        {"user_id": user, "model": "gpt-4o", "tokens": 777, "request_id": request_id},
        key=live_world.bob_key,
    )
    assert answer.json["allowed"] is True
    return {"user": user, "request_id": request_id, "answer": answer}


def _assert_nothing_of_bob(answer: Answer, bobs: dict[str, Any], world: LiveWorld) -> None:
    for secret in (bobs["user"], world.bob.slug, world.bob_key, world.bob.name):
        assert secret.encode() not in answer.raw
        assert all(secret not in value for _, value in answer.headers.items())


def test_usage_of_bobs_request_id_with_alices_key_is_404(server, live_world, bobs_request):
    before = _left(_quota(server, live_world.bob_key, bobs_request["user"]))

    answer = server.call(
        "POST",
        "/api/v1/usage",
        {"request_id": bobs_request["request_id"], "input_tokens": 1, "output_tokens": 1},
        key=live_world.alice_key,
    )

    assert answer.status == 404
    assert answer.json == NOT_FOUND
    _assert_nothing_of_bob(answer, bobs_request, live_world)
    assert _left(_quota(server, live_world.bob_key, bobs_request["user"])) == before
    settled = server.call(
        "POST",
        "/api/v1/usage",
        {"request_id": bobs_request["request_id"], "input_tokens": 5, "output_tokens": 6},
        key=live_world.bob_key,
    )
    assert settled.json["repeated"] is False
    assert (settled.json["input_tokens"], settled.json["output_tokens"]) == (5, 6)


@pytest.mark.parametrize("dry_run", [False, True])
def test_check_with_bobs_request_id_and_alices_key_is_alices_own_check(
    server, live_world, bobs_request, dry_run
):
    answer = server.call(
        "POST",
        "/api/v1/check",
        {
            "user_id": bobs_request["user"],
            "model": "gpt-4o",
            "request_id": bobs_request["request_id"],
            "dry_run": dry_run,
        },
        key=live_world.alice_key,
    )

    assert answer.status == 200
    body = answer.json
    # A decision of Alice's own (her budget, her counters), not Bob's stored answer.
    assert body != bobs_request["answer"].json
    assert [item["scope"] for item in body["limits"]][-2:] == ["budget", "budget"]
    assert body["limits"][0]["remaining"] == REQUESTS_PER_HOUR - 1
    assert body["limits"][1]["remaining"] == 10_000
    _assert_nothing_of_bob(answer, {**bobs_request, "user": '"remaining":9223,'}, live_world)
    repeated = server.call(
        "POST",
        "/api/v1/check",
        {"user_id": "x", "model": "gpt-4o", "request_id": bobs_request["request_id"]},
        key=live_world.bob_key,
    )
    assert repeated.json == bobs_request["answer"].json


def test_quota_with_bobs_ids_in_the_query_shows_alices_own_counters(
    server, live_world, bobs_request
):
    answer = _quota(
        server,
        live_world.alice_key,
        bobs_request["user"],
        request_id=bobs_request["request_id"],
        tenant=live_world.bob.slug,
        tenant_id=str(live_world.bob.pk),
    )

    assert answer.status == 200
    assert _left(answer)[:3] == [
        ("user_model", "requests", REQUESTS_PER_HOUR),
        ("user_model", "tokens", 10_000),
        ("user", "concurrency", 50),
    ]
    bobs = _left(_quota(server, live_world.bob_key, bobs_request["user"]))
    assert bobs[:2] == [
        ("user_model", "requests", REQUESTS_PER_HOUR - 1),
        ("user_model", "tokens", 10_000 - 777),
    ]


def test_tenant_fields_in_a_body_are_ignored(server, live_world, user):
    answer = server.call(
        "POST",
        "/api/v1/check",
        {
            "user_id": user,
            "model": "gpt-4o",
            "tenant": live_world.bob.slug,
            "tenant_id": live_world.bob.pk,
            "api_key": live_world.bob_key,
        },
        key=live_world.alice_key,
    )

    assert answer.json["allowed"] is True
    assert _left(_quota(server, live_world.alice_key, user))[0][2] == REQUESTS_PER_HOUR - 1
    assert _left(_quota(server, live_world.bob_key, user))[0][2] == REQUESTS_PER_HOUR


def test_a_key_in_another_header_is_not_a_key(server, live_world):
    answer = server.call(
        "GET",
        "/api/v1/quota?user_id=u&model=gpt-4o",
        headers={"X-Api-Key": live_world.alice_key, "Api-Key": live_world.alice_key},
    )

    assert answer.status == 401


def _spoofing_headers(number: int, world: LiveWorld) -> dict[str, str]:
    a, b = divmod(number, 250)
    return {
        "X-Forwarded-For": f"10.{a}.{b}.{number % 7}, 192.0.2.{number % 250}",
        "X-Real-IP": f"198.51.100.{number % 250}",
        "Forwarded": f"for=203.0.113.{number % 250};proto=https",
        "X-Tenant": world.bob.slug if number % 2 else f"tenant-{number}",
        "X-Tenant-Id": str(world.bob.pk + number),
        "X-User-Id": f"someone-{number}",
        "X-Api-Key": world.bob_key,
        "X-Forwarded-Host": f"host{number}.example",
    }


@pytest.mark.slow
def test_a_thousand_spoofing_headers_on_one_key_change_nothing_about_its_limit(
    server, live_world, user
):
    def one(number: int) -> tuple[int, bool, str | None]:
        answer = server.call(
            "POST",
            "/api/v1/check",
            {"user_id": user, "model": "gpt-4o"},
            key=live_world.alice_key,
            headers=_spoofing_headers(number, live_world),
        )
        denied_by = answer.json["denied_by"]
        return answer.status, answer.json["allowed"], denied_by and denied_by["scope"]

    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(one, range(1000)))

    assert {status for status, _, _ in outcomes} == {200}
    assert sum(allowed for _, allowed, _ in outcomes) == REQUESTS_PER_HOUR
    assert {scope for _, allowed, scope in outcomes if not allowed} == {"user_model"}
    assert _left(_quota(server, live_world.alice_key, user))[0][2] == 0
    assert _left(_quota(server, live_world.bob_key, user))[0][2] == REQUESTS_PER_HOUR
    distinct = {tuple(_spoofing_headers(n, live_world).items()) for n in range(1000)}
    assert len(distinct) == 1000
