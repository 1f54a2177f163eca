"""Real processes for the integration tests: nginx with the example configuration, a proxy
that holds answers back, and plain HTTP calls. The platform itself runs in gunicorn
(``tests.api.live``)."""

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
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse can be seen
    server: _ProxyServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        return

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        proxy = self.server
        headers = {
            name: value
            for name, value in self.headers.items()
            if name.lower() not in ("connection", "keep-alive", "host")
        }
        upstream = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=30)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
            answer_headers = answer.getheaders()
            status = answer.status
        finally:
            upstream.close()
        with proxy.lock:
            proxy.forwarded.append((self.command, self.path, body))
            held = proxy.hold > 0
            if held:
                proxy.hold -= 1
        if held:
            time.sleep(proxy.delay)  # the platform has answered; the caller hears nothing
        try:
            self.send_response(status)
            for name, value in answer_headers:
                if name.lower() not in ("connection", "transfer-encoding", "content-length"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True  # the caller gave up waiting

    do_GET = _forward  # noqa: N815 - the stdlib's names
    do_POST = _forward  # noqa: N815


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    target_port: int
    hold: int
    delay: float
    connections: int
    forwarded: list[tuple[str, str, bytes | None]]
    lock: threading.Lock


class DelayingProxy:
    """An HTTP proxy on loopback in front of ``target_port``. Every request is forwarded at
    once; the answers to the first ``hold`` of them are held back ``delay`` seconds (the
    platform has done its work, the caller times out). Counts the connections it accepted
    and records what it forwarded."""

    def __init__(self, target_port: int, *, hold: int = 0, delay: float = 0.0) -> None:
        self.server = _ProxyServer(("127.0.0.1", 0), _ProxyHandler)
        self.server.target_port = target_port
        self.server.hold = hold
        self.server.delay = delay
        self.server.connections = 0
        self.server.forwarded = []
        self.server.lock = threading.Lock()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def connections(self) -> int:
        return self.server.connections

    @property
    def forwarded(self) -> list[tuple[str, str, bytes | None]]:
        return self.server.forwarded

    def __enter__(self) -> DelayingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
