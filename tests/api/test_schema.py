"""The OpenAPI document against the running server: schemathesis sends requests made from
it (valid ones and broken ones) with a valid key; no answer may be a 5xx or differ from
what the document says."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode, checks

pytestmark = [pytest.mark.django_db, pytest.mark.slow]


OPERATIONS = [("/api/v1/check", "POST"), ("/api/v1/usage", "POST"), ("/api/v1/quota", "GET")]
MODELS = ["gpt-4o", "llama-3-8b"]


@pytest.fixture
def request_ids(server, live_world) -> list[str]:
    """Request ids of allowed checks, for usage reports that find their check."""
    ids = []
    for number in range(5):
        answer = server.call(
            "POST",
            "/api/v1/check",
            {"user_id": f"schema-{number}", "model": "gpt-4o", "tokens": 10},
            key=live_world.alice_key,
        )
        ids.append(answer.json["request_id"])
    return ids


def _with_known_ids(case: schemathesis.Case, data: st.DataObject, request_ids: list[str]) -> None:
    """Generated ids almost never name a known model or a real check: swap some in, so that
    the answers of allowed and denied checks and of settled usage are covered too."""
    for container in (case.body, case.query):
        if not isinstance(container, dict):
            continue
        if isinstance(container.get("model"), str) and data.draw(st.booleans()):
            container["model"] = data.draw(st.sampled_from(MODELS))
        if (
            case.path == "/api/v1/usage"
            and isinstance(container.get("request_id"), str)
            and data.draw(st.booleans())
        ):
            container["request_id"] = data.draw(st.sampled_from(request_ids))


@pytest.mark.parametrize("mode", list(GenerationMode), ids=str)
@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[path for path, _ in OPERATIONS])
def test_the_api_answers_as_its_schema_says(server, live_world, request_ids, path, method, mode):
    schema = schemathesis.openapi.from_url(f"{server.base_url}/api/schema/")
    operation = schema[path][method]
    headers = {"Authorization": f"Bearer {live_world.alice_key}"}
    statuses: list[int] = []

    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    @settings(
        max_examples=40,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def answers_as_documented(case: schemathesis.Case, data: st.DataObject) -> None:
        _with_known_ids(case, data, request_ids)
        response = case.call_and_validate(
            base_url=server.base_url,
            headers=headers,
            checks=[checks.not_a_server_error, checks.response_schema_conformance],
        )
        statuses.append(response.status_code)

    answers_as_documented()

    assert statuses
    if mode is GenerationMode.POSITIVE:
        assert 200 in statuses, "no generated request was valid: the schema is too loose"


def test_the_schema_documents_every_route_and_the_key(server):
    answer = server.call("GET", "/api/schema/?format=json")

    document = answer.json
    assert answer.status == 200
    assert set(document["paths"]) == {"/api/v1/check", "/api/v1/usage", "/api/v1/quota"}
    assert document["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"


def test_the_schema_documents_a_deferred_usage_report_as_202(server):
    document = server.call("GET", "/api/schema/?format=json").json

    answers = document["paths"]["/api/v1/usage"]["post"]["responses"]
    deferred = answers["202"]["content"]["application/json"]["schema"]["$ref"]
    fields = document["components"]["schemas"][deferred.rsplit("/", 1)[1]]["properties"]
    assert set(answers) == {"200", "202", "400", "401", "404", "405", "415", "503"}
    assert set(fields) == {
        "request_id",
        "input_tokens",
        "output_tokens",
        "status",
        "repeated",
        "deferred",
        "detail",
    }


def test_the_docs_page_uses_only_files_the_server_serves_itself(server):
    answer = server.call("GET", "/api/docs/")

    page = answer.raw.decode()
    assert answer.status == 200
    assert "https://" not in page and "http://" not in page
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in page
