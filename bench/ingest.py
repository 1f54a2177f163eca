"""Benchmark: the billing drain next to a raw COPY of the same rows, and the finance
overview on a year of rollups.

    .venv/bin/python bench/ingest.py [--events N] [--tenants N] [--batch N] [--rounds N]
                                     [--runs N] [--part drain|overview|both]

1. Drain. ``--events`` allowed checks, each followed by its commit, are appended to the
   usage streams of ``--tenants`` tenants in the engine's own entry format, then drained
   into Postgres by ``billing.ingest.drain`` (consumer group, transaction per batch, rollups,
   XACK, XTRIM) until the streams are empty. The same rows are then written again by a bare
   ``COPY`` into a table with the usage table's columns and indexes: the ceiling for getting
   rows into Postgres. Drain and COPY alternate for ``--rounds`` rounds (each from empty
   tables, each timed part after a CHECKPOINT); the median round's ratio counts. Goal: the
   drain at least half as fast as that COPY. The fold of the top-user rollups, which beat
   runs on its own schedule, is timed after each drain and reported apart, and so are the
   CPU seconds of each process (medians of the rounds; PostgreSQL's backend only where it
   runs on this machine), which move far less with other load than the ratio does.
2. Overview. One year of hourly rollups for 100 tenants × 10 models (8,760,000 rows), the
   daily and monthly rollups made from them, ten users per tenant per day and a monthly
   budget per tenant; ``/billing/`` is then rendered through the Django test client for the default
   range (the last 30 days) and for the whole year. Goal: under 300 ms.

It needs PostgreSQL and Redis: DATABASE_URL names the server (default
postgres://postgres@127.0.0.1:5432/quota_platform; only its server is used: the run creates
a database of its own, ``quota_bench_<pid>``, and drops it at the end) and REDIS_URL the
Redis (default redis://127.0.0.1:6379/0; every key lives under a prefix of the run's own
and is deleted at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPOSITORY = Path(__file__).resolve().parent.parent
# Run as a script, this directory comes first on sys.path, where bench/http.py would stand
# in for the standard library's http.
sys.path[:] = [
    entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent
]
MODELS = 10
OVERVIEW_TENANTS = 100
USERS_PER_TENANT = 10
GOAL_RATIO = 0.5
GOAL_RENDER_MS = 300.0


def scratch_database(url: str) -> tuple[str, str]:
    """The URL of a database of this run's own on the same server, and its name."""
    parts = urlsplit(url)
    name = f"quota_bench_{os.getpid()}"
    return urlunsplit(parts._replace(path=f"/{name}")), name


def server_connection(url: str) -> Any:
    import psycopg

    parts = urlsplit(url)
    return psycopg.connect(
        host=parts.hostname or None,
        port=parts.port or None,
        user=parts.username or None,
        password=parts.password or None,
        dbname="postgres",
        autocommit=True,
    )


def setup_django(database_url: str, redis_url: str, prefix: str) -> None:
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "quota_platform.settings",
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "QUOTA_KEY_PREFIX": prefix,
            "SECRET_KEY": os.environ.get("SECRET_KEY") or uuid.uuid4().hex * 2,
            "DEBUG": "false",
            "ALLOWED_HOSTS": "testserver",
            "LOG_LEVEL": "WARNING",
        }
    )
    sys.path.insert(0, str(REPOSITORY))
    import warnings

    # The test client never serves static files; WhiteNoise would say so on every run.
    warnings.filterwarnings("ignore", message="No directory at", category=UserWarning)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def quota_model(tenants: int) -> tuple[list[int], list[str]]:
    from decimal import Decimal

    from billing.services import model_price_seed
    from limits.models import AIModel, ModelClass, Tenant, Tier

    tier = Tier.objects.create(name="bench")
    model_class = ModelClass.objects.create(name="bench")
    models = []
    for index in range(MODELS):
        model = AIModel.objects.create(
            model_id=f"bench-model-{index}",
            model_class=model_class,
            input_price_per_1k=Decimal("0.000150") * (index + 1),
            output_price_per_1k=Decimal("0.000600") * (index + 1),
        )
        model_price_seed(model_id=model.model_id)
        models.append(model.model_id)
    Tenant.objects.bulk_create(
        [
            Tenant(slug=f"tenant{index:03d}", name=f"Tenant {index}", tier=tier)
            for index in range(tenants)
        ]
    )
    return list(Tenant.objects.order_by("pk").values_list("pk", flat=True)), models


