"""API-key authentication for the check API, with verified keys cached in-process.

A warm check must cost no SQL: a key verified once is remembered for
``QUOTA_API_KEY_CACHE_SECONDS`` under a hash of the presented text (never the key
itself), so a revoked key stops working everywhere within that time. A malformed key or
one with a bad checksum is refused before any query.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework.authentication import BaseAuthentication
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.request import Request

from limits.apikeys import apikey_authenticate, apikey_parse

CACHE_MOST = 10_000


@dataclass(frozen=True)
class ApiClient:
    """Who is calling: one API key of one tenant (what request.user is on the API)."""

    key_id: int
    key_prefix: str
    tenant_id: int
    tenant_slug: str
    tier: str
    fail_mode: str

    is_authenticated = True
    is_anonymous = False


_cache: dict[bytes, tuple[float, ApiClient]] = {}
_cache_lock = threading.Lock()


def _digest(raw: str) -> bytes:
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).digest()


def api_client_for(raw: str) -> ApiClient | None:
    raw = raw.strip()
    digest = _digest(raw)
    now = time.monotonic()
    cached = _cache.get(digest)
    if cached is not None and cached[0] > now:
        return cached[1]  # this very text was verified a moment ago
    if apikey_parse(raw) is None:
        return None  # malformed or a wrong checksum: refused without a query
    api_key = apikey_authenticate(raw)
    if api_key is None:
        _cache.pop(digest, None)
        return None
    client = ApiClient(
        key_id=api_key.pk,
        key_prefix=api_key.prefix,
        tenant_id=api_key.tenant_id,
        tenant_slug=api_key.tenant.slug,
        tier=api_key.tenant.tier.name,
        fail_mode=api_key.tenant.tier.fail_mode,
    )
    with _cache_lock:
        if len(_cache) >= CACHE_MOST:
            _cache.clear()  # bounded: valid keys are few; a flood of them only costs SQL
        _cache[digest] = (now + settings.QUOTA_API_KEY_CACHE_SECONDS, client)
    return client


def api_client_cached(raw: str) -> ApiClient | None:
    """The client of a key verified moments ago, or None (never a query)."""
    cached = _cache.get(_digest(raw.strip()))
    if cached is not None and cached[0] > time.monotonic():
        return cached[1]
    return None


def api_client_cache_clear() -> None:
    _cache.clear()


class ApiKeyAuthentication(BaseAuthentication):
    """``Authorization: Bearer qk_…``; 401 for a missing, malformed, unknown or revoked key."""

    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[ApiClient, None] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise AuthenticationFailed("Send the API key as 'Authorization: Bearer <key>'.")
        client = api_client_for(credentials.strip())
        if client is None:
            raise AuthenticationFailed("The API key is not valid, or it was revoked.")
        return client, None

    def authenticate_header(self, request: Any) -> str:
        return 'Bearer realm="api"'


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    """How the OpenAPI document describes our keys."""

    target_class = "limits.authentication.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "qk_<prefix>_<secret>",
            "description": "An API key of the tenant, created in admin or by createapikey.",
        }
