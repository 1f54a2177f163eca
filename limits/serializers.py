"""Bodies of the check API, validated strictly: a wrong type is an error, never coerced."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from limits.identifiers import InvalidIdentifier, normalize_model_id, normalize_user_id

MAX_TOKENS = 10_000_000


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


class IdentifierField(serializers.CharField):
    """An id a caller sends: a JSON string, normalised as the admin normalises it."""

    default_error_messages = {"invalid": "A string is required."}

    def __init__(self, normalize: Any, **kwargs: Any) -> None:
        self.normalize = normalize
        kwargs.setdefault("max_length", 200)
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


class CheckRequestSerializer(serializers.Serializer):
    user_id = IdentifierField(normalize_user_id, help_text="The end user (1-200 characters).")
    model = IdentifierField(normalize_model_id, help_text="A model id the platform knows.")
    tokens = StrictIntegerField(
        min_value=0, max_value=MAX_TOKENS, default=0, help_text="Estimated tokens."
    )
    request_id = IdentifierField(
        _request_id, required=False, help_text="Idempotency key; generated when absent."
    )
    dry_run = StrictBooleanField(default=False, help_text="Decide without consuming.")


class UsageRequestSerializer(serializers.Serializer):
    request_id = IdentifierField(_request_id, help_text="The request id of an allowed check.")
    input_tokens = StrictIntegerField(min_value=0, max_value=MAX_TOKENS)
    output_tokens = StrictIntegerField(min_value=0, max_value=MAX_TOKENS)
    status = serializers.ChoiceField(choices=["ok", "error", "cancelled"], default="ok")


class QuotaQuerySerializer(serializers.Serializer):
    user_id = IdentifierField(normalize_user_id)
    model = IdentifierField(normalize_model_id)


# -- answers (for the schema, and to keep their shape in one place) --------------------
class LimitSerializer(serializers.Serializer):
    scope = serializers.CharField()
    metric = serializers.CharField()
    window = serializers.JSONField(
        help_text="Seconds; 'day'/'month' for budgets; null for concurrency."
    )
    limit = serializers.FloatField()
    remaining = serializers.FloatField()
    reset = serializers.FloatField(help_text="Seconds until the oldest counted use leaves.")


class DeniedBySerializer(serializers.Serializer):
    scope = serializers.CharField()
    metric = serializers.CharField()
    window = serializers.JSONField()
    limit = serializers.FloatField()


class CheckAnswerSerializer(serializers.Serializer):
    allowed = serializers.BooleanField()
    request_id = serializers.CharField()
    policy_version = serializers.IntegerField()
    denied_by = DeniedBySerializer(allow_null=True)
    retry_after = serializers.FloatField(allow_null=True)
    limits = LimitSerializer(many=True)
    degraded = serializers.BooleanField()


class UsageAnswerSerializer(serializers.Serializer):
    request_id = serializers.CharField()
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    status = serializers.CharField()
    repeated = serializers.BooleanField(help_text="Reported before: the first report stands.")


class QuotaAnswerSerializer(serializers.Serializer):
    policy_version = serializers.IntegerField()
    limits = LimitSerializer(many=True)
