"""The check API: thin views over the engine."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import APIException, NotFound, ValidationError
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView, exception_handler

from limits import engine
from limits.authentication import ApiKeyAuthentication
from limits.headers import ratelimit_headers
from limits.serializers import (
    FIELD_ERRORS_SCHEMA,
    CheckAnswerSerializer,
    CheckRequestSerializer,
    ErrorSerializer,
    QuotaAnswerSerializer,
    QuotaQuerySerializer,
    UsageAnswerSerializer,
    UsageDeferredAnswerSerializer,
    UsageRequestSerializer,
)
from limits.usage import usage_report

logger = logging.getLogger(__name__)


DEFERRED_DETAIL = (
    "The limiter's store is unreachable: the report is kept and will be applied when it is "
    "back. Nothing to do; a report sent again changes nothing."
)


class ServiceUnavailable(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    # Only a usage report that neither Redis nor Postgres could take comes here.
    default_detail = "Neither the limiter's store nor the database could take the report."
    default_code = "unavailable"


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler, plus the engine's lookups as the client errors they are."""
    if isinstance(exc, engine.UnknownModel):
        exc = ValidationError({"model": [f"Unknown model {exc.args[0]!r}."]})
    elif isinstance(exc, engine.UnknownTenant):
        exc = NotFound("This key's tenant is not active.")
    elif isinstance(exc, engine.EngineUnavailable):
        exc = ServiceUnavailable()
    return exception_handler(exc, context)


def _number(value: int | Decimal) -> int | float:
    return float(value) if isinstance(value, Decimal) else value


def _limit_json(state: engine.LimitState) -> dict[str, Any]:
    return {
        "scope": state.scope,
        "metric": state.metric,
        "window": state.window,
        "limit": _number(state.limit),
        "remaining": _number(state.remaining),
        "reset": round(state.reset, 3),
    }


def decision_json(decision: engine.Decision) -> dict[str, Any]:
    denied = decision.denied_by
    return {
        "allowed": decision.allowed,
        "request_id": decision.request_id,
        "policy_version": decision.policy_version,
        "denied_by": None
        if denied is None
        else {
            "scope": denied.scope,
            "metric": denied.metric,
            "window": denied.window,
            "limit": _number(denied.limit),
        },
        "retry_after": None if decision.retry_after is None else round(decision.retry_after, 3),
        "limits": [_limit_json(state) for state in decision.limits],
        "degraded": decision.degraded,
    }


def _answers(ok: OpenApiResponse, **details: str) -> dict[int, OpenApiResponse]:
    """The documented answers of an endpoint: ``ok`` for 200, errors with their bodies."""
    answers = {
        200: ok,
        400: OpenApiResponse(FIELD_ERRORS_SCHEMA, details.pop("bad", "Invalid input.")),
        401: OpenApiResponse(ErrorSerializer, "Missing, malformed, unknown or revoked key."),
        404: OpenApiResponse(
            ErrorSerializer, details.pop("missing", "The key's tenant is not active.")
        ),
        405: OpenApiResponse(ErrorSerializer, "Method not allowed."),
        415: OpenApiResponse(ErrorSerializer, "The body is not application/json."),
    }
    unavailable = details.pop("unavailable", None)
    if unavailable:
        answers[503] = OpenApiResponse(ErrorSerializer, unavailable)
    return answers


class JsonOnly(DefaultContentNegotiation):
    """The API answers JSON whatever the Accept header says, without parsing it."""

    def select_renderer(
        self, request: Request, renderers: list[Any], format_suffix: str | None = None
    ) -> tuple[Any, str]:
        return renderers[0], renderers[0].media_type


class ApiView(APIView):
    authentication_classes = [ApiKeyAuthentication]
    permission_classes = [IsAuthenticated]
    content_negotiation_class = JsonOnly


class CheckView(ApiView):
    @extend_schema(
        request=CheckRequestSerializer,
        responses=_answers(
            OpenApiResponse(CheckAnswerSerializer, "Allowed or denied: read `allowed`."),
            bad="Invalid body, or an unknown model.",
        ),
        summary="Ask before an inference",
    )
    def post(self, request: Request) -> Response:
        data = CheckRequestSerializer.validated(request.data)
        client = request.user
        decision = engine.check(
            client.tenant_id,
            data["user_id"],
            data["model"],
            tokens=data["tokens"],
            request_id=data.get("request_id"),
            dry_run=data["dry_run"],
            api_key_id=client.key_id,
            fail_mode=client.fail_mode,
        )
        return Response(decision_json(decision), headers=ratelimit_headers(decision))


class UsageView(ApiView):
    @extend_schema(
        request=UsageRequestSerializer,
        responses={
            **_answers(
                OpenApiResponse(UsageAnswerSerializer, "Settled now, or before (`repeated`)."),
                bad="Invalid body.",
                missing="No allowed check of this key's tenant has this request id.",
                unavailable="Neither the limiter's store nor the database can take the "
                "report: send it again shortly.",
            ),
            202: OpenApiResponse(
                UsageDeferredAnswerSerializer,
                "The limiter's store is unreachable: the report is kept and applied when it "
                "is back (`deferred`). Do not report again.",
            ),
        },
        summary="Report what an inference really used",
    )
    def post(self, request: Request) -> Response:
        data = UsageRequestSerializer.validated(request.data)
        outcome = usage_report(
            tenant_id=request.user.tenant_id,
            request_id=data["request_id"],
            input_tokens=data["input_tokens"],
            output_tokens=data["output_tokens"],
            status=data["status"],
        )
        if outcome is None:
            raise NotFound("No allowed check with this request_id.")
        answer = {
            "request_id": outcome.request_id,
            "input_tokens": outcome.input_tokens,
            "output_tokens": outcome.output_tokens,
            "status": outcome.status,
            "repeated": outcome.repeated,
        }
        if outcome.deferred:
            answer |= {"deferred": True, "detail": DEFERRED_DETAIL}
            return Response(answer, status=status.HTTP_202_ACCEPTED)
        return Response(answer)


class QuotaView(ApiView):
    @extend_schema(
        parameters=[QuotaQuerySerializer],
        responses=_answers(
            OpenApiResponse(QuotaAnswerSerializer, "Where the user stands on every limit."),
            bad="Invalid query, or an unknown model.",
        ),
        summary="Where a user stands, consuming nothing",
    )
    def get(self, request: Request) -> Response:
        data = QuotaQuerySerializer.validated(request.query_params.dict())
        decision = engine.quota(request.user.tenant_id, data["user_id"], data["model"])
        return Response(
            {
                "policy_version": decision.policy_version,
                "limits": [_limit_json(state) for state in decision.limits],
            },
            headers=ratelimit_headers(decision),
        )
