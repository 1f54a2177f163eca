"""Prometheus metrics of the limiter.

Each process counts its own; under several gunicorn workers the exporter aggregates them
through ``PROMETHEUS_MULTIPROC_DIR`` when it is set.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DECISIONS = Counter(
    "quota_decisions_total",
    "Checks decided, by tier, model class and outcome (allowed, denied).",
    ["tier", "model_class", "outcome"],
)
DEGRADED = Counter(
    "quota_degraded_decisions_total",
    "Checks answered without Redis, by the fail mode that answered them.",
    ["fail_mode"],
)
REDIS_ERRORS = Counter(
    "quota_redis_errors_total",
    "Limiter calls to Redis that failed or timed out, by error.",
    ["error"],
)
SHADOW_DENIED = Counter(
    "quota_shadow_denied_total",
    "Checks that a shadow rule would have denied.",
    ["tier", "model_class"],
)
OVER_LIMIT_CACHE = Counter(
    "quota_over_limit_cache_total",
    "Checks that met a request window this process knew to be full: answered from the "
    "over-limit cache (answered: denied, or a repeated request id's first decision), or "
    "sent to the full check because the window had moved on or a user of the tenant was "
    "reset (stale).",
    ["outcome"],
)
CHECK_SECONDS = Histogram(
    "quota_check_seconds",
    "Time to decide one check, in the engine.",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
DEFERRED_USAGE_REPORTS = Counter(
    "quota_deferred_usage_reports_total",
    "Usage reports kept in Postgres while Redis was unreachable (deferred), and what became "
    "of them: applied, unknown (the check's record was lost with Redis), still_unavailable "
    "(a run that found Redis still away and left them for the next); lost_answer: "
    "cancellations kept for checks whose answers were lost, and cancelled: those that "
    "settled a check Redis had admitted.",
    ["outcome"],
)
USAGE_BACKLOG = Gauge(
    "quota_usage_backlog_events",
    "Usage events waiting in Redis streams to be drained to Postgres.",
    multiprocess_mode="max",
)

DEFERRED_USAGE_WAITING = Gauge(
    "quota_deferred_usage_reports_waiting",
    "Usage reports kept in Postgres while Redis was away, not yet applied.",
    # Measured in Postgres at scrape time: the latest measurement of any worker is the count.
    multiprocess_mode="mostrecent",
)


def backlog_refresh() -> None:
    """Measure the backlog now (at scrape time): the length of every tenant's stream."""
    from limits import engine

    store = engine.policy_store()
    tenants = list(store.current().tenants)
    if store.redis is None:
        USAGE_BACKLOG.set(sum(1 for _ in engine.local_backend().events))
        return
    try:
        pipe = store.redis.pipeline(transaction=False)
        for tenant_id in tenants:
            pipe.xlen(f"{engine.tenant_tag(int(tenant_id))}:events")
        USAGE_BACKLOG.set(sum(pipe.execute()))
    except Exception:  # a scrape must not fail because Redis is away; the error metric says it
        return


def deferred_refresh() -> None:
    """Count the kept usage reports now (at scrape time). The task that applies them runs in
    Celery, which exports no metrics, so this is what shows them from the web."""
    from limits.models import DeferredUsageReport

    try:
        DEFERRED_USAGE_WAITING.set(DeferredUsageReport.objects.count())
    except Exception:  # a scrape must not fail because Postgres is away; /readyz says it
        return
