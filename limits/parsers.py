"""A JSON parser that answers 400, never 500, to whatever a client sends."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import BaseParser

MAX_DEPTH = 32


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: with ``{"user_id": "a", "user_id": "b"}``
    two readers of the same body could disagree on whom it is about."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"the key {key[:50]!r} appears more than once")
            seen.add(key)
    return value


def _too_deep(text: str) -> bool:
    """True when brackets nest deeper than MAX_DEPTH (strings are skipped)."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return False  # the usual body: too few brackets to nest that deep, no scan needed
    depth = 0
    in_string = escaped = False
    for character in text:
        if in_string:
            if escaped:
                escaped = False
            elif character == "\\":
                escaped = True
            elif character == '"':
                in_string = False
        elif character == '"':
            in_string = True
        elif character in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif character in "]}":
            depth -= 1
    return False


def _drain(stream: Any, most: int = 16 * 1024 * 1024) -> None:
    """Read what is left of an oversized body (up to a bound) so the client, still
    sending, gets our 400 instead of a reset connection."""
    left = most
    while left > 0:
        chunk = stream.read(min(65536, left))
        if not chunk:
            return
        left -= len(chunk)


def json_from_body(raw: bytes) -> Any:
    """The JSON value of a body within the size cap; ParseError naming what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ParseError("The body is not UTF-8 text.") from error
    if _too_deep(text):
        raise ParseError(f"The JSON nests deeper than {MAX_DEPTH} levels.")
    try:
        return json.loads(text, parse_constant=_constant, object_pairs_hook=_object)
    except (ValueError, RecursionError) as error:
        raise ParseError(f"The body is not valid JSON: {error}") from error


class BoundedJSONParser(BaseParser):
    """Stock DRF parsing with a size cap, a depth cap, no NaN or Infinity and no repeated keys.

    Python's json module raises RecursionError (not ValueError) on deep nesting, which
    DRF's parser would let through as a 500; the depth is checked before parsing. Not a
    JSONParser subclass on purpose: DRF reads the whole body of those through Django's
    ``request.body``, whose own size check answers an HTML page, not our JSON 400.
    """

    media_type = "application/json"

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        limit = settings.QUOTA_API_MAX_BODY_BYTES
        raw = stream.read(limit + 1) if stream is not None else b""
        if len(raw) > limit:
            _drain(stream)
            raise ParseError(f"The body is larger than {limit} bytes.")
        return json_from_body(raw)
