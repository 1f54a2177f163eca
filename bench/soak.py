"""Soak: the real deployment under mixed traffic for minutes while faults are injected.

    .venv/bin/python bench/soak.py [--minutes 10] [--tenants 50] [--workers 4]
                                   [--clients 4] [--rate 60] [--publishes 20] [--seed N]
                                   [--no-aof] [--over-limit-cache SECONDS]
                                   [--hot-nice N] [--no-hot-idle] [--worker-nice N]
                                   [--keep-logs DIR]
    .venv/bin/python bench/soak.py --hot-report DIR [DIR ...]

One command, bounded in time, loopback only, in a world of its own: a redis-server of its
own on a free port, run as docs/operations.md says to run it when billing must survive a
Redis restart (AOF, ``appendfsync everysec``; ``--no-aof``: no persistence at all), a
PostgreSQL database of its own on the server of DATABASE_URL (default
postgres://postgres@127.0.0.1:5432/…), migrated, with a policy of ``--tenants`` tenants on
three tiers (one fail mode each), short windows and small limits so that denials happen,
token limits and a global capacity on one model class, loaded with ``loadpolicy``, and an
API key per tenant made by ``limits.services.apikey_create``. It serves that world with
gunicorn (the project's config, ``--workers`` sync workers) and a Celery worker with beat
(``worker -B``, as ``scripts/run`` starts them, and started again 2 s after it exits by
itself, as ``scripts/run`` does), and drives checks, usage commits and quota reads from
``--clients`` processes across every tenant and many users.

At moments drawn from a seeded RNG (the seed is printed; ``--seed`` repeats a run's
schedule) it restarts Redis (SIGTERM to its pid, started again on the same port), SIGKILLs
the Celery worker's process group and starts it again, publishes ``--publishes`` new policy
versions through ``loadpolicy`` (each toggles four limits), and lets one hot tenant send 50
times its tenant limit for a phase, in one 5-second slice of each pair, which one drawn from
the seed: the other tenants' checks in the silent slices are the control for those in the
loud ones, in the same minutes. On a real deployment that tenant's clients run on machines
of their own; here, on the same cores, their own work would count against the platform, so
its two client processes write each request on a plain socket and decode and log their
denials after the phase, and run at nice 19 (``--hot-nice``) under the kernel's SCHED_IDLE
policy (``--no-hot-idle``: not); the platform's work for their checks runs at the usual
priority. The other tenants' clients, which measure the platform, run in a session of their
own, so that where the kernel shares CPU time between sessions first they are not charged
for the hot clients' CPU. The platform runs with its over-limit cache on
(``--over-limit-cache``, 5 s; ``0`` turns it off). Every client logs every answer it got.
After the run it waits (boundedly) for the usage reports the platform deferred (answered 202
while Redis was away) to be applied, drains what is left with ``manage.py drain_usage`` and
prints: answers by status, check latency per phase, degraded decisions, over-admissions per
rule from the decision log, and events sent against events billed. It exits 1 when it saw a
5xx other than a documented 503 during a Redis outage, an over-admission, an event lost or
billed twice that no fault explains (with AOF, a graceful Redis restart explains none), or a
deferred report not applied.

With ``--hot-report`` it runs nothing and reads the logs that earlier runs kept
(``--keep-logs``) together: the hot tenant's effect in each run and over all of them, where
one run's p99 rests on some 70 slow checks a side.

It ends only the processes it started, by pid (the Celery worker and gunicorn by the
process groups it gave them), on success, failure, Ctrl-C and SIGTERM, drops its database
and removes its temporary directory.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder comes first on sys.path, and bench/http.py would hide
# the standard library's http package from everything imported below.
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0]) == os.path.join(REPOSITORY, "bench"):
    sys.path[0] = REPOSITORY

import argparse  # noqa: E402
import bisect  # noqa: E402
import csv  # noqa: E402
import heapq  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from collections.abc import Iterable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlencode, urlsplit, urlunsplit  # noqa: E402

import psycopg  # noqa: E402
import redis  # noqa: E402

# -- the world's policy ----------------------------------------------------------------
WINDOW = 10  # seconds, every windowed rule
USERS_PER_TENANT = 20
HOT_TENANT = "soak-00"
HOT_LIMIT = 10  # the hot tenant's own tenant requests limit per WINDOW
HOT_FACTOR = 50
# The hot tenant sends in slices of this many seconds, one slice of every two (hot_slice_loud):
# the others' checks in its silent slices are the control, measured in the same minutes as
# those in its loud ones (background load on a shared machine drifts over minutes; see the
# report).
HOT_SLICE = 5.0
MODELS = {  # id: (class, share of the traffic, input price, output price)
    "gpt-4o": ("frontier", 0.45, "0.0025", "0.0100"),
    "claude-3-5-sonnet": ("frontier", 0.20, "0.0030", "0.0150"),
    "llama-3-8b": ("small", 0.25, "0.0001", "0.0002"),
    "mistral-7b": ("small", 0.10, "0.0001", "0.0002"),
}
CAPACITY = {False: 350, True: 300}  # frontier requests per WINDOW, across every tenant
TIERS = {  # name: (fail mode, {(scope, metric): limit per WINDOW})
    "standard": (
        "closed",
        {
            ("user_model", "requests"): 3,
            ("user", "requests"): 5,
            ("tenant", "requests"): 20,
            ("user_model", "tokens"): 1500,
            ("tenant", "tokens"): 8000,
        },
    ),
    "premium": (
        "local",
        {
            ("user_model", "requests"): 5,
            ("user", "requests"): 8,
            ("tenant", "requests"): 40,
            ("user_model", "tokens"): 3000,
            ("tenant", "tokens"): 16000,
        },
    ),
    "free": (
        "open",
        {
            ("user_model", "requests"): 2,
            ("user", "requests"): 3,
            ("tenant", "requests"): 10,
            ("user_model", "tokens"): 800,
            ("tenant", "tokens"): 4000,
        },
    ),
}
# What every other publish changes (and the next one changes back): a limit lowered on each
# tier, and the class capacity.
VARIANT = {
    ("standard", "user", "requests"): 4,
    ("premium", "tenant", "requests"): 32,
    ("free", "user_model", "tokens"): 600,
}
VARIANT_TEXT = (
    f"standard user requests {TIERS['standard'][1][('user', 'requests')]}<->4, premium tenant "
    f"requests {TIERS['premium'][1][('tenant', 'requests')]}<->32, free user_model tokens "
    f"{TIERS['free'][1][('user_model', 'tokens')]}<->600, frontier capacity "
    f"{CAPACITY[False]}<->{CAPACITY[True]}"
)

# -- phases ----------------------------------------------------------------------------
WARM_UP, STEADY, REDIS_RESTART, WORKER_KILL, PUBLISH, HOT = range(6)
ENDED = -1
PHASES = {
    WARM_UP: "warm-up",
    STEADY: "steady",
    REDIS_RESTART: "redis-restart",
    WORKER_KILL: "worker-kill",
    PUBLISH: "publish",
    HOT: "hot-tenant",
}
WARM_UP_SECONDS = 15.0
REDIS_TAIL = 5.0  # seconds after Redis is back still counted as its phase
OUTAGE_503_TAIL = 2.0  # a worker's breaker and its first reconnect after Redis is back
WORKER_TAIL = 10.0
PUBLISH_TAIL = 2.0  # processes poll for a new version every 0.5 s
PUBLISH_MARGIN = (1.0, 2.0)  # seconds before the publish started, after it ended
WORKER_RESTART_DELAY = 2.0  # scripts/run starts a Celery worker that exited again after 2 s
DEFERRED_WAIT = 120.0  # seconds after the traffic for deferred usage reports to be applied
INFERENCE_SECONDS = (0.1, 2.0)  # from an allowed check to its usage report


def tier_of(index: int) -> str:
    return ("standard", "premium", "free")[index % 3] if index else "standard"


def slugs(tenants: int) -> list[str]:
    return [f"soak-{index:02d}" for index in range(tenants)]


def policy_document(tenants: int, *, variant: bool) -> dict[str, Any]:
    def rules(tier: str) -> list[dict[str, Any]]:
        found = []
        for (scope, metric), limit in TIERS[tier][1].items():
            if variant:
                limit = VARIANT.get((tier, scope, metric), limit)
            found.append({"scope": scope, "metric": metric, "limit": limit, "window": WINDOW})
        return found

    classes: dict[str, list[dict[str, str]]] = defaultdict(list)
    for model, (model_class, _share, input_price, output_price) in MODELS.items():
        classes[model_class].append(
            {"id": model, "input_price_per_1k": input_price, "output_price_per_1k": output_price}
        )
    capacity = [{"metric": "requests", "limit": CAPACITY[variant], "window": WINDOW}]
    return {
        "model_classes": [
            {
                "name": name,
                "models": models,
                **({"capacity": capacity} if name == "frontier" else {}),
            }
            for name, models in classes.items()
        ],
        "tiers": [
            {"name": name, "fail_mode": fail_mode, "limits": rules(name)}
            for name, (fail_mode, _limits) in TIERS.items()
        ],
        "tenants": [
            {
                "slug": slug,
                "name": f"Soak tenant {index}",
                "tier": tier_of(index),
                **(
                    {
                        "limits": [
                            {
                                "scope": "tenant",
                                "metric": "requests",
                                "limit": HOT_LIMIT,
                                "window": WINDOW,
                            }
                        ]
                    }
                    if slug == HOT_TENANT
                    else {}
                ),
            }
            for index, slug in enumerate(slugs(tenants))
        ],
    }


CREATE_KEYS = """
import json
from limits.models import Tenant
from limits.services import Actor, apikey_create
keys = {}
for tenant in Tenant.objects.filter(slug__startswith="soak-").order_by("slug"):
    _api_key, key = apikey_create(tenant=tenant, name="soak", actor=Actor(label="soak"))
    keys[tenant.slug] = key
