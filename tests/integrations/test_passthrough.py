"""QuotaMiddleware and the guarded pass-through, end to end: the platform's own
``/v1/…`` routes in this process (real Redis, real Postgres) forwarding over loopback to a
fake OpenAI-compatible server; what was counted is read back through ``/api/v1/quota``."""

from __future__ import annotations

import json
import time

import pytest

from tests.integrations.conftest import IN_FLIGHT, TOKENS_PER_HOUR, publish
from tests.processes import free_port

PROMPT = "x" * 40  # an estimate of 10 input tokens at four characters a token
ESTIMATE_INPUT = 10
MAX_TOKENS = 50


def chat(client, key, *, user="u1", model="gpt-4o", path="/v1/chat/completions", **extra):
    body = {
        "model": model,
        "user": user,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        **extra,
    }
    headers = {"HTTP_AUTHORIZATION": f"Bearer {key}"} if key else {}
    return client.post(path, json.dumps(body), content_type="application/json", **headers)


def standing(client, key, user="u1", model="gpt-4o"):
    """{(scope, metric): remaining} from the quota API."""
    answer = client.get(
        "/api/v1/quota", {"user_id": user, "model": model}, HTTP_AUTHORIZATION=f"Bearer {key}"
    )
    assert answer.status_code == 200, answer.content
    return {(item["scope"], item["metric"]): item["remaining"] for item in answer.json()["limits"]}


def untouched():
    return {
        ("user_model", "requests"): 100,
        ("user_model", "tokens"): TOKENS_PER_HOUR,
        ("user", "concurrency"): IN_FLIGHT,
    }


def test_an_allowed_request_is_forwarded_and_settled_on_the_upstreams_usage(
    client, guarded, upstream, behaviour
):
    behaviour.usage = (12, 30)

    answer = chat(client, guarded.alice_key)

    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"] == behaviour.reply
    assert answer["X-Upstream"] == "fake"
    request_id = answer["X-Quota-Request-Id"]
    assert answer["x-ratelimit-limit-requests"] == "100"
    assert answer["x-ratelimit-remaining-requests"] == "99"
    # The header reports the reservation (10 in + 50 out); the window holds the actuals.
    assert answer["x-ratelimit-remaining-tokens"] == str(TOKENS_PER_HOUR - 60)
    assert "RateLimit-Policy" in answer
    assert standing(client, guarded.alice_key) == {
        ("user_model", "requests"): 99,
        ("user_model", "tokens"): TOKENS_PER_HOUR - 42,
        ("user", "concurrency"): IN_FLIGHT,
    }
    assert standing(client, guarded.bob_key) == untouched()
    (received,) = behaviour.received
    assert received.path == "/v1/chat/completions"
    assert received.body["messages"][0]["content"] == PROMPT
    assert received.headers["x-quota-request-id"] == request_id
    assert "authorization" not in received.headers  # the platform's key stays here


def test_the_upstream_key_replaces_the_callers(client, guarded, upstream, behaviour, settings):
    settings.UPSTREAM_API_KEY = "sk-upstream"

    assert chat(client, guarded.alice_key).status_code == 200

    assert behaviour.received[0].headers["authorization"] == "Bearer sk-upstream"


