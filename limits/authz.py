"""``/api/v1/authz``: the check, asked by a gateway before it forwards a request.

For nginx ``auth_request`` and Envoy ``ext_authz`` (HTTP service). The gateway sends the
client's ``Authorization: Bearer qk_…`` and sets ``X-Quota-User``, ``X-Quota-Model`` and
``X-Quota-Tokens`` (estimated tokens, default 0); any method and any path below
``/api/v1/authz/`` are accepted, because Envoy appends the original path and keeps the
original method. The body is never read.

- allowed: ``200``, empty, with the rate-limit headers (``RateLimit-Policy``, ``RateLimit``,
  ``x-ratelimit-*``) for the gateway to hand on, and ``X-Quota-Request-Id`` for the
  upstream, which may report actual usage to ``/api/v1/usage`` with it;
- denied: ``429`` with the check API's JSON body and headers, ``Retry-After`` included.
  Envoy passes both to the client. nginx understands only 2xx, 401 and 403 from an auth
  subrequest (anything else becomes a 500), so with ``?for=nginx`` a denial is ``403``
  and the body also travels in the ``X-Quota-Decision`` header, which the nginx example
  turns back into a ``429`` with that body;
- a missing, unknown or revoked key: ``401``;
- a missing or malformed header, an unknown model: ``400`` (``403`` for nginx, with
  ``X-Quota-Status: 400`` and the message in ``X-Quota-Error``).

``X-Quota-Request-Id`` sent by the gateway is used as the check's idempotency key (nginx:
``$request_id``), so a gateway's retry of the same request is not counted twice.
"""

from __future__ import annotations

import json
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from limits import engine
from limits.authentication import api_client_for
from limits.headers import ratelimit_headers
from limits.identifiers import InvalidIdentifier, normalize_model_id, normalize_user_id
from limits.middleware import MAX_TOKENS, REQUEST_ID_HEADER


class _Refused(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body)
        self.status = status
        self.body = body


def _header(request: HttpRequest, name: str) -> str:
    value = request.headers.get(name, "").strip()
    if not value:
        raise _Refused(400, {"detail": f"The gateway must send the {name} header."})
    return value


def _ask(request: HttpRequest) -> tuple[engine.Decision, dict[str, str]]:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    client = None
    if scheme.lower() == "bearer" and credentials.strip():
        client = api_client_for(credentials.strip())
    if client is None:
        raise _Refused(401, {"detail": "Send a valid API key as 'Authorization: Bearer <key>'."})
    try:
        user_id = normalize_user_id(_header(request, "X-Quota-User"))
        model = normalize_model_id(_header(request, "X-Quota-Model"))
        request_id = request.headers.get(REQUEST_ID_HEADER)
        request_id = normalize_user_id(request_id) if request_id else None
    except InvalidIdentifier as error:
        raise _Refused(400, {"detail": f"An id sent by the gateway {error}."}) from None
    tokens_text = request.headers.get("X-Quota-Tokens", "0").strip() or "0"
    if not tokens_text.isdigit() or int(tokens_text) > MAX_TOKENS:
        raise _Refused(
            400, {"detail": f"X-Quota-Tokens must be a whole number from 0 to {MAX_TOKENS}."}
        )
    try:
        decision = engine.check(
            client.tenant_id,
            user_id,
            model,
            tokens=int(tokens_text),
            request_id=request_id,
            api_key_id=client.key_id,
            fail_mode=client.fail_mode,
        )
    except engine.UnknownModel:
        raise _Refused(400, {"model": [f"Unknown model {model!r}."]}) from None
    except engine.UnknownTenant:
        raise _Refused(403, {"detail": "This key's tenant is not active."}) from None
    headers = ratelimit_headers(decision)
    headers[REQUEST_ID_HEADER] = decision.request_id
    return decision, headers


@csrf_exempt
def authz(request: HttpRequest, forwarded_path: str = "") -> HttpResponse:
    from limits.views import decision_json

    for_nginx = request.GET.get("for") == "nginx"
    try:
        decision, headers = _ask(request)
    except _Refused as refused:
        response = JsonResponse(refused.body, status=refused.status)
        if refused.status == 401:
            response["WWW-Authenticate"] = 'Bearer realm="api"'
        elif for_nginx and refused.status == 400:
            response.status_code = 403
            response["X-Quota-Status"] = "400"
            response["X-Quota-Error"] = json.dumps(refused.body)
        return response
    answer: HttpResponse
    if decision.allowed:
        answer = HttpResponse(status=200)
    else:
        body = decision_json(decision)
        answer = JsonResponse(body, status=403 if for_nginx else 429)
        if for_nginx:
            answer["X-Quota-Status"] = "429"
            answer["X-Quota-Decision"] = json.dumps(body, separators=(",", ":"))
    for name, value in headers.items():
        answer[name] = value
    return answer
