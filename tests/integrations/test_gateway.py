"""The platform as deployed: gunicorn on loopback (real PostgreSQL and Redis) behind a real
nginx running ``examples/nginx.conf``, in front of a fake inference server; and the same
gunicorn as the guarded pass-through, and as Envoy's authorization service.

The world (tests.api.live): per end user and model 5 requests and 10,000 frontier tokens an
hour, 50 in flight per user. Each test uses end-user ids of its own."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest
import yaml

from tests.api.live import REQUESTS_PER_HOUR, TOKENS_PER_HOUR
from tests.integrations.conftest import LIVE_IN_FLIGHT as IN_FLIGHT
from tests.integrations.live import Nginx, call, nginx_binary
from tests.processes import REPOSITORY, free_port

pytestmark = [pytest.mark.django_db, pytest.mark.slow]
NGINX_MISSING = (
    "nginx is not installed here and scripts/test could not install it (that needs apt-get "
    "as root or with password-less sudo); install the Debian package nginx to run this test"
)


@pytest.fixture(scope="module")
def nginx(platform, upstream_server, tmp_path_factory) -> Iterator[Nginx]:
    if nginx_binary() is None:
        pytest.skip(NGINX_MISSING)
    server = Nginx(
        tmp_path_factory.mktemp("nginx"),
        platform_port=platform.port,
        inference_port=upstream_server.port,
    )
    server.start()
    yield server
    server.stop()


def through_nginx(nginx, key, user, *, model="gpt-4o", tokens=100, stream=False):
    headers = {"X-Quota-User": user, "X-Quota-Model": model, "X-Quota-Tokens": str(tokens)}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return call(nginx.port, "POST", "/v1/chat/completions", body, headers)


def quota(platform, key, user, model="gpt-4o"):
    answer = platform.call("GET", f"/api/v1/quota?user_id={user}&model={model}", key=key)
    assert answer.status == 200, answer.raw
    return {(item["scope"], item["metric"]): item["remaining"] for item in answer.json["limits"]}


# -- nginx -----------------------------------------------------------------------------
def test_nginx_lets_requests_through_until_the_check_apis_limit_then_answers_429(
    nginx, platform, live_world, fake, user
):
    allowed = [through_nginx(nginx, live_world.alice_key, user) for _ in range(REQUESTS_PER_HOUR)]
    denied = through_nginx(nginx, live_world.alice_key, user)

    assert [reply.status for reply in allowed] == [200] * REQUESTS_PER_HOUR, nginx.log()
    assert allowed[0].json["choices"][0]["message"]["content"] == fake.reply
    remaining = [reply.headers["RateLimit"].split(",")[0] for reply in allowed]
    assert remaining == [
        f'"user_model.requests.3600";r={left};t=3600'
        for left in range(REQUESTS_PER_HOUR - 1, -1, -1)
    ]
    assert "q=5" in allowed[0].headers["RateLimit-Policy"]
    assert len(fake.received) == REQUESTS_PER_HOUR  # the denied one never got there
    forwarded = [item.headers.get("x-quota-request-id") for item in fake.received]
    assert forwarded == [reply.headers["X-Quota-Request-Id"] for reply in allowed]
    assert all("authorization" not in item.headers for item in fake.received)

    assert denied.status == 429
    assert denied.headers["Content-Type"] == "application/json"
    body = denied.json
    assert body["allowed"] is False
    assert body["denied_by"] == {
        "scope": "user_model",
        "metric": "requests",
        "window": 3600,
        "limit": REQUESTS_PER_HOUR,
    }
    assert 3500 < body["retry_after"] <= 3600
    assert int(denied.headers["Retry-After"]) == -(-body["retry_after"] // 1)
    assert denied.headers["RateLimit"].startswith('"user_model.requests.3600";r=0;')

    # The check API, asked directly, sees the same counts and gives the same answer.
    assert quota(platform, live_world.alice_key, user)[("user_model", "requests")] == 0
    check = platform.call(
        "POST",
        "/api/v1/check",
        {"user_id": user, "model": "gpt-4o", "tokens": 100, "dry_run": True},
        key=live_world.alice_key,
    )
    assert check.json["allowed"] is False
    assert check.json["denied_by"] == body["denied_by"]
    # Another tenant's user of the same id is counted apart.
    assert through_nginx(nginx, live_world.bob_key, user).status == 200


def test_nginx_enforces_the_token_estimate_the_client_declares(nginx, live_world, fake, user):
    too_many = through_nginx(nginx, live_world.alice_key, user, tokens=TOKENS_PER_HOUR + 1)
    fits = through_nginx(nginx, live_world.alice_key, user, tokens=TOKENS_PER_HOUR)

    assert too_many.status == 429
    assert too_many.json["denied_by"]["metric"] == "tokens"
    assert too_many.json["retry_after"] is None  # it can never fit
    assert "Retry-After" not in too_many.headers
    assert fits.status == 200
    assert len(fake.received) == 1


def test_nginx_answers_401_and_400_as_json_without_forwarding(nginx, live_world, fake, user):
    no_key = through_nginx(nginx, None, user)
    wrong_key = through_nginx(nginx, "qk_aaaaaaaa_bbbb", user)
    unknown_model = through_nginx(nginx, live_world.alice_key, user, model="no-such-model")

    assert (no_key.status, wrong_key.status) == (401, 401)
    assert "API key" in no_key.json["detail"]
    assert no_key.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    assert unknown_model.status == 400
    assert unknown_model.json == {"model": ["Unknown model 'no-such-model'."]}
    assert fake.received == []


def test_the_inference_server_behind_nginx_reports_usage_with_the_forwarded_id(
    nginx, platform, live_world, fake, user
):
    assert through_nginx(nginx, live_world.alice_key, user, tokens=500).status == 200
    request_id = fake.received[0].headers["x-quota-request-id"]
    assert quota(platform, live_world.alice_key, user)[("user_model", "tokens")] == (
        TOKENS_PER_HOUR - 500
    )

    usage = platform.call(
        "POST",
        "/api/v1/usage",
        {"request_id": request_id, "input_tokens": 7, "output_tokens": 3},
        key=live_world.alice_key,
    )

    assert usage.status == 200
    assert quota(platform, live_world.alice_key, user)[("user_model", "tokens")] == (
        TOKENS_PER_HOUR - 10
    )


def test_nginx_streams_server_sent_events_through(nginx, live_world, fake, user):
    reply = through_nginx(nginx, live_world.alice_key, user, stream=True)

    assert reply.status == 200
    assert reply.headers["Content-Type"] == "text/event-stream"
    events = [line for line in reply.raw.split(b"\n") if line.startswith(b"data: ")]
    assert len(events) == len(fake.reply.split(" ")) + 1
    assert events[-1] == b"data: [DONE]"


def test_nginx_fails_closed_with_503_when_the_platform_does_not_answer(
    upstream_server, live_world, fake, tmp_path, user
):
    if nginx_binary() is None:
        pytest.skip(NGINX_MISSING)
    orphan = Nginx(tmp_path, platform_port=free_port(), inference_port=upstream_server.port)
    orphan.start()
    try:
        reply = through_nginx(orphan, live_world.alice_key, user)
    finally:
        orphan.stop()

    assert reply.status == 503
    assert reply.headers["Retry-After"] == "1"
    assert "did not answer" in reply.json["detail"]
    assert fake.received == []


# -- Envoy ext_authz (HTTP service), as Envoy calls it ---------------------------------
def envoy_asks(platform, key, user, tokens=0):
    """What Envoy sends: the original method, path_prefix + the original path, no body."""
    headers = {
        "Authorization": f"Bearer {key}",
        "X-Quota-User": user,
        "X-Quota-Model": "gpt-4o",
        "X-Quota-Tokens": str(tokens),
        "Content-Length": "0",
    }
    return call(platform.port, "POST", "/api/v1/authz/v1/chat/completions", None, headers)


def test_envoy_gets_200_with_headers_then_429_with_the_check_apis_body(platform, live_world, user):
    allowed = [envoy_asks(platform, live_world.alice_key, user) for _ in range(REQUESTS_PER_HOUR)]
    denied = envoy_asks(platform, live_world.alice_key, user)

    assert [reply.status for reply in allowed] == [200] * REQUESTS_PER_HOUR, nginx.log()
    assert allowed[0].raw == b""
    assert allowed[-1].headers["x-ratelimit-remaining-requests"] == "0"
    assert allowed[-1].headers["X-Quota-Request-Id"]
    assert denied.status == 429
    assert denied.json["denied_by"]["metric"] == "requests"
    assert denied.headers["Retry-After"]
    assert "X-Quota-Decision" not in denied.headers  # that one is for nginx


def test_the_envoy_example_points_ext_authz_at_the_platform():
    config = yaml.safe_load((REPOSITORY / "examples" / "envoy.yaml").read_text())
    listener = config["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    filters = {item["name"]: item["typed_config"] for item in manager["http_filters"]}
    authz = filters["envoy.filters.http.ext_authz"]
    service = authz["http_service"]
    clusters = {item["name"] for item in config["static_resources"]["clusters"]}

    assert list(filters)[-1] == "envoy.filters.http.router"
    assert service["path_prefix"] == "/api/v1/authz"
    assert service["server_uri"]["cluster"] in clusters
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"] == {"code": "ServiceUnavailable"}
    sent = {item.get("exact") for item in authz["allowed_headers"]["patterns"]}
    assert {"authorization", "x-quota-user", "x-quota-model", "x-quota-tokens"} <= sent
    response = service["authorization_response"]
    to_client = {item.get("exact") for item in response["allowed_client_headers"]["patterns"]}
    assert {"ratelimit", "ratelimit-policy", "retry-after", "content-type"} <= to_client
    upstream_headers = response["allowed_upstream_headers"]["patterns"]
    assert {"exact": "x-quota-request-id"} in upstream_headers


# -- the pass-through in gunicorn: a client leaving in the middle of a stream ---------
def test_a_client_leaving_a_stream_through_gunicorn_settles_on_what_was_sent(
    platform, live_world, fake, user
):
    fake.chunk_pause = 0.1
    body = json.dumps(
        {
            "model": "gpt-4o",
            "user": user,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "x" * 400}],  # 100 tokens
            "max_tokens": 1000,
        }
    ).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + live_world.alice_key.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
        b"\r\n" + body
    )
    with socket.create_connection(("127.0.0.1", platform.port), timeout=10) as client:
        client.sendall(request)
        received = b""
        while b"data: " not in received:
            chunk = client.recv(65536)
            assert chunk, received
            received += chunk
        assert received.startswith(b"HTTP/1.1 200")
        during = quota(platform, live_world.alice_key, user)
    # The socket is closed: gunicorn's next write fails and it closes the response.

    deadline = time.monotonic() + 10
    after = during
    while after[("user", "concurrency")] != IN_FLIGHT and time.monotonic() < deadline:
        time.sleep(0.05)
        after = quota(platform, live_world.alice_key, user)

    assert during[("user", "concurrency")] == IN_FLIGHT - 1
    assert during[("user_model", "tokens")] == TOKENS_PER_HOUR - 1100
    assert after[("user", "concurrency")] == IN_FLIGHT
    # Settled on the 100 input tokens plus the few words that went out before gunicorn
    # noticed: not the estimate, not the usage chunk, not the whole reply (11 tokens).
    assert TOKENS_PER_HOUR - 111 < after[("user_model", "tokens")] <= TOKENS_PER_HOUR - 101
    deadline = time.monotonic() + 5
    while fake.streams_cut == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (fake.streams_cut, fake.streams_ended) == (1, 0)
