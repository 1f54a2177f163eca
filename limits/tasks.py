"""Celery tasks of the limiter. Thin: each calls one service and returns JSON."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import redis
from celery import shared_task

from limits.policystore import policy_reconcile


@shared_task(
    name="limits.tasks.policy_reconcile",
    autoretry_for=(redis.RedisError,),
    retry_backoff=1,
    retry_backoff_max=8,
    retry_jitter=True,
    max_retries=3,
    # Beat runs it every 10 s: a run stuck longer than that is only in the next one's way.
    soft_time_limit=8,
    time_limit=10,
    ignore_result=True,
)
def policy_reconcile_task() -> dict[str, Any]:
    """Put the latest policy version from Postgres back into Redis if Redis lost it.

    Safe to run any number of times, from beat or by hand; retried with backoff while
    Redis is unreachable.
    """
    return asdict(policy_reconcile())