print(json.dumps(keys))
"""


# -- the world -------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


class Database:
    """A database of the run's own, created fresh and dropped at the end."""

    def __init__(self, url: str) -> None:
        self.name = f"quota_soak_{os.getpid()}"
        self.admin_url = _with_database(url, "postgres")
        self.url = _with_database(url, self.name)
        self.created = False

    def create(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            connection.execute(f'CREATE DATABASE "{self.name}"')
        self.created = True

    def drop(self) -> None:
        if self.created:
            with psycopg.connect(self.admin_url, autocommit=True) as connection:
                connection.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            self.created = False


def _lower_priority(nice: int) -> Any:
    """For a child in a session of its own: its niceness, and its session's scheduling group's
    (where the kernel groups CPU time by session, a niceness alone orders only the processes
    of one session)."""

    def lower() -> None:
        os.nice(nice)
        try:
            Path("/proc/self/autogroup").write_text(str(nice))
        except OSError:
            pass  # no autogroup scheduling here: the niceness is all there is

    return lower


class Service:
    """A long-running process of the soak's own, in a process group of its own, so that
    the terminal's Ctrl-C reaches only the soak, which then stops it."""

    def __init__(
        self, name: str, command: list[str], environ: dict[str, str], log: Path, *, nice: int = 0
    ) -> None:
        self.name = name
        self.command = command
        self.environ = environ
        self.log_path = log
        self.nice = nice
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=REPOSITORY,
                env=self.environ,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_lower_priority(self.nice) if self.nice else None,
            )

    def stop(self, *, timeout: float = 30.0) -> None:
        """SIGTERM to the process, then SIGKILL to its group if it does not go."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
        self._reap_group()
        self.process = None

    def kill_group(self) -> None:
        """SIGKILL to every process of the group this service leads: a crash of it all."""
        process = self.process
        if process is None:
            return
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)

    def _reap_group(self) -> None:
        # Children the leader left behind (it exited first) are still in its group.
        assert self.process is not None
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(2)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class RedisServer(Service):
    """The run's own redis-server. With ``is_persistent`` it keeps an append-only file in the
    run's directory (``appendfsync everysec``, as docs/operations.md says to run it when
    undrained usage must survive), so a restart (SIGTERM: Redis writes the file out before
    it exits) comes back with every key; without, a restart starts empty."""

    def __init__(self, directory: Path, *, is_persistent: bool) -> None:
        self.port = _free_port()
        self.is_persistent = is_persistent
        data = directory / "redis"
        data.mkdir()
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "everysec"]
            if is_persistent
            else ["--appendonly", "no"]
        )
        super().__init__(
            "redis-server",
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *persistence,
                "--dir",
                str(data),
            ],
            dict(os.environ),
            directory / "redis.log",
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        super().start()
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + 15
        try:
            while time.monotonic() < deadline:
                if not self.is_running():
                    raise RuntimeError(f"redis-server exited; see {self.log_path}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    time.sleep(0.02)
        finally:
            client.close()
        raise RuntimeError(f"redis-server did not answer; see {self.log_path}")


def _manage(environ: dict[str, str], *arguments: str, timeout: float = 300) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", *arguments],
        cwd=REPOSITORY,
        env=environ,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        start_new_session=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(arguments[:1])} failed:\n{result.stderr}")
    return result.stdout


def _wait_healthy(service: Service, port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not service.is_running():
            raise RuntimeError(f"{service.name} exited; see {service.log_path}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        finally:
            connection.close()
        time.sleep(0.2)
    raise RuntimeError(f"{service.name} not ready; see {service.log_path}")


# -- the clients -----------------------------------------------------------------------
@dataclass(frozen=True)
class ClientPlan:
    number: int
    port: int
    keys: dict[str, str]
    tenants: tuple[str, ...]
    rate: float  # checks per second
    start: float  # time.time()
    deadline: float
    seed: int
    log_path: str
    is_hot: bool = False
    nice: int = 0  # added to the process's niceness before it sends anything
    idle: bool = False  # under SCHED_IDLE, the policy for work when nothing else wants the CPU
    run_seed: int = 0  # the run's seed: which slices are loud (hot_slice_loud)


def hot_slice_loud(seed: int, index: int) -> bool:
    """Whether the hot tenant sends in slice ``index`` of its phase: one slice of each pair,
    which one drawn from the run's seed. Plain alternation would put every periodic task
    whose period is a multiple of two slices (beat's 10-s policy reconcile, the 1-minute
    user rollups and budget alerts, the 5-minute rollup check) in slices of the same kind
    each time, and their bursts on one side of the comparison."""
    first_loud = random.Random(f"hot-slices:{seed}:{index // 2}").random() < 0.5
    return (index % 2 == 0) == first_loud


LOG_FIELDS = (
    "kind",  # check, usage or quota
    "phase",
    "sent",  # time.time() when the request went out
    "latency",  # seconds until the whole answer was read
    "status",  # HTTP status; 0 when no answer came
    "tenant",
    "user",
    "model",
    "request_id",
    "allowed",  # checks: 1/0; usage: 1 when the answer said repeated
    "degraded",  # checks: 1 when answered by the fail mode; usage: 1 when deferred (202)
    "version",
    "tokens",  # checks: the estimate; usage: input:output
    "limits",  # checks: scope.metric.window=limit|…
    "denied_by",  # checks: scope.metric.window of the limit that denied
)


class _Connection:
    """One HTTP connection, reopened whenever the server closed it (sync workers close
    every connection after their answer)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connection: http.client.HTTPConnection | None = None

    def call(
        self, method: str, path: str, key: str, body: dict[str, Any] | None
    ) -> tuple[float, float, int, dict[str, Any] | None]:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        payload = None if body is None else json.dumps(body).encode()
        sent = time.time()
        began = time.perf_counter()
        status, answer = 0, None
        try:
            if self.connection is None:
                self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            self.connection.request(method, path, payload, headers)
            response = self.connection.getresponse()
            raw = response.read()
            status = response.status
            if response.will_close:
                self.close()
            answer = _decoded(raw)
        except (OSError, http.client.HTTPException):
            self.close()
        return sent, time.perf_counter() - began, status, answer

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


class _RawConnection:
    """The hot tenant's client: one request per connection on a plain socket, its answer
    returned as bytes (run_client decodes a denial's after the phase). On a real deployment
    the hot tenant's clients run on machines of their own; here they share the platform's
    two cores, so the less they do per request the less of their own work is counted
    against the platform: http.client and the JSON of each answer cost about 0.8 ms a
    request, this about half of that (the kernel's work for each connection included)."""

    def __init__(self, port: int) -> None:
        self.address = ("127.0.0.1", port)

    def post(self, path: str, key: str, body: bytes) -> tuple[float, float, int, bytes]:
        request = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode() + body
        sent = time.time()
        began = time.perf_counter()
        chunks = []
        try:
            with socket.create_connection(self.address, timeout=10) as connection:
                connection.sendall(request)
                while chunk := connection.recv(65536):
                    chunks.append(chunk)
        except OSError:
            return sent, time.perf_counter() - began, 0, b""
        latency = time.perf_counter() - began
        raw = b"".join(chunks)
        head, _, payload = raw.partition(b"\r\n\r\n")
        try:
            status = int(head[9:12])
        except ValueError:
            status = 0
        return sent, latency, status, payload


def _decoded(raw: bytes) -> Any:
    """An answer's JSON; None when it has none (empty, or not JSON)."""
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _raw_answer(status: int, payload: bytes) -> dict[str, Any] | None:
    return _decoded(payload) if status == 200 else None


def _limits_text(answer: dict[str, Any]) -> str:
    return "|".join(
        f"{item['scope']}.{item['metric']}.{item['window']}={item['limit']}"
        for item in answer.get("limits") or ()
    )


