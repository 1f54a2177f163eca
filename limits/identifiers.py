"""Normalisation of the ids that callers send.

Model ids and tenant slugs are folded so that look-alike spellings cannot open a second
quota: Unicode NFKC (full-width ``ｇｐｔ－４ｏ`` becomes ``gpt-4o``), surrounding white space
trimmed, then case-folded (``GPT-4o`` and ``gpt-4o`` are one model). End-user ids get NFKC
and trimming but keep their case, because callers' user ids are often case-sensitive.
Control characters and inner white space are refused everywhere.
"""

from __future__ import annotations

import re
import unicodedata

MAX_IDENTIFIER_LENGTH = 200

_SLUG = re.compile(r"^[a-z0-9](?:[a-z0-9_-]*[a-z0-9])?$")
MODEL_ID = re.compile(r"^[a-z0-9][a-z0-9._:/@+-]*$")  # a folded model id


class InvalidIdentifier(ValueError):
    """The id cannot be used; the message says why in plain words."""


def _fold(value: str) -> str:
    return unicodedata.normalize("NFKC", value).strip()


def _check_printable(value: str) -> None:
    if not value:
        raise InvalidIdentifier("must not be empty")
    if len(value) > MAX_IDENTIFIER_LENGTH:
        raise InvalidIdentifier(f"must be at most {MAX_IDENTIFIER_LENGTH} characters")
    if any(not character.isprintable() for character in value):
        raise InvalidIdentifier("must contain only printable characters")


def normalize_user_id(value: str) -> str:
    folded = _fold(value)
    _check_printable(folded)
    return folded


def normalize_model_id(value: str) -> str:
    folded = _fold(value).casefold()
    _check_printable(folded)
    if not MODEL_ID.match(folded):
        raise InvalidIdentifier(
            "may contain only letters, digits and . _ : / @ + -, starting with a letter or digit"
        )
    return folded


def normalize_slug(value: str) -> str:
    folded = _fold(value).casefold()
    _check_printable(folded)
    if len(folded) > 64:
        raise InvalidIdentifier("must be at most 64 characters")
    if not _SLUG.match(folded):
        raise InvalidIdentifier(
            "may contain only letters, digits, - and _, starting and ending with a letter or digit"
        )
    return folded
