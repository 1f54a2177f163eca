"""Celery tasks of the limiter. Thin: each calls one service and returns JSON."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import redis
from celery import shared_task
from django.db import DatabaseError

from limits.policystore import policy_reconcile
from limits.usage import deferred_usage_apply


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


@shared_task(
    name="limits.tasks.deferred_usage_apply",
    # Redis being away is the normal case for this task and the service handles it (the
    # reports wait for the next run); these are the failures of Postgres, or of Redis
    # outside the limiter's own calls.
    autoretry_for=(DatabaseError, redis.RedisError),
    retry_backoff=1,
    retry_backoff_max=8,
    retry_jitter=True,
    max_retries=3,
    acks_late=True,
    # Beat runs it every 5 s; a full run (10 batches of 100) takes about a second.
    soft_time_limit=8,
    time_limit=10,
    ignore_result=True,
)
def deferred_usage_apply_task(max_batches: int = 10) -> dict[str, Any]:
    """Apply the usage reports kept while Redis was unreachable, oldest first.

    Safe to run any number of times, from beat or by hand: an applied report is deleted,
    and one applied twice is a repeat that changes nothing.
    """
    return deferred_usage_apply(max_batches=max_batches).as_dict()