def test_completions_and_embeddings_are_settled_on_their_usage(
    client, guarded, upstream, behaviour
):
    behaviour.usage = (7, 3)

    completion = client.post(
        "/v1/completions",
        json.dumps({"model": "gpt-4o", "user": "u1", "prompt": PROMPT, "max_tokens": 5}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {guarded.alice_key}",
    )
    embedding = client.post(
        "/v1/embeddings",
        json.dumps({"model": "gpt-4o", "input": ["a" * 400]}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {guarded.alice_key}",
        HTTP_X_QUOTA_USER="u1",
    )

    assert (completion.status_code, embedding.status_code) == (200, 200)
    assert [item.path for item in behaviour.received] == ["/v1/completions", "/v1/embeddings"]
    # 7 + 3 for the completion, 7 prompt tokens for the embedding
    assert standing(client, guarded.alice_key)[("user_model", "tokens")] == TOKENS_PER_HOUR - 17


def test_a_stream_passes_event_by_event_and_settles_on_its_usage_chunk(
    client, guarded, upstream, behaviour
):
    behaviour.usage = (12, 30)

    answer = chat(client, guarded.alice_key, stream=True, stream_options={"include_usage": True})

    assert answer.status_code == 200
    assert answer.streaming
    assert answer["Content-Type"] == "text/event-stream"
    chunks = list(answer.streaming_content)
    body = b"".join(chunks)
    events = [line for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]"
    words = behaviour.reply.split(" ")
    assert len(events) == len(words) + 2  # one per word, the usage chunk, [DONE]
    assert standing(client, guarded.alice_key) == {
        ("user_model", "requests"): 99,
        ("user_model", "tokens"): TOKENS_PER_HOUR - 42,
        ("user", "concurrency"): IN_FLIGHT,
    }


def test_a_stream_without_usage_settles_on_the_input_estimate_and_the_text_sent(
    client, guarded, upstream, behaviour
):
    answer = chat(client, guarded.alice_key, stream=True)
    list(answer.streaming_content)

    sent = -(-len(behaviour.reply) // 4)  # 43 characters: 11 tokens
    assert standing(client, guarded.alice_key)[("user_model", "tokens")] == (
        TOKENS_PER_HOUR - ESTIMATE_INPUT - sent
    )
    assert standing(client, guarded.alice_key)[("user", "concurrency")] == IN_FLIGHT


def test_a_stream_the_client_leaves_settles_on_what_was_sent_and_stops_the_upstream(
    client, guarded, upstream, behaviour
):
    behaviour.chunk_pause = 0.05

    answer = chat(client, guarded.alice_key, stream=True, stream_options={"include_usage": True})
    first = next(iter(answer.streaming_content))
    assert standing(client, guarded.alice_key)[("user", "concurrency")] == IN_FLIGHT - 1
    answer.close()  # what the WSGI server does when writing to a departed client fails

    assert b'"content": "Sure"' in first
    assert standing(client, guarded.alice_key) == {
        ("user_model", "requests"): 99,
        ("user_model", "tokens"): TOKENS_PER_HOUR - ESTIMATE_INPUT - 1,  # "Sure": 1 token
        ("user", "concurrency"): IN_FLIGHT,
    }
    deadline = time.monotonic() + 5
    while behaviour.streams_cut == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (behaviour.streams_cut, behaviour.streams_ended) == (1, 0)  # told to stop


def test_over_the_limit_is_429_with_the_check_apis_body_and_headers(
    client, guarded, upstream, behaviour, world
):
    world.rule.limit = 1
    world.rule.save()
    publish()
    assert chat(client, guarded.alice_key).status_code == 200
    before = standing(client, guarded.alice_key)

    denied = chat(client, guarded.alice_key)

    assert denied.status_code == 429
    body = denied.json()
    assert body["allowed"] is False
    assert body["denied_by"] == {
        "scope": "user_model",
        "metric": "requests",
        "window": 3600,
        "limit": 1,
    }
    assert 3590 < body["retry_after"] <= 3600
    assert denied["Retry-After"] == str(int(-(-body["retry_after"] // 1)))
    assert denied["X-Quota-Request-Id"] == body["request_id"]
    assert len(behaviour.received) == 1  # the denied request never reached the upstream
    assert standing(client, guarded.alice_key) == before  # and consumed nothing

    check = client.post(
        "/api/v1/check",
        {"user_id": "u1", "model": "gpt-4o", "tokens": ESTIMATE_INPUT + MAX_TOKENS},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {guarded.alice_key}",
    )
    assert check.json()["allowed"] is False
    same = {"request_id", "retry_after", "limits"}
    assert {k: v for k, v in check.json().items() if k not in same} == {
        k: v for k, v in body.items() if k not in same
    }
    for header in ("RateLimit-Policy", "x-ratelimit-limit-requests", "x-ratelimit-limit-tokens"):
        assert denied[header] == check[header]
    assert denied["RateLimit"].split(";")[:2] == check["RateLimit"].split(";")[:2]


def test_a_request_larger_than_a_limit_is_denied_without_retry_after(
    client, guarded, upstream, behaviour
):
    denied = chat(client, guarded.alice_key, max_tokens=TOKENS_PER_HOUR)

    assert denied.status_code == 429
    assert denied.json()["denied_by"]["metric"] == "tokens"
    assert denied.json()["retry_after"] is None
    assert "Retry-After" not in denied
    assert behaviour.received == []
    assert standing(client, guarded.alice_key) == untouched()


def test_an_unreachable_upstream_is_502_and_releases_the_reservation(client, guarded, settings):
    settings.UPSTREAM_URL = f"http://127.0.0.1:{free_port()}/v1"

    answer = chat(client, guarded.alice_key)

    assert answer.status_code == 502
    assert answer.json()["error"]["type"] == "upstream_unavailable"
    assert standing(client, guarded.alice_key) == {
        ("user_model", "requests"): 99,  # it was asked for; nothing more stays reserved
        ("user_model", "tokens"): TOKENS_PER_HOUR,
        ("user", "concurrency"): IN_FLIGHT,
    }


def test_an_upstream_error_passes_through_and_settles_the_input_estimate(
    client, guarded, upstream, behaviour
):
    behaviour.status = 400

    answer = chat(client, guarded.alice_key)

    assert answer.status_code == 400
    assert answer.json() == {"error": {"message": "upstream says no", "type": "x"}}
    assert standing(client, guarded.alice_key)[("user_model", "tokens")] == (
        TOKENS_PER_HOUR - ESTIMATE_INPUT
    )
    assert standing(client, guarded.alice_key)[("user", "concurrency")] == IN_FLIGHT


@pytest.mark.parametrize(
    ("key", "body", "status"),
    [
        (None, {"model": "gpt-4o", "user": "u1"}, 401),
        ("qk_notakey", {"model": "gpt-4o", "user": "u1"}, 401),
        ("alice", {"model": "gpt-4o", "user": 42}, 400),
        ("alice", {"user": "u1"}, 400),
        ("alice", {"model": "no-such-model", "user": "u1"}, 400),
        ("alice", {"model": "gpt-4o", "user": "u\x00"}, 400),
        ("alice", ["not", "an", "object"], 400),
    ],
)
def test_requests_that_cannot_be_checked_are_refused_before_the_upstream(
    client, guarded, upstream, behaviour, key, body, status
):
    headers = {}
    if key is not None:
        headers["HTTP_AUTHORIZATION"] = f"Bearer {guarded.alice_key if key == 'alice' else key}"

    answer = client.post(
        "/v1/chat/completions", json.dumps(body), content_type="application/json", **headers
    )

    assert answer.status_code == status
    assert answer["Content-Type"] == "application/json"
    assert behaviour.received == []
    assert standing(client, guarded.alice_key) == untouched()


def test_a_route_outside_the_guarded_paths_is_never_forwarded(
    client, guarded, upstream, behaviour, settings
):
    settings.QUOTA_MIDDLEWARE = {"paths": ["/somewhere-else/"]}

    answer = chat(client, guarded.alice_key)

    assert answer.status_code == 500
    assert "not guarded" in answer.json()["error"]["message"]
    assert behaviour.received == []


def test_a_request_naming_no_user_is_counted_for_its_api_key(client, guarded, upstream, behaviour):
    prefix = guarded.alice_key.split("_")[1]
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": PROMPT}]}

    answer = client.post(
        "/v1/chat/completions",
        json.dumps(body),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {guarded.alice_key}",
    )

    assert answer.status_code == 200
    assert standing(client, guarded.alice_key, user=f"key:{prefix}") == {
        ("user_model", "requests"): 99,
        ("user_model", "tokens"): TOKENS_PER_HOUR - 42,
        ("user", "concurrency"): IN_FLIGHT,
    }
