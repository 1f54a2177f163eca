"""Real processes for the integration tests: nginx with the example configuration, and
plain HTTP calls. The platform itself runs in gunicorn (``tests.api.live``)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.processes import REPOSITORY, free_port

EXAMPLE_NGINX_CONF = REPOSITORY / "examples" / "nginx.conf"
PLATFORM_ADDRESS = "127.0.0.1:8000"
INFERENCE_ADDRESS = "127.0.0.1:8001"
LISTEN = "listen 127.0.0.1:8080;"


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


def call(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 15.0,
) -> Reply:
    """One request on a connection of its own to 127.0.0.1:``port``."""
    sent = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        connection.close()


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class Nginx:
    """nginx running ``examples/nginx.conf`` from a directory of its own, its addresses
    rewritten to loopback ports of the test: one master (no daemon) and one worker, pid
    file, logs and temporary files in that directory; stopped by its pid."""

    def __init__(self, directory: Path, *, platform_port: int, inference_port: int) -> None:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.conf = directory / "nginx.conf"
        text = EXAMPLE_NGINX_CONF.read_text()
        for old, new in (
            (PLATFORM_ADDRESS, f"127.0.0.1:{platform_port}"),
            (INFERENCE_ADDRESS, f"127.0.0.1:{inference_port}"),
            (LISTEN, f"listen 127.0.0.1:{self.port};"),
        ):
            if old not in text:
                raise AssertionError(f"examples/nginx.conf no longer has {old!r}")
            text = text.replace(old, new)
        temp = "\n".join(
            f"    {name}_temp_path {directory / name};"
            for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        text = re.sub(r"^http \{$", "http {\n" + temp, text, count=1, flags=re.MULTILINE)
        self.conf.write_text(text)
        self.pid_file = directory / "nginx.pid"
        self.error_log = directory / "error.log"
        self.process: subprocess.Popen[bytes] | None = None

    def _globals(self) -> str:
        directives = [
            f"pid {self.pid_file};",
            f"error_log {self.error_log} info;",
            "daemon off;",
            "master_process on;",
        ]
        if os.geteuid() == 0:
            directives.append("user root;")  # workers must reach the test's private tmp
        return " ".join(directives)

    def command(self, *extra: str) -> list[str]:
        return [
            self.binary,
            "-p",
            str(self.directory),
            "-c",
            str(self.conf),
            "-e",
            str(self.error_log),
            "-g",
            self._globals(),
            *extra,
        ]

    def check_config(self) -> str:
        done = subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise AssertionError(f"nginx -t refused the example:\n{done.stderr}")
        return done.stderr

    def start(self, timeout: float = 15.0) -> Nginx:
        log = (self.directory / "nginx.out").open("ab")
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited at start-up:\n{self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=2),
            ):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not answer within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        """SIGQUIT (graceful) to the master we started; SIGKILL if it lingers."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGQUIT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        parts = []
        for path in (self.directory / "nginx.out", self.error_log):
            if path.exists():
                parts.append(path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)
