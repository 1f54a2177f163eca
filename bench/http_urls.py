"""The HTTP benchmark's routes: the whole project, plus a baseline next to the check API.

``POST /bench/evalsha`` is the least a DRF endpoint in front of a Redis limiter can do:
the same middleware, JSON parser and renderer as ``/api/v1/check``, then one EVALSHA of a
one-line script, no authentication and no policy. ``POST /bench/check`` is the check API's
own view under another path: the WSGI front that answers known denials before Django
(limits/cached_denials.py) answers only the API's path, so Django answers this one. Both
live here, not in the product.
"""

from __future__ import annotations

import os
from typing import Any

import redis
from django.conf import settings
from django.urls import path
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from limits.views import CheckView
from quota_platform.urls import urlpatterns as project_urlpatterns

SCRIPT = "return redis.call('INCR', KEYS[1])"
_scripts: dict[int, Any] = {}


def _script() -> Any:
    """One client and script per process (workers fork after the app is loaded)."""
    found = _scripts.get(os.getpid())
    if found is None:
        client = redis.Redis.from_url(settings.REDIS_URL)
        found = _scripts[os.getpid()] = client.register_script(SCRIPT)
    return found


class EvalshaView(APIView):
    authentication_classes: list[Any] = []
    permission_classes: list[Any] = []

    def post(self, request: Request) -> Response:
        body = request.data
        count = _script()(keys=[f"{settings.QUOTA_KEY_PREFIX}:baseline"])
        return Response({"allowed": True, "count": count, "fields": len(body)})


# Next to the check API's routes, so that finding either costs the same patterns tried.
_api = next(
    index for index, pattern in enumerate(project_urlpatterns) if str(pattern.pattern) == "api/v1/"
)
urlpatterns = [
    *project_urlpatterns[:_api],
    path("bench/evalsha", EvalshaView.as_view(), name="bench-evalsha"),
    path("bench/check", CheckView.as_view(), name="bench-check"),
    *project_urlpatterns[_api:],
]
