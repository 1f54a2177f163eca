"""The check body's plain fast path returns exactly what the serializer would."""

from __future__ import annotations

import random
from typing import Any

import pytest
from rest_framework.exceptions import ValidationError

from limits.serializers import (
    MAX_TOKENS,
    CheckRequestSerializer,
    InputSerializer,
    plain_check_body,
)


def by_serializer(data: Any) -> dict[str, Any] | str:
    """The serializer's own answer: the validated dict, or its errors as text."""
    try:
        return InputSerializer.validated.__func__(CheckRequestSerializer, data)  # type: ignore[attr-defined]
    except ValidationError as error:
        return str(error.detail)


def answer(data: Any) -> dict[str, Any] | str:
    try:
        return CheckRequestSerializer.validated(data)
    except ValidationError as error:
        return str(error.detail)


PLAIN = [
    {"user_id": "u1", "model": "gpt-4o"},
    {"user_id": "u1", "model": "gpt-4o", "tokens": 120, "request_id": "r-1"},
    {"user_id": "alice smith", "model": "meta/llama-3@8b+x:1.0_a", "tokens": 0, "dry_run": True},
    {"user_id": "~!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}", "model": "m", "tokens": MAX_TOKENS},
    {"user_id": "x" * 200, "model": "a" * 200, "request_id": "R" * 200, "dry_run": False},
    {"dry_run": False, "request_id": "1", "tokens": 5, "model": "9", "user_id": "U"},
]

NOT_PLAIN = [
    {"user_id": "u1", "model": "GPT-4o"},  # folded by the serializer
    {"user_id": " u1", "model": "gpt-4o"},  # trimmed by the serializer
    {"user_id": "u1 ", "model": "gpt-4o"},
    {"user_id": "ｕ１", "model": "ｇｐｔ－４ｏ"},  # NFKC
    {"user_id": "zoë", "model": "gpt-4o"},
    {"user_id": "a\tb", "model": "gpt-4o"},
    {"user_id": "a\x1fb", "model": "gpt-4o"},
    {"user_id": "", "model": "gpt-4o"},
    {"user_id": "x" * 201, "model": "gpt-4o"},
    {"user_id": "u1", "model": "a" * 201},
    {"user_id": "u1", "model": "-gpt"},
    {"user_id": "u1", "model": "gpt 4o"},
    {"user_id": "u1", "model": "gpt-4o\n"},  # "$" would match before a final line break
    {"user_id": "u1\n", "model": "gpt-4o"},
    {"user_id": "u1", "model": "gpt-4o", "tokens": True},
    {"user_id": "u1", "model": "gpt-4o", "tokens": 1.0},
    {"user_id": "u1", "model": "gpt-4o", "tokens": "5"},
    {"user_id": "u1", "model": "gpt-4o", "tokens": -1},
    {"user_id": "u1", "model": "gpt-4o", "tokens": MAX_TOKENS + 1},
    {"user_id": "u1", "model": "gpt-4o", "tokens": None},
    {"user_id": "u1", "model": "gpt-4o", "dry_run": 1},
    {"user_id": "u1", "model": "gpt-4o", "dry_run": "true"},
    {"user_id": "u1", "model": "gpt-4o", "request_id": ""},
    {"user_id": "u1", "model": "gpt-4o", "request_id": None},
    {"user_id": "u1", "model": "gpt-4o", "request_id": 7},
    {"user_id": "u1", "model": "gpt-4o", "extra": 1},
    {"user_id": None, "model": "gpt-4o"},
    {"user_id": 5, "model": "gpt-4o"},
    {"model": "gpt-4o"},
    {"user_id": "u1"},
    {},
    [],
    None,
    "u1",
]


@pytest.mark.parametrize("data", PLAIN, ids=range(len(PLAIN)))
def test_a_plain_body_is_taken_as_the_serializer_takes_it(data: dict[str, Any]) -> None:
    fast = plain_check_body(data)

    assert fast is not None
    expected = by_serializer(data)
    assert fast == expected
    assert list(fast) == list(expected)  # the same fields in the same order
    assert answer(data) == expected


@pytest.mark.parametrize("data", NOT_PLAIN, ids=range(len(NOT_PLAIN)))
def test_any_other_body_goes_through_the_serializer(data: Any) -> None:
    assert plain_check_body(data) is None
    assert answer(data) == by_serializer(data)


def test_random_bodies_agree_with_the_serializer() -> None:
    rng = random.Random(20261129)
    pieces = ["a", "Z", "0", "-", " ", ".", "/", "@", ":", "_", "+", "é", "\t", "Ａ", "\x00", '"']

    def text() -> str:
        return "".join(rng.choice(pieces) for _ in range(rng.choice([0, 1, 2, 5, 199, 200, 201])))

    def value(kind: str) -> Any:
        if kind == "tokens":
            return rng.choice(
                [0, 1, 250, 4000, MAX_TOKENS, MAX_TOKENS + 1, -1, True, 2.0, "3", None]
            )
        if kind == "dry_run":
            return rng.choice([True, False, False, 0, "false", None])
        if kind == "model":
            return rng.choice([text(), "gpt-4o", "a/b@c:1.0", "A", " m", None, 3])
        return rng.choice([text(), text(), "u-1", "alice b", "x" * 200, " u", None, 3])

    taken = 0
    for _ in range(3000):
        fields = [
            f
            for f in ("user_id", "model", "tokens", "request_id", "dry_run")
            if rng.random() < 0.85
        ]
        data = {field: value(field) for field in fields}
        if rng.random() < 0.05:
            data["other"] = 1
        fast = plain_check_body(data)
        expected = by_serializer(data)
        if fast is not None:
            taken += 1
            assert fast == expected and list(fast) == list(expected), data
        assert answer(data) == expected, data
    assert taken > 30  # the fast path was exercised, not only the fallback