def run_client(plan: ClientPlan, phase: Any) -> None:
    """One client process: paced checks, some quota reads, and the usage report of each
    allowed check once its inference has run (INFERENCE_SECONDS later): a Redis outage
    meets reports of checks that Redis allowed before it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the soak stops its clients itself,
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # by SIGTERM (not the soak's handler)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    if plan.nice:
        os.nice(plan.nice)
    if plan.idle and hasattr(os, "SCHED_IDLE"):  # Linux only
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    rng = random.Random(plan.seed)
    models = list(MODELS)
    shares = [MODELS[model][1] for model in models]
    connection = _Connection(plan.port)
    raw_connection = _RawConnection(plan.port) if plan.is_hot else None
    # The hot client's denials, as (phase, sent, latency, status, call, body): decoded and
    # logged after its phase, not between its requests.
    undecoded: list[tuple[int, float, float, int, tuple[str, str, str, str, int], bytes]] = []
    counter = 0
    interval = 1.0 / plan.rate
    next_at = plan.start
    # (when due, request number, tenant, user, model, request id, input, output, status)
    inferences: list[tuple[float, int, str, str, str, str, int, int, str]] = []
    with open(plan.log_path, "w", newline="", buffering=1 << 16) as out:
        log = csv.writer(out)

        def report_due(moment: float) -> None:
            while inferences and inferences[0][0] <= moment:
                (
                    _due,
                    _number,
                    tenant,
                    user,
                    model,
                    request_id,
                    input_tokens,
                    output_tokens,
                    state,
                ) = heapq.heappop(inferences)
                current = phase.value
                sent, latency, status, answer = connection.call(
                    "POST",
                    "/api/v1/usage",
                    plan.keys[tenant],
                    {
                        "request_id": request_id,
                        "input_tokens": input_tokens,
                        "output_tokens": output_tokens,
                        "status": state,
                    },
                )
                repeated = deferred = ""
                if status in (200, 202) and answer:
                    repeated = int(bool(answer.get("repeated")))
                    deferred = int(bool(answer.get("deferred")))
                log.writerow(
                    ("usage", current, f"{sent:.6f}", f"{latency:.6f}", status, tenant, user)
                    + (model, request_id, repeated, deferred, "")
                    + (f"{input_tokens}:{output_tokens}", "", "")
                )

        def write_check(
            current: int,
            sent: float,
            latency: float,
            status: int,
            call: tuple[str, str, str, str, int],
            answer: dict[str, Any] | None,
        ) -> tuple[Any, Any]:
            tenant, user, model, request_id, tokens = call
            allowed = degraded = version = ""
            limits = denied_by = ""
            if status == 200 and answer is not None:
                allowed = int(bool(answer["allowed"]))
                degraded = int(bool(answer.get("degraded")))
                version = answer.get("policy_version", "")
                limits = _limits_text(answer)
                denied = answer.get("denied_by")
                if denied:
                    denied_by = f"{denied['scope']}.{denied['metric']}.{denied['window']}"
            log.writerow(
                ("check", current, f"{sent:.6f}", f"{latency:.6f}", status, tenant, user, model)
                + (request_id, allowed, degraded, version, tokens, limits, denied_by)
            )
            return allowed, degraded

        def check(tenant: str, user: str, model: str) -> None:
            nonlocal counter
            counter += 1
            request_id = f"c{plan.number}-{counter}"
            tokens = rng.randint(50, 600)
            key = plan.keys[tenant]
            current = phase.value
            call = (tenant, user, model, request_id, tokens)
            body = {"user_id": user, "model": model, "tokens": tokens, "request_id": request_id}
            if raw_connection is not None:
                sent, latency, status, payload = raw_connection.post(
                    "/api/v1/check", key, json.dumps(body).encode()
                )
                if b'"allowed":true' not in payload:
                    # A denial (nearly every hot check): nothing to report, decoded later.
                    undecoded.append((current, sent, latency, status, call, payload))
                    return
                answer = _raw_answer(status, payload)
            else:
                sent, latency, status, answer = connection.call("POST", "/api/v1/check", key, body)
            allowed, degraded = write_check(current, sent, latency, status, call, answer)
            if allowed == 1 and degraded == 0:
                # What the inference really used: never more than the estimate, so that
                # a token window holds at least the actuals from the check on.
                input_tokens = rng.randint(0, tokens)
                output_tokens = rng.randint(0, tokens - input_tokens)
                state = rng.choices(("ok", "error", "cancelled"), (0.9, 0.05, 0.05))[0]
                due = time.time() + rng.uniform(*INFERENCE_SECONDS)
                heapq.heappush(
                    inferences,
                    (due, counter, tenant, user, model, request_id)
                    + (input_tokens, output_tokens, state),
                )

        while True:
            report_due(time.time())
            now = time.time()
            if now >= plan.deadline:
                break
            if next_at > now:
                wake = min(next_at, inferences[0][0]) if inferences else next_at
                time.sleep(max(0.0, min(wake, plan.deadline) - now))
                continue
            # Open loop, but a client that fell behind does not make up for it in a burst.
            next_at = max(next_at, time.time() - 1.0)
            tenant = rng.choice(plan.tenants)
            user = "user-0" if rng.random() < 0.4 else f"user-{rng.randrange(USERS_PER_TENANT)}"
            model = rng.choices(models, shares)[0]
            draw = rng.random()
            if plan.is_hot:
                index = int((now - plan.start) // HOT_SLICE)
                if not hot_slice_loud(plan.run_seed, index):
                    # A silent slice: wait for the next one, without making up for it.
                    next_at = plan.start + (index + 1) * HOT_SLICE
                    continue
            if plan.is_hot:
                user = f"user-{rng.randrange(USERS_PER_TENANT)}"
                check(tenant, user, model)
                next_at += interval
            elif draw < 0.05:
                current = phase.value
                query = urlencode({"user_id": user, "model": model})
                sent, latency, status, _answer = connection.call(
                    "GET", f"/api/v1/quota?{query}", plan.keys[tenant], None
                )
                log.writerow(
                    ("quota", current, f"{sent:.6f}", f"{latency:.6f}", status, tenant, user)
                    + (model, "", "", "", "", "", "", "")
                )
                next_at += interval
            elif draw < 0.13:
                # A burst: one user on one model, back to back.
                for _ in range(6):
                    check(tenant, user, model)
                next_at += 6 * interval
            else:
                check(tenant, user, model)
                next_at += interval
        # The inferences still running end, and report, at once.
        report_due(float("inf"))
        for current, sent, latency, status, call, payload in undecoded:
            answer = _raw_answer(status, payload)
            if answer is not None and answer["allowed"]:
                print(f"soak: an allowed answer taken for a denial: {payload!r}", file=sys.stderr)
            write_check(current, sent, latency, status, call, answer)
    connection.close()
    if plan.is_hot:
        # Its own CPU, all of it spent on the soak's two cores: the report prints it per check.
        Path(plan.log_path).with_suffix(".cpu").write_text(f"{counter} {time.process_time()}\n")


def run_clients_in_session(plans: list[ClientPlan], phase: Any) -> None:
    """The other tenants' clients, forked from a session of their own.

    Where the kernel shares CPU time between sessions first (autogroup scheduling), the
    processes of one session are charged together: the hot tenant's clients, in the soak's
    session, would make these, which measure the platform, wait for the CPU they used. On
    a real deployment the two run on machines of their own."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    children: list[int] = []
    for plan in plans:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                run_client(plan, phase)
                code = 0
            except BaseException:  # noqa: BLE001 - told, as multiprocessing would
                traceback.print_exc()
            finally:
                os._exit(code)
        children.append(pid)

    def stop(signum: int, frame: Any) -> None:
        for child in children:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    for child in children:
        os.waitpid(child, 0)


# -- the schedule ----------------------------------------------------------------------
@dataclass
class Fault:
    kind: str  # publish, redis, worker, hot
    at: float  # seconds after the clients started
    reserve: float  # seconds kept free for it
    pause: float = 0.0  # redis, worker: how long it stays down


