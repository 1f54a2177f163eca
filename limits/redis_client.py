"""The one place that turns ``REDIS_URL`` into a client: a plain Redis, or a Redis Cluster
when ``REDIS_CLUSTER`` is set.

With a cluster, ``REDIS_URL`` names any one node; redis-py's cluster client learns the
others from it, sends each command to the node that owns its keys' slot, and follows MOVED
and ASK redirections itself. Every key the platform writes carries a hash tag (``{t:<id>}``
per tenant, ``{g:<class>}`` per global capacity, ``{policy}``), so each script call and each
transaction touches one slot.
"""

from __future__ import annotations

from typing import Any

import redis
from django.conf import settings

Client = redis.Redis | redis.RedisCluster


def redis_client(url: str | None = None, **options: Any) -> Client:
    """A client for ``url`` (default ``REDIS_URL``) with redis-py's ``options``."""
    url = url or settings.REDIS_URL
    if settings.REDIS_CLUSTER:
        return redis.RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)
