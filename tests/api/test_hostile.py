"""Hostile bodies through gunicorn: each one is refused with a 4xx and a JSON body, counts
nothing, and never makes the server answer 5xx."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.api.live import Answer, Gunicorn

pytestmark = pytest.mark.django_db

MB = 1024 * 1024
USER = "{user}"  # replaced by the test's own end-user id


def _body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def _check(**overrides: Any) -> bytes:
    fields = {"user_id": USER, "model": "gpt-4o", "tokens": 10, **overrides}
    return _body(**{key: value for key, value in fields.items() if value is not _MISSING})


def _nested(depth: int, leaf: str = "1", opener: str = "[", closer: str = "]") -> str:
    return opener * depth + leaf + closer * depth


def _nested_objects(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


_MISSING = object()
JSON = "application/json"

# (id, raw body, content type, expected status)
CHECK_BODIES: list[tuple[str, bytes, str | None, int]] = [
    # tokens
    ("tokens-negative", _check(tokens=-1), JSON, 400),
    ("tokens-float", _check(tokens=1.5), JSON, 400),
    ("tokens-whole-float", _check(tokens=5.0), JSON, 400),
    ("tokens-over-ten-million", _check(tokens=10_000_001), JSON, 400),
    ("tokens-huge", _check(tokens=10**40), JSON, 400),
    ("tokens-string", _check(tokens="5"), JSON, 400),
    ("tokens-fullwidth-string", _check(tokens="１０"), JSON, 400),
    ("tokens-true", _check(tokens=True), JSON, 400),
    ("tokens-null", _check(tokens=None), JSON, 400),
    ("tokens-list", _check(tokens=[5]), JSON, 400),
    ("tokens-object", _check(tokens={"n": 5}), JSON, 400),
    ("tokens-exponent-overflow", _check().replace(b'"tokens": 10', b'"tokens": 1e400'), JSON, 400),
    ("tokens-nan", _check().replace(b'"tokens": 10', b'"tokens": NaN'), JSON, 400),
    ("tokens-infinity", _check().replace(b'"tokens": 10', b'"tokens": Infinity'), JSON, 400),
    ("tokens-minus-infinity", _check().replace(b'"tokens": 10', b'"tokens": -Infinity'), JSON, 400),
    # missing or empty fields
    ("missing-user-id", _check(user_id=_MISSING), JSON, 400),
    ("missing-model", _check(model=_MISSING), JSON, 400),
    ("empty-object", b"{}", JSON, 400),
    ("user-id-empty", _check(user_id=""), JSON, 400),
    ("user-id-only-spaces", _check(user_id="   "), JSON, 400),
    ("user-id-null", _check(user_id=None), JSON, 400),
    ("model-null", _check(model=None), JSON, 400),
    # ids of the wrong type, length or characters
    ("user-id-10k-characters", _check(user_id="u" * 10_000), JSON, 400),
    ("user-id-201-characters", _check(user_id="u" * 201), JSON, 400),
    ("user-id-nul", _check(user_id=USER + "\u0000"), JSON, 400),
    ("user-id-newline", _check(user_id=USER + "\nX-Tenant: bob"), JSON, 400),
    ("user-id-escape", _check(user_id=USER + "\u001b[2J"), JSON, 400),
    ("user-id-bidi-override", _check(user_id=USER + "\u202e"), JSON, 400),
    ("user-id-lone-surrogate", _check().replace(b'"{user}"', b'"{user}\\ud800"'), JSON, 400),
    ("user-id-number", _check(user_id=12345), JSON, 400),
    ("user-id-list", _check(user_id=[USER]), JSON, 400),
    ("user-id-object", _check(user_id={"id": USER}), JSON, 400),
    ("model-unknown", _check(model="gpt-5"), JSON, 400),
    ("model-cyrillic-look-alike", _check(model="gрt-4o"), JSON, 400),
    ("model-zero-width-space", _check(model="gpt\u200b-4o"), JSON, 400),
    ("model-inner-space", _check(model="gpt 4o"), JSON, 400),
    ("model-10k-characters", _check(model="g" * 10_000), JSON, 400),
    ("request-id-201-characters", _check(request_id="r" * 201), JSON, 400),
    ("request-id-control", _check(request_id="r\u0007"), JSON, 400),
    ("request-id-number", _check(request_id=7), JSON, 400),
    ("request-id-empty", _check(request_id=""), JSON, 400),
    ("dry-run-string", _check(dry_run="true"), JSON, 400),
    ("dry-run-number", _check(dry_run=1), JSON, 400),
    ("dry-run-null", _check(dry_run=None), JSON, 400),
    # structure
    (
        "nested-objects-1000-deep",
        _check().replace(b"}", b', "x": ' + _nested_objects(1000).encode() + b"}"),
        JSON,
        400,
    ),
    (
        "nested-arrays-1000-deep",
        _check().replace(b'"tokens": 10', b'"tokens": ' + _nested(1000).encode()),
        JSON,
        400,
    ),
    ("nested-33-deep", _nested(33).encode(), JSON, 400),
    ("nested-arrays-10k-deep", _nested(10_000).encode(), JSON, 400),
    ("nested-100k-deep-over-the-size-cap", _nested(100_000).encode(), JSON, 400),
    (
        "duplicate-keys",
        b'{"user_id": "{user}", "model": "gpt-4o", "user_id": "someone-else"}',
        JSON,
        400,
    ),
    (
        "duplicate-tokens",
        b'{"user_id": "{user}", "model": "gpt-4o", "tokens": 10, "tokens": -5}',
        JSON,
        400,
    ),
    ("top-level-array", b'[{"user_id": "{user}", "model": "gpt-4o"}]', JSON, 400),
    ("top-level-string", b'"{user}"', JSON, 400),
    ("top-level-number", b"5", JSON, 400),
    ("top-level-null", b"null", JSON, 400),
    ("top-level-true", b"true", JSON, 400),
    # not JSON at all
    ("not-json", b"user_id={user}&model=gpt-4o", JSON, 400),
    ("truncated-json", b'{"user_id": "{user}", "model": ', JSON, 400),
    ("trailing-garbage", _check() + b"}", JSON, 400),
    ("single-quotes", b"{'user_id': '{user}', 'model': 'gpt-4o'}", JSON, 400),
    ("empty-body", b"", JSON, 400),
    ("only-white-space", b"  \n\t ", JSON, 400),
    ("invalid-utf-8", b'{"user_id": "\xff\xfe", "model": "gpt-4o"}', JSON, 400),
    ("utf-16", _check().decode().encode("utf-16"), JSON, 400),
    ("byte-order-mark", b"\xef\xbb\xbf" + _check(), JSON, 400),
    ("nul-bytes", b"\x00" * 64, JSON, 400),
    # size
    ("body-just-over-64-kb", _check(padding="p" * (64 * 1024)), JSON, 400),
    ("body-3-mb", _check(padding="p" * (3 * MB)), JSON, 400),
    # content type
    ("text-plain", _check(), "text/plain", 415),
    ("form-urlencoded", b"user_id={user}&model=gpt-4o", "application/x-www-form-urlencoded", 415),
    ("multipart", b"--x\r\n\r\n--x--\r\n", "multipart/form-data; boundary=x", 415),
    ("xml", b"<check user_id='{user}'/>", "application/xml", 415),
    ("no-content-type", _check(), None, 415),
    ("json-look-alike-type", _check(), "application/jsonp", 415),
]

USAGE_BODIES: list[tuple[str, dict[str, Any]]] = [
    ("input-negative", {"input_tokens": -1}),
    ("output-float", {"output_tokens": 2.5}),
    ("input-string", {"input_tokens": "3"}),
    ("output-huge", {"output_tokens": 10**20}),
    ("status-unknown", {"status": "done"}),
    ("status-null", {"status": None}),
    ("status-upper-case", {"status": "OK"}),
    ("missing-input", {"input_tokens": _MISSING}),
    ("missing-request-id", {"request_id": _MISSING}),
    ("request-id-control", {"request_id": "r\u0000"}),
]


def _remaining(server: Gunicorn, key: str, user: str) -> list[Any]:
    query = urlencode({"user_id": user, "model": "gpt-4o"})
    answer = server.call("GET", f"/api/v1/quota?{query}", key=key)
    assert answer.status == 200
    return [(item["scope"], item["metric"], item["remaining"]) for item in answer.json["limits"]]


def _assert_refused(answer: Answer, expected: int) -> None:
    assert answer.status == expected, answer.raw[:500]
    assert answer.header("Content-Type") == "application/json"
    body = answer.json
    assert isinstance(body, dict) and body


def test_there_are_at_least_forty_hostile_bodies():
    assert len(CHECK_BODIES) + len(USAGE_BODIES) >= 40
    assert len({name for name, *_ in CHECK_BODIES}) == len(CHECK_BODIES)


@pytest.mark.parametrize(
    ("raw", "content_type", "expected"),
    [case[1:] for case in CHECK_BODIES],
    ids=[case[0] for case in CHECK_BODIES],
)
def test_a_hostile_check_body_is_refused_and_counts_nothing(
    server, live_world, user, raw, content_type, expected
):
    before = _remaining(server, live_world.alice_key, user)

    answer = server.call(
        "POST",
        "/api/v1/check",
        raw=raw.replace(b"{user}", user.encode()),
        key=live_world.alice_key,
        content_type=content_type,
    )

    _assert_refused(answer, expected)
    assert _remaining(server, live_world.alice_key, user) == before
    assert before[0] == ("user_model", "requests", 5)


@pytest.mark.parametrize(
    "fields", [case[1] for case in USAGE_BODIES], ids=[case[0] for case in USAGE_BODIES]
)
def test_a_hostile_usage_body_is_refused_and_settles_nothing(server, live_world, user, fields):
    checked = server.call(
        "POST",
        "/api/v1/check",
        {"user_id": user, "model": "gpt-4o", "tokens": 100},
        key=live_world.alice_key,
    )
    request_id = checked.json["request_id"]
    body = {"request_id": request_id, "input_tokens": 1, "output_tokens": 2, **fields}
    body = {key: value for key, value in body.items() if value is not _MISSING}

    answer = server.call("POST", "/api/v1/usage", body, key=live_world.alice_key)

    _assert_refused(answer, 400)
    settled = server.call(
        "POST",
        "/api/v1/usage",
        {"request_id": request_id, "input_tokens": 1, "output_tokens": 2},
        key=live_world.alice_key,
    )
    assert settled.json["repeated"] is False


def test_the_server_never_logged_a_server_error(server):
    log = server.log_path.read_text(errors="replace")
    assert re.search(r'HTTP/1\.[01]" 5\d\d ', log) is None
    assert "Traceback" not in log
