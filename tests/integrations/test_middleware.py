"""QuotaMiddleware on its own, around views of a Django project's own (not the pass-through):
what it reads, what it never touches, how it settles, and its fail modes."""

from __future__ import annotations

import json

import pytest
from asgiref.sync import async_to_sync
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.test import RequestFactory
from django.urls import path

from limits import engine
from limits.middleware import QuotaMiddleware, QuotaRequest, openai_request
from tests.integrations.conftest import IN_FLIGHT, TOKENS_PER_HOUR, publish
from tests.processes import free_port

USAGE = {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}


def reply_view(request):
    body = json.loads(request.body)
    return JsonResponse({"choices": [{"message": {"content": "ok"}}], "usage": USAGE, **body})


def plain_view(request):
    return HttpResponse("plain text, no usage")


def async_stream_view(request):
    async def events():
        yield b'data: {"choices": [{"delta": {"content": "abcd"}}]}\n\n'
        yield b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n'
        yield b"data: [DONE]\n\n"

    return StreamingHttpResponse(events(), content_type="text/event-stream")


urlpatterns = [
    path("ai/reply", reply_view),
    path("ai/plain", plain_view),
    path("ai/async-stream", async_stream_view),
    path("other/reply", reply_view),
]


@pytest.fixture
def project(settings, guarded):
    """A Django project of its own: its views under /ai/, guarded by the middleware."""
    settings.ROOT_URLCONF = __name__
    settings.MIDDLEWARE = ["limits.middleware.QuotaMiddleware"]
    settings.QUOTA_MIDDLEWARE = {"paths": ["/ai/"]}
    return guarded


def post(client, key, path="/ai/reply", **body):
    body = {"model": "gpt-4o", "user": "u1", **body}
    return client.post(
        path, json.dumps(body), content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {key}"
    )


def tokens_left(tenant, user="u1"):
    states = {
        (s.scope, s.metric): s.remaining for s in engine.quota(tenant.pk, user, "gpt-4o").limits
    }
    return states[("user_model", "tokens")], states[("user", "concurrency")]


def test_a_projects_own_view_is_checked_and_settled_on_its_usage(client, project, world):
    answer = post(client, project.alice_key, prompt="y" * 400, max_tokens=100)

    assert answer.status_code == 200
    assert answer.json()["prompt"] == "y" * 400  # the view read the body the middleware read
    assert answer["x-ratelimit-remaining-tokens"] == str(TOKENS_PER_HOUR - 200)
    assert tokens_left(world.alice) == (TOKENS_PER_HOUR - 25, IN_FLIGHT)


def test_a_response_without_usage_settles_on_the_input_estimate(client, project, world):
    assert post(client, project.alice_key, "/ai/plain", prompt="y" * 400).status_code == 200

    assert tokens_left(world.alice) == (TOKENS_PER_HOUR - 100, IN_FLIGHT)


def test_an_async_stream_settles_on_its_usage_chunk(client, project, world):
    answer = post(client, project.alice_key, "/ai/async-stream", max_tokens=300)
    assert answer.status_code == 200
    assert tokens_left(world.alice)[1] == IN_FLIGHT - 1

    async def read():
        return b"".join([chunk async for chunk in answer.streaming_content])

    body = async_to_sync(read)()

    assert body.endswith(b"data: [DONE]\n\n")
    assert tokens_left(world.alice) == (TOKENS_PER_HOUR - 5, IN_FLIGHT)


def test_paths_outside_the_prefixes_pass_without_a_check(client, project, world):
    answer = client.post("/other/reply", json.dumps({"x": 1}), content_type="application/json")

    assert answer.status_code == 200
    assert "X-Quota-Request-Id" not in answer
    assert tokens_left(world.alice) == (TOKENS_PER_HOUR, IN_FLIGHT)


def test_an_unguarded_request_body_is_never_read(project):
    seen = []

    def view(request):
        seen.append(hasattr(request, "_body"))
        return HttpResponse("ok")

    request = RequestFactory().post("/other/reply", b"\xff not json", content_type="text/plain")
    answer = QuotaMiddleware(view)(request)

    assert answer.status_code == 200
    assert seen == [False]


def test_methods_other_than_post_pass_unchecked(client, project, world):
    answer = client.get("/ai/plain")

    assert answer.status_code == 200
    assert tokens_left(world.alice) == (TOKENS_PER_HOUR, IN_FLIGHT)


def test_an_exception_in_the_view_settles_the_input_estimate_as_an_error(project, world):
    def broken(request):
        raise RuntimeError("the model server fell over")

    body = json.dumps({"model": "gpt-4o", "user": "u1", "prompt": "y" * 40, "max_tokens": 500})
    request = RequestFactory().post(
        "/ai/reply",
        body,
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {project.alice_key}",
    )
    with pytest.raises(RuntimeError):
        QuotaMiddleware(broken)(request)

    assert request.quota_grant.settlement.status == "error"
    assert (
        request.quota_grant.settlement.input_tokens,
        request.quota_grant.settlement.output_tokens,
    ) == (10, 0)
    assert tokens_left(world.alice) == (TOKENS_PER_HOUR - 10, IN_FLIGHT)