@dataclass
class Record:
    """What the controller did and when (time.time())."""

    phases: list[tuple[float, int]] = field(default_factory=list)
    outages: list[tuple[float, float]] = field(default_factory=list)  # Redis down → up
    at_risk_since: list[float] = field(default_factory=list)  # stream snapshot times
    at_risk: set[tuple[str, str, str]] = field(default_factory=set)  # (kind, tenant id, rid)
    kills: list[tuple[float, float]] = field(default_factory=list)
    publishes: list[tuple[float, float, bool]] = field(default_factory=list)
    hot: tuple[float, float] | None = None
    hot_origin: float = 0.0  # the hot tenant's slices are counted from here
    # ... until here, when its clients stop sending (and then decode and log their answers)
    hot_until: float = 0.0
    # The worker's exits that were not the soak's doing: (when, status, its log's last lines)
    deaths: list[tuple[float, int | None, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def schedule(
    rng: random.Random, seconds: float, publishes: int, restarts: int, kills: int, hot: float
) -> list[Fault]:
    faults = (
        [Fault("publish", 0, 8.0) for _ in range(publishes)]
        + [Fault("redis", 0, 14.0, rng.uniform(1.0, 4.0)) for _ in range(restarts)]
        + [Fault("worker", 0, 26.0, rng.uniform(2.0, 8.0)) for _ in range(kills)]
        + [Fault("hot", 0, 2 * hot + 5.0)]  # loud and silent slices
    )
    rng.shuffle(faults)
    first, last = WARM_UP_SECONDS + 10.0, seconds - 10.0
    free = (last - first) - sum(fault.reserve for fault in faults)
    if free < 0:
        raise SystemExit(
            f"soak: {len(faults)} faults need {sum(f.reserve for f in faults):.0f} s but the "
            f"run has {last - first:.0f} s between warm-up and end; use more --minutes or "
            "fewer --publishes"
        )
    cuts = sorted(rng.uniform(0, free) for _ in faults)
    used = 0.0
    for fault, cut in zip(faults, cuts, strict=True):
        fault.at = first + cut + used
        used += fault.reserve
    return faults


# -- the run ---------------------------------------------------------------------------
@dataclass
class Soak:
    arguments: argparse.Namespace
    directory: Path
    environ: dict[str, str]
    redis_server: RedisServer
    web: Service
    worker: Service
    port: int
    keys: dict[str, str]
    tenant_ids: dict[str, int]
    record: Record
    phase: Any
    is_deferring: bool  # /api/v1/usage keeps reports in Postgres (202) while Redis is away
    clients: list[Any] = field(default_factory=list)
    client_count: int = 0
    metrics: str = ""
    worker_exited_at: float | None = None
    deferred_left: set[tuple[str, str]] = field(default_factory=set)  # kept after the wait

    def wait_until(self, moment: float) -> None:
        """Sleep until ``moment``, restarting the Celery worker if it died meanwhile (as
        scripts/run does), and recording that it did."""
        while True:
            self.watch_worker()
            left = moment - time.time()
            if left <= 0:
                return
            time.sleep(min(left, 0.5))

    def watch_worker(self) -> None:
        """Start the Celery worker again WORKER_RESTART_DELAY s after it exited by itself,
        as scripts/run does."""
        process = self.worker.process
        if process is None or process.poll() is None:
            return
        now = time.time()
        if self.worker_exited_at is None:
            self.worker_exited_at = now
            self.record.deaths.append(
                (now, process.returncode, _log_tail(self.worker.log_path, 25))
            )
            print(
                f"  the Celery worker exited by itself (status {process.returncode}); starting "
                f"it again in {WORKER_RESTART_DELAY:g} s, as scripts/run does",
                flush=True,
            )
        if now - self.worker_exited_at < WORKER_RESTART_DELAY:
            return
        self.worker.stop()
        self.worker.start()
        self.worker_exited_at = None

    def set_phase(self, value: int) -> None:
        self.phase.value = value
        self.record.phases.append((time.time(), value))

    def start_clients(self, count: int, rate: float, *, deadline: float, hot: bool) -> list[Any]:
        context = multiprocessing.get_context("fork")
        tenants = tuple(self.keys) if not hot else (HOT_TENANT,)
        start = time.time() + 0.1
        if hot:
            self.record.hot_origin = start
        plans = []
        for _ in range(count):
            number = self.client_count
            self.client_count += 1
            plan = ClientPlan(
                number=number,
                port=self.port,
                keys=self.keys,
                tenants=tenants,
                rate=rate / count,
                start=start,
                deadline=deadline,
                seed=self.arguments.seed * 1000 + number,
                log_path=str(self.directory / f"client-{number:02d}.csv"),
                is_hot=hot,
                nice=self.arguments.hot_nice if hot else 0,
                idle=hot and self.arguments.hot_idle,
                run_seed=self.arguments.seed,
            )
            plans.append(plan)
        if hot:
            # In the soak's session, at --hot-nice and (--hot-idle) under SCHED_IDLE.
            targets = [(run_client, (plan, self.phase)) for plan in plans]
        else:
            targets = [(run_clients_in_session, (plans, self.phase))]
        started = []
        for target, args in targets:
            process = context.Process(target=target, args=args, daemon=True)
            process.start()
            self.clients.append(process)
            started.append(process)
        return started

    def stop_clients(self) -> None:
        for process in self.clients:
            if process.is_alive():
                process.terminate()
        for process in self.clients:
            process.join(timeout=10)

    # -- the faults ----------------------------------------------------------------
    def publish(self, number: int) -> None:
        variant = number % 2 == 1
        path = self.directory / f"policy-{number:02d}.json"
        path.write_text(json.dumps(policy_document(self.arguments.tenants, variant=variant)))
        self.set_phase(PUBLISH)
        began = time.time()
        ok = True
        try:
            _manage(self.environ, "loadpolicy", str(path), timeout=120)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            ok = False
            self.record.notes.append(f"publish {number} failed: {error}")
        ended = time.time()
        self.record.publishes.append((began, ended, ok))
        time.sleep(PUBLISH_TAIL)
        self.set_phase(STEADY)

    def restart_redis(self, pause: float) -> None:
        self.set_phase(REDIS_RESTART)
        snapshot = time.time()
        self.record.at_risk_since.append(snapshot)
        self.record.at_risk |= _undrained(self.redis_server.url)
        down = time.time()
        self.redis_server.stop(timeout=10)
        time.sleep(pause)
        self.redis_server.start()
        up = time.time()
        self.record.outages.append((down, up))
        self.wait_until(up + REDIS_TAIL)
        self.set_phase(STEADY)

    def kill_worker(self, pause: float) -> None:
        self.set_phase(WORKER_KILL)
        killed = time.time()
        self.worker.kill_group()
        time.sleep(pause)
        self.worker.start()
        self.record.kills.append((killed, time.time()))
        time.sleep(WORKER_TAIL)
        self.set_phase(STEADY)

    def hot_phase(self, seconds: float) -> None:
        """``seconds`` of the hot tenant sending, in loud slices between as many silent."""
        seconds *= 2
        rate = HOT_FACTOR * HOT_LIMIT / WINDOW
        self.set_phase(HOT)
        began = time.time()
        processes = self.start_clients(2, rate, deadline=began + seconds, hot=True)
        self.record.hot_until = began + seconds
        for process in processes:
            process.join(timeout=seconds + 30)
        self.record.hot = (began, time.time())
        self.set_phase(STEADY)


def _log_lines(path: Path) -> list[str]:
    """A log's lines; none when it cannot be read."""
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def _log_tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"(no log: {error})"
    return "\n".join(text.splitlines()[-lines:])


def _metrics(port: int) -> str:
    """The platform's own counters of Redis errors and degraded decisions (/metrics)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    except (OSError, http.client.HTTPException) as error:
        return f"/metrics: {error}"
    finally:
        connection.close()
    return "\n".join(
        line
        for line in text.splitlines()
        if line.startswith(
            (
                "quota_redis_errors_total",
                "quota_degraded_decisions_total",
                "quota_deferred_usage_reports",
            )
        )
    )


def _undrained(url: str) -> set[tuple[str, str, str]]:
    """(kind, tenant id, request id) of every entry in the usage streams: what a restart of
    a Redis without persistence loses if the drain has not acknowledged it."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    found: set[tuple[str, str, str]] = set()
    try:
        for key in client.scan_iter(match="*:events", count=1000):
            tenant = re.search(rb"\{t:(\d+)\}", key)
            for _entry_id, fields in client.xrange(key):
                request = re.search(rb'"request_id":"([^"]*)"', fields.get(b"e", b""))
                if tenant and request:
                    kind = fields.get(b"k", b"").decode()
                    found.add((kind, tenant[1].decode(), request[1].decode()))
    finally:
        client.close()
    return found


def _backlog(url: str) -> int:
    """Stream entries not yet acknowledged by the billing group (pending or never read)."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    waiting = 0
    try:
        for key in client.scan_iter(match="*:events", count=1000):
            try:
                groups = client.xinfo_groups(key)
            except redis.ResponseError:
                groups = []
            if not groups:
                waiting += int(client.xlen(key))
                continue
            for group in groups:
                waiting += int(group["pending"])
                last = group["last-delivered-id"]
                last = last.decode() if isinstance(last, bytes) else str(last)
                waiting += len(client.xrange(key, min=f"({last}", max="+", count=100_000))
    finally:
        client.close()
    return waiting


def drain_all(soak: Soak, *, limit: float = 240.0) -> tuple[int, float]:
    """Drain until nothing waits (a dead consumer's batch is claimed after
    BILLING_CLAIM_IDLE_SECONDS); returns (entries still waiting, seconds taken)."""
    began = time.monotonic()
    waiting = _backlog(soak.redis_server.url)
    while True:
        _manage(soak.environ, "drain_usage", timeout=300)
        waiting = _backlog(soak.redis_server.url)
        if waiting == 0 or time.monotonic() - began > limit:
            return waiting, time.monotonic() - began
        time.sleep(5)


def deferred_kept(database_url: str) -> set[tuple[str, str]] | None:
    """(tenant slug, request id) of the usage reports kept in Postgres and not yet applied
    to Redis; None when the platform keeps none (it answers 503 while Redis is away)."""
    with psycopg.connect(database_url) as connection:
        row = connection.execute("SELECT to_regclass('limits_deferredusagereport')").fetchone()
        if row is None or row[0] is None:
            return None
        rows = connection.execute(
            "SELECT t.slug, d.request_id "
            "FROM limits_deferredusagereport d JOIN limits_tenant t ON t.id = d.tenant_id"
        ).fetchall()
    return {(slug, request_id) for slug, request_id in rows}


def wait_deferred(soak: Soak, *, limit: float = DEFERRED_WAIT) -> tuple[int, float]:
    """With the Celery worker (and beat, which runs the task every 5 s) still up, wait until
    no deferred usage report is kept; returns (still kept, seconds waited)."""
    began = time.monotonic()
    while True:
        soak.watch_worker()
        kept = deferred_kept(soak.environ["DATABASE_URL"]) or set()
        if not kept or time.monotonic() - began > limit:
            return len(kept), time.monotonic() - began
        time.sleep(1)


# -- the analysis ----------------------------------------------------------------------
@dataclass
class Answer:
    kind: str
    phase: int
    sent: float
    latency: float
    status: int
    tenant: str
    user: str
    model: str
    request_id: str
    allowed: int | None
    degraded: bool
    version: int | None
    tokens: str
    limits: str
    denied_by: str

    @property
    def ended(self) -> float:
        return self.sent + self.latency


def read_logs(directory: Path) -> list[Answer]:
    answers = []
    for path in sorted(directory.glob("client-*.csv")):
        with path.open(newline="") as source:
            for row in csv.reader(source):
                if len(row) != len(LOG_FIELDS):
                    continue  # a line cut off by a client that was stopped
                answers.append(
                    Answer(
                        kind=row[0],
                        phase=int(row[1]),
                        sent=float(row[2]),
                        latency=float(row[3]),
                        status=int(row[4]),
                        tenant=row[5],
                        user=row[6],
                        model=row[7],
                        request_id=row[8],
                        allowed=int(row[9]) if row[9] else None,
                        degraded=row[10] == "1",
                        version=int(row[11]) if row[11] else None,
                        tokens=row[12],
                        limits=row[13],
                        denied_by=row[14],
                    )
                )
    answers.sort(key=lambda answer: answer.sent)
    return answers


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def hot_client_cpu(directory: Path) -> str:
    """The CPU the hot tenant's client processes used, per check they sent."""
    checks = seconds = 0.0
    for path in directory.glob("client-*.cpu"):
        count, used = path.read_text().split()
        checks += int(count)
        seconds += float(used)
    if not checks:
        return "its clients' CPU not known"
    return f"its clients' own CPU {seconds / checks * 1e6:,.0f} µs a check"


TASK_DONE = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): INFO/ForkPoolWorker-\d+\] "
    r"Task ([\w.]+)\[[^\]]*\] succeeded in ([\d.e-]+)s"
)


def slow_beside_tasks(checks: list[Answer], worker_log: Path) -> str:
    """How many of the slowest hundredth of ``checks`` were in flight while the Celery
    worker ran a task (from the worker's log: each task's end and its run time), against
    the share of all checks that were: the platform's own background work in the tail."""
    spans = []
    for line in _log_lines(worker_log):
        found = TASK_DONE.match(line)
        if found:
            # Celery's log writes local time, which astimezone() assumes of a naive datetime.
            end = datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp()
            spans.append((end - float(found[3]), end, found[2].rsplit(".", 1)[-1]))
    if not spans or len(checks) < 100:
        return "checks beside the Celery worker's tasks: not known"
    spans.sort()
    starts = [span[0] for span in spans]
    longest = max(span[1] - span[0] for span in spans)

    def tasks_beside(answer: Answer) -> set[str]:
        end = answer.sent + answer.latency
        first = bisect.bisect_left(starts, answer.sent - longest)
        last = bisect.bisect_left(starts, end)
        return {name for start, stop, name in spans[first:last] if stop > answer.sent}

    threshold = percentile([a.latency for a in checks], 0.99)
    slow = [a for a in checks if a.latency > threshold]
    names: Counter[str] = Counter()
    beside = 0
    for answer in slow:
        found_names = tasks_beside(answer)
        beside += bool(found_names)
        names.update(found_names)
    everyone = sum(1 for a in checks if tasks_beside(a)) / len(checks)
    busiest = ", ".join(f"{name} {count}" for name, count in names.most_common(3))
    return (
        f"the others' slowest hundredth (steady and hot phases, over "
        f"{threshold * 1000:.1f} ms): {beside} of {len(slow)} ({beside / len(slow):.0%}) in "
        f"flight while the Celery worker ran a task ({busiest}), against {everyone:.0%} of all "
        f"their checks"
    )