# -- 1. the drain --------------------------------------------------------------------------
def fill_streams(client: Any, tenants: list[int], models: list[str], events: int) -> int:
    """Append ``events`` checks, each followed by its commit, as the engine writes them."""
    import random

    from billing.ingest import stream_key

    rng = random.Random(7)
    now_us = time.time_ns() // 1000
    pipe = client.pipeline(transaction=False)
    for index in range(events):
        tenant = tenants[index % len(tenants)]
        model = models[rng.randrange(len(models))]
        user = f"user{rng.randrange(500)}"
        request_id = uuid.uuid4().hex
        at = now_us - (events - index) * 1000
        key = stream_key(tenant)
        check = {
            "request_id": request_id,
            "tenant": tenant,
            "key": None,
            "user": user,
            "model": model,
            "tokens": rng.randrange(1, 4000),
            "version": 1,
        }
        commit = {
            "request_id": request_id,
            "tenant": tenant,
            "key": None,
            "user": user,
            "model": model,
            "input_tokens": rng.randrange(0, 4000),
            "output_tokens": rng.randrange(0, 2000),
            "status": "ok",
        }
        pipe.xadd(key, {"k": "check", "e": json.dumps(check, separators=(",", ":")), "t": str(at)})
        pipe.xadd(
            key, {"k": "commit", "e": json.dumps(commit, separators=(",", ":")), "t": str(at + 500)}
        )
        if index % 2000 == 1999:
            pipe.execute()
    pipe.execute()
    return 2 * events


# CPU seconds of the processes a timed part keeps busy, where this machine can read them
# (PostgreSQL local, Linux): the wall-clock ratio moves with whatever else runs on the
# cores, these much less. Reported, not part of the goal.
def backend_cpu() -> float | None:
    """CPU seconds this connection's PostgreSQL backend has used, if it runs here."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def redis_cpu(client: Any) -> float:
    """The Redis server's CPU seconds (all its clients', not only this run's)."""
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _spent(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def bench_drain(batch: int, client: Any) -> dict[str, Any]:
    from billing.ingest import RedisSource, drain, user_rollups_fold

    source = RedisSource()
    backend, server = backend_cpu(), redis_cpu(client)
    process, own = time.process_time(), time.thread_time()
    started = time.perf_counter()
    report = drain(source=source, max_batches=1_000_000, batch_size=batch)
    seconds = time.perf_counter() - started
    own = time.thread_time() - own
    cpu = {
        "backend": _spent(backend, backend_cpu()),
        # (the process's other threads: the drain's reading thread)
        "reading": time.process_time() - process - own,
        "main": own,
        "redis": redis_cpu(client) - server,
    }
    source.close()
    # Beat's billing-user-rollups, which runs on its own schedule: timed apart, not part of
    # the drain's rate.
    started = time.perf_counter()
    folded = user_rollups_fold()
    fold_seconds = time.perf_counter() - started
    assert folded == report.written.inserted, (folded, report.written.inserted)
    return {
        "report": report.as_dict(),
        "seconds": seconds,
        "fold_seconds": fold_seconds,
        "cpu": cpu,
    }


def quiet() -> None:
    """Start a timed part with nothing of the last one's left to write out."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("CHECKPOINT")


def clear_ledger() -> None:
    """Empty what a round wrote, so that every round starts from the same tables."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE billing_usageevent, billing_hourlyrollup, billing_dailyrollup, "
            "billing_monthlyrollup, billing_dailyuserrollup, billing_monthlyuserrollup, "
            "billing_pendingcommit, billing_userusagedelta, billing_statementadjustment"
        )
        cursor.execute("DROP TABLE bench_raw_copy")


