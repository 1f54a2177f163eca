"""Every field, header and status code of /api/v1/check, /usage and /quota, through
gunicorn with two workers, PostgreSQL and Redis."""

from __future__ import annotations

import calendar
import math
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import http_sf
import pytest

from limits.apikeys import apikey_generate
from limits.models import PolicyVersion
from tests.api.live import (
    CONCURRENT,
    MONTHLY_COST,
    MONTHLY_TOKENS,
    REQUESTS_PER_HOUR,
    TOKENS_PER_HOUR,
    Answer,
    Gunicorn,
)

pytestmark = pytest.mark.django_db

CHECK_FIELDS = {
    "allowed",
    "request_id",
    "policy_version",
    "denied_by",
    "retry_after",
    "limits",
    "degraded",
}
LIMIT_FIELDS = {"scope", "metric", "window", "limit", "remaining", "reset"}
# The price of an estimated token is the dearer of gpt-4o's two prices: 0.0100 per 1K.
PRICE_PER_TOKEN = 0.00001


def check(server: Gunicorn, key: str, **body: Any) -> Answer:
    return server.call("POST", "/api/v1/check", body, key=key)


def quota(server: Gunicorn, key: str, user_id: str, model: str = "gpt-4o") -> Answer:
    query = urlencode({"user_id": user_id, "model": model})
    return server.call("GET", f"/api/v1/quota?{query}", key=key)


def usage(server: Gunicorn, key: str, **body: Any) -> Answer:
    return server.call("POST", "/api/v1/usage", body, key=key)


def remaining(answer: Answer) -> dict[tuple[str, str], float]:
    return {(item["scope"], item["metric"]): item["remaining"] for item in answer.json["limits"]}


def seconds_to_month_end() -> float:
    now = datetime.now(UTC)
    days = calendar.monthrange(now.year, now.month)[1]
    end = datetime(now.year, now.month, days, tzinfo=UTC).timestamp() + 86400
    return end - now.timestamp()


def structured(answer: Answer, name: str) -> list[tuple[str, dict[str, Any]]]:
    value = answer.header(name)
    assert value is not None, f"no {name} header"
    return [
        (item, dict(parameters))
        for item, parameters in http_sf.parse(value.encode(), tltype="list")
    ]


# -- check: allowed ------------------------------------------------------------------------


def test_an_allowed_check_answers_every_field(server, live_world, user):
    before = quota(server, live_world.alice_key, user).json
    budget_tokens = remaining(quota(server, live_world.alice_key, user))

    answer = check(server, live_world.alice_key, user_id=user, model="gpt-4o", tokens=100)

    assert answer.status == 200
    assert answer.header("Content-Type") == "application/json"
    body = answer.json
    assert set(body) == CHECK_FIELDS
    assert body["allowed"] is True
    assert re.fullmatch(r"[0-9a-f]{32}", body["request_id"])
    assert (
        body["policy_version"] == PolicyVersion.objects.latest().version == before["policy_version"]
    )
    assert body["denied_by"] is None
    assert body["retry_after"] is None
    assert body["degraded"] is False
    limits = body["limits"]
    assert all(set(item) == LIMIT_FIELDS for item in limits)
    assert limits[:3] == [
        {
            "scope": "user_model",
            "metric": "requests",
            "window": 3600,
            "limit": REQUESTS_PER_HOUR,
            "remaining": REQUESTS_PER_HOUR - 1,
            "reset": 3600.0,
        },
        {
            "scope": "user_model",
            "metric": "tokens",
            "window": 3600,
            "limit": TOKENS_PER_HOUR,
            "remaining": TOKENS_PER_HOUR - 100,
            "reset": 3600.0,
        },
        {
            "scope": "user",
            "metric": "concurrency",
            "window": None,
            "limit": CONCURRENT,
            "remaining": CONCURRENT - 1,
            "reset": 600.0,
        },
    ]
    tokens_budget, cost_budget = limits[3:]
    assert {key: tokens_budget[key] for key in ("scope", "metric", "window", "limit")} == {
        "scope": "budget",
        "metric": "tokens",
        "window": "month",
        "limit": MONTHLY_TOKENS,
    }
    assert tokens_budget["remaining"] == budget_tokens[("budget", "tokens")] - 100
    assert {key: cost_budget[key] for key in ("scope", "metric", "window", "limit")} == {
        "scope": "budget",
        "metric": "cost",
        "window": "month",
        "limit": float(MONTHLY_COST),
    }
    assert cost_budget["remaining"] == pytest.approx(
        budget_tokens[("budget", "cost")] - 100 * PRICE_PER_TOKEN, abs=1e-9
    )
    for budget in (tokens_budget, cost_budget):
        assert budget["reset"] == pytest.approx(seconds_to_month_end(), abs=5)


