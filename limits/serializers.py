"""Bodies of the check API, validated strictly: a wrong type is an error, never coerced."""

from __future__ import annotations

import re
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.settings import api_settings

from limits.identifiers import (
    MAX_IDENTIFIER_LENGTH,
    MODEL_ID,
    InvalidIdentifier,
    normalize_model_id,
    normalize_user_id,
)

MAX_TOKENS = 10_000_000
# What the OpenAPI document says of an id: not empty, and no control characters. The server
# also refuses other unprintable characters and normalises (NFKC, trimmed) before counting.
ID_SCHEMA = {
    "type": "string",
    "minLength": 1,
    "maxLength": 200,
    "pattern": r"^[^\u0000-\u001f\u007f-\u009f]*\S[^\u0000-\u001f\u007f-\u009f]*$",
}


class StrictIntegerField(serializers.IntegerField):
    """An integer in JSON: ``"5"``, ``5.0`` and ``true`` are refused, not converted."""

    default_error_messages = {"invalid": "A whole number is required (not a string or a float)."}

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    default_error_messages = {"invalid": "Must be true or false."}

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


@extend_schema_field(ID_SCHEMA)
class IdentifierField(serializers.CharField):
    """An id a caller sends: a JSON string, normalised as the admin normalises it."""

    default_error_messages = {"invalid": "A string is required."}

    def __init__(self, normalize: Any, **kwargs: Any) -> None:
        self.normalize = normalize
        kwargs.setdefault("max_length", MAX_IDENTIFIER_LENGTH)
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        if len(data) > 1000:  # refuse before normalising a huge text
            self.fail("max_length", max_length=self.max_length)
        try:
            value = self.normalize(data)
        except InvalidIdentifier as error:
            raise serializers.ValidationError(f"This id {error}.") from error
        return str(super().to_internal_value(value))


def _request_id(value: str) -> str:
    return normalize_user_id(value)


class InputSerializer(serializers.Serializer):
    """A request body or query, validated by one shared instance per class.

    ``Serializer(data=...)`` deep-copies every declared field for each request; on the check
    path that copying cost more than the validation itself. These fields keep no state
    between calls, so one bound instance validates every request, in any thread, with the
    same errors as ``is_valid(raise_exception=True)``.
    """

    @classmethod
    def validated(cls, data: Any) -> dict[str, Any]:
        shared = cls.__dict__.get("_shared")
        if shared is None:
            shared = cls()
            shared.fields  # noqa: B018 - binds the fields once, before any concurrent use
            cls._shared = shared
        try:
            return dict(shared.run_validation(data))
        except serializers.ValidationError as error:
            detail = error.detail
            if isinstance(detail, list):  # the body was JSON null
                detail = {api_settings.NON_FIELD_ERRORS_KEY: ["No data provided"]}
            raise serializers.ValidationError(detail) from None


# A check body as clients nearly always send it: ids in printable ASCII with no space at
# either end, a model id already in its folded form, a plain integer and boolean. Every
# field of such a body passes CheckRequestSerializer unchanged (NFKC, trimming and case
# folding leave these characters as they are), so it is taken as it is; anything else,
# including whatever would be refused, goes through the serializer.
_PLAIN_ID = re.compile(r"[!-~](?:[ -~]*[!-~])?")
_CHECK_FIELDS = frozenset({"user_id", "model", "tokens", "request_id", "dry_run"})


def plain_check_body(data: Any) -> dict[str, Any] | None:
    """What ``CheckRequestSerializer.validated(data)`` returns, for a plain body (above);
    None for any other, which the serializer then decides."""
    if type(data) is not dict or not data.keys() <= _CHECK_FIELDS:
        return None
    user_id, model = data.get("user_id"), data.get("model")
    tokens, dry_run = data.get("tokens", 0), data.get("dry_run", False)
    if (
        type(user_id) is not str
        or type(model) is not str
        or type(tokens) is not int
        or type(dry_run) is not bool
        or not 0 <= tokens <= MAX_TOKENS
        or len(user_id) > MAX_IDENTIFIER_LENGTH
        or len(model) > MAX_IDENTIFIER_LENGTH
        or not _PLAIN_ID.fullmatch(user_id)
        or not MODEL_ID.fullmatch(model)
    ):
        return None
    valid: dict[str, Any] = {"user_id": user_id, "model": model, "tokens": tokens}
    if "request_id" in data:
        request_id = data["request_id"]
        if (
            type(request_id) is not str
            or len(request_id) > MAX_IDENTIFIER_LENGTH
            or not _PLAIN_ID.fullmatch(request_id)
        ):
            return None
        valid["request_id"] = request_id
    valid["dry_run"] = dry_run
    return valid


