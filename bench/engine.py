"""Benchmark: our engine's check next to the `limits` library and DRF's throttle.

    .venv/bin/python bench/engine.py [--iterations N] [--attempts N] [--rounds N]

One run against one Redis (REDIS_URL, default redis://127.0.0.1:6379/0) prints five
tables: single-thread speed, what each admits when 8 processes x 4 threads race for a limit
of 100, what each admits across a window's edge, Redis memory per limited key, and the
goals. Every key it writes lives under a prefix of the run's own and is deleted at the end;
nothing else on the server is touched.

Our Django app is called `limits`, as is the PyPI package. The two never meet in one
interpreter here: every contender runs in processes of its own (multiprocessing, spawn),
which put the repository first on sys.path for our engine, or take it off sys.path for the
peers so that `import limits` finds the installed package. This module imports neither at
the top, so it is safe as the spawned processes' main module.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import redis

REPOSITORY = Path(__file__).resolve().parent.parent
OUR_APP = REPOSITORY / "limits"
MODEL = "gpt-4o"
LIMIT = 100  # requests per window: the limit every contender enforces
HOUR = 3600
TOKEN_LIMIT = 100_000
TOKENS = 100  # estimated tokens of each of our checks in the speed loop
USES_PER_USER = 50  # the speed loop spreads its checks so that no user reaches LIMIT
PROCESSES, THREADS = 8, 4
EDGE_WINDOW = 2  # seconds: the window of the edge test
SPLIT_TURNS, SPLIT_BLOCK = 20, 200  # where the time goes: turns of each loop, calls a turn
SETUP_SECONDS = 120
STEP_SECONDS = 600

# Our tenants in the published document.
ONE_RULE, FIVE_RULES, TOKEN_RULE, EDGE_RULE = 1, 2, 3, 4


def _rule(rule_id: int, scope: str, metric: str, window: int, limit: int) -> dict[str, Any]:
    return {
        "id": rule_id,
        "source": "tier",
        "scope": scope,
        "metric": metric,
        "window": window,
        "limit": limit,
        "class": "frontier" if scope == "global" else None,
        "shadow": False,
    }


def _tenant(slug: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "slug": slug,
        "active": True,
        "tier": "bench",
        "fail_mode": "closed",
        "priority": 0,
        "rules": rules,
        "budgets": [],
    }


# What policy_compile() would produce for these tenants; published straight into the store.
POLICY = {
    "currency": "USD",
    "models": {
        MODEL: {
            "class": "frontier",
            "input_price_per_1k": "0.0025",
            "output_price_per_1k": "0.0100",
        }
    },
    "tenants": {
        str(ONE_RULE): _tenant("one", [_rule(1, "user_model", "requests", HOUR, LIMIT)]),
        str(FIVE_RULES): _tenant(
            "five",
            [
                _rule(2, "user_model", "requests", HOUR, LIMIT),
                _rule(3, "user_model", "tokens", HOUR, TOKEN_LIMIT),
                _rule(4, "user", "requests", HOUR, 10 * LIMIT),
                _rule(5, "tenant", "tokens", 86400, 10**12),
                _rule(6, "global", "requests", 60, 10**9),
            ],
        ),
        str(TOKEN_RULE): _tenant("tokens", [_rule(7, "user_model", "tokens", HOUR, TOKEN_LIMIT)]),
        str(EDGE_RULE): _tenant("edge", [_rule(8, "user_model", "requests", EDGE_WINDOW, LIMIT)]),
    },
}


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # ours, moving, sliding, drf
    tenant: int = ONE_RULE  # ours only: whose rules a check meets


OURS_ONE = Contender("ours, 1 rule", "ours", ONE_RULE)
OURS_FIVE = Contender("ours, 5 rules", "ours", FIVE_RULES)
MOVING = Contender("limits moving window", "moving")
SLIDING = Contender("limits sliding window counter", "sliding")
DRF = Contender("DRF UserRateThrottle", "drf")
ONE_RULE_EACH = (OURS_ONE, MOVING, SLIDING, DRF)


# -- inside a contender's process ------------------------------------------------------------
def _ours(prefix: str, url: str, *, patient: bool) -> Any:
    sys.path.insert(0, str(REPOSITORY))
    os.environ.update(
        DJANGO_SETTINGS_MODULE="quota_platform.settings",
        SECRET_KEY="bench-only-secret-key",  # noqa: S106 - signs nothing here
        DEBUG="false",
        REDIS_URL=url,
        QUOTA_KEY_PREFIX=prefix,
    )
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if patient:
        # Racing on two cores, a call can wait its turn longer than the 50 ms production
        # timeout; the peers wait as long as it takes, so ours does too when it counts.
        os.environ["QUOTA_REDIS_TIMEOUT_MS"] = "5000"
    import django

    django.setup()
    from limits import engine

    assert Path(engine.__file__).resolve().parent == OUR_APP, "found the package, not our app"
    return engine


def _without_repository() -> None:
    here = REPOSITORY.resolve()
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]


class Attempts:
    """One contender, set up in this process.

    ``attempt(user, tokens, window)`` asks it once and says whether it admitted: a request
    limit of LIMIT per ``window`` seconds, or with ``tokens`` a limit of TOKEN_LIMIT tokens
    per hour (the peers count tokens as the hit's cost).
    """

    def __init__(self, contender: Contender, prefix: str, url: str, *, patient: bool) -> None:
        self.degraded = 0
        self.storage: Any = None  # the limits package's RedisStorage, for a closer look
        self._lock = threading.Lock()
        self.attempt: Callable[[str, int, int], bool]
        if contender.kind == "ours":
            self._set_up_ours(contender, prefix, url, patient=patient)
        elif contender.kind in ("moving", "sliding"):
            self._set_up_limits(contender.kind, prefix, url)
        else:
            self._set_up_drf(prefix, url)

    def _set_up_ours(self, contender: Contender, prefix: str, url: str, *, patient: bool) -> None:
        engine = _ours(prefix, url, patient=patient)
        if engine.policy_store().current().version == 0:
            raise RuntimeError("no policy under this prefix in Redis")

        def attempt(user: str, tokens: int = 0, window: int = HOUR) -> bool:
            tenant = EDGE_RULE if window == EDGE_WINDOW else contender.tenant
            if tokens and contender.tenant == ONE_RULE:
                tenant = TOKEN_RULE
            decision = engine.check(tenant, user, MODEL, tokens)
            if decision.degraded:
                with self._lock:
                    self.degraded += 1
            return bool(decision.allowed)

        self.attempt = attempt

    def _set_up_limits(self, kind: str, prefix: str, url: str) -> None:
        _without_repository()
        # One statement: linters file `limits` under this repository, its submodules not.
        from limits import RateLimitItemPerSecond, storage, strategies

        found = Path(sys.modules["limits"].__file__ or "").resolve().parent
        assert found != OUR_APP, "found our app, not the limits package"
        redis_storage = self.storage = storage.RedisStorage(url, key_prefix=prefix)
        limiter: Any
        if kind == "moving":
            limiter = strategies.MovingWindowRateLimiter(redis_storage)
        else:
            limiter = strategies.SlidingWindowCounterRateLimiter(redis_storage)
        items: dict[tuple[int, int], Any] = {}

        def attempt(user: str, tokens: int = 0, window: int = HOUR) -> bool:
            size = TOKEN_LIMIT if tokens else LIMIT
            item = items.get((size, window))
            if item is None:
                item = items[size, window] = RateLimitItemPerSecond(size, window)
            return bool(limiter.hit(item, MODEL, user, cost=tokens or 1))

        self.attempt = attempt

    def _set_up_drf(self, prefix: str, url: str) -> None:
        _without_repository()
        import django
        from django.conf import settings

        settings.configure(
            CACHES={
                "default": {
                    "BACKEND": "django_redis.cache.RedisCache",
                    "LOCATION": url,
                    "KEY_PREFIX": prefix,
                }
            },
            INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth"],
        )
        django.setup()
        from rest_framework.throttling import UserRateThrottle

        class Throttle(UserRateThrottle):
            rate = f"{LIMIT}/hour"

            def __init__(self, window: int) -> None:
                super().__init__()
                self.duration = window  # DRF's rates know whole units only

        def attempt(user: str, tokens: int = 0, window: int = HOUR) -> bool:
            if tokens:
                raise ValueError("DRF's throttle counts requests only")
            # DRF makes a throttle per request; its user is all that get_cache_key reads.
            request = SimpleNamespace(user=SimpleNamespace(is_authenticated=True, pk=user))
            return bool(Throttle(window).allow_request(request, None))

        self.attempt = attempt


def _percentile(ordered: list[int], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1000


def speed_process(contender: Contender, prefix: str, url: str, blocks: Any, out: Any) -> None:
    """Waits for blocks of checks to run, one at a time; reports everything at the end."""
    try:
        # Patient, as in the race: a check that waits past the production timeout for a
        # CPU would be answered by the fail mode, quickly and without Redis, and counted as
        # a fast check (the peers have no timeout and always wait).
        attempt = Attempts(contender, prefix, url, patient=True).attempt
        tokens = TOKENS if contender.tenant == FIVE_RULES else 0
        for index in range(500):  # connections, scripts, caches
            attempt(f"warm-{index % 20}", tokens, HOUR)
        out.put({"ready": True})
        spent: list[int] = []
        admitted = 0
        cpu = 0  # this process's CPU over the blocks, its kernel time (the socket) included
        clock = time.perf_counter_ns
        while (size := blocks.get(timeout=STEP_SECONDS)) is not None:
            cpu -= time.process_time_ns()
            for _ in range(size):
                user = f"user-{len(spent) // USES_PER_USER}"
                before = clock()
                admitted += attempt(user, tokens, HOUR)
                spent.append(clock() - before)
            cpu += time.process_time_ns()
            out.put({"block": size})
        total = sum(spent) / 1e9
        spent.sort()
        out.put(
            {
                "checks": len(spent),
                "checks_per_second": len(spent) / total,
                "p50": _percentile(spent, 0.50),
                "p99": _percentile(spent, 0.99),
                "admitted": admitted,
                "client_cpu": cpu / 1000 / len(spent),
            }
        )
    except Exception:
        out.put({"error": traceback.format_exc()})


# A stand-in for a limiter's script: the same keys and arguments travel, nothing is counted.
# Ours answers allowed with a zero for each limit's used and reset, as the text check.lua
# answers a check with (its stored layout), so the engine decodes a reply of the usual shape.
NOOP_CHECK = """
return "1;0;0;-1" .. string.rep(";0", 2 * tonumber(ARGV[10])) .. ";"
"""
NOOP_ONE = "return 1"


def split_process(contender: Contender, prefix: str, url: str, rounds: int, out: Any) -> None:
    """Where one check's time goes, from three loops taking turns: the real call (A), the
    same call with its script swapped for a no-op (B), and the no-op script alone with the
    same keys and arguments (C). Lua in Redis = A - B; Python = B - C; redis-py and the
    round trip = C."""
    try:
        block = SPLIT_BLOCK
        count = [0]

        def user() -> str:
            count[0] += 1
            return f"split-{count[0] // USES_PER_USER}"

        if contender.kind == "ours":
            engine = _ours(prefix, url, patient=False)
            from limits.backends import LoadedScript

            chosen = engine.backend()
            tokens = TOKENS if contender.tenant == FIVE_RULES else 0
            real, noop = chosen.check_script, LoadedScript.of(NOOP_CHECK)
            sent: dict[str, Any] = {}

            def capture(script: Any, keys: list[str], args: list[Any], *packed: Any) -> Any:
                sent.update(keys=keys, args=args, packed=packed)
                return type(chosen).evalsha(chosen, noop, keys, args, *packed)

            chosen.evalsha = capture  # the next check's keys and arguments, on the no-op
            engine.check(contender.tenant, "split-capture", MODEL, tokens)
            del chosen.evalsha

            def whole() -> None:
                engine.check(contender.tenant, user(), MODEL, tokens)

            def alone() -> None:
                chosen.evalsha(noop, sent["keys"], sent["args"], *sent["packed"])

            def swap(script: Any) -> None:
                chosen.check_script = script

            scripts = (real, noop)
        else:
            if contender.kind != "moving":
                raise ValueError("split the moving window only")
            limiter = Attempts(contender, prefix, url, patient=False)
            redis_storage = limiter.storage
            real = redis_storage.lua_acquire_moving_window
            noop = redis_storage.get_connection().register_script(NOOP_ONE)

            def whole() -> None:
                limiter.attempt(user(), 0, HOUR)

            def alone() -> None:
                noop([f"{prefix}:split"], [time.time(), LIMIT, HOUR, 1])

            def swap(script: Any) -> None:
                redis_storage.lua_acquire_moving_window = script

            scripts = (real, noop)
        timings: dict[str, list[float]] = {"A": [], "B": [], "C": []}
        for _ in range(rounds):
            for label, script, loop in (
                ("A", scripts[0], whole),
                ("B", scripts[1], whole),
                ("C", None, alone),
            ):
                if script is not None:
                    swap(script)
                started = time.perf_counter_ns()
                for _ in range(block):
                    loop()
                timings[label].append((time.perf_counter_ns() - started) / block / 1000)
        swap(scripts[0])
        # Whatever else runs on the machine only ever adds time: the quickest turn is the
        # closest to each loop's own cost.
        quickest = {label: min(values) for label, values in timings.items()}
        out.put(
            {
                "name": contender.name,
                "total": quickest["A"],
                "lua": quickest["A"] - quickest["B"],
                "python": quickest["B"] - quickest["C"],
                "transport": quickest["C"],
            }
        )
    except Exception:
        out.put({"error": traceback.format_exc()})


def race_process(
    contender: Contender, prefix: str, url: str, attempts_each: int, barrier: Any, out: Any
) -> None:
    try:
        attempts = Attempts(contender, prefix, url, patient=True)
        counts = [0] * THREADS
        failures: list[str] = []

        def run(index: int) -> None:
            try:
                # Its own connection and loaded scripts first, on a user of its own.
                attempts.attempt(f"warm-{os.getpid()}-{index}", 0, HOUR)
                barrier.wait(timeout=SETUP_SECONDS)
                counts[index] = sum(
                    attempts.attempt("racer", 0, HOUR) for _ in range(attempts_each)
                )
            except Exception:
                failures.append(traceback.format_exc())
                barrier.abort()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise RuntimeError(failures[0])
        out.put({"admitted": sum(counts), "degraded": attempts.degraded})
    except Exception:
        barrier.abort()
        out.put({"error": traceback.format_exc()})


def edge_process(contender: Contender, prefix: str, url: str, out: Any) -> None:
    """LIMIT per EDGE_WINDOW seconds: 1 use at 0 s, the other 99 at 1.8 s, then 100 tries at
    3.0 s. Any exact window of 2 s ending at 3.0 s holds the 99, so exactly 1 more fits."""
    try:
        attempt = Attempts(contender, prefix, url, patient=False).attempt
        attempt("edge-warm", 0, EDGE_WINDOW)
        started = time.monotonic()

        def at(offset: float) -> None:
            time.sleep(max(0.0, started + offset - time.monotonic()))

        first = attempt("edge", 0, EDGE_WINDOW)
        at(0.9 * EDGE_WINDOW)
        late = sum(attempt("edge", 0, EDGE_WINDOW) for _ in range(LIMIT - 1))
        at(1.5 * EDGE_WINDOW)
        after = sum(attempt("edge", 0, EDGE_WINDOW) for _ in range(LIMIT))
        out.put({"name": contender.name, "first": int(first), "late": late, "after": after})
    except Exception:
        out.put({"error": traceback.format_exc()})


def fill_process(contender: Contender, prefix: str, url: str, out: Any) -> None:
    """Fills user "mem-requests" with 100 requests and "mem-tokens" with 100 x 1000 tokens."""
    try:
        attempt = Attempts(contender, prefix, url, patient=False).attempt
        for _ in range(LIMIT):
            assert attempt("mem-requests", 0, HOUR)
            if contender.kind != "drf":  # DRF counts requests only
                assert attempt("mem-tokens", 1000, HOUR)
        out.put({"done": True})
    except Exception:
        out.put({"error": traceback.format_exc()})


def publish_process(prefix: str, url: str, out: Any) -> None:
    try:
        engine = _ours(prefix, url, patient=False)
        store = engine.policy_store()
        store.publish(1, POLICY)
        store.stop()
        out.put({"done": True})
    except Exception:
        out.put({"error": traceback.format_exc()})


# -- the conductor ---------------------------------------------------------------------------
class Bench:
    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"bench{uuid.uuid4().hex[:10]}"
        self.context = multiprocessing.get_context("spawn")
        self.client = redis.Redis.from_url(url, decode_responses=True)

    def space(self, contender: Contender) -> str:
        """The key prefix of one contender (ours share one: the policy lives there)."""
        return f"{self.prefix}-{contender.kind}"

    def _run(self, target: Callable[..., None], argument_lists: list[tuple[Any, ...]]) -> list[Any]:
        """Starts one process per argument list (each gets a queue last); their answers, in
        the order they arrive."""
        out = self.context.Queue()
        processes = [
            self.context.Process(target=target, args=(*arguments, out), daemon=True)
            for arguments in argument_lists
        ]
        for process in processes:
            process.start()
        try:
            answers = [out.get(timeout=SETUP_SECONDS + STEP_SECONDS) for _ in processes]
        finally:
            self._stop(processes)
        for answer in answers:
            if "error" in answer:
                raise RuntimeError(answer["error"])
        return answers

    @staticmethod
    def _stop(processes: list[Any]) -> None:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()

    def publish(self) -> None:
        self._run(publish_process, [(self.space(OURS_ONE), self.url)])

    def speed(self, contenders: list[Contender], iterations: int, rounds: int) -> dict[str, Any]:
        """Every contender in a process of its own, taking turns: block after block, so that
        whatever else this machine does meanwhile falls on all of them alike."""
        processes, blocks, outs = [], [], []
        for contender in contenders:
            block_queue, out = self.context.Queue(), self.context.Queue()
            process = self.context.Process(
                target=speed_process,
                args=(contender, self.space(contender), self.url, block_queue, out),
                daemon=True,
            )
            process.start()
            processes.append(process)
            blocks.append(block_queue)
            outs.append(out)
        size = max(1, iterations // rounds)
        # Redis's CPU during each contender's blocks: one contender runs at a time.
        redis_cpu = [0.0] * len(contenders)
        try:
            for out in outs:
                self._expect(out)
            for _ in range(rounds):
                for index, (block_queue, out) in enumerate(zip(blocks, outs, strict=True)):
                    redis_cpu[index] -= self._redis_cpu()
                    block_queue.put(size)
                    self._expect(out)
                    redis_cpu[index] += self._redis_cpu()
            results = {}
            for index, (contender, block_queue, out) in enumerate(
                zip(contenders, blocks, outs, strict=True)
            ):
                block_queue.put(None)
                results[contender.name] = self._expect(out)
                results[contender.name]["redis_cpu"] = (
                    redis_cpu[index] * 1e6 / results[contender.name]["checks"]
                )
        finally:
            self._stop(processes)
        return results

    def _redis_cpu(self) -> float:
        """Seconds of CPU the Redis server has used since it started."""
        found = self.client.info("cpu")
        return float(found["used_cpu_user"]) + float(found["used_cpu_sys"])

    @staticmethod
    def _expect(out: Any) -> dict[str, Any]:
        answer: dict[str, Any] = out.get(timeout=SETUP_SECONDS + STEP_SECONDS)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def race(self, contender: Contender, attempts: int) -> dict[str, int]:
        barrier = self.context.Barrier(PROCESSES * THREADS)
        arguments = (contender, self.space(contender), self.url, attempts, barrier)
        answers = self._run(race_process, [arguments] * PROCESSES)
        return {
            "admitted": sum(answer["admitted"] for answer in answers),
            "degraded": sum(answer["degraded"] for answer in answers),
        }

    def edge(self, contenders: tuple[Contender, ...]) -> dict[str, Any]:
        answers = self._run(
            edge_process, [(contender, self.space(contender), self.url) for contender in contenders]
        )
        by_name = {answer.pop("name"): answer for answer in answers}  # in order of arrival
        return {contender.name: by_name[contender.name] for contender in contenders}

    def split(self, contenders: tuple[Contender, ...], rounds: int) -> dict[str, Any]:
        results = {}
        for contender in contenders:  # one at a time: they would slow each other down
            (answer,) = self._run(
                split_process, [(contender, self.space(contender), self.url, rounds)]
            )
            results[answer.pop("name")] = answer
        return results

    def memory(self, contender: Contender) -> dict[str, int | None]:
        self._run(fill_process, [(contender, self.space(contender), self.url)])
        sizes: dict[str, int | None] = {}
        for user in ("mem-requests", "mem-tokens"):
            keys = [key for key in self._keys(f"{self.space(contender)}*mem-*") if user in key]
            sizes[user] = self._bytes(keys) if keys else None
        if contender.kind == "ours":
            # Tenant TOKEN_RULE saw only the 100 token checks of the fill.
            tag = f"{self.space(contender)}:{{t:{TOKEN_RULE}}}"
            records = self._keys(f"{tag}:req:*")
            sizes["record"] = self._bytes(records) // len(records)
            (stream,) = self._keys(f"{tag}:events")
            sizes["event"] = self._bytes([stream]) // int(self.client.xlen(stream))
        return sizes

    def _keys(self, pattern: str) -> list[str]:
        return sorted(self.client.scan_iter(match=pattern, count=1000))

    def _bytes(self, keys: list[str]) -> int:
        return sum(int(self.client.memory_usage(key, samples=0) or 0) for key in keys)

    def clean(self) -> int:
        removed = 0
        batch: list[str] = []
        for key in self.client.scan_iter(match=f"{self.prefix}-*", count=1000):
            batch.append(key)
            if len(batch) == 1000:
                removed += int(self.client.unlink(*batch))
                batch.clear()
        if batch:
            removed += int(self.client.unlink(*batch))
        return removed


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = [
        "  ".join(
            cell.ljust(width) if index == 0 else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(line, widths, strict=True))
        )
        for line in [headers, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=20_000, help="speed: checks each")
    parser.add_argument("--rounds", type=int, default=10, help="speed: turns they take")
    parser.add_argument("--attempts", type=int, default=250, help="race: tries per thread")
    parser.add_argument("--json", action="store_true", help="also print the raw results")
    options = parser.parse_args()
    # Run as a script, this folder comes first on sys.path (and so on the spawned processes'
    # paths): a module here named like a standard one (bench/http.py) would hide it.
    here = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    bench = Bench(url)
    info = bench.client.info("server")
    print(
        f"Redis {info['redis_version']} at {url}; {os.cpu_count()} CPUs; "
        f"Python {sys.version.split()[0]}; keys under {bench.prefix}-*"
    )
    results: dict[str, Any] = {}
    started = time.monotonic()
    try:
        bench.publish()
        results["speed"] = bench.speed(
            [OURS_ONE, OURS_FIVE, MOVING, SLIDING, DRF], options.iterations, options.rounds
        )
        results["split"] = bench.split((OURS_ONE, OURS_FIVE, MOVING), SPLIT_TURNS)
        results["race"] = {
            contender.name: bench.race(contender, options.attempts) for contender in ONE_RULE_EACH
        }
        results["edge"] = bench.edge(ONE_RULE_EACH)
        results["memory"] = {contender.name: bench.memory(contender) for contender in ONE_RULE_EACH}
    finally:
        removed = bench.clean()
    report(options, results)
    print(f"\n{removed} keys removed; {time.monotonic() - started:.0f} s in all.")
    if options.json:
        print(json.dumps(results, indent=2))


def report(options: argparse.Namespace, results: dict[str, Any]) -> None:
    speed = results["speed"]
    base = speed[MOVING.name]["checks_per_second"]
    checks = speed[MOVING.name]["checks"]
    print(
        f"\nSpeed: one thread each, {checks} checks in {options.rounds} turns, spread over "
        f"users so that none reaches {LIMIT}/h (all admitted)"
    )
    rows = [
        [
            name,
            f"{result['checks_per_second']:,.0f}",
            f"{result['p50']:.0f}",
            f"{result['p99']:.0f}",
            f"{result['checks_per_second'] / base:.2f}x",
            f"{result['admitted']}/{result['checks']}",
            f"{result['client_cpu']:.0f}",
            f"{result['redis_cpu']:.0f}",
        ]
        for name, result in speed.items()
    ]
    headers = ["contender", "checks/s", "p50 µs", "p99 µs", "vs moving", "admitted"]
    print(table([*headers, "client CPU µs", "Redis CPU µs"], rows))
    print(
        "CPU per check, waiting left out: the contender's process (its socket's kernel work "
        "included) and the Redis server (reading, running and answering the call) during its "
        "turns"
    )

    print(
        f"\nWhere a check's time goes (µs, quickest of {SPLIT_TURNS} turns of {SPLIT_BLOCK}): "
        "the real call, less the same call with a no-op script (Lua in Redis), less the no-op "
        "script alone (Python)"
    )
    rows = [
        [
            name,
            f"{result['total']:.0f}",
            f"{result['python']:.0f}",
            f"{result['transport']:.0f}",
            f"{result['lua']:.0f}",
        ]
        for name, result in results["split"].items()
    ]
    print(table(["contender", "total", "Python", "redis-py + round trip", "Lua in Redis"], rows))

    attempts = PROCESSES * THREADS * options.attempts
    print(
        f"\nRace: {PROCESSES} processes x {THREADS} threads x {options.attempts} attempts "
        f"({attempts}) released together on one user, limit {LIMIT}/h"
    )
    rows = [
        [name, str(result["admitted"]), _verdict(result["admitted"]), str(result["degraded"])]
        for name, result in results["race"].items()
    ]
    print(table(["contender", "admitted", "vs limit", "degraded"], rows))

    print(
        f"\nWindow edge: limit {LIMIT} per {EDGE_WINDOW} s; 1 use at 0 s, {LIMIT - 1} at "
        f"{0.9 * EDGE_WINDOW:.1f} s, {LIMIT} tries at {1.5 * EDGE_WINDOW:.1f} s"
    )
    rows = []
    for name, result in results["edge"].items():
        span = result["late"] + result["after"]
        rows.append(
            [name, str(result["first"]), str(result["late"]), str(result["after"]), str(span)]
        )
        rows[-1].append(_verdict(span))
    print(
        table(
            ["contender", "at 0 s", "at 1.8 s", "at 3.0 s", "in (1 s, 3 s]", "vs limit"],
            rows,
        )
    )

    print("\nRedis memory (MEMORY USAGE, bytes) of one user x model after filling its limit")
    rows = [
        [name, _size(sizes.get("mem-requests")), _size(sizes.get("mem-tokens"))]
        for name, sizes in results["memory"].items()
    ]
    print(table(["contender", "100/h: 100 requests", "100k tokens/h: 100 x 1000"], rows))
    ours = results["memory"][OURS_ONE.name]
    print(
        f"Ours also keeps per check a decision record of {ours['record']} B (idempotency and "
        "commit; expires after the longest window, at least 1 h) and a usage event of "
        f"{ours['event']} B in the tenant's stream until billing drains it."
    )

    five = speed[OURS_FIVE.name]["checks_per_second"]
    inexact = [
        name
        for name in results["race"]
        if results["race"][name]["admitted"] != LIMIT
        or results["edge"][name]["late"] + results["edge"][name]["after"] != LIMIT
    ]
    ours_exact = OURS_ONE.name not in inexact
    print("\nGoals")
    # Every check of the speed loop is admitted when Redis answered it: fewer means some were
    # answered by a fail mode, and the speed is not the engine's.
    unanswered = [
        name
        for name, result in speed.items()
        if name in (OURS_ONE.name, OURS_FIVE.name) and result["admitted"] != result["checks"]
    ]
    verdict = "met" if five >= base else "NOT met"
    if unanswered:
        verdict = f"not measured ({', '.join(unanswered)}: not every check admitted)"
    print(
        f"  ours with 5 rules at least as fast as limits' moving window with 1: "
        f"{five:,.0f} vs {base:,.0f} checks/s: {verdict}"
    )
    print(
        f"  ours exact in the race and at the edge: {'met' if ours_exact else 'NOT met'}; "
        f"inexact: {', '.join(inexact) or 'none'}"
    )


def _verdict(admitted: int) -> str:
    return "exact" if admitted == LIMIT else f"{admitted - LIMIT:+d}"


def _size(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


if __name__ == "__main__":
    main()
