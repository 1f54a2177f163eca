"""The sync worker that is woken alone: it serves as gunicorn's does, on one listener or
several, stays alive between requests, stops on a signal, and idle workers sleep through
connections another worker takes."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import REPOSITORY, free_port

WORKER = "quota_platform.gunicorn_worker.ExclusiveAcceptWorker"
APP = """
def application(environ, start_response):
    body = environ["SERVER_PORT"].encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


class Server:
    """A gunicorn of ``workers`` workers of ``worker_class`` serving APP on ``ports``."""

    def __init__(
        self, directory: Path, worker_class: str, workers: int, ports: list[int], timeout: int = 2
    ) -> None:
        (directory / "herd_app.py").write_text(APP)
        self.ports = ports
        self.log_path = directory / f"gunicorn-{ports[0]}.log"
        command = [sys.executable, "-m", "gunicorn", "-k", worker_class, "-w", str(workers)]
        for port in ports:
            command += ["-b", f"127.0.0.1:{port}"]
        command += ["--timeout", str(timeout), "--log-level", "info", "herd_app:application"]
        environment = dict(os.environ, PYTHONPATH=f"{directory}{os.pathsep}{REPOSITORY}")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=directory, env=environment, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 20
        while len(self.workers()) < workers or not all(self.answers(port) for port in ports):
            assert self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def workers(self) -> list[int]:
        listed = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False
        )
        return sorted(int(pid) for pid in listed.stdout.split())

    def answers(self, port: int) -> bool:
        try:
            return self.get(port) == str(port)
        except OSError:
            return False

    @staticmethod
    def get(port: int) -> str:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", "/")
            return connection.getresponse().read().decode()
        finally:
            connection.close()

    def switches(self) -> int:
        """Context switches the workers made: one each time one went to sleep."""
        total = 0
        for pid in self.workers():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches"):
                    total += int(line.split()[1])
        return total

    def stop(self) -> float:
        """SIGTERM; the seconds gunicorn took to exit."""
        began = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return time.monotonic() - began


@pytest.fixture
def servers(tmp_path) -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        if server.process.poll() is None:
            server.stop()


def switches_per_request(server: Server, requests: int = 300) -> float:
    for _ in range(20):
        server.get(server.ports[0])
    time.sleep(0.3)  # every worker back asleep
    before = server.switches()
    for _ in range(requests):
        server.get(server.ports[0])
    return (server.switches() - before) / requests


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="EPOLLEXCLUSIVE is Linux's")
def test_idle_workers_sleep_through_a_connection_another_takes(tmp_path, servers):
    exclusive = Server(tmp_path, WORKER, 4, [free_port()])
    servers.append(exclusive)
    ours = switches_per_request(exclusive)
    exclusive.stop()
    stock = Server(tmp_path, "sync", 4, [free_port()])
    servers.append(stock)
    theirs = switches_per_request(stock)

    # Gunicorn's own wakes the three idle workers too (about 5.7 a request here). Woken
    # alone, the worker that serves sleeps waiting for the connection, and may sleep again
    # for the request's bytes and for the client to close (about 2.0 here).
    assert ours < 3.5, (ours, theirs)
    assert theirs > ours + 1.5, (ours, theirs)


def test_it_serves_every_listener(tmp_path, servers):
    ports = [free_port(), free_port()]
    server = Server(tmp_path, WORKER, 2, ports)
    servers.append(server)

    for _ in range(20):
        for port in ports:
            assert server.get(port) == str(port)


def test_idle_workers_keep_telling_the_master_they_live(tmp_path, servers):
    server = Server(tmp_path, WORKER, 2, [free_port()])
    servers.append(server)
    workers = server.workers()

    time.sleep(5)  # two and a half worker timeouts without a request

    assert server.workers() == workers, server.log()
    assert "WORKER TIMEOUT" not in server.log()
    assert server.get(server.ports[0]) == str(server.ports[0])


def test_a_signal_stops_idle_workers_at_once(tmp_path, servers):
    # Idle, a worker waits up to half its timeout (30 s here) unless the signal wakes it.
    server = Server(tmp_path, WORKER, 2, [free_port()], timeout=60)
    servers.append(server)

    took = server.stop()

    assert server.process.returncode == 0, server.log()
    assert took < 5, server.log()
