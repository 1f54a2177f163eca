"""The README's run command, end to end: a fresh VAR_DIR, the embedded default, a browser's
walk through the admin login."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

import pytest

from tests.processes import (
    SETTINGS_VARIABLES,
    free_port,
    start_process_group,
    stop_process_group,
)

PROJECT = Path(__file__).resolve().parent.parent
START_TIMEOUT_SECONDS = 90
STOP_TIMEOUT_SECONDS = 30
# The variables that would pull the child out of the embedded default, or size its server.
SERVICE_VARIABLES = SETTINGS_VARIABLES | {"WEB_CONCURRENCY", "GUNICORN_CMD_ARGS"}


class Browser:
    """Just enough of a browser for the admin: cookies and Django's CSRF token."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.cookies = CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))

    def get(self, path: str) -> tuple[int, str]:
        try:
            with self.opener.open(self.base_url + path, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def post(self, path: str, form: dict[str, str]) -> tuple[int, str]:
        data = urllib.parse.urlencode(form).encode()
        request = urllib.request.Request(  # noqa: S310 - a loopback http URL we built
            self.base_url + path, data=data, headers={"Referer": self.base_url + path}
        )
        with self.opener.open(request, timeout=10) as response:
            return response.status, response.read().decode()


@pytest.mark.slow
def test_the_run_command_serves_the_admin_with_the_demo_data(tmp_path):
    port = free_port()
    environ = {key: value for key, value in os.environ.items() if key not in SERVICE_VARIABLES}
    environ.update({"VAR_DIR": str(tmp_path / "var"), "PORT": str(port), "WEB_CONCURRENCY": "2"})
    log_path = tmp_path / "run.log"
    base_url = f"http://127.0.0.1:{port}"
    browser = Browser(base_url)

    process = start_process_group(["scripts/run"], log_path, environ, cwd=PROJECT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        status = None
        while time.monotonic() < deadline:
            assert process.poll() is None, f"scripts/run exited:\n{log_path.read_text()[-3000:]}"
            try:
                status, _body = browser.get("/admin/login/")
            except OSError:
                status = None
            if status == 200:
                break
            time.sleep(0.5)
        assert status == 200, f"no admin login page in time:\n{log_path.read_text()[-3000:]}"

        output = log_path.read_text()
        assert f"run: serving {base_url}/admin/" in output
        password = re.search(r"^admin login: admin / (\S+)$", output, re.MULTILINE)
        assert password is not None, output[-3000:]
        assert re.search(r"^demo API key for tenant acme: qk_[a-z2-7]{8}_\w{38}$", output, re.M)

        css_status, css = browser.get("/static/admin/css/base.css")
        assert css_status == 200
        assert "body" in css

        _status, login_page = browser.get("/admin/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login_page)
        assert token is not None
        status, _body = browser.post(
            "/admin/login/?next=/admin/",
            {
                "csrfmiddlewaretoken": token.group(1),
                "username": "admin",
                "password": password.group(1),
                "next": "/admin/",
            },
        )
        assert status == 200

        status, tenants = browser.get("/admin/limits/tenant/")
        assert status == 200
        assert "acme" in tenants
        assert "Log in" not in tenants
    finally:
        stop_process_group(process, STOP_TIMEOUT_SECONDS)
    assert process.returncode is not None


def _worker_pids(group: int) -> set[int]:
    """The main Celery worker processes in ``group``: those started by the script's shell
    (not their pool children, nor a pool child orphaned by a killed worker)."""
    found = subprocess.run(
        ["pgrep", "-g", str(group), "-f", "celery -A quota_platform worker"],
        capture_output=True,
        text=True,
        check=False,
    )
    workers = set()
    for pid in (int(text) for text in found.stdout.split()):
        try:
            parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
            if Path(f"/proc/{parent}/comm").read_text().strip() == "bash":
                workers.add(pid)
        except (OSError, IndexError):
            continue
    return workers


def _children(pid: int) -> set[int]:
    found = subprocess.run(
        ["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    return {int(child) for child in found.split()}


@pytest.mark.slow
def test_the_run_command_starts_the_celery_worker_again_when_it_dies(tmp_path):
    """With PostgreSQL and Redis the run command keeps a Celery worker beside gunicorn; one
    that exits on its own (SIGKILLed here; a Redis restart can end it too) is started again,
    and stopping the command stops everything it started."""
    from tests.processes import RedisServer

    if not RedisServer.available():
        pytest.skip("redis-server is not installed; this test runs a Redis server of its own")
    redis_server = RedisServer(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    redis_server.start()
    database = f"quota_run_{os.getpid()}_{int(time.time())}"
    port = free_port()
    environ = {key: value for key, value in os.environ.items() if key not in SERVICE_VARIABLES}
    environ.update(
        {
            "VAR_DIR": str(tmp_path / "var"),
            "PORT": str(port),
            "WEB_CONCURRENCY": "1",
            "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{database}",
            "REDIS_URL": redis_server.url,
        }
    )
    log_path = tmp_path / "run.log"
    browser = Browser(f"http://127.0.0.1:{port}")
    process = start_process_group(["scripts/run"], log_path, environ, cwd=PROJECT)
    try:

        def wait_for(what: str, condition: Any) -> Any:
            deadline = time.monotonic() + START_TIMEOUT_SECONDS
            while time.monotonic() < deadline:
                assert process.poll() is None, (
                    f"scripts/run exited:\n{log_path.read_text()[-3000:]}"
                )
                found = condition()
                if found:
                    return found
                time.sleep(0.5)
            pytest.fail(f"{what} not in time:\n{log_path.read_text()[-3000:]}")

        def admin_up() -> bool:
            try:
                return browser.get("/admin/login/")[0] == 200
            except OSError:
                return False

        wait_for("the admin login page", admin_up)
        first = wait_for("a Celery worker", lambda: _worker_pids(process.pid))
        assert len(first) == 1
        # Below the web's priority (ours is the web's: both inherit it from the script).
        expected_nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
        assert os.getpriority(os.PRIO_PROCESS, next(iter(first))) == expected_nice

        # The worker and its pool, as when it dies by itself: no orphaned pool process.
        worker = next(iter(first))
        for pid in {worker, *_children(worker)}:
            os.kill(pid, signal.SIGKILL)

        second = wait_for("a new Celery worker", lambda: _worker_pids(process.pid) - first or None)
        assert len(second) == 1
        assert "run: the Celery worker exited (status 137); starting it again" in (
            log_path.read_text()
        )
        assert admin_up()  # the web server never stopped
    finally:
        stop_process_group(process, STOP_TIMEOUT_SECONDS)
        redis_server.stop()
        import psycopg

        with psycopg.connect(
            "postgres://postgres@127.0.0.1:5432/postgres", autocommit=True
        ) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    assert process.returncode is not None
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    while True:
        leftover = subprocess.run(
            ["pgrep", "-a", "-g", str(process.pid)], capture_output=True, text=True, check=False
        ).stdout.strip()
        if not leftover or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert leftover == "", f"scripts/run left processes behind: {leftover}"