def bench_copy() -> dict[str, Any]:
    """COPY the rows the drain wrote (binary, as the drain does) into a table with the same
    columns and indexes."""
    from django.db import connection, transaction

    from billing.ingest import EVENT_COLUMNS, copy_types
    from billing.models import UsageEvent

    columns = ", ".join(EVENT_COLUMNS)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {columns} FROM billing_usageevent")  # noqa: S608
        rows = cursor.fetchall()
        cursor.execute("CREATE TABLE bench_raw_copy (LIKE billing_usageevent INCLUDING ALL)")
    types = copy_types(UsageEvent, EVENT_COLUMNS)
    backend, own = backend_cpu(), time.thread_time()
    started = time.perf_counter()
    with transaction.atomic(), connection.cursor() as cursor:
        statement = f"COPY bench_raw_copy ({columns}) FROM STDIN (FORMAT BINARY)"
        with cursor.cursor.copy(statement) as copy:
            copy.set_types(types)
            for row in rows:
                copy.write_row(row)
    seconds = time.perf_counter() - started
    cpu = {"backend": _spent(backend, backend_cpu()), "main": time.thread_time() - own}
    return {"rows": len(rows), "seconds": seconds, "cpu": cpu}


# -- 2. the overview -------------------------------------------------------------------------
def year_of_rollups(tenants: list[int], models: list[str]) -> dict[str, int]:
    from django.db import connection

    from billing.models import ModelPrice
    from limits.models import Budget, Tenant

    prices = dict(ModelPrice.objects.values_list("model_id", "pk"))
    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE billing_hourlyrollup, billing_dailyrollup, billing_dailyuserrollup, "
            "billing_monthlyrollup, billing_monthlyuserrollup"
        )
        cursor.execute("CREATE TEMPORARY TABLE bench_models (model_id text, price_id bigint)")
        cursor.executemany(
            "INSERT INTO bench_models VALUES (%s, %s)", [(m, prices[m]) for m in models]
        )
        cursor.execute(
            """
            INSERT INTO billing_hourlyrollup (hour, tenant_id, model_id, price_id, requests,
                denied, input_tokens, output_tokens, estimated_requests, cost)
            SELECT hour, tenant.id, model.model_id, model.price_id, requests,
                   (requests * random() * 0.05)::bigint, requests * 700, requests * 300,
                   (requests * 0.02)::bigint, requests * 0.0021
            FROM generate_series(
                     date_trunc('hour', now()) - interval '365 days',
                     date_trunc('hour', now()) - interval '1 hour',
                     interval '1 hour') AS hour
            CROSS JOIN limits_tenant AS tenant
            CROSS JOIN bench_models AS model
            CROSS JOIN LATERAL (SELECT (random() * 40)::bigint + tenant.id % 7 AS requests)
                AS drawn
            """
        )
        hourly = cursor.rowcount
        cursor.execute(
            """
            INSERT INTO billing_dailyrollup (day, tenant_id, model_id, requests, denied,
                input_tokens, output_tokens, estimated_requests, cost)
            SELECT (hour AT TIME ZONE 'UTC')::date, tenant_id, model_id, sum(requests),
                   sum(denied), sum(input_tokens), sum(output_tokens),
                   sum(estimated_requests), sum(cost)
            FROM billing_hourlyrollup GROUP BY 1, 2, 3
            """
        )
        daily = cursor.rowcount
        cursor.execute(
            f"""
            INSERT INTO billing_dailyuserrollup (day, tenant_id, user_id, requests,
                input_tokens, output_tokens, cost)
            SELECT day::date, tenant.id, 'user' || user_number, 40, 28000, 12000, 0.084
            FROM generate_series(
                     (now() AT TIME ZONE 'UTC')::date - 365,
                     (now() AT TIME ZONE 'UTC')::date - 1, interval '1 day') AS day
            CROSS JOIN limits_tenant AS tenant
            CROSS JOIN generate_series(1, {USERS_PER_TENANT}) AS user_number
            """  # noqa: S608
        )
        users = cursor.rowcount
        cursor.execute(
            """
            INSERT INTO billing_monthlyrollup (month, tenant_id, model_id, requests, denied,
                input_tokens, output_tokens, estimated_requests, cost)
            SELECT date_trunc('month', day)::date, tenant_id, model_id, sum(requests),
                   sum(denied), sum(input_tokens), sum(output_tokens),
                   sum(estimated_requests), sum(cost)
            FROM billing_dailyrollup GROUP BY 1, 2, 3
            """
        )
        cursor.execute(
            """
            INSERT INTO billing_monthlyuserrollup (month, tenant_id, user_id, requests,
                input_tokens, output_tokens, cost)
            SELECT date_trunc('month', day)::date, tenant_id, user_id, sum(requests),
                   sum(input_tokens), sum(output_tokens), sum(cost)
            FROM billing_dailyuserrollup GROUP BY 1, 2, 3
            """
        )
        cursor.execute("ANALYZE")
    Budget.objects.bulk_create(
        [
            Budget(
                tenant=tenant,
                period="month",
                token_limit=50_000_000,
                is_hard=False,
                alert_thresholds=[80, 100],
            )
            for tenant in Tenant.objects.all()
        ]
    )
    return {"hourly": hourly, "daily": daily, "users": users}


