"""Real processes that tests start and stop: a Redis server of their own, and a second
engine process that knows only what Redis tells it.

Run as ``python -m tests.processes`` this module is that second process: it reads one JSON
request per line on stdin, answers one JSON line on stdout, and ends when stdin closes
(so it never outlives the test that started it).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parent.parent
# A database nobody listens on: the second process can learn the policy only from Redis.
NO_DATABASE = "postgres://postgres@127.0.0.1:1/unreachable"


# Variables the platform's settings read: a child started by ``run_with_settings`` or given
# ``settings_environ`` gets none of this process's values for them.
SETTINGS_VARIABLES = {
    "DJANGO_SETTINGS_MODULE",
    "DATABASE_URL",
    "REDIS_URL",
    "REDIS_CLUSTER",
    "CELERY_BROKER_URL",
    "SECRET_KEY",
    "API_KEY_PEPPER",
    "DEBUG",
    "ALLOWED_HOSTS",
    "CSRF_TRUSTED_ORIGINS",
    "TIME_ZONE",
    "BILLING_CURRENCY",
    "LOG_LEVEL",
    "VAR_DIR",
}


def settings_environ(var_dir: Path, **variables: str) -> dict[str, str]:
    """This process's environment for a child that reads the platform's settings: none of
    the variables they read (nor any ``QUOTA_*``), a VAR_DIR and a SECRET_KEY of its own,
    then ``variables``; a variable given as "<unset>" is left out."""
    environ = {
        key: value
        for key, value in os.environ.items()
        if key not in SETTINGS_VARIABLES and not key.startswith("QUOTA_")
    }
    environ.update({"VAR_DIR": str(var_dir), "SECRET_KEY": "a-secret-for-this-test"})
    environ.update(variables)
    return {key: value for key, value in environ.items() if value != "<unset>"}


def run_with_settings(
    command: list[str], var_dir: Path, **variables: str
) -> subprocess.CompletedProcess[str]:
    """``command`` run to its end in the repository, with ``settings_environ``."""
    return subprocess.run(
        command,
        cwd=REPOSITORY,
        env=settings_environ(var_dir, **variables),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_process_group(
    command: list[str], log_path: Path, env: dict[str, str], cwd: Path = REPOSITORY
) -> subprocess.Popen[bytes]:
    """``command`` started in a session (and process group) of its own, its output going to
    ``log_path``: ``stop_process_group`` ends it and everything it started."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_process_group(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Stop the process group a test started (``start_new_session=True``), and wait for it:
    SIGTERM, then SIGKILL after ``timeout`` seconds. When its leader is gone already,
    nothing it started may outlive it."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


class RedisServer:
    """A redis-server on a free loopback port in a directory of its own, without
    persistence, that can be stopped and started again on the same port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.frozen = False

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.running:
            return
        log = (self.directory / "redis.log").open("ab")
        # The port is never handed out again while we hold it, but another program may
        # take it while the server is down: then start-up fails here, loudly.
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        import redis

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {self.directory / 'redis.log'}")
            with contextlib.suppress(redis.RedisError), self.client() as client:
                if client.ping():
                    return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not answer within 10 s")

    def stop(self) -> None:
        """Kill the server (no shutdown courtesy: an outage, not a maintenance)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()  # a stopped (frozen) process dies of SIGKILL too
        self.process.wait(timeout=10)
        self.process = None
        self.frozen = False

    def freeze(self) -> None:
        """Stop the server's process: the kernel still accepts connections, nobody answers."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.process is not None and self.frozen:
            os.kill(self.process.pid, signal.SIGCONT)
        self.frozen = False

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port, socket_timeout=5, socket_connect_timeout=1)


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (10,000 higher, so at most 65,535) is free too."""
    for _ in range(200):
        port = random.randint(20_000, 55_000)
        try:
            with socket.socket() as first, socket.socket() as bus:
                first.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free pair of loopback ports for a cluster node")


