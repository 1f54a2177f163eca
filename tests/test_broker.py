"""The Celery broker transport (quota_platform/broker.py): a worker outlives restarts of its
Redis broker, against a real redis-server that the tests stop and start again."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kombu import Connection
from kombu.common import ignore_errors

from quota_platform.broker import BrokerConnectionClosed, RedisTransport
from tests.broker_app import MARKS_KEY
from tests.processes import (
    RedisServer,
    free_port,
    run_with_settings,
    settings_environ,
    start_process_group,
    stop_process_group,
)

RESTARTS = 20
START_TIMEOUT_SECONDS = 60


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
    environ = settings_environ(tmp_path / "var", CELERY_BROKER_URL=redis_server.url)
    log_path = tmp_path / "worker.log"
    command = [sys.executable, "-m", "celery", "-A", "tests.broker_app", "worker", "-B"]
    command += ["--loglevel=info", "--concurrency=2", "--schedule", str(tmp_path / "beat")]
    worker = start_process_group(command, log_path, environ)

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


# A rediss:// broker: TLS, with the server's certificate checked


def _openssl(*arguments: str, cwd: Path) -> None:
    subprocess.run(["openssl", *arguments], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def tls_redis_port(tmp_path):
    """A redis-server that speaks only TLS, with a certificate for 127.0.0.1 signed by a CA
    made for this test (``ca.pem`` in tmp_path), which no system trusts."""
    if not RedisServer.available() or shutil.which("openssl") is None:
        pytest.skip("redis-server and openssl are needed for a TLS Redis of this test's own")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=quota test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=tmp_path,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        cwd=tmp_path,
    )
    (tmp_path / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.cnf",
        "-out",
        "server.pem",
        cwd=tmp_path,
    )
    port = free_port()
    with (tmp_path / "redis.log").open("wb") as log:
        server = subprocess.Popen(
            [
                "redis-server",
                "--port",
                "0",
                "--tls-port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--tls-cert-file",
                "server.pem",
                "--tls-key-file",
                "server.key",
                "--tls-ca-cert-file",
                "ca.pem",
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp_path),
            ],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 10
        while b"Ready to accept connections" not in (tmp_path / "redis.log").read_bytes():
            if server.poll() is not None:
                log_tail = (tmp_path / "redis.log").read_text()[-300:]
                pytest.skip(f"this redis-server speaks no TLS: {log_tail}")
            assert time.monotonic() < deadline, "the TLS redis-server did not start"
            time.sleep(0.05)
        yield port
    finally:
        server.kill()
        server.wait(timeout=10)


ROUND_TRIP = """
from kombu import Exchange, Queue
from quota_platform.celery_app import app
queue = Queue("tls-probe", Exchange("tls-probe"), "tls-probe")
with app.connection_for_write() as connection:
    connection.Producer().publish(
        {"sent": 1}, exchange=queue.exchange, routing_key="tls-probe", declare=[queue]
    )
    print(queue(connection.default_channel).get(no_ack=True).payload)
"""


def _round_trip(broker_url: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return run_with_settings(
        [sys.executable, "-c", ROUND_TRIP], tmp_path / "var", CELERY_BROKER_URL=broker_url
    )


def test_a_rediss_broker_is_reached_over_tls_with_its_certificate_checked(tls_redis_port, tmp_path):
    url = f"rediss://127.0.0.1:{tls_redis_port}/0"

    trusted = _round_trip(f"{url}?ssl_ca_certs={tmp_path / 'ca.pem'}", tmp_path)
    assert trusted.returncode == 0, trusted.stderr
    assert trusted.stdout.strip() == "{'sent': 1}"

    # Signed by a CA nobody trusts: refused, not sent in the clear nor unchecked.
    untrusted = _round_trip(url, tmp_path)
    assert untrusted.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr

    # An operator can still turn the check off in the URL, as kombu reads it.
    unchecked = _round_trip(f"{url}?ssl_cert_reqs=none", tmp_path)
    assert unchecked.returncode == 0, unchecked.stderr
