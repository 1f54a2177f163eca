"""Every example of "Four ways to put the platform in front of your models" runs: the ones in
docs/integrations.md, and the README's copies of them once the README carries the section.

The section shows one code block per placement, in the order of ``NAMES``. The client and
pass-through examples run against gunicorn (real PostgreSQL and Redis) with a fake
inference server; the middleware example configures a Django project in this process; the
nginx example must be an excerpt of examples/nginx.conf, which test_gateway runs in nginx."""

from __future__ import annotations

import json
import os
import re
import subprocess
from types import SimpleNamespace

import pytest
from django.conf import settings as django_settings
from django.http import JsonResponse
from django.urls import path

from limits import engine
from tests.api.live import REQUESTS_PER_HOUR, TOKENS_PER_HOUR
from tests.processes import REPOSITORY

pytestmark = [pytest.mark.django_db, pytest.mark.slow]
SECTION = "Four ways to put the platform in front of your models"
NAMES = ("client", "middleware", "passthrough", "gateway")  # the order they are shown in
FENCE = re.compile(r"^```(\w+)\n(.*?)\n```$", re.DOTALL | re.MULTILINE)
PLATFORM = "http://127.0.0.1:8000"
UPSTREAM = "http://127.0.0.1:8001/v1"


def section(text: str) -> str | None:
    """The section's text: from its heading to the next heading of the same level."""
    found = re.search(rf"^(#+) {re.escape(SECTION)}\n(.*?)(?=^\1 |\Z)", text, re.S | re.M)
    return found.group(2) if found else None


def examples(text: str) -> dict[str, str]:
    blocks = [code for _language, code in FENCE.findall(text)]
    assert len(blocks) == len(NAMES), f"{len(blocks)} code blocks, not one per placement"
    return dict(zip(NAMES, blocks, strict=True))


def sources() -> list[tuple[str, str]]:
    found = [("docs/integrations.md", (REPOSITORY / "docs" / "integrations.md").read_text())]
    readme = section((REPOSITORY / "README.md").read_text())
    if readme is not None:
        found.append(("README.md", readme))
    return found


SOURCES = dict(sources())


@pytest.fixture(params=list(SOURCES))
def example(request) -> dict[str, str]:
    return examples(SOURCES[request.param])


def test_the_readme_carries_the_same_examples_as_the_docs():
    if "README.md" not in SOURCES:
        pytest.skip(f"README.md has no section {SECTION!r} yet; docs/integrations.md has it")
    assert examples(SOURCES["README.md"]) == examples(SOURCES["docs/integrations.md"])


def test_every_example_is_five_lines(example):
    lines = {
        name: len([line for line in code.splitlines() if line.strip()])
        for name, code in example.items()
    }
    assert lines == dict.fromkeys(NAMES, 5)


def standing(platform, key, user, model="gpt-4o"):
    answer = platform.call("GET", f"/api/v1/quota?user_id={user}&model={model}", key=key)
    assert answer.status == 200, answer.raw
    return {(item["scope"], item["metric"]): item["remaining"] for item in answer.json["limits"]}


def test_the_client_example_runs(example, platform, live_world):
    code = example["client"]
    assert PLATFORM in code
    user = f"user-{os.urandom(4).hex()}"
    code = code.replace(PLATFORM, platform.base_url).replace('"user-42"', repr(user))
    usage = SimpleNamespace(prompt_tokens=300, completion_tokens=200)
    calls = []

    def call_your_model():
        calls.append(standing(platform, live_world.alice_key, user)[("user_model", "tokens")])
        return SimpleNamespace(usage=usage)

    exec(code, {"QUOTA_KEY": live_world.alice_key, "call_your_model": call_your_model})  # noqa: S102

    assert calls == [TOKENS_PER_HOUR - 1200]  # checked, with the estimate, before the call
    assert standing(platform, live_world.alice_key, user)[("user_model", "tokens")] == (
        TOKENS_PER_HOUR - 500
    )


def test_the_passthrough_example_runs(example, platform, live_world, fake):
    code = example["passthrough"]
    assert PLATFORM in code
    assert f"UPSTREAM_URL={UPSTREAM}" in code
    user = f"user-{os.urandom(4).hex()}"
    script = (
        code.replace(PLATFORM, platform.base_url)
        .replace(UPSTREAM, fake_url := platform.environ["UPSTREAM_URL"])
        .replace("user-42", user)
    )
    assert fake_url.endswith("/v1")

    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={**os.environ, "QUOTA_KEY": live_world.alice_key},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["choices"][0]["message"]["content"] == fake.reply
    assert fake.received[0].body["messages"] == [{"role": "user", "content": "Hello"}]
    left = standing(platform, live_world.alice_key, user)
    assert left[("user_model", "requests")] == REQUESTS_PER_HOUR - 1
    assert left[("user_model", "tokens")] == TOKENS_PER_HOUR - sum(fake.usage)


def answer_view(request):
    body = json.loads(request.body)
    usage = {"prompt_tokens": 9, "completion_tokens": 21}
    return JsonResponse({"model": body["model"], "choices": [], "usage": usage})


urlpatterns = [path("v1/answer", answer_view)]


def test_the_middleware_example_runs(example, settings, client, live_world):
    own = [name for name in django_settings.MIDDLEWARE if "QuotaMiddleware" not in name]
    project = {"MIDDLEWARE": list(own)}
    exec(example["middleware"], project)  # noqa: S102 - the example is a settings file
    settings.MIDDLEWARE = project["MIDDLEWARE"]
    settings.QUOTA_MIDDLEWARE = project["QUOTA_MIDDLEWARE"]
    settings.ROOT_URLCONF = __name__
    settings.QUOTA_KEY_PREFIX = live_world.prefix  # where gunicorn's world publishes
    engine.reset_state()
    user = f"user-{os.urandom(4).hex()}"
    body = {"model": "gpt-4o", "user": user, "max_tokens": 100, "prompt": "p" * 40}

    allowed = [
        client.post(
            "/v1/answer",
            json.dumps(body),
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {live_world.alice_key}",
        )
        for _ in range(REQUESTS_PER_HOUR + 1)
    ]

    assert [answer.status_code for answer in allowed] == [200] * REQUESTS_PER_HOUR + [429]
    assert allowed[-1].json()["denied_by"]["metric"] == "requests"
    (tokens,) = [
        state
        for state in engine.quota(live_world.alice.pk, user, "gpt-4o").limits
        if state.scope == "user_model" and state.metric == "tokens"
    ]
    assert tokens.remaining == TOKENS_PER_HOUR - 30 * REQUESTS_PER_HOUR


def nginx_blocks(text: str) -> dict[str, list[str]]:
    """{block header: its directives} of an nginx configuration (comments dropped)."""
    text = re.sub(r"#[^\n]*", "", text)
    blocks: dict[str, list[str]] = {}
    stack: list[str] = []
    for token in re.findall(r"[^;{}]+[;{]|}", text):
        token = " ".join(token.split())
        if token == "}":
            stack.pop()
        elif token.endswith("{"):
            stack.append(token[:-1].strip())
            blocks.setdefault(stack[-1], [])
        elif stack:
            blocks[stack[-1]].append(token[:-1].strip())
    return blocks


def test_the_gateway_example_is_an_excerpt_of_the_tested_nginx_conf(example):
    tested = nginx_blocks((REPOSITORY / "examples" / "nginx.conf").read_text())
    shown = nginx_blocks(example["gateway"])

    assert set(shown) == {"location /v1/", "location = /_quota_check"}
    for header, directives in shown.items():
        assert header in tested
        assert set(directives) <= set(tested[header]), header
