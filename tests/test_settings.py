"""Settings from the environment: typed helpers, and start-up refusing malformed values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from quota_platform.env import (
    database_from_url,
    env_bool,
    env_float,
    env_int,
    env_list,
    env_str,
    env_url,
)
from tests.processes import run_with_settings


def _check(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    return run_with_settings([sys.executable, "manage.py", "check"], tmp_path, **variables)


# Start-up


def test_the_embedded_default_passes_the_checks(tmp_path):
    result = _check(tmp_path)

    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        (
            {"QUOTA_REDIS_TIMEOUT_MS": "abc"},
            "QUOTA_REDIS_TIMEOUT_MS='abc' is not a whole number",
        ),
        ({"QUOTA_REDIS_TIMEOUT_MS": "0"}, "QUOTA_REDIS_TIMEOUT_MS=0 must be at least 1"),
        (
            {"QUOTA_BREAKER_SECONDS": "soon"},
            "QUOTA_BREAKER_SECONDS='soon' is not a number",
        ),
        (
            {"QUOTA_POLICY_REFRESH_SECONDS": "nan"},
            "QUOTA_POLICY_REFRESH_SECONDS='nan' must be a number of at least 0.0",
        ),
        (
            {"DEBUG": "maybe"},
            "DEBUG='maybe' is not a boolean; use one of 1/0, true/false, yes/no, on/off",
        ),
        (
            {"DATABASE_URL": "mysql://x"},
            "DATABASE_URL must start with one of postgres://, postgresql://, sqlite://",
        ),
        ({"DATABASE_URL": "postgres://db.example:port/x"}, "DATABASE_URL is not a valid URL"),
        ({"DATABASE_URL": "postgres:///quota"}, "DATABASE_URL has no host name"),
        (
            {"DATABASE_URL": "postgres://db.example:5432"},
            "DATABASE_URL names no database (postgres://user@host:port/name)",
        ),
        (
            {"REDIS_URL": "http://x"},
            "REDIS_URL must start with one of redis://, rediss://, unix://",
        ),
        (
            {"CELERY_BROKER_URL": "sqs://x"},
            "CELERY_BROKER_URL must start with one of redis://, rediss://, amqp://, amqps://",
        ),
        (
            {"REDIS_CLUSTER": "true"},
            "REDIS_CLUSTER=true needs REDIS_URL naming one node of the cluster",
        ),
        (
            {"BILLING_CURRENCY": "dollars"},
            "BILLING_CURRENCY='DOLLARS' must be a three-letter ISO 4217 code",
        ),
        (
            {"SECRET_KEY": "<unset>", "DEBUG": "false"},
            "SECRET_KEY is not set; set it (a long random string), or set DEBUG=true",
        ),
    ],
)
def test_a_malformed_value_stops_start_up_naming_the_variable(tmp_path, variables, message):
    result = _check(tmp_path, **variables)

    assert result.returncode == 2
    assert result.stderr.startswith("configuration error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_without_a_secret_key_debug_gets_a_development_default(tmp_path):
    result = _check(tmp_path, SECRET_KEY="<unset>", DEBUG="true")

    assert result.returncode == 0, result.stderr


def test_the_wsgi_application_refuses_a_malformed_value_without_a_traceback(tmp_path):
    command = [sys.executable, "-c", "import quota_platform.wsgi"]
    result = run_with_settings(command, tmp_path, DEBUG="maybe")

    assert result.returncode == 2
    assert result.stderr == (
        "configuration error: DEBUG='maybe' is not a boolean; use one of 1/0, true/false, "
        "yes/no, on/off\n"
    )


@pytest.mark.parametrize(
    ("broker", "transport", "use_ssl"),
    [
        ("redis://127.0.0.1:6379/0", "quota_platform.broker:RedisTransport", "False"),
        (
            "rediss://cache.example:6380/0",
            "quota_platform.broker:RedisTransport",
            "{'ssl_cert_reqs': <VerifyMode.CERT_REQUIRED: 2>}",
        ),
        ("amqp://guest@127.0.0.1:5672//", "None", "False"),
    ],
)
def test_a_redis_broker_gets_the_transport_that_survives_its_restarts(
    tmp_path, broker, transport, use_ssl
):
    code = (
        "from celery import Celery; app = Celery(); "
        "app.config_from_object('django.conf:settings', namespace='CELERY'); "
        "print(app.conf.broker_transport); print(app.conf.broker_use_ssl)"
    )
    result = run_with_settings(
        [sys.executable, "-c", f"import django; django.setup(); {code}"],
        tmp_path,
        DJANGO_SETTINGS_MODULE="quota_platform.settings",
        CELERY_BROKER_URL=broker,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [transport, use_ssl]


# The helpers


def test_env_str_returns_the_value_or_the_default():
    assert env_str("NAME", "fallback", environ={}) == "fallback"
    assert env_str("NAME", "fallback", environ={"NAME": " as is "}) == " as is "


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        (" TRUE ", True),
        ("yes", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
        ("", False),
    ],
)
def test_env_bool_reads_the_usual_spellings(raw, expected):
    assert env_bool("FLAG", not expected, environ={"FLAG": raw}) is expected


def test_env_bool_returns_the_default_when_unset():
    assert env_bool("FLAG", True, environ={}) is True
    assert env_bool("FLAG", False, environ={}) is False


def test_env_bool_refuses_anything_else_naming_the_variable():
    with pytest.raises(ImproperlyConfigured, match=r"^FLAG='maybe' is not a boolean"):
        env_bool("FLAG", False, environ={"FLAG": "maybe"})


def test_env_int_reads_and_bounds_whole_numbers():
    assert env_int("SIZE", 5, environ={}) == 5
    assert env_int("SIZE", 5, environ={"SIZE": " 42 "}) == 42
    assert env_int("SIZE", 5, minimum=1, maximum=42, environ={"SIZE": "42"}) == 42
    with pytest.raises(ImproperlyConfigured, match=r"^SIZE='4\.5' is not a whole number$"):
        env_int("SIZE", 5, environ={"SIZE": "4.5"})
    with pytest.raises(ImproperlyConfigured, match=r"^SIZE=0 must be at least 1$"):
        env_int("SIZE", 5, minimum=1, environ={"SIZE": "0"})
    with pytest.raises(ImproperlyConfigured, match=r"^SIZE=43 must be at most 42$"):
        env_int("SIZE", 5, maximum=42, environ={"SIZE": "43"})


def test_env_float_reads_numbers_and_refuses_nan_and_values_below_the_floor():
    assert env_float("SECONDS", 1.5, environ={}) == 1.5
    assert env_float("SECONDS", 1.5, minimum=0.0, environ={"SECONDS": "0.25"}) == 0.25
    with pytest.raises(ImproperlyConfigured, match=r"^SECONDS='soon' is not a number$"):
        env_float("SECONDS", 1.5, environ={"SECONDS": "soon"})
    with pytest.raises(ImproperlyConfigured, match=r"^SECONDS='nan' must be a number"):
        env_float("SECONDS", 1.5, minimum=0.0, environ={"SECONDS": "nan"})
    with pytest.raises(ImproperlyConfigured, match=r"^SECONDS='-1' must be a number of at least"):
        env_float("SECONDS", 1.5, minimum=0.0, environ={"SECONDS": "-1"})


def test_env_list_splits_on_commas_and_drops_blanks():
    assert env_list("HOSTS", ["a"], environ={}) == ["a"]
    assert env_list("HOSTS", ["a"], environ={"HOSTS": " x.example , ,y.example,"}) == [
        "x.example",
        "y.example",
    ]
    assert env_list("HOSTS", ["a"], environ={"HOSTS": ""}) == []


def test_env_url_checks_scheme_host_and_port():
    schemes = ("redis", "rediss")
    assert env_url("URL", schemes=schemes, environ={}) is None
    assert env_url("URL", schemes=schemes, environ={"URL": "  "}) is None
    assert (
        env_url("URL", schemes=schemes, environ={"URL": " redis://h:6379/0 "}) == "redis://h:6379/0"
    )
    with pytest.raises(ImproperlyConfigured, match=r"^URL must start with one of redis://"):
        env_url("URL", schemes=schemes, environ={"URL": "http://h"})
    with pytest.raises(ImproperlyConfigured, match=r"^URL has no host name$"):
        env_url("URL", schemes=schemes, environ={"URL": "redis:///0"})
    with pytest.raises(ImproperlyConfigured, match=r"^URL is not a valid URL"):
        env_url("URL", schemes=schemes, environ={"URL": "redis://h:99999/0"})


def test_database_from_url_reads_every_part_of_a_postgres_url():
    assert database_from_url(
        "postgres://quota:p%40ss@db.example:6543/quota%5Fplatform?sslmode=require"
    ) == {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "quota_platform",
        "USER": "quota",
        "PASSWORD": "p@ss",
        "HOST": "db.example",
        "PORT": "6543",
        "CONN_MAX_AGE": 60,
        "CONN_HEALTH_CHECKS": True,
        "OPTIONS": {"sslmode": "require"},
    }


def test_database_from_url_reads_a_relative_sqlite_path():
    assert database_from_url("sqlite:///var/quota.sqlite3") == {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": "var/quota.sqlite3",
    }


def test_database_from_url_reads_an_absolute_sqlite_path():
    assert database_from_url("sqlite:////srv/quota.sqlite3") == {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": "/srv/quota.sqlite3",
    }


def test_database_from_url_refuses_a_url_without_a_database():
    with pytest.raises(ImproperlyConfigured, match=r"^DATABASE_URL names no database"):
        database_from_url("postgres://db.example:5432/")
    with pytest.raises(ImproperlyConfigured, match=r"^DATABASE_URL names no SQLite file$"):
        database_from_url("sqlite:///")