@pytest.mark.parametrize(
    ("body", "tokens", "input_tokens"),
    [
        ({"messages": [{"role": "user", "content": "a" * 41}]}, 11, 11),
        ({"messages": [{"content": [{"type": "text", "text": "a" * 8}]}], "max_tokens": 7}, 9, 2),
        ({"prompt": ["a" * 8, "b" * 8], "max_completion_tokens": 10}, 14, 4),
        ({"prompt": [1, 2, 3], "max_tokens": 10, "n": 3}, 33, 3),
        ({"input": "a" * 4000}, 1000, 1000),
        ({}, 0, 0),
    ],
)
def test_the_estimate_is_four_characters_a_token_plus_the_output_allowance(
    body, tokens, input_tokens, settings
):
    settings.QUOTA_MIDDLEWARE = {"paths": ["/"]}
    request = RequestFactory().post(
        "/",
        json.dumps({"model": "gpt-4o", "user": "u1", **body}),
        content_type="application/json",
        HTTP_AUTHORIZATION="Bearer k",
    )

    asked = openai_request(request)

    assert (asked.tokens, asked.input_tokens) == (tokens, input_tokens)


def test_headers_name_the_user_model_and_estimate_when_the_body_does_not(settings):
    settings.QUOTA_MIDDLEWARE = {"paths": ["/"], "key_header": "X-Api-Key"}
    request = RequestFactory().post(
        "/",
        b"",
        content_type="application/json",
        HTTP_X_API_KEY="qk_x",
        HTTP_X_QUOTA_USER="u9",
        HTTP_X_QUOTA_MODEL="gpt-4o",
        HTTP_X_QUOTA_TOKENS="250",
    )

    assert openai_request(request) == QuotaRequest("qk_x", "u9", "gpt-4o", 250, 0, None)


def mapper_from_headers(request):
    return QuotaRequest(
        key=request.headers["X-Service-Key"],
        user_id=request.headers["X-Employee"],
        model="gpt-4o",
        tokens=123,
        input_tokens=100,
    )


def test_a_mapper_of_the_projects_own_replaces_the_default(client, project, settings, world):
    settings.QUOTA_MIDDLEWARE = {"paths": ["/ai/"], "mapper": f"{__name__}.mapper_from_headers"}

    answer = client.post(
        "/ai/plain",
        b"",
        content_type="text/plain",
        HTTP_X_SERVICE_KEY=project.alice_key,
        HTTP_X_EMPLOYEE="emp-7",
    )

    assert answer.status_code == 200
    assert tokens_left(world.alice, "emp-7") == (TOKENS_PER_HOUR - 100, IN_FLIGHT)


def test_a_request_id_header_makes_a_retry_count_once(client, project, settings, world):
    settings.QUOTA_MIDDLEWARE = {"paths": ["/ai/"], "request_id_header": "Idempotency-Key"}

    for _ in range(2):
        answer = client.post(
            "/ai/plain",
            json.dumps({"model": "gpt-4o", "user": "u1", "prompt": "y" * 40}),
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {project.alice_key}",
            HTTP_IDEMPOTENCY_KEY="job-1",
        )
        assert answer.status_code == 200
        assert answer["X-Quota-Request-Id"] == "job-1"

    (requests,) = [
        s for s in engine.quota(world.alice.pk, "u1", "gpt-4o").limits if s.metric == "requests"
    ]
    assert requests.remaining == 99


@pytest.mark.parametrize(("fail_mode", "status"), [("open", 200), ("closed", 429)])
def test_with_redis_unreachable_the_tiers_fail_mode_answers(
    client, project, settings, world, fail_mode, status
):
    world.tier.fail_mode = fail_mode
    world.tier.save()
    publish()
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    engine.reset_state()

    answer = post(client, project.alice_key, "/ai/plain")

    assert answer.status_code == status
    assert "RateLimit-Policy" not in answer  # no counter was read: the fail mode answered
    if status == 429:
        assert answer.json()["degraded"] is True
        assert answer.json()["allowed"] is False
        assert "Retry-After" in answer


def test_a_body_over_djangos_limit_is_413_and_checks_nothing(client, project, settings, world):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000

    answer = post(client, project.alice_key, prompt="y" * 2000)

    assert answer.status_code == 413
    assert answer.json() == {"detail": "The body is too large."}
    assert tokens_left(world.alice) == (TOKENS_PER_HOUR, IN_FLIGHT)
