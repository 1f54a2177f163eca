"""The check API as clients meet it: gunicorn on a loopback port, real PostgreSQL and Redis.

``LiveWorld`` writes a small committed world (two tenants on one tier, their keys, a
published policy) into the test database, where a separate server process can read it;
``Gunicorn`` serves the project against that database and a key prefix of the test's
choosing; ``call`` sends one request and returns the parsed answer.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import redis
from django.apps import apps
from django.conf import settings
from django.core.management.color import no_style
from django.db import connection
from django.test import override_settings

from limits import engine
from limits.models import ApiKey, BudgetPeriod, FailMode, Metric, Scope, Tenant
from limits.services import SYSTEM, apikey_create, policy_publish
from tests.factories import (
    AIModelFactory,
    BudgetFactory,
    LimitRuleFactory,
    ModelClassFactory,
    TenantFactory,
    TierFactory,
)
from tests.processes import REPOSITORY, free_port

T = TypeVar("T")

REQUESTS_PER_HOUR = 5
TOKENS_PER_HOUR = 10_000
CONCURRENT = 50
MONTHLY_TOKENS = 1_000_000
MONTHLY_COST = Decimal("250.00")


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


@dataclass
class LiveWorld:
    """What the committed world holds; ids and keys the tests address it by."""

    prefix: str
    alice: Tenant
    bob: Tenant
    alice_key: str
    bob_key: str
    alice_api_key: ApiKey
    bob_api_key: ApiKey
    extra: dict[str, Any] = field(default_factory=dict)


def live_world_create(prefix: str) -> LiveWorld:
    """Create and publish the world (committed: call with database access unblocked).

    Tier ``standard`` (fail closed): per user and model 5 requests an hour, per user and
    frontier model 10,000 tokens an hour, per user 50 in flight. Alice also has a monthly
    hard budget of 1,000,000 tokens and 250.00 in money; Bob has none.
    """
    tier = TierFactory(name="standard", fail_mode=FailMode.CLOSED)
    frontier = ModelClassFactory(name="frontier")
    small = ModelClassFactory(name="small")
    AIModelFactory(model_id="gpt-4o", model_class=frontier)
    AIModelFactory(model_id="llama-3-8b", model_class=small)
    alice = TenantFactory(slug="alice", name="Alice Labs", tier=tier)
    bob = TenantFactory(slug="bob", name="Bob Systems", tier=tier)
    LimitRuleFactory(tier=tier, limit=REQUESTS_PER_HOUR, window_seconds=3600)
    LimitRuleFactory(
        tier=tier,
        metric=Metric.TOKENS,
        limit=TOKENS_PER_HOUR,
        window_seconds=3600,
        model_class=frontier,
    )
    LimitRuleFactory(
        tier=tier,
        scope=Scope.USER,
        metric=Metric.CONCURRENCY,
        limit=CONCURRENT,
        window_seconds=None,
    )
    BudgetFactory(
        tenant=alice,
        period=BudgetPeriod.MONTH,
        token_limit=MONTHLY_TOKENS,
        cost_limit=MONTHLY_COST,
        is_hard=True,
    )
    alice_api_key, alice_key = apikey_create(tenant=alice, name="backend", actor=SYSTEM)
    bob_api_key, bob_key = apikey_create(tenant=bob, name="backend", actor=SYSTEM)
    live_publish(prefix)
    return LiveWorld(prefix, alice, bob, alice_key, bob_key, alice_api_key, bob_api_key)


def live_publish(prefix: str) -> None:
    """Record a policy version and publish it to Redis under ``prefix`` (autocommit: the
    on-commit push runs at once)."""
    with override_settings(QUOTA_KEY_PREFIX=prefix):
        engine.reset_state()
        policy_publish(actor=SYSTEM, reason="API tests", force=True)
        engine.reset_state()


def committed(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``function`` on a database connection of its own, in autocommit, so that what it
    writes is visible to a server at once even while the test sits in a transaction (its
    changes are not rolled back: clean up with ``live_world_delete``)."""

    def run() -> T:
        try:
            return function(*args, **kwargs)
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result(timeout=60)


def live_world_delete(prefix: str) -> None:
    """Empty the quota and billing tables (not auth: its roles come from a migration) and
    remove every Redis key under ``prefix``."""
    with connection.cursor() as cursor:
        # Never wait forever behind a transaction that read these tables.
        cursor.execute("SET lock_timeout = '10s'")
    models = [
        *apps.get_app_config("limits").get_models(),
        *apps.get_app_config("billing").get_models(),
    ]
    existing = set(connection.introspection.table_names())
    tables = [model._meta.db_table for model in models if model._meta.db_table in existing]
    statements = connection.ops.sql_flush(no_style(), tables, allow_cascade=True)
    connection.ops.execute_sql_flush(statements)
    redis_keys_delete(prefix)


def redis_keys_delete(prefix: str, url: str | None = None) -> None:
    client = redis.Redis.from_url(url or settings.REDIS_URL)
    try:
        for batch in _batches(client.scan_iter(match=f"{prefix}:*", count=500), 500):
            client.delete(*batch)
    finally:
        client.close()


def _batches(items: Any, size: int) -> Any:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def database_url() -> str:
    """The URL of the database this test process uses (the test database)."""
    database = settings.DATABASES["default"]
    user = database.get("USER") or "postgres"
    password = f":{database['PASSWORD']}" if database.get("PASSWORD") else ""
    host = database.get("HOST") or "127.0.0.1"
    port = database.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{database['NAME']}"


def new_prefix() -> str:
    return f"qh{uuid.uuid4().hex[:12]}"


class Gunicorn:
    """``gunicorn -c quota_platform/gunicorn.conf.py`` on a free loopback port."""

    def __init__(
        self,
        directory: Path,
        *,
        prefix: str,
        redis_url: str | None = None,
        workers: int = 2,
        environ: dict[str, str] | None = None,
    ) -> None:
        self.directory = directory
        self.port = free_port()
        self.log_path = directory / f"gunicorn-{self.port}.log"
        self.metrics_dir = directory / f"metrics-{self.port}"
        self.metrics_dir.mkdir()
        self.environ = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "DATABASE_URL": database_url(),
            "REDIS_URL": redis_url or settings.REDIS_URL,
            "API_KEY_PEPPER": settings.API_KEY_PEPPER,
            "QUOTA_KEY_PREFIX": prefix,
            "PORT": str(self.port),
            "WEB_CONCURRENCY": str(workers),
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
            "LOG_LEVEL": "warning",
            "PYTHONUNBUFFERED": "1",
            **(environ or {}),
        }
        self.environ.pop("GUNICORN_CMD_ARGS", None)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Gunicorn:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "quota_platform/gunicorn.conf.py"],
            cwd=REPOSITORY,
            env=self.environ,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited at start-up:\n{self.log()}")
            with contextlib.suppress(OSError):
                if self.call("GET", "/healthz").status == 200:
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"gunicorn did not answer within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        content_type: str | None = "application/json",
    ) -> Answer:
        """One request on a connection of its own. ``body`` is sent as JSON, ``raw`` as is."""
        sent = dict(headers or {})
        if key is not None:
            sent.setdefault("Authorization", f"Bearer {key}")
        data = raw
        if data is None and body is not None:
            data = json.dumps(body).encode()
        if data is not None and content_type is not None:
            sent.setdefault("Content-Type", content_type)
        connection_ = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection_.request(method, path, body=data, headers=sent)
            response = connection_.getresponse()
            return Answer(response.status, response.headers, response.read())
        finally:
            connection_.close()