def test_an_allowed_check_sends_ratelimit_headers_as_structured_fields(server, live_world, user):
    answer = check(server, live_world.alice_key, user_id=user, model="gpt-4o", tokens=100)

    assert answer.json["allowed"] is True
    assert structured(answer, "RateLimit-Policy") == [
        ("user_model.requests.3600", {"q": REQUESTS_PER_HOUR, "w": 3600, "qu": "requests"}),
        ("user_model.tokens.3600.frontier", {"q": TOKENS_PER_HOUR, "w": 3600, "qu": "tokens"}),
        ("user.concurrency", {"q": CONCURRENT, "qu": "concurrent-requests"}),
        ("budget.tokens.month", {"q": MONTHLY_TOKENS, "qu": "tokens"}),
    ]
    state = structured(answer, "RateLimit")
    budget_left = remaining(answer)[("budget", "tokens")]
    assert state[:3] == [
        ("user_model.requests.3600", {"r": REQUESTS_PER_HOUR - 1, "t": 3600}),
        ("user_model.tokens.3600.frontier", {"r": TOKENS_PER_HOUR - 100, "t": 3600}),
        ("user.concurrency", {"r": CONCURRENT - 1, "t": 600}),
    ]
    assert state[3][0] == "budget.tokens.month"
    assert state[3][1]["r"] == budget_left
    assert state[3][1]["t"] == pytest.approx(seconds_to_month_end(), abs=5)
    assert answer.header("Retry-After") is None
    # OpenAI-style: the tightest request limit and the tightest token limit.
    assert answer.header("x-ratelimit-limit-requests") == str(REQUESTS_PER_HOUR)
    assert answer.header("x-ratelimit-remaining-requests") == str(REQUESTS_PER_HOUR - 1)
    assert answer.header("x-ratelimit-reset-requests") == "1h0m0s"
    assert answer.header("x-ratelimit-limit-tokens") == str(TOKENS_PER_HOUR)
    assert answer.header("x-ratelimit-remaining-tokens") == str(TOKENS_PER_HOUR - 100)
    assert answer.header("x-ratelimit-reset-tokens") == "1h0m0s"


def test_a_check_without_tokens_counts_zero_tokens(server, live_world, user):
    answer = check(server, live_world.alice_key, user_id=user, model="gpt-4o")

    assert answer.json["allowed"] is True
    assert remaining(answer)[("user_model", "tokens")] == TOKENS_PER_HOUR


def test_a_check_on_a_model_without_token_rules_shows_only_its_limits(server, live_world, user):
    answer = check(server, live_world.bob_key, user_id=user, model="llama-3-8b", tokens=5)

    assert answer.status == 200
    assert [(item["scope"], item["metric"]) for item in answer.json["limits"]] == [
        ("user_model", "requests"),
        ("user", "concurrency"),
    ]
    assert [name for name, _ in structured(answer, "RateLimit-Policy")] == [
        "user_model.requests.3600",
        "user.concurrency",
    ]
    assert answer.header("x-ratelimit-limit-tokens") is None


def test_a_given_request_id_is_echoed_normalised(server, live_world, user):
    answer = check(
        server, live_world.alice_key, user_id=user, model="gpt-4o", request_id=" ｒｅｑ-1 "
    )

    assert answer.json["request_id"] == "req-1"


def test_model_ids_are_folded_so_a_look_alike_spelling_shares_the_quota(server, live_world, user):
    check(server, live_world.alice_key, user_id=user, model="gpt-4o")
    check(server, live_world.alice_key, user_id=user, model="GPT-4O")
    folded = check(server, live_world.alice_key, user_id=user, model="ｇｐｔ－４ｏ")

    assert remaining(folded)[("user_model", "requests")] == REQUESTS_PER_HOUR - 3