class RedisCluster:
    """A Redis Cluster of three primaries (no replicas) on free loopback ports, each
    redis-server in a directory of its own, built with ``redis-cli --cluster create``."""

    PRIMARIES = 3

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ports: list[int] = []
        while len(self.ports) < self.PRIMARIES:
            port = _free_cluster_port()
            if port not in self.ports:
                self.ports.append(port)
        self.processes: list[subprocess.Popen[bytes]] = []

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None

    @property
    def url(self) -> str:
        """Any one node: the cluster client learns the others from it."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> None:
        try:
            for port in self.ports:
                node = self.directory / str(port)
                node.mkdir(parents=True, exist_ok=True)
                log = (node / "redis.log").open("ab")
                self.processes.append(
                    subprocess.Popen(
                        [
                            "redis-server",
                            "--port",
                            str(port),
                            "--bind",
                            "127.0.0.1",
                            "--cluster-enabled",
                            "yes",
                            "--cluster-config-file",
                            str(node / "nodes.conf"),
                            "--cluster-node-timeout",
                            "2000",
                            "--save",
                            "",
                            "--appendonly",
                            "no",
                            "--daemonize",
                            "no",
                            "--dir",
                            str(node),
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
                log.close()
            for port in self.ports:
                self._wait(port, lambda client: client.ping())
            subprocess.run(
                [
                    "redis-cli",
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{port}" for port in self.ports),
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            for port in self.ports:
                self._wait(port, lambda client: client.cluster("info")["cluster_state"] == "ok")
        except BaseException:
            self.stop()
            raise

    def _wait(self, port: int, ready: Any) -> None:
        import redis

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if any(process.poll() is not None for process in self.processes):
                raise RuntimeError(f"a cluster node exited; see the logs under {self.directory}")
            with (
                contextlib.suppress(redis.RedisError),
                redis.Redis(port=port, socket_timeout=5, decode_responses=True) as client,
            ):
                if ready(client):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"cluster node 127.0.0.1:{port} was not ready within 20 s")

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            process.wait(timeout=10)
        self.processes = []


class EngineProcess:
    """A second process running the engine with the test settings, the same key prefix and
    no database: everything it enforces it learned from Redis (its policy poller)."""

    def __init__(self, *, prefix: str, redis_url: str, log_path: Path) -> None:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "QUOTA_KEY_PREFIX": prefix,
            "REDIS_URL": redis_url,
            "DATABASE_URL": NO_DATABASE,
            "PYTHONUNBUFFERED": "1",
        }
        self.log_path = log_path
        log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.processes"],
            cwd=REPOSITORY,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        log.close()
        self._selector = selectors.DefaultSelector()
        assert self.process.stdout is not None
        self._selector.register(self.process.stdout, selectors.EVENT_READ)

    def ask(self, timeout: float = 20.0, **request: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        if not self._selector.select(timeout):
            raise TimeoutError(f"no answer within {timeout} s; see {self.log_path}")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the engine process ended; see {self.log_path}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the engine process failed: {answer['error']}")
        return answer

    def check(self, tenant_id: int, user_id: str, model: str, tokens: int = 0) -> dict[str, Any]:
        return self.ask(op="check", tenant=tenant_id, user=user_id, model=model, tokens=tokens)

    def close(self) -> None:
        self._selector.close()
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()


def _answer(request: dict[str, Any]) -> dict[str, Any]:
    from limits import engine

    if request["op"] == "check":
        decision = engine.check(
            request["tenant"], request["user"], request["model"], request.get("tokens", 0)
        )
        return {
            "allowed": decision.allowed,
            "policy_version": decision.policy_version,
            "degraded": decision.degraded,
            "limits": [[state.scope, state.metric, state.limit] for state in decision.limits],
            "denied_by": None if decision.denied_by is None else decision.denied_by.scope,
        }
    if request["op"] == "version":
        store = engine.policy_store()
        store.current()
        return {"version": store.version, "loaded": store.loaded}
    raise ValueError(f"unknown op {request['op']!r}")


def main() -> None:
    import django

    django.setup()
    for line in sys.stdin:
        try:
            answer = _answer(json.loads(line))
        except Exception as error:  # noqa: BLE001 - reported to the test, which fails
            answer = {"error": f"{type(error).__name__}: {error}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
