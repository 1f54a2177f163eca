"""The Celery broker transport (quota_platform/broker.py): a worker outlives restarts of its
Redis broker, against a real redis-server that the tests stop and start again."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest
from kombu import Connection
from kombu.common import ignore_errors

from quota_platform.broker import BrokerConnectionClosed, RedisTransport
from tests.broker_app import MARKS_KEY
from tests.processes import REPOSITORY, RedisServer, stop_process_group

RESTARTS = 20
START_TIMEOUT_SECONDS = 60
# Variables of this process that would point the worker elsewhere.
SERVICE_VARIABLES = {"DATABASE_URL", "REDIS_URL", "REDIS_CLUSTER", "CELERY_BROKER_URL"}


@pytest.fixture
def redis_server(tmp_path):
    if not RedisServer.available():
        pytest.skip("redis-server is not installed; these tests run a Redis server of their own")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_a_channel_asking_for_redis_after_its_connection_was_collected_gets_a_connection_error(
    redis_server,
):
    # What Celery's consumer does with a connection it lost: collect it, then close it. A
    # channel that still has messages to put back then needs a new connection pool.
    connection = Connection(redis_server.url, transport=RedisTransport)
    channel = connection.channel()
    connection.collect()

    with pytest.raises(BrokerConnectionClosed):
        channel.qos.restore_unacked()
    # One of the transport's connection errors, which Celery's clean-up ignores (kombu's own
    # channel raised an AttributeError here, which ended the worker).
    assert issubclass(BrokerConnectionClosed, connection.connection_errors)
    with ignore_errors(connection):
        channel.qos.restore_unacked()


def _marks(server: RedisServer) -> int:
    with server.client() as client:
        return int(client.get(MARKS_KEY) or 0)


def test_a_worker_outlives_restarts_of_its_redis_broker(redis_server, tmp_path):
    environ = {key: value for key, value in os.environ.items() if key not in SERVICE_VARIABLES}
    environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "quota_platform.settings",
            "SECRET_KEY": "a-secret-for-this-test",
            "VAR_DIR": str(tmp_path / "var"),
            "CELERY_BROKER_URL": redis_server.url,
        }
    )
    log_path = tmp_path / "worker.log"
    command = [sys.executable, "-m", "celery", "-A", "tests.broker_app", "worker", "-B"]
    command += ["--loglevel=info", "--concurrency=2", "--schedule", str(tmp_path / "beat")]
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            command,
            cwd=REPOSITORY,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-4000:]

    def wait_for_marks(count: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            assert worker.poll() is None, f"the worker exited:\n{log_tail()}"
            try:
                if _marks(redis_server) >= count:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail(f"the worker ran fewer than {count} tasks in time:\n{log_tail()}")

    try:
        wait_for_marks(3)
        assert "quota_platform.broker:RedisTransport" in log_path.read_text()
        # Stopped at moments drawn from one seed, so a failure can be run again as it was.
        moments = random.Random(20261129)
        for restart in range(1, RESTARTS + 1):
            time.sleep(moments.uniform(1.0, 3.0))
            redis_server.stop()  # killed: an outage, not a shutdown
            time.sleep(moments.uniform(0.1, 1.0))
            redis_server.start()
            assert worker.poll() is None, (
                f"the worker exited after restart {restart}:\n{log_tail()}"
            )
        # The Redis came back empty (no persistence): counting starts again from nothing.
        wait_for_marks(3)
        assert "Unrecoverable error" not in log_path.read_text()
    finally:
        stop_process_group(worker)
