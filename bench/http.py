"""Benchmark: the check API over HTTP, next to a bare DRF view doing one EVALSHA.

    .venv/bin/python bench/http.py [--seconds 5] [--rounds 3] [--connections 8]
                                   [--loader auto|wrk|python] [--bogus 10000]

One command, real services: it creates a database of its own on the PostgreSQL server of
DATABASE_URL (default postgres://postgres@127.0.0.1:5432/quota_platform), migrates it,
loads a policy of four rules (three of the tier, one global capacity) with ``loadpolicy``,
creates a key with ``createapikey``, and serves the project with gunicorn (two sync
workers, the production config) against it and the Redis of REDIS_URL (default
redis://127.0.0.1:6379/0), every key under a prefix of the run's own. Then, alternating
in rounds on the same server:

1. ``POST /api/v1/check`` (a valid key, 1,000 end users, 100 estimated tokens) and
   ``POST /bench/evalsha`` (bench/http_urls.py: the same middleware, parser and renderer,
   then one EVALSHA of a one-line script): requests per second, p50 and p99, the ratio;
2. the SQL a warm check costs: PostgreSQL's own transaction and session counters of the
   database, read before and after a phase of checks;
3. bogus keys: 10,000 requests whose key has a wrong checksum, alone (their SQL, by the
   same counters; a control with well-formed unknown keys shows the counters do see
   per-request SQL), then during valid traffic (its p99 with and without them);
4. a tenant far over its limit (1 request an hour, every check denied; the server runs with
   the over-limit cache on, ``QUOTA_OVER_LIMIT_CACHE_SECONDS=5``): ``POST /api/v1/check``,
   answered by the WSGI front before Django (limits/cached_denials.py), alternating with
   ``POST /bench/check`` (bench/http_urls.py: the same view under another path, so Django
   answers it, from the same cache): requests per second, p50, p99, the gunicorn workers'
   CPU time per answer (from /proc), and their ratios.

The load comes from wrk when it is installed (Debian package ``wrk``), else from Python
processes with http.client connections. Everything it made is removed at the end: the
database, the Redis keys, the server.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder comes first on sys.path, and this module, named
# http, would hide the standard library's http package from everything imported below.
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0]) == os.path.join(REPOSITORY, "bench"):
    sys.path[0] = REPOSITORY

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlsplit, urlunsplit  # noqa: E402

import psycopg  # noqa: E402
import redis  # noqa: E402

USERS = 1000
TOKENS = 100
CHECK_PATH = "/api/v1/check"
BASELINE_PATH = "/bench/evalsha"
DJANGO_CHECK_PATH = "/bench/check"
POLICY = """\
model_classes:
  - name: frontier
    capacity: [{metric: requests, limit: 1000000000, window: 60}]
    models:
      - {id: gpt-4o, input_price_per_1k: "0.0025", output_price_per_1k: "0.0100"}
tiers:
  - name: standard
    fail_mode: closed
    limits:
      - {scope: user_model, metric: requests, limit: 100000000, window: 3600}
      - {scope: user_model, metric: tokens, limit: 1000000000, window: 3600, model_class: frontier}
      - {scope: tenant, metric: requests, limit: 1000000000, window: 60}
  - name: tiny
    fail_mode: closed
    limits:
      - {scope: tenant, metric: requests, limit: 1, window: 3600}
tenants:
  - {slug: bench, name: Benchmark, tier: standard}
  - {slug: hot, name: Far over its limit, tier: tiny}
