"""The lean access logger writes gunicorn's own lines."""

from __future__ import annotations

import base64
import datetime
import logging
import runpy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from gunicorn.config import Config
from gunicorn.glogging import Logger

from quota_platform.gunicorn_logging import AccessLogger


def _environ(**extra: str) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REMOTE_ADDR": "127.0.0.1",
        "REQUEST_METHOD": "POST",
        "RAW_URI": "/api/v1/check?x=1",
        "PATH_INFO": "/api/v1/check",
        "QUERY_STRING": "x=1",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "127.0.0.1:8000",
        "CONTENT_TYPE": "application/json",
    }
    environ.update(extra)
    return environ


def _lines(
    logger_class: type[Logger], path: Path, cases: list[tuple[Any, dict[str, Any]]], **settings: str
) -> list[str]:
    config = Config()
    config.set("accesslog", str(path))
    for name, value in settings.items():
        config.set(name, value)
    logger = logger_class(config)
    request = SimpleNamespace(headers=[("HOST", "127.0.0.1:8000"), ("X-TRACE", "t-1")])
    for response, environ in cases:
        logger.access(response, request, environ, datetime.timedelta(microseconds=1500))
    for handler in logger.access_log.handlers:
        handler.flush()
    return path.read_text().splitlines()


CASES = [
    (SimpleNamespace(status="200 OK", sent=283, headers=[("Content-Length", "283")]), _environ()),
    (
        SimpleNamespace(status="429 Too Many Requests", sent=0, headers=[]),
        _environ(HTTP_USER_AGENT='curl/8 "quoted"', HTTP_REFERER="https://example.test/a"),
    ),
    (
        SimpleNamespace(status=200, sent=None, headers=[]),
        _environ(HTTP_AUTHORIZATION="Basic " + base64.b64encode(b'al"ice:secret').decode()),
    ),
    (SimpleNamespace(status="404 Not Found", headers=[]), _environ(REMOTE_ADDR="::1")),
    (
        SimpleNamespace(status="401 Unauthorized", sent=12, headers=[]),
        _environ(HTTP_AUTHORIZATION="Basic not-base64!", RAW_URI='/a"b'),
    ),
]


def test_default_format_lines_equal_gunicorns(tmp_path: Path) -> None:
    theirs = _lines(Logger, tmp_path / "theirs.log", CASES)
    ours = _lines(AccessLogger, tmp_path / "ours.log", CASES)
    assert len(ours) == len(CASES)
    # The time stamp may differ if the two loops straddle a second; the rest may not.
    strip = [line.split("[", 1)[0] + line.split("]", 1)[1] for line in theirs]
    assert [line.split("[", 1)[0] + line.split("]", 1)[1] for line in ours] == strip
    assert ours[1].endswith('"https://example.test/a" "curl/8 \\"quoted\\""')
    assert ours[2].startswith('127.0.0.1 - al\\"ice [')
    assert ' 200 - "-" "-"' in ours[2]


def test_time_stamp_is_gunicorns() -> None:
    config = Config()
    ours, theirs = AccessLogger(config), Logger(config)
    for _ in range(3):  # a second may turn between the two calls; not three times running
        if ours.now() == theirs.now():
            break
    else:
        pytest.fail(f"{ours.now()} != {theirs.now()}")


@pytest.mark.parametrize("log_format", ['%(h)s "%(r)s" %(s)s %({x-trace}i)s %(L)s', "%(a)s %(p)s"])
def test_other_formats_go_through_gunicorn(tmp_path: Path, log_format: str) -> None:
    theirs = _lines(Logger, tmp_path / "theirs.log", CASES, access_log_format=log_format)
    ours = _lines(AccessLogger, tmp_path / "ours.log", CASES, access_log_format=log_format)
    assert ours == theirs
    assert "t-1" in ours[0] or "%(p)s" in log_format


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("enabled", [False, True])
def test_writes_only_when_access_log_is_on(tmp_path: Path, enabled: bool) -> None:
    config = Config()
    if enabled:
        config.set("accesslog", str(tmp_path / "access.log"))
    logger = AccessLogger(config)
    records = _Records()
    logger.access_log.addHandler(records)
    response, environ = CASES[0]
    logger.access(response, SimpleNamespace(headers=[]), environ, datetime.timedelta())
    assert len(records.records) == (1 if enabled else 0)


@pytest.mark.parametrize(
    ("value", "expected"), [(None, "-"), ("", None), ("/var/log/q.log", "/var/log/q.log")]
)
def test_access_log_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str | None, expected: str | None
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # else the file makes one
    if value is None:
        monkeypatch.delenv("ACCESS_LOG", raising=False)
    else:
        monkeypatch.setenv("ACCESS_LOG", value)
    settings = runpy.run_path(
        str(Path(__file__).parent.parent / "quota_platform" / "gunicorn.conf.py")
    )
    assert settings["accesslog"] == expected
    assert settings["logger_class"] == "quota_platform.gunicorn_logging.AccessLogger"