@dataclass
class HotPhase:
    """When a run's hot tenant sent: its slices are counted from ``origin``, and which of
    each pair was loud follows from the run's seed (hot_slice_loud). Kept beside the logs
    (HOT_PHASE_FILE), so that several runs' logs can be read together (--hot-report)."""

    seed: int
    origin: float
    until: float

    def is_loud(self, answer: Answer) -> bool:
        return hot_slice_loud(self.seed, int((answer.sent - self.origin) // HOT_SLICE))

    def others(self, checks: list[Answer]) -> list[Answer]:
        """The other tenants' checks sent while the hot tenant's slices ran."""
        return [
            a
            for a in checks
            if a.kind == "check"
            and a.phase == HOT
            and a.tenant != HOT_TENANT
            and self.origin <= a.sent < self.until
        ]

    def pairs(self, others: list[Answer]) -> dict[int, tuple[list[float], list[float]]]:
        """The latencies of ``others`` by pair of slices: (in the loud one, in the silent)."""
        pairs: dict[int, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
        for answer in others:
            index = int((answer.sent - self.origin) // HOT_SLICE)
            pairs[index // 2][0 if hot_slice_loud(self.seed, index) else 1].append(answer.latency)
        return pairs


HOT_PHASE_FILE = "hot-phase.json"


def hot_effect_spread(pairs: dict[Any, tuple[list[float], list[float]]], seed: int) -> str:
    """The others' loud/silent ratio at other percentiles, and how far the p99 ratio moves
    when the slice pairs are drawn again with replacement (1,000 times): one run's p99 rests
    on its slowest hundredth, and a few slow moments weigh on it."""
    loud = [latency for pair in pairs.values() for latency in pair[0]]
    silent = [latency for pair in pairs.values() for latency in pair[1]]
    if not loud or not silent:
        return "no checks of the others in the hot phase"
    ladder = ", ".join(
        f"p{round(q * 100)} {percentile(loud, q) / percentile(silent, q):.2f}"
        for q in (0.5, 0.9, 0.95, 0.99)
    )
    low, high = p99_ratio_range(pairs, seed)
    return (
        f"loud/silent by percentile: {ladder}; p99 ratio with the {len(pairs)} slice pairs "
        f"drawn again (1,000 times): 90% between {low:.2f} and {high:.2f}"
    )


def p99_ratio_range(
    pairs: dict[Any, tuple[list[float], list[float]]], seed: int
) -> tuple[float, float]:
    """Where 90% of the loud/silent p99 ratios fall when the pairs are drawn again."""
    rng = random.Random(seed)
    keys = sorted(pairs)
    ratios = []
    for _ in range(1000):
        drawn = rng.choices(keys, k=len(keys))
        drawn_loud = [latency for key in drawn for latency in pairs[key][0]]
        drawn_silent = [latency for key in drawn for latency in pairs[key][1]]
        if drawn_loud and drawn_silent:
            ratios.append(percentile(drawn_loud, 0.99) / percentile(drawn_silent, 0.99))
    ratios.sort()
    return ratios[len(ratios) // 20], ratios[len(ratios) - 1 - len(ratios) // 20]


def hot_report(directories: list[Path]) -> int:
    """The hot tenant's effect over the kept logs of several runs (--keep-logs) read together:
    each run's ratio, and the ratio of all their loud slices against all their silent ones,
    with its range when the slice pairs of every run are drawn again. One run's p99 rests on
    some 70 slow checks a side; several runs' on as many times more."""
    rows = []
    everything: dict[tuple[int, int], tuple[list[float], list[float]]] = {}
    seeds = []
    for number, directory in enumerate(directories):
        try:
            fields = json.loads((directory / HOT_PHASE_FILE).read_text())
            phase = HotPhase(int(fields["seed"]), float(fields["origin"]), float(fields["until"]))
        except (OSError, ValueError, KeyError, TypeError) as error:
            print(
                f"soak: {directory} holds no readable {HOT_PHASE_FILE} (the logs of a run kept "
                f"with --keep-logs): {error}",
                file=sys.stderr,
            )
            return 2
        pairs = phase.pairs(phase.others(read_logs(directory)))
        loud = [latency for pair in pairs.values() for latency in pair[0]]
        silent = [latency for pair in pairs.values() for latency in pair[1]]
        if not loud or not silent:
            print(f"soak: {directory}: no checks of the others in the hot phase", file=sys.stderr)
            return 2
        ratio = percentile(loud, 0.99) / percentile(silent, 0.99)
        low, high = p99_ratio_range(pairs, phase.seed)
        rows.append(
            [
                str(directory),
                str(phase.seed),
                f"{len(loud):,}",
                f"{len(silent):,}",
                f"{percentile(loud, 0.99) * 1000:.1f}",
                f"{percentile(silent, 0.99) * 1000:.1f}",
                f"{ratio:.2f}",
                f"{low:.2f}-{high:.2f}",
            ]
        )
        everything.update({(number, key): pair for key, pair in pairs.items()})
        seeds.append(phase.seed)
    loud = [latency for pair in everything.values() for latency in pair[0]]
    silent = [latency for pair in everything.values() for latency in pair[1]]
    ratio = percentile(loud, 0.99) / percentile(silent, 0.99)
    print(
        f"The hot tenant's effect over {len(directories)} run(s): the other tenants' checks in its "
        "loud slices against those in its silent ones (p99, ms)"
    )
    print(
        table(
            ["run's logs", "seed", "loud", "silent", "p99 loud", "p99 silent", "ratio", "90%"],
            rows,
        )
    )
    print(
        f"all together: p99 {percentile(loud, 0.99) * 1000:.1f} ms ({len(loud):,} checks) "
        f"against {percentile(silent, 0.99) * 1000:.1f} ms ({len(silent):,}): ratio "
        f"{ratio:.2f} (goal <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'})"
    )
    print(f"  {hot_effect_spread(everything, sum(seeds))}")
    return 0


def _overlaps(start: float, end: float, spans: Iterable[tuple[float, float]]) -> bool:
    return any(start <= span_end and end >= span_start for span_start, span_end in spans)


@dataclass
class RuleResult:
    keys: set[tuple[Any, ...]] = field(default_factory=set)
    decisions: int = 0
    windows_over: int = 0
    near_publish: int = 0
    worst: tuple[float, str] = (0, "")


def over_admissions(
    checks: list[Answer],
    usage: dict[tuple[str, str], tuple[int, int]],
    record: Record,
    *,
    is_persistent: bool,
) -> tuple[dict[str, RuleResult], int]:
    """Over-admissions per rule from the decision log.

    A check's decision happened at some moment between its send time and the end of its
    answer. For every allowed, non-degraded check *i* of a key, the checks of that key whose
    whole round trip lies in [sent_i, sent_i + window) were certainly decided within less
    than one window of each other: when the last of them was admitted, all of them were in
    its window. So their count (requests) or the tokens they certainly held (the actuals
    reported, never above the estimate; the estimate if none was reported) may not exceed
    the limit that the deciding answers reported. With a publish in between, some of them
    were decided under another limit: the bound is checked for every limit L among them,
    against the members decided under a limit of at most L.
    Decisions whose round trip overlaps a Redis outage are left out. Without persistence
    each lifetime of the Redis server is counted apart (a restart empties every window, as
    documented); with AOF a restart keeps the windows, and so does the count.
    """
    outages = sorted(record.outages)
    ups = [up for _down, up in outages]
    marks = [
        (began - PUBLISH_MARGIN[0], ended + PUBLISH_MARGIN[1])
        for began, ended, _ok in record.publishes
    ]
    groups: dict[tuple[Any, ...], list[tuple[float, float, int, int]]] = defaultdict(list)
    excluded = 0
    for answer in checks:
        if answer.status != 200 or answer.allowed != 1 or answer.degraded:
            continue
        if _overlaps(answer.sent, answer.ended, outages):
            excluded += 1
            continue
        epoch = 0 if is_persistent else bisect.bisect_right(ups, answer.sent)
        for item in answer.limits.split("|") if answer.limits else ():
            name, _, limit_text = item.rpartition("=")
            scope, metric, window = name.split(".")
            if metric not in ("requests", "tokens") or not window.isdigit():
                continue
            subject: tuple[str, ...] = {
                "user_model": (answer.tenant, answer.user, answer.model),
                "user": (answer.tenant, answer.user),
                "tenant_model": (answer.tenant, answer.model),
                "tenant": (answer.tenant,),
                "global": (MODELS[answer.model][0],),
            }[scope]
            weight = 1
            if metric == "tokens":
                actual = usage.get((answer.tenant, answer.request_id))
                weight = sum(actual) if actual else int(answer.tokens)
            groups[(name, subject, epoch)].append(
                (answer.sent, answer.ended, weight, int(float(limit_text)))
            )

    results: dict[str, RuleResult] = defaultdict(RuleResult)
    for (name, subject, epoch), members in groups.items():
        window = int(name.split(".")[2])
        result = results[name]
        result.keys.add(subject)
        result.decisions += len(members)
        members.sort()
        count = len(members)
        next_free = float("-inf")
        for index in range(count):
            start = members[index][0]
            end = start + window
            inside = []
            cursor = index
            while cursor < count and members[cursor][0] < end:
                if members[cursor][1] < end:
                    inside.append(members[cursor])
                cursor += 1
            excess = _excess(inside)
            if excess <= 0:
                continue
            if excess > result.worst[0]:
                admitted = sum(member[2] for member in inside)
                limits = sorted({member[3] for member in inside})
                result.worst = (
                    excess,
                    f"{'/'.join(subject)} epoch {epoch}: {admitted} in "
                    f"[{_clock(start)}, +{window} s) against limit "
                    f"{'/'.join(map(str, limits))}",
                )
            if start >= next_free:
                result.windows_over += 1
                if _overlaps(start, end, marks):
                    result.near_publish += 1
                next_free = end
    return dict(results), excluded


def _clock(moment: float) -> str:
    return f"{time.strftime('%H:%M:%S', time.gmtime(moment))}.{int(moment % 1 * 1000):03d} UTC"


def _excess(inside: list[tuple[float, float, int, int]]) -> int:
    worst = 0
    for bound in {member[3] for member in inside}:
        held = sum(member[2] for member in inside if member[3] <= bound)
        worst = max(worst, held - bound)
    return worst


def billed_events(database_url: str) -> tuple[dict[tuple[str, str], list[Any]], dict[str, Any]]:
    events: dict[tuple[str, str], list[Any]] = defaultdict(list)
    with psycopg.connect(database_url) as connection:
        rows = connection.execute(
            "SELECT t.slug, e.request_id, e.input_tokens, e.output_tokens, e.is_estimate, "
            "e.status FROM billing_usageevent e JOIN limits_tenant t ON t.id = e.tenant_id"
        ).fetchall()
        for slug, request_id, input_tokens, output_tokens, is_estimate, status in rows:
            events[(slug, request_id)].append((input_tokens, output_tokens, is_estimate, status))
        pending = connection.execute(
            "SELECT t.slug, p.request_id "
            "FROM billing_pendingcommit p JOIN limits_tenant t ON t.id = p.tenant_id"
        ).fetchall()
        versions = connection.execute("SELECT count(*) FROM limits_policyversion").fetchone()
        extra = {"pending_commits": {tuple(row) for row in pending}, "versions": versions[0]}
    return events, extra


# -- the report ------------------------------------------------------------------------
def table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    lines = []
    for number, row in enumerate(cells):
        lines.append(
            "  ".join(
                value.ljust(width) if column == 0 else value.rjust(width)
                for column, (value, width) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def report(
    soak: Soak,
    answers: list[Answer],
    drained: tuple[int, float],
    deferred_wait: tuple[int, float],
) -> bool:
    """Print the tables; True when no correctness goal was missed."""
    record = soak.record
    outages = record.outages
    tenant_names = {str(number): slug for slug, number in soak.tenant_ids.items()}
    fail_mode = {
        slug: TIERS[tier_of(index)][0] for index, slug in enumerate(slugs(soak.arguments.tenants))
    }
    checks = [answer for answer in answers if answer.kind == "check"]
    commits = [answer for answer in answers if answer.kind == "usage"]

    def during_outage(answer: Answer, tail: float = 0.0) -> bool:
        return _overlaps(answer.sent, answer.ended, [(d, u + tail) for d, u in outages])

    is_persistent = soak.redis_server.is_persistent
    by_id = {(a.tenant, a.request_id): a for a in checks}

    def record_lost(commit: Answer) -> bool:
        """Whether a restart without persistence took the record of this report's check:
        the check was made before Redis came back, the report (or the task applying it, if
        it was kept) reached Redis after it went down."""
        check = by_id.get((commit.tenant, commit.request_id))
        return (
            not is_persistent
            and check is not None
            and any(check.sent <= up and commit.ended >= down - 5.0 for down, up in outages)
        )

    # 1. Answers by status.
    rows = []
    unexpected_5xx = breaker_503 = usage_503_down = 0
    for kind in ("check", "usage", "quota"):
        mine = [answer for answer in answers if answer.kind == kind]
        statuses = Counter(answer.status for answer in mine)
        unavailable = [answer for answer in mine if answer.status == 503]
        in_outage = sum(1 for answer in unavailable if during_outage(answer, OUTAGE_503_TAIL))
        other_5xx = sum(1 for answer in mine if answer.status >= 500 and answer.status != 503)
        unexpected_5xx += other_5xx + len(unavailable) - in_outage
        breaker_503 += len(unavailable) - in_outage
        if kind == "usage" and soak.is_deferring:
            # The report is kept in Postgres (202): a 503 means Postgres refused it too.
            usage_503_down = in_outage
            unexpected_5xx += in_outage
        rows.append(
            [
                f"POST /api/v1/{kind}" if kind != "quota" else "GET /api/v1/quota",
                len(mine),
                statuses[200],
                statuses[202],
                sum(n for status, n in statuses.items() if 400 <= status < 500),
                sum(n for status, n in statuses.items() if status >= 500),
                in_outage,
                len(unavailable) - in_outage,
                other_5xx,
                statuses[0],
            ]
        )
    print("\nAnswers (202: a usage report kept while Redis was away, applied later; 5xx split:")
    print("503 while Redis was down or within 2 s of its return; 503 with Redis up; other 5xx)")
    print(
        table(
            [
                "endpoint",
                "sent",
                "200",
                "202 deferred",
                "4xx",
                "5xx",
                "503 Redis down",
                "503 Redis up",
                "other 5xx",
                "no answer",
            ],
            rows,
        )
    )
    degraded_times = sorted(a.sent for a in answers if a.kind == "check" and a.degraded)

    def beside_degraded(found: list[Answer]) -> int:
        beside = 0
        for answer in found:
            index = bisect.bisect_left(degraded_times, answer.sent - 1.5)
            beside += index < len(degraded_times) and degraded_times[index] <= answer.sent + 1.5
        return beside

    up_503 = [a for a in answers if a.status == 503 and not during_outage(a, OUTAGE_503_TAIL)]
    if up_503:
        print(
            f"  503 with Redis up: {beside_degraded(up_503)} of {len(up_503)} within 1.5 s of a "
            "degraded check (a worker's breaker open after a Redis call outlived "
            "QUOTA_REDIS_TIMEOUT_MS)"
        )
    deferred_answers = [a for a in commits if a.status == 202]
    if deferred_answers:
        up_202 = [a for a in deferred_answers if not during_outage(a, OUTAGE_503_TAIL)]
        print(
            f"  202 on /usage: {len(deferred_answers) - len(up_202)} while Redis was down or "
            f"within 2 s of its return, {len(up_202)} with Redis up "
            f"({beside_degraded(up_202)} of them within 1.5 s of a degraded check)"
        )
    unknown_reports = [a for a in commits if a.status == 404]
    unknown_unexplained = [a for a in unknown_reports if not record_lost(a)]
    if unknown_reports:
        print(
            f"  404 on /usage: {len(unknown_reports) - len(unknown_unexplained)} for checks "
            f"whose record a Redis restart took (no persistence), {len(unknown_unexplained)} "
            "otherwise"
        )
    other_statuses = Counter(
        (answer.kind, answer.status) for answer in answers if answer.status not in (0, 200)
    )
    if other_statuses:
        print(
            "  non-200 answers: "
            + ", ".join(
                f"{kind} {status}: {n}" for (kind, status), n in sorted(other_statuses.items())
            )
        )

    # 2. Latency per phase.
    seconds: Counter[int] = Counter()
    for (began, value), (ended, _next) in zip(record.phases, record.phases[1:], strict=False):
        seconds[value] += ended - began
    rows = []
    latencies: dict[int, list[float]] = defaultdict(list)
    for answer in checks:
        latencies[answer.phase].append(answer.latency)
    for value in (STEADY, REDIS_RESTART, WORKER_KILL, PUBLISH, HOT, WARM_UP):
        mine = [answer for answer in checks if answer.phase == value]
        rows.append(
            [
                PHASES[value],
                round(seconds[value]),
                len(mine),
                percentile(latencies[value], 0.50) * 1000,
                percentile(latencies[value], 0.99) * 1000,
                max(latencies[value], default=float("nan")) * 1000,
                sum(1 for answer in mine if answer.status >= 500),
                sum(1 for answer in mine if answer.degraded),
                sum(1 for answer in mine if answer.status == 0),
            ]
        )
    print("\nChecks per phase (client-side latency from send to the whole answer, ms)")
    print(
        table(
            ["phase", "seconds", "checks", "p50", "p99", "max", "5xx", "degraded", "no answer"],
            rows,
        )
    )

    # The hot tenant's effect: the others' checks sent in its loud slices against those sent
    # in its silent slices between them (the same minutes, so the same background load),
    # and, as before, against the whole steady phase (other minutes: drift included).
    hot = HotPhase(soak.arguments.seed, record.hot_origin, record.hot_until)
    others_steady = [a.latency for a in checks if a.phase == STEADY and a.tenant != HOT_TENANT]
    others_hot = hot.others(checks)
    others_loud = [a.latency for a in others_hot if hot.is_loud(a)]
    others_silent = [a.latency for a in others_hot if not hot.is_loud(a)]
    hot_checks = [a for a in checks if a.phase == HOT and a.tenant == HOT_TENANT]
    ratio = percentile(others_loud, 0.99) / percentile(others_silent, 0.99)
    ratio_steady = percentile(others_loud, 0.99) / percentile(others_steady, 0.99)
    print(
        f"  {HOT_TENANT} sent {HOT_FACTOR}x its {HOT_LIMIT}/{WINDOW} s in {HOT_SLICE:g}-s slices, "
        f"silent in the other of each pair: {len(hot_checks):,} checks, "
        f"{sum(1 for a in hot_checks if a.allowed == 1):,} allowed; "
        + hot_client_cpu(soak.directory)
    )
    print(
        f"  other tenants' p99 while it sent: {percentile(others_loud, 0.99) * 1000:.1f} ms "
        f"({len(others_loud):,} checks), in its silent slices: "
        f"{percentile(others_silent, 0.99) * 1000:.1f} ms ({len(others_silent):,}): ratio "
        f"{ratio:.2f} (goal <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'}); against the "
        f"whole steady phase ({percentile(others_steady, 0.99) * 1000:.1f} ms): "
        f"{ratio_steady:.2f}"
    )
    print(f"    {hot_effect_spread(hot.pairs(others_hot), soak.arguments.seed)}")
    others = [
        a for a in checks if a.phase in (STEADY, HOT) and a.tenant != HOT_TENANT and a.status == 200
    ]
    print(f"  {slow_beside_tasks(others, soak.worker.log_path)}")

    # 3. Degraded decisions.
    rows = []
    for mode in ("closed", "local", "open"):
        mine = [a for a in checks if a.degraded and fail_mode[a.tenant] == mode]
        near = [a for a in mine if during_outage(a, REDIS_TAIL)]
        rows.append(
            [
                mode,
                len(mine),
                sum(1 for a in mine if a.allowed == 1),
                sum(1 for a in mine if a.allowed == 0),
                len(near),
                len(mine) - len(near),
            ]
        )
    print("\nDegraded decisions (answered by the tier's fail mode, not by Redis)")
    print(
        table(
            ["fail mode", "degraded", "allowed", "denied", "Redis restarts", "elsewhere"],
            rows,
        )
    )

    # 4. Over-admissions.
    usage: dict[tuple[str, str], tuple[int, int]] = {}
    for answer in commits:
        input_tokens, output_tokens = answer.tokens.split(":")
        usage[(answer.tenant, answer.request_id)] = (int(input_tokens), int(output_tokens))
    results, excluded = over_admissions(
        checks, usage, record, is_persistent=soak.redis_server.is_persistent
    )
    rows = []
    over_total = 0
    denials = Counter(a.denied_by for a in checks if a.allowed == 0 and not a.degraded)
    for name in sorted(results, key=lambda n: (n.split(".")[1], n)):
        result = results[name]
        over_total += result.windows_over
        rows.append(
            [
                name,
                len(result.keys),
                denials[name],
                result.decisions,
                result.windows_over,
                result.near_publish,
                result.worst[0],
            ]
        )
    allowed_checks = sum(1 for a in checks if a.allowed == 1 and not a.degraded)
    denied_checks = sum(1 for a in checks if a.allowed == 0 and not a.degraded)
    lifetimes = (
        "windows kept across restarts (AOF)"
        if soak.redis_server.is_persistent
        else "each Redis lifetime apart"
    )
    print(
        f"\nOver-admission per rule ({allowed_checks:,} allowed and {denied_checks:,} denied "
        f"non-degraded checks; {excluded:,} allowed ones overlapping a Redis outage left out; "
        f"{lifetimes})"
    )
    print(
        table(
            [
                "rule",
                "keys",
                "denied by it",
                "admitted",
                "windows over",
                "near a publish",
                "worst excess",
            ],
            rows,
        )
    )
    for name, result in sorted(results.items()):
        if result.windows_over:
            print(f"  {name}: worst {result.worst[1]}")

    # 5. Billing.
    events, extra = billed_events(soak.environ["DATABASE_URL"])
    sent = {
        (a.tenant, a.request_id)
        for a in checks
        if a.status == 200 and a.allowed == 1 and not a.degraded
    }
    at_risk_checks = {
        (tenant_names.get(tenant, tenant), rid)
        for kind, tenant, rid in record.at_risk
        if kind == "check"
    }
    at_risk_commits = {
        (tenant_names.get(tenant, tenant), rid)
        for kind, tenant, rid in record.at_risk
        if kind == "commit"
    }
    windows = list(zip(record.at_risk_since, [up for _d, up in outages], strict=False))
    for answer in checks:
        if _overlaps(answer.sent, answer.ended, windows):
            at_risk_checks.add((answer.tenant, answer.request_id))
    for answer in commits:
        if _overlaps(answer.sent, answer.ended, windows):
            at_risk_commits.add((answer.tenant, answer.request_id))
    # A check whose answer was lost while Redis ran it (a restart's shutdown, a timeout),
    # its caller told "denied" by the fail mode: the platform settles it as cancelled, with
    # no tokens and no cost, once Redis is back. In the ledger, not billed.
    cancelled_lost = {
        key
        for key, rows_ in events.items()
        if key in by_id
        and by_id[key].degraded
        and by_id[key].allowed == 0
        and all(row[:2] == (0, 0) and row[3] == "cancelled" for row in rows_)
    }
    billed = set(events) - cancelled_lost
    pending_commits = extra["pending_commits"]
    doubled = sum(1 for rows_ in events.values() if len(rows_) > 1)
    missing = sent - billed
    lost_restart = missing & at_risk_checks
    unexplained = missing - at_risk_checks
    extra_ids = billed - sent
    extra_degraded = sum(1 for key in extra_ids if key in by_id and by_id[key].degraded)
    # A check whose Redis call outlived QUOTA_REDIS_TIMEOUT_MS may have run all the same:
    # answered by the fail mode, yet consumed and recorded. Denied so, it is billed for a
    # request its caller was told not to make.
    denied_billed = sum(
        1 for key in extra_ids if key in by_id and by_id[key].degraded and by_id[key].allowed == 0
    )
    extra_no_answer = sum(1 for key in extra_ids if key in by_id and by_id[key].status != 200)
    extra_denied = sum(
        1
        for key in extra_ids
        if key in by_id
        and by_id[key].status == 200
        and by_id[key].allowed == 0
        and not by_id[key].degraded
    )
    extra_unknown = len(extra_ids) - extra_degraded - extra_no_answer - extra_denied
    applied = lost_commit = 0
    lost_commit_restart_ids: set[tuple[str, str]] = set()
    deferred_applied = deferred_lost_restart = 0
    deferred_kept_ids: set[tuple[str, str]] = set()
    deferred_lost_ids: set[tuple[str, str]] = set()
    for answer in commits:
        key = (answer.tenant, answer.request_id)
        if answer.status not in (200, 202) or answer.allowed == 1:
            continue
        input_tokens, output_tokens = usage[key]
        stored = events[key][0] if key in events else None
        with_actuals = (
            stored is not None
            and not stored[2]
            and stored[0] == input_tokens
            and stored[1] == output_tokens
        )
        if answer.status == 200:
            if stored is None:
                continue  # its check's event is missing: counted as sent, not billed
            if with_actuals:
                applied += 1
            elif key in at_risk_commits:
                lost_commit_restart_ids.add(key)
            else:
                lost_commit += 1
        elif with_actuals:
            deferred_applied += 1
        elif key in soak.deferred_left:
            deferred_kept_ids.add(key)
        elif record_lost(answer):
            # The task found no check to settle: its estimate stands (or its event was lost
            # with the same restart).
            deferred_lost_restart += 1
        else:
            deferred_lost_ids.add(key)
    print(
        f"\nBilling after the deferred reports were applied ({deferred_wait[1]:.0f} s; "
        f"{deferred_wait[0]} still kept) and the final drain ({drained[1]:.0f} s; "
        f"{drained[0]} stream entries still waiting)"
    )
    restart_note = "AOF: none expected" if is_persistent else "no persistence"
    rows = [
        ["events sent (allowed, non-degraded checks)", len(sent)],
        ["events billed (usage events in Postgres, distinct request ids)", len(billed)],
        ["  billed twice or more", doubled],
        [f"sent, not billed: undrained when Redis restarted ({restart_note})", len(lost_restart)],
        ["sent, not billed: otherwise", len(unexplained)],
        [
            "billed, not sent: answered degraded, allowed (open/local)",
            extra_degraded - denied_billed,
        ],
        ["billed, not sent: answered degraded, DENIED (closed)", denied_billed],
        [
            "not billed: answered degraded and denied, its answer lost while Redis ran it: "
            "settled cancelled at no cost",
            len(cancelled_lost),
        ],
        ["billed, not sent: no answer / not 200", extra_no_answer],
        ["billed, not sent: answered denied", extra_denied],
        ["billed, not sent: never asked", extra_unknown],
        ["commits answered 200, billed with their actuals", applied],
        [
            f"commits answered 200, not in billing: undrained at a Redis restart ({restart_note})",
            len(lost_commit_restart_ids),
        ],
        ["commits answered 200, not in billing: otherwise", lost_commit],
        ["commits answered 202 (deferred), applied: billed with their actuals", deferred_applied],
        ["commits answered 202, still kept in Postgres after the wait", len(deferred_kept_ids)],
        [
            "commits answered 202, not applied: check's record lost with a Redis restart",
            deferred_lost_restart,
        ],
        ["commits answered 202, not applied: otherwise", len(deferred_lost_ids)],
        ["commits waiting for a check lost with a Redis restart (PendingCommit)"]
        + [len(pending_commits & at_risk_checks)],
        ["commits waiting for a check, otherwise (PendingCommit)"]
        + [len(pending_commits - at_risk_checks)],
        [f"policy versions (1 + {len(record.publishes)} publishes)", extra["versions"]],
    ]
    print(table(["", "count"], rows))
    denied_billed_ids = {key for key in extra_ids if key in by_id and by_id[key].degraded}
    denied_billed_ids = {key for key in denied_billed_ids if by_id[key].allowed == 0}
    denied_billed_ids -= cancelled_lost
    restart_ids = lost_restart | lost_commit_restart_ids if is_persistent else set()
    for label, keys in (
        ("sent, not billed otherwise", unexplained),
        ("lost in a Redis restart with AOF", restart_ids),
        ("billed, answered degraded and denied", denied_billed_ids),
        (
            "billed, answered denied",
            {
                key
                for key in extra_ids
                if key in by_id and by_id[key].allowed == 0 and not by_id[key].degraded
            },
        ),
        ("billed, never asked", {key for key in extra_ids if key not in by_id}),
        ("waiting for a check, otherwise", pending_commits - at_risk_checks),
        ("usage answered 404 otherwise", {(a.tenant, a.request_id) for a in unknown_unexplained}),
        ("deferred, still kept", deferred_kept_ids),
        ("deferred, not applied otherwise", deferred_lost_ids),
    ):
        for key in sorted(keys)[:5]:
            answer = by_id.get(key)
            seen = (
                f"sent {_clock(answer.sent)}, answered in {answer.latency * 1000:.0f} ms, "
                f"allowed {answer.allowed}, degraded {int(answer.degraded)}"
                if answer
                else "not in the decision log"
            )
            print(f"  {label}: {key[0]}/{key[1]}: {seen}")

    print("\nThe platform's own counters (/metrics, summed over the gunicorn workers)")
    for line in soak.metrics.splitlines():
        print(f"  {line}")

    failures = []
    if breaker_503:
        failures.append(f"{breaker_503} answers 503 while Redis was up")
    if usage_503_down:
        failures.append(
            f"{usage_503_down} usage reports answered 503 while Redis was down (the platform "
            "keeps them in Postgres: 202)"
        )
    if unexpected_5xx - breaker_503 - usage_503_down:
        failures.append(
            f"{unexpected_5xx - breaker_503 - usage_503_down} 5xx answers other than 503"
        )
    if unknown_unexplained:
        failures.append(
            f"{len(unknown_unexplained)} usage reports of allowed checks answered 404"
            + (" (AOF keeps the checks' records)" if is_persistent else "")
        )
    if over_total:
        failures.append(f"{over_total} windows over their limit")
    if doubled:
        failures.append(f"{doubled} events billed twice")
    if unexplained:
        failures.append(f"{len(unexplained)} events lost without a Redis restart")
    lost_with_aof = len(restart_ids)
    if lost_with_aof:
        failures.append(
            f"{lost_with_aof} events or commits lost in graceful Redis restarts with AOF on"
        )
    if extra_denied or extra_unknown or denied_billed:
        failures.append(
            f"{extra_denied + extra_unknown + denied_billed} events billed for checks answered "
            "denied or never answered allowed"
        )
    if lost_commit:
        failures.append(f"{lost_commit} acknowledged commits missing from billing")
    if deferred_kept_ids:
        failures.append(
            f"{len(deferred_kept_ids)} deferred usage reports still not applied "
            f"{deferred_wait[1]:.0f} s after the traffic"
        )
    if deferred_lost_ids:
        failures.append(
            f"{len(deferred_lost_ids)} deferred usage reports not billed with their actuals"
        )
    print("\nGoals")
    print(f"  no 5xx, but 503 while Redis is down: {'met' if not unexpected_5xx else 'NOT met'}")
    print(f"  no over-admission: {'met' if not over_total else 'NOT met'}")
    billing_met = not (
        doubled
        or unexplained
        or lost_with_aof
        or extra_denied
        or extra_unknown
        or denied_billed
        or lost_commit
        or deferred_kept_ids
        or deferred_lost_ids
    )
    print(
        "  every event billed once, loss only with a Redis restart"
        f"{' (none with AOF)' if is_persistent else ''}, every deferred report applied: "
        f"{'met' if billing_met else 'NOT met'}"
    )
    print(
        "  other tenants' p99 while the hot tenant sends <= 1.10x while it is silent: "
        f"{ratio:.2f}x ({'met' if ratio <= 1.10 else 'NOT met'}; {ratio_steady:.2f}x the "
        "whole steady phase)"
    )
    # Not a finding of its own since scripts/run starts the worker again (as the soak does):
    # what it cost shows in the billing above.
    print(
        "  the Celery worker only dies when killed: "
        + (
            "met"
            if not record.deaths
            else f"NOT met ({len(record.deaths)} exits, started again as scripts/run does)"
        )
    )
    for failure in failures:
        print(f"  FOUND: {failure}")
    return not failures


def service_errors(soak: Soak) -> None:
    """Distinct error lines of the services' logs: the evidence behind a 5xx."""
    for service in (soak.web, soak.worker):
        found = Counter(
            line.strip()[:200]
            for line in _log_lines(service.log_path)
            if re.search(r"Error|Exception|Traceback|CRITICAL", line) and "INFO" not in line
        )
        if found:
            print(f"\n{service.name} log: {sum(found.values())} error lines, most common:")
            for line, count in found.most_common(8):
                print(f"  {count:>5} x {line}")


# -- main ------------------------------------------------------------------------------
def _interrupted(number: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {number}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the traffic")
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--workers", type=int, default=4, help="gunicorn sync workers")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--rate", type=float, default=60.0, help="checks per second, in all")
    parser.add_argument("--publishes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--no-aof",
        action="store_true",
        help="run Redis without persistence (a restart loses undrained usage)",
    )
    parser.add_argument(
        "--over-limit-cache",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="QUOTA_OVER_LIMIT_CACHE_SECONDS of the platform (0: off)",
    )
    parser.add_argument(
        "--hot-nice",
        type=int,
        default=19,
        metavar="N",
        help="niceness of the hot tenant's client processes (0: as the others')",
    )
    parser.add_argument(
        "--hot-idle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the hot tenant's client processes under SCHED_IDLE (default: yes)",
    )
    parser.add_argument(
        "--worker-nice",
        type=int,
        default=10,
        metavar="N",
        help="niceness of the Celery worker, as scripts/run gives it (its session's group too)",
    )
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy the logs here")
    parser.add_argument(
        "--hot-report",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="run nothing: the hot tenant's effect over the logs of earlier runs (--keep-logs)",
    )
    arguments = parser.parse_args()
    if arguments.hot_report:
        sys.exit(hot_report(arguments.hot_report))
    if arguments.seed is None:
        arguments.seed = secrets.randbelow(1_000_000)
    if arguments.tenants < 2 or arguments.tenants > 100:
        parser.error("--tenants must be between 2 and 100")
    seconds = arguments.minutes * 60
    rng = random.Random(arguments.seed)
    restarts = max(1, round(arguments.minutes * 0.3))
    kills = max(1, round(arguments.minutes * 0.3))
    # A fifth of the run loud (as much again silent between): the others' p99 in each half
    # rests on some 7,000 checks in a 10-minute run, not a few thousand.
    hot_seconds = max(20.0, seconds * 0.2)
    faults = schedule(rng, seconds, arguments.publishes, restarts, kills, hot_seconds)

    print(
        f"bench/soak.py: seed {arguments.seed}; {arguments.minutes:g} min of traffic, "
        f"{arguments.tenants} tenants, gunicorn {arguments.workers} sync workers, "
        f"{arguments.clients} client processes at {arguments.rate:g} checks/s, Celery worker at "
        f"nice {arguments.worker_nice}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; over-limit cache "
        + (f"{arguments.over_limit_cache:g} s" if arguments.over_limit_cache > 0 else "off")
    )
    print(
        "  redis-server: "
        + (
            "AOF on (--appendonly yes --appendfsync everysec)"
            if not arguments.no_aof
            else "no persistence (--no-aof: --appendonly no --save '')"
        )
    )
    print(
        f"  faults: {restarts} Redis restarts, {kills} worker kills, {arguments.publishes} "
        f"publishes ({VARIANT_TEXT}), {HOT_TENANT} at {HOT_FACTOR}x its limit for "
        f"{hot_seconds:.0f} s (in {HOT_SLICE:g}-s slices over {2 * hot_seconds:.0f} s), "
        f"its client processes at nice {arguments.hot_nice}"
        + (" under SCHED_IDLE" if arguments.hot_idle else "")
    )
    print(
        "  schedule (s after start): "
        + ", ".join(f"{fault.kind} {fault.at:.0f}" for fault in sorted(faults, key=lambda f: f.at))
    )

    # SIGINT too: a shell starts background jobs with it ignored, and Python keeps that.
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, _interrupted)
    directory = Path(tempfile.mkdtemp(prefix="quota-soak-"))
    database = Database(
        os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/quota_platform")
    )
    redis_server = RedisServer(directory, is_persistent=not arguments.no_aof)
    port = _free_port()
    environ = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("QUOTA_", "BILLING_", "CELERY_", "GUNICORN_", "DJANGO_"))
    }
    environ.update(
        {
            "DATABASE_URL": database.url,
            "REDIS_URL": redis_server.url,
            "SECRET_KEY": "soak-" + secrets.token_hex(24),
            "DEBUG": "false",
            "VAR_DIR": str(directory / "var"),
            "PORT": str(port),
            "WEB_CONCURRENCY": str(arguments.workers),
            "PROMETHEUS_MULTIPROC_DIR": str(directory / "metrics"),
            "LOG_LEVEL": "warning",
            "PYTHONUNBUFFERED": "1",
            "QUOTA_OVER_LIMIT_CACHE_SECONDS": str(arguments.over_limit_cache),
        }
    )
    (directory / "var").mkdir()
    (directory / "metrics").mkdir()
    web = Service(
        "gunicorn",
        [sys.executable, "-m", "gunicorn", "-c", "quota_platform/gunicorn.conf.py"],
        environ,
        directory / "gunicorn.log",
    )
    worker = Service(
        "celery worker -B",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "quota_platform",
            "worker",
            "-B",
            "--loglevel=info",
            "--schedule",
            str(directory / "var" / "celerybeat-schedule"),
        ],
        environ,
        directory / "celery.log",
        nice=arguments.worker_nice,
    )
    soak: Soak | None = None
    succeeded = interrupted = False
    began = time.monotonic()
    try:
        redis_server.start()
        database.create()
        _manage(environ, "migrate", "--noinput")
        _manage(environ, "collectstatic", "--noinput", "-v", "0")
        policy_path = directory / "policy-00.json"
        policy_path.write_text(json.dumps(policy_document(arguments.tenants, variant=False)))
        _manage(environ, "loadpolicy", str(policy_path))
        keys = json.loads(_manage(environ, "shell", "-c", CREATE_KEYS).splitlines()[-1])
        with psycopg.connect(database.url) as connection:
            tenant_ids = dict(connection.execute("SELECT slug, id FROM limits_tenant").fetchall())
        is_deferring = deferred_kept(database.url) is not None
        web.start()
        worker.start()
        _wait_healthy(web, port)
        print(
            f"  set up in {time.monotonic() - began:.0f} s: redis-server pid {redis_server.pid} "
            f"port {redis_server.port}, database {database.name}, gunicorn pid {web.pid} "
            f"port {port}, celery pid {worker.pid}; /api/v1/usage with Redis away: "
            + ("202, kept and applied later" if is_deferring else "503"),
            flush=True,
        )
        context = multiprocessing.get_context("fork")
        soak = Soak(
            arguments=arguments,
            directory=directory,
            environ=environ,
            redis_server=redis_server,
            web=web,
            worker=worker,
            port=port,
            keys=keys,
            tenant_ids=tenant_ids,
            record=Record(),
            phase=context.Value("i", WARM_UP, lock=False),
            is_deferring=is_deferring,
        )
        soak.record.phases.append((time.time(), WARM_UP))
        start = time.time()
        soak.start_clients(arguments.clients, arguments.rate, deadline=start + seconds, hot=False)
        time.sleep(WARM_UP_SECONDS)
        soak.set_phase(STEADY)
        publishes = 0
        for fault in sorted(faults, key=lambda f: f.at):
            soak.wait_until(start + fault.at)
            print(f"  {time.time() - start:6.1f} s  {fault.kind}", flush=True)
            if fault.kind == "publish":
                publishes += 1
                soak.publish(publishes)
            elif fault.kind == "redis":
                soak.restart_redis(fault.pause)
            elif fault.kind == "worker":
                soak.kill_worker(fault.pause)
            else:
                soak.hot_phase(hot_seconds)
        soak.wait_until(start + seconds)
        for process in soak.clients:
            process.join(timeout=30)
        soak.watch_worker()
        soak.record.phases.append((time.time(), ENDED))
        soak.metrics = _metrics(port)
        deferred_wait = wait_deferred(soak) if is_deferring else (0, 0.0)
        soak.deferred_left = deferred_kept(database.url) or set()
        worker.stop()
        drained = drain_all(soak)
        answers = read_logs(directory)
        if soak.record.hot is not None:
            hot_phase = {
                "seed": arguments.seed,
                "origin": soak.record.hot_origin,
                "until": soak.record.hot_until,
            }
            (directory / HOT_PHASE_FILE).write_text(json.dumps(hot_phase) + "\n")
        print(f"\nsoak: traffic and faults done after {(time.time() - start) / 60:.1f} min")
        for note in soak.record.notes:
            print(f"  note: {note}")
        for moment, status, tail in soak.record.deaths:
            print(
                f"  note: the Celery worker exited by itself at {_clock(moment)} "
                f"(status {status}, {moment - start:.0f} s in); started again "
                f"{WORKER_RESTART_DELAY:g} s later, as scripts/run does; the last lines "
                "of its log:"
            )
            print("    " + tail.replace("\n", "\n    "))
        succeeded = report(soak, answers, drained, deferred_wait)
        service_errors(soak)
    except KeyboardInterrupt as stop:
        print(f"\nsoak: interrupted ({stop}); stopping what it started", file=sys.stderr)
        interrupted = True
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if soak is not None:
            soak.stop_clients()
        for service in (web, worker, redis_server):
            try:
                service.stop()
            except Exception as error:  # noqa: BLE001 - stop the others all the same
                print(f"soak: stopping {service.name}: {error}", file=sys.stderr)
        try:
            database.drop()
        except psycopg.Error as error:
            print(f"soak: dropping {database.name}: {error}", file=sys.stderr)
        if arguments.keep_logs:
            shutil.copytree(directory, arguments.keep_logs, dirs_exist_ok=True)
        shutil.rmtree(directory, ignore_errors=True)
        print(f"soak: {(time.monotonic() - began) / 60:.1f} min in all; seed {arguments.seed}")
    sys.exit(130 if interrupted else 0 if succeeded else 1)


if __name__ == "__main__":
    main()
