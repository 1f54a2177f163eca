"""The Celery broker transport for Redis: kombu's, made to survive a broker restart.

When the worker loses its Redis connection, Celery's consumer first collects the broken
connection (which drops the kombu transport's link to its connection settings) and then
closes it. If a channel could not finish closing during the collect (Redis was still down
while a BRPOP was outstanding), the close tries again to put the channel's unacknowledged
messages back, and kombu's Redis channel, needing a new connection pool for that, reads the
settings that are gone: ``AttributeError: 'NoneType' object has no attribute 'hostname'``.
Celery's clean-up ignores only the transport's connection errors, so that AttributeError
ends the worker ("Unrecoverable error"), a few seconds after the restart, when messages
were delivered and not yet acknowledged at that moment.

This transport raises the connection error the clean-up expects instead. The consumer then
reconnects as it does for any broker error; the messages it could not put back stay in
kombu's unacknowledged set in Redis, which gives them back after the visibility timeout.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis


class BrokerConnectionClosed(redis.exceptions.ConnectionError):
    """A channel asked for a new Redis connection after its broker connection was closed."""


class RedisChannel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        # The transport, or its link to the connection settings, is gone once the
        # connection has been collected or closed.
        transport = self.connection
        if transport is None or transport.client is None:
            raise BrokerConnectionClosed("the broker connection is closed")
        return super()._connparams(asynchronous=asynchronous)


class RedisTransport(kombu_redis.Transport):
    Channel = RedisChannel