# -- check: denied -------------------------------------------------------------------------


def test_a_denied_check_says_why_and_when_and_consumes_nothing(server, live_world, user):
    for _ in range(REQUESTS_PER_HOUR):
        assert check(server, live_world.alice_key, user_id=user, model="gpt-4o").json["allowed"]
    before = quota(server, live_world.alice_key, user).json["limits"]

    answer = check(server, live_world.alice_key, user_id=user, model="gpt-4o", tokens=50)

    assert answer.status == 200
    body = answer.json
    assert set(body) == CHECK_FIELDS
    assert body["allowed"] is False
    assert body["denied_by"] == {
        "scope": "user_model",
        "metric": "requests",
        "window": 3600,
        "limit": REQUESTS_PER_HOUR,
    }
    assert 3590 < body["retry_after"] <= 3600
    retry_after = answer.header("Retry-After")
    assert retry_after is not None and retry_after.isdigit()
    assert 0 <= int(retry_after) - body["retry_after"] < 1.001
    assert body["limits"][0]["remaining"] == 0
    assert structured(answer, "RateLimit")[0] == (
        "user_model.requests.3600",
        {"r": 0, "t": math.ceil(body["limits"][0]["reset"])},
    )
    assert answer.header("x-ratelimit-remaining-requests") == "0"
    after = quota(server, live_world.alice_key, user).json["limits"]
    assert [item["remaining"] for item in after] == [item["remaining"] for item in before]


def test_a_check_that_can_never_pass_has_no_retry_after(server, live_world, user):
    answer = check(
        server, live_world.alice_key, user_id=user, model="gpt-4o", tokens=TOKENS_PER_HOUR + 1
    )

    body = answer.json
    assert answer.status == 200
    assert body["allowed"] is False
    assert body["denied_by"] == {
        "scope": "user_model",
        "metric": "tokens",
        "window": 3600,
        "limit": TOKENS_PER_HOUR,
    }
    assert body["retry_after"] is None
    assert answer.header("Retry-After") is None
    assert remaining(quota(server, live_world.alice_key, user))[("user_model", "requests")] == 5


# -- check: dry runs and repeated request ids ----------------------------------------------


def test_a_dry_run_decides_without_consuming(server, live_world, user):
    answer = check(server, live_world.alice_key, user_id=user, model="gpt-4o", dry_run=True)

    assert answer.json["allowed"] is True
    assert remaining(answer)[("user_model", "requests")] == REQUESTS_PER_HOUR - 1
    assert remaining(quota(server, live_world.alice_key, user))[("user_model", "requests")] == 5


def test_a_repeated_request_id_with_another_body_returns_the_first_decision(
    server, live_world, user
):
    first = check(
        server, live_world.alice_key, user_id=user, model="gpt-4o", tokens=10, request_id="r-1"
    )
    again = check(
        server,
        live_world.alice_key,
        user_id=f"{user}-other",
        model="gpt-4o",
        tokens=9000,
        request_id="r-1",
    )

    assert again.status == 200
    assert again.json == first.json
    assert remaining(quota(server, live_world.alice_key, user)) == remaining(first)
    other = remaining(quota(server, live_world.alice_key, f"{user}-other"))
    assert other[("user_model", "requests")] == REQUESTS_PER_HOUR
    assert other[("user_model", "tokens")] == TOKENS_PER_HOUR


# -- usage ---------------------------------------------------------------------------------


def test_usage_replaces_the_estimate_and_frees_the_slot(server, live_world, user):
    checked = check(server, live_world.alice_key, user_id=user, model="gpt-4o", tokens=1000)
    request_id = checked.json["request_id"]

    answer = usage(
        server,
        live_world.alice_key,
        request_id=request_id,
        input_tokens=300,
        output_tokens=200,
    )

    assert answer.status == 200
    assert answer.header("Content-Type") == "application/json"
    assert answer.json == {
        "request_id": request_id,
        "input_tokens": 300,
        "output_tokens": 200,
        "status": "ok",
        "repeated": False,
    }
    now = remaining(quota(server, live_world.alice_key, user))
    assert now[("user_model", "tokens")] == TOKENS_PER_HOUR - 500
    assert now[("user", "concurrency")] == CONCURRENT
    assert now[("user_model", "requests")] == REQUESTS_PER_HOUR - 1
    assert now[("budget", "tokens")] == remaining(checked)[("budget", "tokens")] + 500