def bench_overview(runs: int) -> dict[str, dict[str, float]]:
    import datetime as dt

    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    admin = get_user_model().objects.create_superuser("bench", "bench@example.com", "x")
    client = Client()
    client.force_login(admin)
    today = dt.datetime.now(dt.UTC).date()
    ranges = {
        "last 30 days (default)": {},
        "whole year": {
            "from": (today - dt.timedelta(days=365)).isoformat(),
            "to": today.isoformat(),
        },
    }
    results = {}
    for label, query in ranges.items():
        for _ in range(2):  # warm: templates compiled, caches filled
            assert client.get("/billing/", query).status_code == 200
        timings = []
        for _ in range(runs):
            started = time.perf_counter()
            response = client.get("/billing/", query)
            timings.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200
        with CaptureQueriesContext(connection) as queries:
            client.get("/billing/", query)
        results[label] = {
            "median_ms": statistics.median(timings),
            "max_ms": max(timings),
            "queries": len(queries),
        }
    return results


# -- the run -------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="checks (each committed)")
    parser.add_argument("--tenants", type=int, default=10, help="tenants of the drain part")
    parser.add_argument("--batch", type=int, default=None, help="entries per stream per batch")
    parser.add_argument("--runs", type=int, default=15, help="renders per range")
    parser.add_argument("--rounds", type=int, default=5, help="drain-then-COPY rounds")
    parser.add_argument(
        "--part", choices=("drain", "overview", "both"), default="both", help="what to run"
    )
    args = parser.parse_args()

    server_url = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/quota_platform")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    database_url, database = scratch_database(server_url)
    prefix = f"bench-ingest-{uuid.uuid4().hex[:8]}"
    with server_connection(server_url) as server:
        server.execute(f'CREATE DATABASE "{database}"')
    try:
        setup_django(database_url, redis_url, prefix)
        import redis
        from django.conf import settings

        client = redis.Redis.from_url(redis_url)
        try:
            return run(args, client, settings)
        finally:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            for first in range(0, len(keys), 500):
                client.unlink(*keys[first : first + 500])
            client.close()
    finally:
        from django.db import connections

        connections.close_all()
        with server_connection(server_url) as server:
            server.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def run(args: argparse.Namespace, client: Any, settings: Any) -> int:
    batch = args.batch or settings.BILLING_DRAIN_BATCH
    tenants, models = quota_model(max(args.tenants, OVERVIEW_TENANTS))
    drain_tenants = tenants[: args.tenants]

    ratio = None
    if args.part in ("drain", "both"):
        # The machine is shared and either side may be slowed by something else running:
        # drain and COPY alternate, the run reports each round and the median ratio.
        rounds = []
        for number in range(args.rounds):
            if number:
                clear_ledger()
            entries = fill_streams(client, drain_tenants, models, args.events)
            quiet()
            drained = bench_drain(batch, client)
            quiet()
            copied = bench_copy()
            report = drained["report"]
            assert report["inserted"] == args.events == copied["rows"], (report, copied)
            assert report["amended"] + report["inserted"] >= args.events
            drain_rate = args.events / drained["seconds"]
            copy_rate = copied["rows"] / copied["seconds"]
            rounds.append((drain_rate / copy_rate, drain_rate, copy_rate, drained, copied))
        ordered = sorted(rounds, key=lambda result: result[0])
        ratio, drain_rate, copy_rate, drained, copied = ordered[len(ordered) // 2]
        report = drained["report"]

        print(
            f"\n1. Drain: {args.events:,} checks + {args.events:,} commits ({entries:,} stream "
            f"entries), {len(drain_tenants)} tenants, batch {batch} per stream; "
            f"{args.rounds} rounds of drain then COPY"
        )
        print(f"   {'round':8}{'drain events/s':>16}{'COPY rows/s':>14}{'ratio':>8}")
        for number, (each, drained_each, copied_each, _, _) in enumerate(rounds, 1):
            print(f"   {number:<8}{drained_each:>16,.0f}{copied_each:>14,.0f}{each:>7.2f}×")
        print(f"\n   median round: {'':19}{'events/s':>12}{'seconds':>10}")
        print(
            f"   {'drain (Redis → Postgres, rollups)':34}{drain_rate:>12,.0f}"
            f"{drained['seconds']:>10.2f}"
        )
        print(f"   {'raw COPY of the same rows':34}{copy_rate:>12,.0f}{copied['seconds']:>10.2f}")
        print(
            f"   ratio drain / COPY: {ratio:.2f}× (goal ≥ {GOAL_RATIO}×); "
            f"{report['batches']} batches, {report['amended']} commits applied a batch later"
        )
        print(
            f"   drain time: {report['write_seconds']:.2f} s in Postgres transactions, "
            f"{report['wait_seconds']:.2f} s waiting for the reading thread, which spent "
            f"{report['read_seconds']:.2f} s reading and laying out batches and "
            f"{report['ack_seconds']:.2f} s acknowledging and trimming while Postgres worked"
        )
        print(
            f"   then the fold of the top-user rollups (beat's billing-user-rollups, on its own "
            f"schedule): {drained['fold_seconds']:.2f} s"
        )
        print(cpu_summary([each[3]["cpu"] for each in rounds], [each[4]["cpu"] for each in rounds]))
    if args.part == "drain":
        return goals(ratio, None)

    made = year_of_rollups(tenants[:OVERVIEW_TENANTS], models)
    overview = bench_overview(args.runs)
    print(
        f"\n2. /billing/ on one year of rollups: {made['hourly']:,} hourly, "
        f"{made['daily']:,} daily, {made['users']:,} user-day rows; "
        f"{OVERVIEW_TENANTS} tenants × {MODELS} models, {OVERVIEW_TENANTS} budgets"
    )
    print(f"   {'range':26}{'median ms':>11}{'max ms':>9}{'queries':>9}")
    for label, result in overview.items():
        print(
            f"   {label:26}{result['median_ms']:>11.1f}{result['max_ms']:>9.1f}"
            f"{result['queries']:>9}"
        )

    return goals(ratio, overview)


def cpu_summary(drains: list[dict[str, Any]], copies: list[dict[str, Any]]) -> str:
    """Median CPU seconds per process over the rounds (the backend's only where it runs on
    this machine; Redis's are the whole server's)."""

    def median(parts: list[dict[str, Any]], name: str) -> str:
        values = [part[name] for part in parts if part[name] is not None]
        return f"{statistics.median(values):.2f} s" if values else "unknown"

    return (
        f"   CPU per process, median of the rounds: the drain's PostgreSQL backend "
        f"{median(drains, 'backend')}, reading thread {median(drains, 'reading')}, main thread "
        f"{median(drains, 'main')}, Redis {median(drains, 'redis')}; the COPY's backend "
        f"{median(copies, 'backend')}, main thread {median(copies, 'main')}"
    )


def goals(ratio: float | None, overview: dict[str, dict[str, float]] | None) -> int:
    print("\nGoals")
    if ratio is not None:
        print(
            f"   drain ≥ {GOAL_RATIO}× COPY: {'met' if ratio >= GOAL_RATIO else 'MISSED'} "
            f"({ratio:.2f}×)"
        )
    if overview is not None:
        for label, result in overview.items():
            median = result["median_ms"]
            print(
                f"   /billing/ < {GOAL_RENDER_MS:.0f} ms, {label}: "
                f"{'met' if median < GOAL_RENDER_MS else 'MISSED'} ({median:.0f} ms)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
