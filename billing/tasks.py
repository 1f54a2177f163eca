"""Celery tasks of billing. Thin: each calls one service and returns JSON.

All are idempotent (a second run finds its work done), bounded, and retried with backoff
while Postgres or Redis is unreachable. They are late-acknowledged: a worker that dies
mid-task leaves it to run again rather than lose it.
"""

from __future__ import annotations

from typing import Any

import redis
from celery import shared_task
from django.db import DatabaseError

from billing import services
from billing.ingest import drain, user_rollups_fold
from billing.rollups import rollups_reconcile_recent

# A cluster client that cannot reach any node, or finds slots without a node, raises
# RedisClusterException, which is not a RedisError.
RETRIED = (redis.RedisError, redis.exceptions.RedisClusterException, DatabaseError)
COMMON: dict[str, Any] = {
    "autoretry_for": RETRIED,
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": True,
    "max_retries": 5,
    "acks_late": True,
    "ignore_result": True,
}


@shared_task(name="billing.tasks.drain_usage", soft_time_limit=20, time_limit=30, **COMMON)
def drain_usage_task(max_batches: int = 50) -> dict[str, Any]:
    """Move usage events from the limiter into Postgres (beat: every 5 s)."""
    return drain(max_batches=max_batches).as_dict()


@shared_task(name="billing.tasks.user_rollups", soft_time_limit=50, time_limit=58, **COMMON)
def user_rollups_task() -> dict[str, Any]:
    """Fold the events the drain wrote since the last fold into the top-user rollups (beat:
    every minute)."""
    return {"folded": user_rollups_fold()}


@shared_task(name="billing.tasks.rollup", soft_time_limit=240, time_limit=280, **COMMON)
def rollup_task(hours: int = 3) -> dict[str, Any]:
    """Check the rollups of the last hours against the raw events, repairing any
    difference, and mark them checked (beat: every 5 minutes)."""
    return rollups_reconcile_recent(hours=hours).as_dict()


@shared_task(name="billing.tasks.budget_alerts", soft_time_limit=50, time_limit=58, **COMMON)
def budget_alerts_task() -> dict[str, Any]:
    """Record and mail budget thresholds crossed in the current period (beat: every
    minute)."""
    alerts = services.budget_alerts_check()
    return {"recorded": [alert.pk for alert in alerts]}


@shared_task(
    name="billing.tasks.statements_finalise", soft_time_limit=600, time_limit=660, **COMMON
)
def statements_finalise_task() -> dict[str, Any]:
    """Finalise the last month's statements once its grace period is over (beat: hourly)."""
    statements = services.statements_finalise_due()
    return {"finalised": [statement.pk for statement in statements]}


@shared_task(name="billing.tasks.retention", soft_time_limit=600, time_limit=660, **COMMON)
def retention_task() -> dict[str, Any]:
    """Delete raw usage events past retention once rolled up (beat: hourly)."""
    return {"deleted": services.usage_retention_run()}