def test_usage_reported_twice_keeps_the_first_report(server, live_world, user):
    request_id = check(server, live_world.alice_key, user_id=user, model="gpt-4o", tokens=10).json[
        "request_id"
    ]
    usage(
        server,
        live_world.alice_key,
        request_id=request_id,
        input_tokens=4,
        output_tokens=5,
        status="error",
    )
    before = remaining(quota(server, live_world.alice_key, user))

    again = usage(
        server, live_world.alice_key, request_id=request_id, input_tokens=900, output_tokens=900
    )

    assert again.status == 200
    assert again.json == {
        "request_id": request_id,
        "input_tokens": 4,
        "output_tokens": 5,
        "status": "error",
        "repeated": True,
    }
    assert remaining(quota(server, live_world.alice_key, user)) == before


def test_usage_accepts_cancelled(server, live_world, user):
    request_id = check(server, live_world.alice_key, user_id=user, model="gpt-4o").json[
        "request_id"
    ]

    answer = usage(
        server,
        live_world.alice_key,
        request_id=request_id,
        input_tokens=0,
        output_tokens=0,
        status="cancelled",
    )

    assert answer.status == 200
    assert answer.json["status"] == "cancelled"


def test_usage_of_an_unknown_request_id_is_404(server, live_world):
    answer = usage(
        server, live_world.alice_key, request_id="never-checked", input_tokens=1, output_tokens=1
    )

    assert answer.status == 404
    assert answer.header("Content-Type") == "application/json"
    assert answer.json == {"detail": "No allowed check with this request_id."}


def test_usage_of_a_denied_check_is_404(server, live_world, user):
    denied = check(
        server, live_world.alice_key, user_id=user, model="gpt-4o", tokens=TOKENS_PER_HOUR + 1
    )
    assert denied.json["allowed"] is False

    answer = usage(
        server,
        live_world.alice_key,
        request_id=denied.json["request_id"],
        input_tokens=1,
        output_tokens=1,
    )

    assert answer.status == 404


def test_usage_of_a_dry_run_is_404(server, live_world, user):
    dry = check(server, live_world.alice_key, user_id=user, model="gpt-4o", dry_run=True)

    answer = usage(
        server,
        live_world.alice_key,
        request_id=dry.json["request_id"],
        input_tokens=1,
        output_tokens=1,
    )

    assert answer.status == 404


# -- quota ---------------------------------------------------------------------------------


def test_quota_answers_the_limits_and_consumes_nothing(server, live_world, user):
    check(server, live_world.alice_key, user_id=user, model="gpt-4o", tokens=70)

    first = quota(server, live_world.alice_key, user)
    second = quota(server, live_world.alice_key, user)

    assert first.status == 200
    assert first.header("Content-Type") == "application/json"
    body = first.json
    assert set(body) == {"policy_version", "limits"}
    assert body["policy_version"] == PolicyVersion.objects.latest().version
    assert [(item["scope"], item["metric"], item["remaining"]) for item in body["limits"][:3]] == [
        ("user_model", "requests", REQUESTS_PER_HOUR - 1),
        ("user_model", "tokens", TOKENS_PER_HOUR - 70),
        ("user", "concurrency", CONCURRENT - 1),
    ]
    assert remaining(second) == remaining(first)
    assert [name for name, _ in structured(first, "RateLimit-Policy")] == [
        "user_model.requests.3600",
        "user_model.tokens.3600.frontier",
        "user.concurrency",
        "budget.tokens.month",
    ]
    assert structured(first, "RateLimit")[0][1]["r"] == REQUESTS_PER_HOUR - 1
    assert first.header("Retry-After") is None
    following = check(server, live_world.alice_key, user_id=user, model="gpt-4o")
    assert remaining(following)[("user_model", "requests")] == REQUESTS_PER_HOUR - 2