"""
STATISTICS_DELAY = 11.0
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


# -- setup -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


class Database:
    """A database of the run's own on the server of ``url``."""

    def __init__(self, url: str) -> None:
        self.name = f"quota_bench_{os.getpid()}_{secrets.token_hex(3)}"
        self.admin_url = _with_database(url, "postgres")
        self.url = _with_database(url, self.name)

    def create(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{self.name}"')

    def drop(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def counters(self) -> tuple[int, int]:
        """(transactions, sessions) PostgreSQL has counted in this database so far.

        Read from the admin database, so that reading does not count, and after a pause: a
        backend that stays connected (Django keeps its connection for a minute) reports
        its statistics at the latest 10 seconds after it went idle (PostgreSQL 15+).
        """
        time.sleep(STATISTICS_DELAY)
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            row = connection.execute(
                "SELECT xact_commit + xact_rollback, sessions FROM pg_stat_database "
                "WHERE datname = %s",
                [self.name],
            ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])


def _manage(environ: dict[str, str], *arguments: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", *arguments],
        cwd=REPOSITORY,
        env=environ,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(arguments)} failed:\n{result.stderr}")
    return result.stdout


class Server:
    """gunicorn with the production config and the bench's settings (the baseline route)."""

    def __init__(self, environ: dict[str, str], directory: Path, workers: int) -> None:
        self.port = _free_port()
        self.log_path = directory / "gunicorn.log"
        self.environ = {
            **environ,
            "PORT": str(self.port),
            "WEB_CONCURRENCY": str(workers),
            "PROMETHEUS_MULTIPROC_DIR": str(directory / "metrics"),
            "LOG_LEVEL": "warning",
        }
        (directory / "metrics").mkdir()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "quota_platform/gunicorn.conf.py"],
                cwd=REPOSITORY,
                env=self.environ,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited; see {self.log_path}")
            try:
                if call(self.port, "GET", "/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"gunicorn did not start; see {self.log_path}")

    def workers_cpu_seconds(self) -> float:
        """CPU time (user + system) the gunicorn workers have used so far, from /proc."""
        assert self.process is not None
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # gone meanwhile
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == self.process.pid:  # ppid: a worker of this server
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / ticks

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def call(
    port: int, method: str, path: str, body: bytes | None = None, key: str | None = None
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def bad_checksum(key: str) -> str:
    """The same key with its last checksum character changed: refused by its format alone."""
    last = key[-1]
    return key[:-1] + ("0" if last != "0" else "1")


def well_formed_unknown(key: str) -> str:
    """A key of the right format and checksum that no database row matches: the control
    that the counters do see per-request SQL."""
    head = key[: key.index("_", 3) + 1] + "".join(secrets.choice(BASE62) for _ in range(32))
    number = zlib.crc32(head.encode("ascii"))
    digits = []
    for _ in range(6):
        number, remainder = divmod(number, 62)
        digits.append(BASE62[remainder])
    return head + "".join(reversed(digits))


# -- load ------------------------------------------------------------------------------
@dataclass
class Result:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int  # answers other than the expected status, or failed requests

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def _check_body(number: int) -> bytes:
    return f'{{"user_id":"user-{number % USERS}","model":"gpt-4o","tokens":{TOKENS}}}'.encode()


def _python_worker(
    port: int,
    path: str,
    key: str,
    expected: int,
    seconds: float,
    most: int,
    start: float,
    offset: int,
    results: Any,
) -> None:
    while time.time() < start:
        time.sleep(0.001)
    deadline = time.monotonic() + seconds
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    latencies: list[float] = []
    errors = 0
    number = offset
    while time.monotonic() < deadline and len(latencies) < most:
        number += 1
        began = time.perf_counter()
        try:
            connection.request("POST", path, body=_check_body(number), headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status != expected:
                errors += 1
        except (OSError, http.client.HTTPException):
            errors += 1
            connection.close()
            continue
        latencies.append(time.perf_counter() - began)
    connection.close()
    results.put((latencies, errors))


def python_load(
    port: int,
    path: str,
    key: str,
    *,
    seconds: float,
    connections: int,
    expected: int = 200,
    most: int | None = None,
) -> Result:
    """Closed loop: ``connections`` processes, each one request at a time."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    per_process = (most + connections - 1) // connections if most else 10**9
    start = time.time() + 0.2
    processes = [
        context.Process(
            target=_python_worker,
            args=(port, path, key, expected, seconds, per_process, start, n * 100_003, results),
        )
        for n in range(connections)
    ]
    for process in processes:
        process.start()
    latencies: list[float] = []
    errors = 0
    for _ in processes:
        part, part_errors = results.get(timeout=seconds + 60)
        latencies.extend(part)
        errors += part_errors
    elapsed = time.time() - start
    for process in processes:
        process.join(timeout=10)
    latencies.sort()
    return Result(
        requests=len(latencies),
        seconds=elapsed,
        p50_ms=_percentile(latencies, 0.50) * 1000,
        p99_ms=_percentile(latencies, 0.99) * 1000,
        errors=errors,
    )


def _percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


WRK_SCRIPT = """
local counter = {offset}
local answered = 0
local most = {most}
local headers = {{["Content-Type"] = "application/json", ["Authorization"] = "Bearer {key}"}}
request = function()
  counter = counter + 1
  local body = string.format('{{"user_id":"user-%d","model":"gpt-4o","tokens":{tokens}}}',
                             counter % {users})
  return wrk.format("POST", "{path}", headers, body)
end
response = function(status, headers, body)
  answered = answered + 1
  if most > 0 and answered >= most then wrk.thread:stop() end
end
"""
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk_start(
    port: int,
    path: str,
    key: str,
    *,
    seconds: float,
    connections: int,
    directory: Path,
    most: int = 0,
) -> subprocess.Popen[str]:
    script = directory / f"wrk-{secrets.token_hex(4)}.lua"
    script.write_text(
        WRK_SCRIPT.format(
            offset=secrets.randbelow(10**6),
            most=most,
            key=key,
            tokens=TOKENS,
            users=USERS,
            path=path,
        )
    )
    return subprocess.Popen(
        [
            "wrk",
            "--threads",
            "1",
            "--connections",
            str(connections),
            "--duration",
            f"{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "--latency",
            "--script",
            str(script),
            f"http://127.0.0.1:{port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wrk_result(process: subprocess.Popen[str], *, expected: int = 200) -> Result:
    output, _ = process.communicate(timeout=600)
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed:\n{output}")

    def latency(label: str) -> float:
        found = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        if found is None:
            raise RuntimeError(f"no {label}% latency in wrk's output:\n{output}")
        return float(found[1]) * _UNITS[found[2]]

    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    if total is None:
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    seconds = float(total[2]) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[total[3]]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read \d+, write (\d+), timeout (\d+)", output
    )
    requests = int(total[1])
    unexpected = int(non_2xx[1]) if non_2xx else 0
    if expected != 200:
        unexpected = requests - unexpected
    if socket_errors:
        unexpected += sum(int(value) for value in socket_errors.groups())
    return Result(requests, seconds, latency("50"), latency("99"), unexpected)


class Load:
    def __init__(self, loader: str, port: int, connections: int, directory: Path) -> None:
        self.loader = loader
        self.port = port
        self.connections = connections
        self.directory = directory

    def run(
        self,
        path: str,
        key: str,
        seconds: float,
        *,
        expected: int = 200,
        most: int | None = None,
        connections: int | None = None,
    ) -> Result:
        connections = connections or self.connections
        # wrk can stop sending after a count, but not stop its clock: counted runs are Python's.
        if self.loader == "wrk" and most is None:
            process = wrk_start(
                self.port,
                path,
                key,
                seconds=seconds,
                connections=connections,
                directory=self.directory,
                most=most or 0,
            )
            return wrk_result(process, expected=expected)
        return python_load(
            self.port,
            path,
            key,
            seconds=seconds,
            connections=connections,
            expected=expected,
            most=most,
        )

    def run_together(
        self, main: tuple[str, str], flood: tuple[str, str], seconds: float
    ) -> tuple[Result, Result]:
        """The main load on all connections while one more connection floods."""
        path, key = main
        flood_path, flood_key = flood
        if self.loader == "wrk":
            first = wrk_start(
                self.port,
                path,
                key,
                seconds=seconds,
                connections=self.connections,
                directory=self.directory,
            )
            second = wrk_start(
                self.port,
                flood_path,
                flood_key,
                seconds=seconds,
                connections=1,
                directory=self.directory,
            )
            return wrk_result(first), wrk_result(second, expected=401)
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        flooding = context.Process(
            target=_flood_process, args=(self.port, flood_path, flood_key, seconds, queue)
        )
        flooding.start()
        result = python_load(self.port, path, key, seconds=seconds, connections=self.connections)
        flood_result = queue.get(timeout=seconds + 60)
        flooding.join(timeout=10)
        return result, flood_result


def _flood_process(port: int, path: str, key: str, seconds: float, queue: Any) -> None:
    queue.put(python_load(port, path, key, seconds=seconds, connections=1, expected=401))


# -- the run ---------------------------------------------------------------------------
def _row(name: str, result: Result) -> str:
    return (
        f"  {name:<34} {result.rps:>9,.0f} rps   p50 {result.p50_ms:6.2f} ms   "
        f"p99 {result.p99_ms:6.2f} ms   {result.requests:>7,} requests"
        + (f"   {result.errors} unexpected" if result.errors else "")
    )


def _combined(results: list[Result]) -> Result:
    return Result(
        requests=sum(result.requests for result in results),
        seconds=sum(result.seconds for result in results),
        p50_ms=statistics.median(result.p50_ms for result in results),
        p99_ms=statistics.median(result.p99_ms for result in results),
        errors=sum(result.errors for result in results),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=3, help="check/baseline alternations")
    parser.add_argument("--connections", type=int, default=8, help="concurrent clients")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn sync workers")
    parser.add_argument("--bogus", type=int, default=10_000, help="bogus-key requests")
    parser.add_argument("--loader", choices=["auto", "wrk", "python"], default="auto")
    arguments = parser.parse_args()
    loader = arguments.loader
    if loader == "auto":
        loader = "wrk" if shutil.which("wrk") else "python"

    base_url = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/quota_platform")
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"qb{secrets.token_hex(6)}"
    database = Database(base_url)
    directory = Path(tempfile.mkdtemp(prefix="quota-bench-http-"))
    environ = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "bench.http_settings",
        "DATABASE_URL": database.url,
        "REDIS_URL": redis_url,
        "QUOTA_KEY_PREFIX": prefix,
        "SECRET_KEY": os.environ.get("SECRET_KEY", "bench-" + secrets.token_hex(16)),
        "DEBUG": "false",
        # Nothing in phases 1-3 is denied; phase 4's tenant is denied from it.
        "QUOTA_OVER_LIMIT_CACHE_SECONDS": "5",
    }
    environ.pop("GUNICORN_CMD_ARGS", None)
    server = Server(environ, directory, arguments.workers)
    print(
        f"bench/http.py: gunicorn with {arguments.workers} sync workers, {loader} with "
        f"{arguments.connections} connections, {arguments.rounds} rounds of "
        f"{arguments.seconds:g} s per endpoint; {os.cpu_count()} CPUs"
    )
    try:
        started = time.monotonic()
        database.create()
        _manage(environ, "migrate", "--noinput")
        policy_file = directory / "policy.yaml"
        policy_file.write_text(POLICY)
        _manage(environ, "loadpolicy", str(policy_file))
        key = _manage(environ, "createapikey", "bench", "--name", "bench").splitlines()[-1]
        hot_key = _manage(environ, "createapikey", "hot", "--name", "bench").splitlines()[-1]
        server.start()
        print(f"  set up in {time.monotonic() - started:.1f} s (database {database.name})")
        load = Load(loader, server.port, arguments.connections, directory)
        _run(load, server, database, key, hot_key, arguments)
    finally:
        server.stop()
        database.drop()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
        client.close()
        shutil.rmtree(directory, ignore_errors=True)


def _run(
    load: Load,
    server: Server,
    database: Database,
    key: str,
    hot_key: str,
    arguments: argparse.Namespace,
) -> None:
    seconds = arguments.seconds
    # Warm up both: every worker verifies the key, loads the policy, loads the scripts.
    load.run(CHECK_PATH, key, 1.0)
    load.run(BASELINE_PATH, key, 1.0)

    checks: list[Result] = []
    baselines: list[Result] = []
    for _ in range(arguments.rounds):
        checks.append(load.run(CHECK_PATH, key, seconds))
        baselines.append(load.run(BASELINE_PATH, key, seconds))
    check, baseline = _combined(checks), _combined(baselines)
    ratio = check.rps / baseline.rps
    print("\nThroughput, alternating on one server (medians of the rounds' percentiles):")
    print(_row("POST /api/v1/check (4 rules)", check))
    print(_row("POST /bench/evalsha (baseline)", baseline))
    print(f"  ratio check / baseline: {ratio:.2f}x   (goal >= 0.70x)")

    print("\nSQL (PostgreSQL's own counters of the bench database; each read waits for them):")
    before = database.counters()
    warm = load.run(CHECK_PATH, key, seconds)
    after_warm = database.counters()
    print(
        f"  {warm.requests:,} warm checks: {after_warm[0] - before[0]} transactions, "
        f"{after_warm[1] - before[1]} sessions (the key is verified again every "
        "QUOTA_API_KEY_CACHE_SECONDS in each worker)"
    )
    bogus = load.run(
        CHECK_PATH, bad_checksum(key), 600, expected=401, most=arguments.bogus, connections=2
    )
    after_bogus = database.counters()
    print(
        f"  {bogus.requests:,} bogus keys (wrong checksum): "
        f"{after_bogus[0] - after_warm[0]} transactions, "
        f"{after_bogus[1] - after_warm[1]} sessions; {bogus.errors} answers other than 401"
    )
    control = load.run(
        CHECK_PATH, well_formed_unknown(key), 600, expected=401, most=500, connections=2
    )
    after_control = database.counters()
    print(
        f"  control, {control.requests:,} well-formed unknown keys: "
        f"{after_control[0] - after_bogus[0]} transactions, "
        f"{after_control[1] - after_bogus[1]} sessions"
    )

    print(
        f"\nValid checks ({arguments.connections} connections) alone, and while one more "
        "connection sends bogus keys, alternating until it has sent "
        f"{arguments.bogus:,}:"
    )
    alone_runs: list[Result] = []
    flooded_runs: list[Result] = []
    floods: list[Result] = []
    while sum(flood.requests for flood in floods) < arguments.bogus and len(floods) < 20:
        alone_runs.append(load.run(CHECK_PATH, key, seconds))
        flooded, flood = load.run_together(
            (CHECK_PATH, key), (CHECK_PATH, bad_checksum(key)), seconds
        )
        flooded_runs.append(flooded)
        floods.append(flood)
    alone, flooded, flood = _combined(alone_runs), _combined(flooded_runs), _combined(floods)
    print(_row("valid checks alone", alone))
    print(_row("valid checks during the flood", flooded))
    print(_row("the flood: bogus keys -> 401", flood))
    increase = flooded.p99_ms / alone.p99_ms - 1
    print(f"  valid p99 increase: {increase * 100:+.1f} %   (goal <= +10 %)")

    # Every worker answers one denial through Django first (it learns the answer's headers
    # there) and the full check fills its over-limit cache.
    load.run(CHECK_PATH, hot_key, 1.0)
    load.run(DJANGO_CHECK_PATH, hot_key, 1.0)
    fronts: list[Result] = []
    djangos: list[Result] = []
    # The workers' own CPU per answer: unlike the rates, it does not move with what else
    # the machine (the load processes included) is doing.
    cpu = {CHECK_PATH: 0.0, DJANGO_CHECK_PATH: 0.0}
    for _ in range(arguments.rounds):
        for path, results in ((CHECK_PATH, fronts), (DJANGO_CHECK_PATH, djangos)):
            before = server.workers_cpu_seconds()
            results.append(load.run(path, hot_key, seconds))
            cpu[path] += server.workers_cpu_seconds() - before
    front, django = _combined(fronts), _combined(djangos)
    front_cpu = cpu[CHECK_PATH] / front.requests * 1e6
    django_cpu = cpu[DJANGO_CHECK_PATH] / django.requests * 1e6
    print("\nA tenant far over its limit (every check denied from the over-limit cache):")
    print(_row("POST /api/v1/check (the front)", front) + f"   {front_cpu:5.0f} µs CPU each")
    print(_row("POST /bench/check (Django)", django) + f"   {django_cpu:5.0f} µs CPU each")
    print(
        f"  ratio front / Django: {front.rps / django.rps:.2f}x the rate, "
        f"{front_cpu / django_cpu:.2f}x the workers' CPU per answer"
    )
    print(
        json.dumps(
            {
                "check_rps": round(check.rps),
                "baseline_rps": round(baseline.rps),
                "ratio": round(ratio, 3),
                "check_p50_ms": check.p50_ms,
                "check_p99_ms": check.p99_ms,
                "baseline_p50_ms": baseline.p50_ms,
                "baseline_p99_ms": baseline.p99_ms,
                "p99_increase_under_bogus_flood": round(increase, 3),
                "denied_front_rps": round(front.rps),
                "denied_django_rps": round(django.rps),
                "denied_front_p99_ms": front.p99_ms,
                "denied_front_cpu_us": round(front_cpu),
                "denied_django_cpu_us": round(django_cpu),
                "denied_django_p99_ms": django.p99_ms,
            }
        )
    )


if __name__ == "__main__":
    main()
