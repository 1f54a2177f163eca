"""A redis-server of each test module's own, for tests that stop, freeze or empty it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from limits import engine
from tests.processes import RedisServer


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    if not RedisServer.available():
        pytest.skip("redis-server is not installed; these tests run a Redis server of their own")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(redis_server, settings) -> Iterator[RedisServer]:
    """This test's engine on the module's Redis server, running and answering; the test may
    stop, freeze or empty it, and the next test finds it running and thawed again."""
    redis_server.thaw()
    redis_server.start()
    settings.REDIS_URL = redis_server.url
    engine.reset_state()
    yield redis_server
    redis_server.thaw()
    engine.reset_state()
    redis_server.start()