def test_quota_of_a_user_who_never_checked_is_whole(server, live_world, user):
    answer = quota(server, live_world.bob_key, user, model="llama-3-8b")

    assert answer.json["limits"] == [
        {
            "scope": "user_model",
            "metric": "requests",
            "window": 3600,
            "limit": REQUESTS_PER_HOUR,
            "remaining": REQUESTS_PER_HOUR,
            "reset": 0.0,
        },
        {
            "scope": "user",
            "metric": "concurrency",
            "window": None,
            "limit": CONCURRENT,
            "remaining": CONCURRENT,
            "reset": 0.0,
        },
    ]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("", "user_id"),
        ("user_id=u", "model"),
        ("model=gpt-4o", "user_id"),
        ("user_id=u&model=no-such-model", "model"),
        ("user_id=&model=gpt-4o", "user_id"),
        ("user_id=u%00x&model=gpt-4o", "user_id"),
        (f"user_id={'u' * 201}&model=gpt-4o", "user_id"),
    ],
)
def test_quota_with_a_bad_query_is_400_naming_the_field(server, live_world, query, field):
    answer = server.call("GET", f"/api/v1/quota?{query}", key=live_world.alice_key)

    assert answer.status == 400
    assert field in answer.json
    assert isinstance(answer.json[field], list)


# -- status codes --------------------------------------------------------------------------


def _unknown_but_well_formed_key() -> str:
    return apikey_generate().key


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Token qk_abcdefgh_00000000000000000000000000000000000000",
        "Bearer not-a-key",
        "Bearer qk_abcdefgh_00000000000000000000000000000000AAAAAA",
        "unknown",
    ],
    ids=[
        "missing",
        "empty",
        "scheme-only",
        "scheme-and-space",
        "basic",
        "other-scheme",
        "garbage",
        "bad-checksum",
        "unknown-well-formed",
    ],
)
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/v1/check", {"user_id": "u", "model": "gpt-4o"}),
        ("POST", "/api/v1/usage", {"request_id": "r", "input_tokens": 1, "output_tokens": 1}),
        ("GET", "/api/v1/quota?user_id=u&model=gpt-4o", None),
    ],
    ids=["check", "usage", "quota"],
)
def test_a_missing_malformed_or_unknown_key_is_401(server, authorization, method, path, body):
    if authorization == "unknown":
        authorization = f"Bearer {_unknown_but_well_formed_key()}"
    headers = {} if authorization is None else {"Authorization": authorization}

    answer = server.call(method, path, body, headers=headers)

    assert answer.status == 401
    assert answer.header("Content-Type") == "application/json"
    assert set(answer.json) == {"detail"}
    assert answer.header("WWW-Authenticate") == 'Bearer realm="api"'


def test_a_wrong_key_consumes_nothing(server, live_world, user):
    for _ in range(3):
        server.call(
            "POST",
            "/api/v1/check",
            {"user_id": user, "model": "gpt-4o"},
            headers={"Authorization": f"Bearer {live_world.alice_key[:-1]}x"},
        )

    assert remaining(quota(server, live_world.alice_key, user))[("user_model", "requests")] == 5


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/check"),
        ("PUT", "/api/v1/check"),
        ("DELETE", "/api/v1/check"),
        ("PATCH", "/api/v1/usage"),
        ("GET", "/api/v1/usage"),
        ("POST", "/api/v1/quota"),
        ("DELETE", "/api/v1/quota"),
    ],
)
def test_a_wrong_method_is_405(server, live_world, method, path):
    answer = server.call(method, path, {}, key=live_world.alice_key)

    assert answer.status == 405
    assert answer.header("Content-Type") == "application/json"
    assert answer.json == {"detail": f'Method "{method}" not allowed.'}


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
def test_a_body_that_is_not_json_is_415(server, live_world, content_type, user):
    answer = server.call(
        "POST",
        "/api/v1/check",
        raw=f'{{"user_id": "{user}", "model": "gpt-4o"}}'.encode(),
        key=live_world.alice_key,
        content_type=content_type,
    )

    assert answer.status == 415
    assert answer.header("Content-Type") == "application/json"
    assert set(answer.json) == {"detail"}
    assert remaining(quota(server, live_world.alice_key, user))[("user_model", "requests")] == 5


def test_retry_after_matches_the_reset_of_the_denying_limit(server, live_world, user):
    for _ in range(REQUESTS_PER_HOUR + 1):
        answer = check(server, live_world.alice_key, user_id=user, model="gpt-4o")

    assert answer.json["allowed"] is False
    assert int(answer.header("Retry-After")) == structured(answer, "RateLimit")[0][1]["t"]
