"""Health, readiness and metrics endpoints for load balancers and Prometheus."""

from __future__ import annotations

import os

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """The process is up and answering."""
    return JsonResponse({"status": "ok"})


@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    """Ready to decide checks: Postgres and Redis reachable, a policy loaded."""
    from limits import engine

    checks: dict[str, str] = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as error:  # any failure means not ready; say which
        checks["database"] = f"unreachable: {type(error).__name__}"
    store = engine.policy_store()
    if settings.REDIS_URL:
        try:
            if store.redis is None:
                raise RuntimeError("no client")
            store.redis.ping()
            checks["redis"] = "ok"
        except Exception as error:
            checks["redis"] = f"unreachable: {type(error).__name__}"
    try:
        policy = store.current()
        checks["policy"] = f"version {policy.version}" if policy.version else "none loaded"
    except Exception as error:
        checks["policy"] = f"unavailable: {type(error).__name__}"
    ready = all(
        value == "ok" or (name == "policy" and value.startswith("version "))
        for name, value in checks.items()
    )
    return JsonResponse({"ready": ready, "checks": checks}, status=200 if ready else 503)


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text format; across gunicorn workers when PROMETHEUS_MULTIPROC_DIR is set."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

    from limits import metrics as limiter_metrics

    limiter_metrics.backlog_refresh()
    limiter_metrics.deferred_refresh()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