class CheckRequestSerializer(InputSerializer):
    """Validated on every check: a plain body (``plain_check_body``) skips DRF's field
    machinery, which cost about 50 µs a check (docs/engine.md, "Over-limit cache")."""

    @classmethod
    def validated(cls, data: Any) -> dict[str, Any]:
        plain = plain_check_body(data)
        return plain if plain is not None else super().validated(data)

    user_id = IdentifierField(normalize_user_id, help_text="The end user (1-200 characters).")
    model = IdentifierField(normalize_model_id, help_text="A model id the platform knows.")
    tokens = StrictIntegerField(
        min_value=0, max_value=MAX_TOKENS, default=0, help_text="Estimated tokens."
    )
    request_id = IdentifierField(
        _request_id, required=False, help_text="Idempotency key; generated when absent."
    )
    dry_run = StrictBooleanField(default=False, help_text="Decide without consuming.")


class UsageRequestSerializer(InputSerializer):
    request_id = IdentifierField(_request_id, help_text="The request id of an allowed check.")
    input_tokens = StrictIntegerField(min_value=0, max_value=MAX_TOKENS)
    output_tokens = StrictIntegerField(min_value=0, max_value=MAX_TOKENS)
    status = serializers.ChoiceField(choices=["ok", "error", "cancelled"], default="ok")


class QuotaQuerySerializer(InputSerializer):
    user_id = IdentifierField(normalize_user_id)
    model = IdentifierField(normalize_model_id)


# -- answers: their shape for the OpenAPI document (the views build them as plain dicts) --
@extend_schema_field(
    {
        "oneOf": [
            {"type": "integer", "minimum": 1},
            {"type": "string", "enum": ["day", "month"]},
        ],
        "nullable": True,
    }
)
class WindowField(serializers.Field):
    """Seconds for a sliding window, the period for a budget, null for concurrency."""


SCOPES = ["user_model", "user", "tenant_model", "tenant", "global", "budget"]
METRICS = ["requests", "tokens", "concurrency", "cost"]


class LimitSerializer(serializers.Serializer):
    scope = serializers.ChoiceField(choices=SCOPES)
    metric = serializers.ChoiceField(choices=METRICS, help_text="cost: money, for budgets.")
    window = WindowField(help_text="Seconds; 'day' or 'month' for budgets; null for concurrency.")
    limit = serializers.FloatField(min_value=0)
    remaining = serializers.FloatField(min_value=0)
    reset = serializers.FloatField(
        min_value=0,
        help_text="Seconds until the oldest counted use leaves (budgets: until the period ends).",
    )


class DeniedBySerializer(serializers.Serializer):
    scope = serializers.ChoiceField(choices=SCOPES)
    metric = serializers.ChoiceField(choices=METRICS)
    window = WindowField()
    limit = serializers.FloatField(min_value=0)


class CheckAnswerSerializer(serializers.Serializer):
    allowed = serializers.BooleanField()
    request_id = serializers.CharField(help_text="The one sent, or a generated one.")
    policy_version = serializers.IntegerField(min_value=0)
    denied_by = DeniedBySerializer(allow_null=True, help_text="The limit that denied; or null.")
    retry_after = serializers.FloatField(
        min_value=0,
        allow_null=True,
        help_text="Seconds until it may pass; null when allowed or when it never can.",
    )
    limits = LimitSerializer(many=True)
    degraded = serializers.BooleanField(
        help_text="Answered by the tier's fail mode because the shared counters were unreachable."
    )


class UsageAnswerSerializer(serializers.Serializer):
    request_id = serializers.CharField()
    input_tokens = serializers.IntegerField(min_value=0)
    output_tokens = serializers.IntegerField(min_value=0)
    status = serializers.ChoiceField(choices=["ok", "error", "cancelled"])
    repeated = serializers.BooleanField(help_text="Reported before: the first report stands.")


class UsageDeferredAnswerSerializer(serializers.Serializer):
    request_id = serializers.CharField()
    input_tokens = serializers.IntegerField(min_value=0)
    output_tokens = serializers.IntegerField(min_value=0)
    status = serializers.ChoiceField(choices=["ok", "error", "cancelled"])
    repeated = serializers.BooleanField(
        help_text="Reported before while the store was away: the first report stands."
    )
    deferred = serializers.BooleanField(
        help_text="Always true: kept, and applied when the limiter's store is back."
    )
    detail = serializers.CharField()


class QuotaAnswerSerializer(serializers.Serializer):
    policy_version = serializers.IntegerField(min_value=0)
    limits = LimitSerializer(many=True)


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()


FIELD_ERRORS_SCHEMA = {
    "type": "object",
    "description": "Messages by field (non_field_errors for the body as a whole), or a detail.",
    "additionalProperties": {
        "oneOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}]
    },
    "minProperties": 1,
}
