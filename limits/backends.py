"""Where limits are counted: Redis (the deployment) or this process (the embedded default,
and the `local` fail mode).

Both backends take the same calls and give the same answers: the Redis one runs
`lua/check.lua` and `lua/commit.lua` by SHA, the local one is their line-by-line twin in
Python under one lock. The engine above them decides what to ask; this module only counts.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import re
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import hiredis
import redis
from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from limits.redis_client import Client, redis_client

logger = logging.getLogger(__name__)

LUA_DIR = Path(__file__).resolve().parent / "lua"
DAY_US = 86_400_000_000
NEVER = -2  # retry value: this request can never pass (it alone exceeds the limit)


class BackendUnavailable(Exception):
    """Redis did not answer in time (or at all); the tier's fail mode decides.

    ``sent``: the call went out and its answer was lost (a timeout, a connection closed), so
    Redis may have run it; False when nothing was sent (the breaker was open) or Redis
    answered with an error."""

    def __init__(self, message: str, *, sent: bool = False) -> None:
        super().__init__(message)
        self.sent = sent


@dataclass(frozen=True)
class LimitSpec:
    """One limit of a plan as the scripts see it: what stays the same from check to check."""

    kind: str  # "r" requests, "t" tokens, "c" concurrency, "k" token budget, "m" money budget
    limit: int
    span: str  # window or lease in µs, or the budget period "d" / "m"
    ttl_ms: str  # key TTL: windows twice the window, leases the lease + 1 ms; "" for budgets
    shadow: bool
    label: str
    # A class's global capacity: its keys carry the class's hash tag, not the tenant's, and
    # on a Redis Cluster they are decided in a call of their own (capacity.lua).
    is_global: bool = False

    def weight(self, tokens: int, cost: int) -> int:
        """What one check adds: one request or lease, its tokens, or its cost."""
        if self.kind in ("t", "k"):
            return tokens
        return cost if self.kind == "m" else 1


def limit_args(limits: tuple[LimitSpec, ...]) -> tuple[str, ...]:
    """The limits as check.lua reads them from ARGV[10…]: their count, then 4 values each
    (kind, limit, span, and a shadow rule's label). Made once per plan."""
    args = [str(len(limits))]
    for item in limits:
        args += [item.kind, str(item.limit), item.span, item.label if item.shadow else ""]
    return tuple(args)


class PackedArgs(NamedTuple):
    """Arguments already in Redis's wire format, to follow a command's others: a plan's
    limits are the same for every check, so they are packed once, not once a check."""

    data: bytes
    length: int  # how many arguments

    @classmethod
    def of(cls, args: tuple[str, ...]) -> PackedArgs:
        packed = _packed(*args)
        return cls(packed[packed.index(b"\r\n") + 2 :], len(args))  # past "*<count>\r\n"


class CheckCall(NamedTuple):
    """One check as both backends take it. A named tuple: it is made for every check."""

    # KEYS as check.lua reads them: record, stream, denied, shadow, then each limit's key (a
    # token window's running sum right after it).
    keys: list[str]
    request_id: str
    member: str  # what the sorted sets hold: the request id qualified by its tenant
    mode: str  # "check", "dry" (decide only) or "peek" (read only)
    record_ttl_ms: int
    event: str
    denied_label: str
    prices: str  # "<input>\t<output>\t" (µ-units per 1K): remembered with the event, for commit
    tokens: int  # the estimate
    cost: int  # the estimate in nano-units of the currency
    limits: tuple[LimitSpec, ...]
    limit_args: tuple[str, ...]  # ``limit_args(limits)``, made once per plan
    packed_limits: PackedArgs  # ``PackedArgs.of(limit_args)``, once per plan
    # The request id was made by the engine for this check (128 random bits): no decision
    # can be recorded for it yet, so check.lua reads none (its mode "new").
    new_id: bool = False

    @property
    def script_mode(self) -> str:
        """The mode as check.lua takes it (ARGV[3])."""
        return "new" if self.new_id else self.mode

    @property
    def record_key(self) -> str:
        return self.keys[0]

    @property
    def stream_key(self) -> str:
        return self.keys[1]

    @property
    def denied_key(self) -> str:
        return self.keys[2]

    @property
    def shadow_key(self) -> str:
        return self.keys[3]


# What a check answers, laid out as check.lua returns it: [status (1 allowed, 0 denied), now
# µs, denied index (1-based, 0 none), retry µs (-1 none, NEVER), used_1, reset_1, …, shadow
# denied mask "i,j,"]. Numbers may come as text (check.lua answers a check, and a repeated
# request, with the text it stores); the engine reads only what its caller asks for.
Answer = tuple[list[Any], bool]  # (values, repeated)


@dataclass(frozen=True)
class StoredRequest:
    consumed: str
    extra: str
    settled: str | None


@dataclass(frozen=True)
class CommitCall:
    record_key: str
    stream_key: str
    request_id: str
    member: str
    tokens: int
    cost: int
    summary: str
    event: str


def sum_key(window_key: str) -> str:
    return window_key + ":sum"


def record_text(decision: str, settled: str | None, extra: str, consumed: str) -> str:
    """A request record as check.lua writes it: the decision, the settlement (empty until
    commit), what commit needs (prices and event: never a line break) and the consumed
    lines."""
    return f"{decision}\n{settled or ''}\n{extra}\n{consumed}"


def record_parts(text: str) -> tuple[str, str | None, str, str]:
    """(decision, settlement or None, what commit needs, consumed lines) of a record."""
    decision, settled, extra, consumed = text.split("\n", 3)
    return decision, settled or None, extra, consumed


# A window's name before the upgrade: ":w:" right after the hash tag where a log has ":l:".
_OLD_WINDOW = re.compile(r"^([^{]*\{[^}]*\}):w:")
_NEW_WINDOW = re.compile(r"^([^{]*\{[^}]*\}):l:")


def window_before_upgrade(key: str) -> str:
    """The name a request or token log (or its sum) had before the upgrade: check.lua
    carries a window found there into an empty log (docs/engine.md, "Upgrading")."""
    return _NEW_WINDOW.sub(r"\1:w:", key, count=1)


def consumed_keys(consumed: str) -> list[str]:
    """The keys a commit touches, in the order commit.lua reads them. A token line of a
    record written before the upgrade names its window's old name: the window it now has
    is given instead, where a check has carried the old one over (docs/engine.md,
    "Upgrading from sorted-set windows"); commit.lua reads such a line's name the same way."""
    keys: list[str] = []
    for line in consumed.split("\n"):
        if not line:
            continue
        fields = line.split("\t")
        if fields[0] == "t":
            keys.append(_OLD_WINDOW.sub(r"\1:l:", fields[1], count=1))
            keys.append(_OLD_WINDOW.sub(r"\1:l:", fields[2], count=1))
        else:
            keys.append(fields[1])
    return keys


_UNREAD = object()
_test_clock: Any = _UNREAD


def test_clock_us() -> int | None:
    """Time injected by tests through a setting that production never sets. Read once and
    kept until a setting changes: asking Django's settings for one they lack raises and
    catches an exception inside, which cost as much as packing a check's whole command."""
    global _test_clock
    value = _test_clock
    if value is _UNREAD:
        found = getattr(settings, "QUOTA_TEST_NOW_US", None)
        value = _test_clock = None if found is None else int(found)
    return value


@receiver(setting_changed)
def _forget_test_clock(*, setting: str, **kwargs: Any) -> None:
    global _test_clock
    if setting == "QUOTA_TEST_NOW_US":
        _test_clock = _UNREAD


@dataclass(frozen=True)
class LoadedScript:
    """A Lua script called by its SHA; its source is sent only when Redis does not know it."""

    source: str
    sha: str

    @classmethod
    def read(cls, name: str) -> LoadedScript:
        return cls.of((LUA_DIR / name).read_text())

    @classmethod
    def of(cls, source: str) -> LoadedScript:
        return cls(source, hashlib.sha1(source.encode()).hexdigest())  # noqa: S324 - Redis's id


class RedisBackend:
    """Counts in Redis: one EVALSHA per check, behind a circuit breaker.

    On one Redis the scripts go out on a connection of the calling thread's own, packed by
    hiredis and read by redis-py's hiredis parser: redis-py's client and pool machinery
    around one command (retry wrapper, pool bookkeeping and its readiness poll,
    observability hooks) cost more than the round trip itself. The connection is redis-py's,
    made from the same URL and options as the client's, so authentication, TLS and the
    database are alike.

    On a Redis Cluster (``REDIS_CLUSTER``) every call goes through redis-py's cluster
    client, which sends it to the node that owns its keys' slot and follows MOVED and ASK.
    A check of a class with a global capacity takes that capacity first in a call of its
    own (``capacity.lua`` on the class's slot), then runs ``check.lua`` on the tenant's
    slot, and gives the capacity back when that call denies or fails (see docs/engine.md).
    """

    def __init__(self, url: str) -> None:
        timeout = settings.QUOTA_REDIS_TIMEOUT_MS / 1000
        self.is_cluster = bool(settings.REDIS_CLUSTER)
        self._url = url
        self._cluster_lock = threading.Lock()
        self.client: Client | None = None  # made on first use on a cluster: see ``_client``
        if not self.is_cluster:
            # A dead pooled connection (Redis restarted) is retried once at once; a timeout
            # is not, so an outage costs one timeout, not several.
            single = redis.Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
                decode_responses=True,
            )
            self.client = single
            self._pool = single.connection_pool
        self.check_script = LoadedScript.read("check.lua")
        self.commit_script = LoadedScript.read("commit.lua")
        self.capacity_script = LoadedScript.read("capacity.lua")
        self.deny_script = LoadedScript.read("deny.lua")
        self._open_until = 0.0
        self._probe = threading.Lock()
        self._local = threading.local()
        # Weak: a thread that ends drops its connection, which closes itself when collected
        # (ASGI and threaded servers run requests on short-lived threads; holding them here
        # kept one Redis client per finished thread open until maxclients).
        self._connections: weakref.WeakSet[Any] = weakref.WeakSet()
        self._connections_lock = threading.Lock()

    def _client(self) -> Client:
        """The client. A cluster client learns the cluster's layout when it is made, and
        cannot be made while no node answers: it is made on first use, inside the breaker,
        so that a process started during an outage answers by the fail mode meanwhile."""
        client = self.client
        if client is None:
            with self._cluster_lock:
                if self.client is None:
                    try:
                        # The cluster client's own retries would send a command again after
                        # a timeout too: none there. ``_cluster_evalsha`` retries a dead
                        # connection once, as the single-Redis path does.
                        self.client = redis_client(
                            self._url,
                            socket_timeout=settings.QUOTA_REDIS_TIMEOUT_MS / 1000,
                            socket_connect_timeout=settings.QUOTA_REDIS_TIMEOUT_MS / 1000,
                            retry=Retry(NoBackoff(), 0),
                            decode_responses=True,
                        )
                    except redis.exceptions.RedisClusterException as error:
                        raise redis.ConnectionError(str(error)) from error
                client = self.client
        return client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        with self._connections_lock:
            for connection in list(self._connections):
                connection.disconnect()
            self._connections.clear()

    # -- transport -------------------------------------------------------------------
    def _connection(self) -> Any:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            pool = self._pool
            connection = pool.connection_class(**pool.connection_kwargs)
            self._local.connection = connection
            with self._connections_lock:
                self._connections.add(connection)
        return connection

    def evalsha(
        self,
        script: LoadedScript,
        keys: list[str],
        args: list[Any],
        packed: PackedArgs | None = None,
    ) -> Any:
        """One EVALSHA on this thread's connection, ``packed`` after ``args``. A dead
        connection (Redis restarted) is reconnected and the call sent once more; a timeout
        is not retried. Errors are redis-py's."""
        connection = self._connection()
        command = [_packed("EVALSHA", script.sha, len(keys), *keys, *args)]
        if packed is not None:
            head = command[0]
            start = head.index(b"\r\n") + 2  # past "*<count>\r\n", which grows
            count = 3 + len(keys) + len(args) + packed.length
            command = [b"".join((b"*%d\r\n" % count, head[start:], packed.data))]
        retried = loaded = False
        while True:
            try:
                connection.send_packed_command(command, check_health=False)
                return connection.read_response()
            except redis.exceptions.NoScriptError:
                if loaded:
                    raise
                # A restarted or flushed Redis forgot the script: load it, call again.
                connection.send_packed_command(
                    [_packed("SCRIPT", "LOAD", script.source)], check_health=False
                )
                connection.read_response()
                loaded = True
            except redis.ConnectionError:
                # redis-py has closed the connection; the next send opens a new one.
                if retried:
                    raise
                retried = True

    def _cluster_evalsha(self, script: LoadedScript, keys: list[str], args: list[Any]) -> Any:
        """One EVALSHA through the cluster client, on the node that owns the keys' slot. A
        node that does not know the script (restarted, flushed, newly promoted) gets it
        with every other primary; a dead connection is retried once, a timeout is not."""
        retried = loaded = False
        while True:
            try:
                return self._client().evalsha(script.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                if loaded:
                    raise
                self._client().script_load(script.source)
                loaded = True
            except redis.ConnectionError:
                if retried:
                    raise
                retried = True

    # -- breaker ---------------------------------------------------------------------
    def _call(self, function: Any, *args: Any, settling: bool = False) -> Any:
        """``function(*args)`` behind the breaker. While it is open, checks are answered by
        their fail mode at once; ``settling`` calls (a usage report, after the inference ran)
        are still tried: a report refused while Redis is up (one slow call opened this
        process's breaker) would leave the request billed at its estimate, and a report can
        afford one timeout where a check cannot. One that gets through closes the breaker."""
        probing = False
        if self._open_until and not settling:
            if time.monotonic() < self._open_until or not self._probe.acquire(blocking=False):
                raise BackendUnavailable("circuit open")
            probing = True
        try:
            result = function(*args)
        except redis.RedisError as error:
            from limits import metrics

            metrics.REDIS_ERRORS.labels(error=type(error).__name__).inc()
            if isinstance(error, redis.ResponseError) and not str(error).startswith(
                ("BUSY", "LOADING", "MASTERDOWN", "READONLY", "CLUSTERDOWN", "TRYAGAIN")
            ):
                logger.error("redis refused a limiter call: %s", error)
            self._open_until = time.monotonic() + settings.QUOTA_BREAKER_SECONDS
            sent = not isinstance(error, redis.ResponseError)
            raise BackendUnavailable(str(error), sent=sent) from error
        else:
            if probing or (settling and self._open_until):
                self._open_until = 0.0
            return result
        finally:
            if probing:
                self._probe.release()

    @property
    def circuit_open(self) -> bool:
        return bool(self._open_until)

    # -- calls -----------------------------------------------------------------------
    def check(self, call: CheckCall) -> Answer:
        if self.is_cluster:
            reply = self._call(self._cluster_check, call)
        else:
            args = [
                _clock_arg(),
                call.member,
                call.script_mode,
                call.record_ttl_ms,
                call.event,
                call.denied_label,
                call.prices,
                call.tokens,
                call.cost,
            ]
            reply = self._call(self.evalsha, self.check_script, call.keys, args, call.packed_limits)
        if isinstance(reply, str):
            return reply.split(";"), False  # a check's answer comes as the text it is stored as
        if reply[0] == 2:
            return reply[1].split(";"), True
        return reply, False

    def deny(
        self, call: CheckCall, reset_key: str, until_us: int, parts: tuple[str, str, str]
    ) -> Answer | None:
        """A check answered from the over-limit cache by deny.lua (see limits/overlimit.py):
        denied now, or its request id's first decision; None when the cache must not answer
        (the window moved on, or the tenant's reset mark is set). ``parts`` lay out the
        decision around its retry (deny.lua's ARGV[3…5])."""
        keys = [call.record_key, call.denied_key, reset_key]
        args = [
            _clock_arg(),
            until_us,
            *parts,
            call.record_ttl_ms,
            call.prices + call.event,
            call.denied_label,
        ]
        evalsha = self._cluster_evalsha if self.is_cluster else self.evalsha
        reply = self._call(evalsha, self.deny_script, keys, args)
        if reply[0] == 3:
            return None
        return reply[1].split(";"), reply[0] == 2

    def mark_reset(self, key: str, milliseconds: int) -> None:
        """Set a tenant's reset mark: no over-limit cache answers for it while it lives."""
        self._call(lambda: self._client().set(key, 1, px=milliseconds))

    def _cluster_check(self, call: CheckCall) -> list[Any] | str:
        """check.lua on the tenant's slot; a class's global capacity first, on its own."""
        if not any(spec.is_global for spec in call.limits):
            return self._cluster_evalsha(
                self.check_script, call.keys, _check_args(call, call.limit_args)
            )
        split = _CapacitySplit.of(call)
        clock = _clock_arg()
        taken = self._cluster_evalsha(
            self.capacity_script,
            split.capacity_keys,
            [clock, "take", call.member, call.mode, call.tokens, *split.take_args],
        )
        reserved_at, outcomes = int(taken[0]), taken[2:]
        limit_args = split.limit_args(call, outcomes)
        added = [str(outcomes[4 * index + 2]) for index in range(len(split.capacity))]
        try:
            reply = self._cluster_evalsha(
                self.check_script, split.tenant_keys, _check_args(call, limit_args, clock)
            )
        except redis.RedisError:
            self._give_back(call, split, added)
            raise
        if "1" in added:
            if isinstance(reply, str):
                if reply.startswith("1;"):
                    added = []  # counted: the capacity stays taken
            elif reply[0] == 2:
                settled = len(reply) > 2 and int(reply[2]) == 1
                added = split.not_counted_by(reply[1], reserved_at, added, settled=settled)
            elif reply[0] == 1:
                added = []
            if "1" in added:
                self._give_back(call, split, added)
        return reply

    def _give_back(self, call: CheckCall, split: _CapacitySplit, added: list[str]) -> None:
        """Undo a take. When even that fails, the units stay taken until they leave their
        window (or lease): the capacity is then briefly under-used, never exceeded."""
        if "1" not in added:
            return
        args: list[Any] = [_clock_arg(), "give", call.member, call.tokens, len(added)]
        for spec, flag in zip(split.capacity, added, strict=True):
            args += [spec.kind, flag]
        try:
            self._cluster_evalsha(self.capacity_script, split.capacity_keys, args)
        except redis.RedisError as error:
            from limits import metrics

            metrics.REDIS_ERRORS.labels(error=type(error).__name__).inc()
            logger.warning("global capacity not given back (held until it expires): %s", error)

    def stored_request(self, record_key: str) -> StoredRequest | None:
        def read() -> tuple[str | None, str | None, str | None, str | None]:
            client = self._client()
            try:
                text = client.get(record_key)
            except redis.ResponseError as error:
                if not str(error).startswith("WRONGTYPE"):
                    raise
                # A record kept as a hash: the layout before this one (docs/engine.md).
                consumed, extra, decision, settled = client.hmget(record_key, "c", "x", "d", "s")
                return decision, settled, extra, consumed
            return (None, None, None, None) if text is None else record_parts(text)

        decision, settled, extra, consumed = self._call(read, settling=True)
        if decision is None or not str(decision).startswith("1;"):
            return None
        return StoredRequest(consumed=consumed or "", extra=extra or "", settled=settled)

    def commit(self, call: CommitCall, stored: StoredRequest) -> tuple[int, str]:
        args = [_clock_arg(), call.member, call.tokens, call.cost, call.summary, call.event]
        if self.is_cluster:
            reply = self._call(self._cluster_commit, call, stored, args, settling=True)
        else:
            keys = [call.record_key, call.stream_key, *consumed_keys(stored.consumed)]
            reply = self._call(self.evalsha, self.commit_script, keys, args, settling=True)
        return int(reply[0]), (str(reply[1]) if len(reply) > 1 else "")

    def _cluster_commit(self, call: CommitCall, stored: StoredRequest, args: list[Any]) -> Any:
        """Global capacity lines settled on their class's slot first, then commit.lua on the
        tenant's, which passes over lines whose keys it is not given. Settling capacity
        twice changes nothing more, so a report sent again after a failure is safe."""
        home = key_slot(call.record_key.encode())
        tenant_lines: list[str] = []
        elsewhere: dict[int, list[str]] = {}
        for line in stored.consumed.split("\n"):
            if not line:
                continue
            slot = key_slot(line.split("\t", 2)[1].encode())
            if slot == home:
                tenant_lines.append(line)
            else:
                elsewhere.setdefault(slot, []).append(line)
        for lines in elsewhere.values():
            self._cluster_evalsha(
                self.capacity_script,
                consumed_keys("\n".join(lines)),
                [args[0], "settle", call.member, call.tokens, *lines],
            )
        keys = [call.record_key, call.stream_key, *consumed_keys("\n".join(tenant_lines))]
        return self._cluster_evalsha(self.commit_script, keys, args)

    def delete(self, keys: list[str]) -> int:
        return int(self._call(lambda: self._client().unlink(*keys))) if keys else 0


def _packed(*parts: Any) -> bytes:
    return hiredis.pack_command(parts)


def _check_args(
    call: CheckCall, limit_args: tuple[str, ...], clock: str | None = None
) -> list[Any]:
    """check.lua's ARGV (the single-Redis path lays them out in line)."""
    return [
        _clock_arg() if clock is None else clock,
        call.member,
        call.script_mode,
        call.record_ttl_ms,
        call.event,
        call.denied_label,
        call.prices,
        call.tokens,
        call.cost,
        *limit_args,
    ]


class _CapacitySplit(NamedTuple):
    """A check's limits parted for a cluster: the tenant's, and the class's global capacity
    (``capacity.lua``'s KEYS and ARGV), with where each capacity limit sits in the plan."""

    tenant_keys: list[str]
    capacity_keys: list[str]
    capacity: list[LimitSpec]
    positions: list[int]  # each capacity limit's index in ``call.limits``
    take_args: list[Any]

    @classmethod
    def of(cls, call: CheckCall) -> _CapacitySplit:
        tenant_keys = call.keys[:4]
        capacity_keys: list[str] = []
        capacity: list[LimitSpec] = []
        positions: list[int] = []
        take_args: list[Any] = []
        index = 4
        for position, spec in enumerate(call.limits):
            width = 2 if spec.kind == "t" else 1
            keys = call.keys[index : index + width]
            index += width
            if spec.is_global:
                capacity_keys += keys
                capacity.append(spec)
                positions.append(position)
            else:
                tenant_keys += keys
        take_args.append(len(capacity))
        for spec in capacity:
            take_args += [spec.kind, spec.limit, spec.span, spec.ttl_ms, int(spec.shadow)]
        return cls(tenant_keys, capacity_keys, capacity, positions, take_args)

    def limit_args(self, call: CheckCall, outcomes: list[Any]) -> tuple[str, ...]:
        """check.lua's limits with each capacity limit replaced by what the take decided
        (kind "x": its wait, where it stands either way, the line to record)."""
        args = list(call.limit_args)
        for number, (spec, position) in enumerate(zip(self.capacity, self.positions, strict=True)):
            wait, standing, _added, line = outcomes[4 * number : 4 * number + 4]
            base = 1 + 4 * position
            span = f"{wait or '-'} {standing}"
            args[base : base + 4] = [
                "x",
                str(spec.limit),
                f"{span}\n{line}" if line else span,
                spec.label if spec.shadow else "",
            ]
        return tuple(args)

    def not_counted_by(
        self, stored: str, reserved_at: int, added: list[str], *, settled: bool = False
    ) -> list[str]:
        """Of the units a take added, those a repeated request id's first decision does not
        count. Every check of a request id shares one member in the capacity sets, so a
        unit this take added may be the one the stored decision stands on: a concurrent
        check of the same id that found it there, or this very call sent again after a
        dropped connection. That holds while the stored decision was allowed, its usage not
        yet reported (a report settles the capacity lines: the lease freed, the tokens
        replaced) and its unit would still be in its window (or lease); otherwise the unit
        is this repeat's own."""
        if settled:
            return added
        values = stored.split(";")
        counted = values[0] == "1"
        decided_at = int(values[1])
        return [
            "1"
            if flag == "1" and not (counted and decided_at + int(spec.span) > reserved_at)
            else "0"
            for spec, flag in zip(self.capacity, added, strict=True)
        ]


def _clock_arg() -> str:
    now = test_clock_us()
    return "" if now is None else str(now)


# -- the in-process twin ---------------------------------------------------------------
class _SortedSet:
    """The part of a Redis sorted set the scripts use: members ordered by score."""

    __slots__ = ("items", "scores")

    def __init__(self) -> None:
        self.items: list[tuple[int, str]] = []
        self.scores: dict[str, int] = {}

    def add(self, score: int, member: str) -> int:
        """1 when the member is new, 0 when it was there (its score moves), as ZADD says."""
        present = self.remove(member)
        bisect.insort(self.items, (score, member))
        self.scores[member] = score
        return 1 - present

    def remove(self, member: str) -> int:
        score = self.scores.pop(member, None)
        if score is None:
            return 0
        index = bisect.bisect_left(self.items, (score, member))
        del self.items[index]
        return 1

    def pop_through(self, score: int) -> list[tuple[int, str]]:
        """Remove and return every member scored at or below ``score``."""
        index = bisect.bisect_right(self.items, (score, "\U0010ffff"))
        gone = self.items[:index]
        del self.items[:index]
        for _, member in gone:
            del self.scores[member]
        return gone

    def __len__(self) -> int:
        return len(self.items)


class _Log:
    """The part of a Redis list the scripts use for a window: entries "<time>:<…>" pushed
    newest first (kept here oldest first, with their times)."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: list[tuple[int, str]] = []

    def push(self, at: int, entry: str) -> None:
        self.entries.append((at, entry))

    def oldest(self) -> int | None:
        return self.entries[0][0] if self.entries else None

    def pop_through(self, cutoff: int) -> list[str]:
        """check.lua's trim: remove the oldest entries while they are at or before cutoff."""
        index = 0
        while index < len(self.entries) and self.entries[index][0] <= cutoff:
            index += 1
        gone = [entry for _, entry in self.entries[:index]]
        del self.entries[:index]
        return gone

    def find(self, entry: str) -> int | None:
        """LPOS: the first position from the newest end holding ``entry`` (here, from the
        oldest end), or None."""
        for index in range(len(self.entries) - 1, -1, -1):
            if self.entries[index][1] == entry:
                return index
        return None

    def __len__(self) -> int:
        return len(self.entries)


def _weight_of(entry: str) -> int:
    """The tokens of a token log entry "<time>:<tokens>:<member>"."""
    return int(entry.split(":", 2)[1])


class LocalBackend:
    """The scripts' semantics in this process, for one process's traffic."""

    SWEEP_EVERY = 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {}
        self._expires: dict[str, int] = {}
        self._calls = 0
        self.events: list[dict[str, str]] = []
        self.circuit_open = False

    # -- keyspace ------------------------------------------------------------------
    def _get(self, key: str, now: int) -> Any:
        expires = self._expires.get(key)
        value = self._data.get(key)
        # Redis deletes a sorted set or hash with its last member: so does this keyspace.
        gone = isinstance(value, (_SortedSet, _Log, dict)) and not value
        if gone or (expires is not None and expires <= now):
            self._data.pop(key, None)
            self._expires.pop(key, None)
            return None
        return value

    def _expire(self, key: str, now: int, ttl_ms: int) -> None:
        if key in self._data:
            self._expires[key] = now + ttl_ms * 1000

    def _sweep(self, now: int) -> None:
        for key in [key for key, at in self._expires.items() if at <= now]:
            self._data.pop(key, None)
            del self._expires[key]

    def _zset(self, key: str, now: int) -> _SortedSet | None:
        value = self._get(key, now)
        return value if isinstance(value, _SortedSet) else None

    def _log(self, key: str, now: int) -> _Log | None:
        value = self._get(key, now)
        return value if isinstance(value, _Log) else None

    def _now(self) -> int:
        now = test_clock_us()
        return time.time_ns() // 1000 if now is None else now

    # -- calls ---------------------------------------------------------------------
    def check(self, call: CheckCall) -> Answer:
        with self._lock:
            now = self._now()
            self._calls += 1
            if self._calls % self.SWEEP_EVERY == 0:
                self._sweep(now)
            return self._check(call, now)

    def _trim_log(
        self, key: str, cutoff: int, weighted: bool, now: int
    ) -> tuple[int | None, int, bool]:
        """check.lua's ``trim_log``: the oldest time left, the weight that left, whether any
        did."""
        log = self._log(key, now)
        if log is None:
            return None, 0, False
        gone = log.pop_through(cutoff)
        weight = sum(_weight_of(entry) for entry in gone) if weighted else 0
        return log.oldest(), weight, bool(gone)

    def _trim_leases(self, key: str, cutoff: int, now: int) -> int | None:
        """check.lua's ``trim_leases``: the earliest expiry left."""
        entries = self._zset(key, now)
        if entries is None:
            return None
        entries.pop_through(cutoff)
        return entries.items[0][0] if len(entries) else None

    def _check(self, call: CheckCall, now: int) -> Answer:
        if call.mode == "check":
            record = self._get(call.record_key, now)
            if record is not None:
                return record_parts(record)[0].split(";"), True

        peek = call.mode == "peek"
        allowed = True
        denied_index, retry = 0, -1
        shadow_denied: list[int] = []
        states: list[dict[str, Any]] = []
        keys = iter(call.keys[4:])
        for index, item in enumerate(call.limits, start=1):
            key = next(keys)
            weight = 0 if peek else item.weight(call.tokens, call.cost)
            needed = weight
            if item.kind in ("r", "c"):
                needed = 0 if peek else 1
            state: dict[str, Any] = {"item": item, "key": key, "weight": weight, "oldest": None}
            if item.kind == "r":
                oldest, _, left = self._trim_log(key, now - int(item.span), False, now)
                log = self._log(key, now)
                used = len(log) if log is not None else 0
                if left and used > 0:
                    self._expire(key, now, int(item.ttl_ms))
                state.update(oldest=oldest, fresh=used == 0)
            elif item.kind == "t":
                total_key = state["sum_key"] = next(keys)
                oldest, gone, left = self._trim_log(key, now - int(item.span), True, now)
                total = self._get(total_key, now) or 0
                if gone:
                    total -= gone
                    if total <= 0:
                        self._delete(total_key)
                        total = 0
                    else:
                        self._data[total_key] = total
                used = total
                if left and oldest is not None:
                    self._expire(key, now, int(item.ttl_ms))
                    self._expire(total_key, now, int(item.ttl_ms))
                state.update(oldest=oldest, fresh=oldest is None)
            elif item.kind == "c":
                oldest = self._trim_leases(key, now, now)
                entries = self._zset(key, now)
                used = len(entries) if entries is not None else 0
                state["oldest"] = oldest
            else:
                field, period_end, stale = _period_of(item.span, now)
                state.update(field=field, period_end=period_end, stale=stale)
                fields = self._get(key, now) or {}
                used = fields.get(field, 0)
            state["used"] = used

            # Room for at least one unit, as in check.lua: a spent limit denies a 0 estimate.
            room = max(needed, 1)
            if used + room > item.limit and not peek:
                wait = NEVER
                log = self._log(key, now) if item.kind in ("r", "t") else None
                if item.kind == "r" and log is not None:
                    position = used - item.limit
                    if 0 <= position < len(log):
                        wait = log.entries[position][0] + int(item.span) - now
                elif item.kind == "t" and log is not None:
                    if room <= item.limit:
                        remaining = used
                        for at, entry in log.entries:
                            remaining -= _weight_of(entry)
                            if remaining + room <= item.limit:
                                wait = at + int(item.span) - now
                                break
                elif item.kind == "c" and state["oldest"] is not None:
                    wait = state["oldest"] - now
                elif item.kind in ("k", "m") and room <= item.limit:
                    wait = state["period_end"] - now
                if item.shadow:
                    shadow_denied.append(index)
                else:
                    allowed = False
                    if retry != NEVER and (wait == NEVER or wait > retry):
                        retry = wait
                        denied_index = index
            state["needed"] = needed
            states.append(state)

        consume = allowed and call.mode == "check"
        consumed: list[str] = []
        pushed: set[str] = set()  # logs shared by two rules take one entry a check
        values: list[Any] = [1 if allowed else 0, now, denied_index, retry]
        for state in states:
            item, key, weight, oldest = (
                state["item"],
                state["key"],
                state["weight"],
                state["oldest"],
            )
            used = state["used"]
            if consume:
                first_push = False
                if item.kind in ("r", "t"):
                    if state["fresh"]:
                        oldest = now
                    first_push = key not in pushed
                    if first_push:
                        pushed.add(key)
                        entry = (
                            f"{now}:{call.member}"
                            if item.kind == "r"
                            else f"{now}:{weight}:{call.member}"
                        )
                        log = self._log(key, now) or self._new(key, _Log())
                        log.push(now, entry)
                        if state["fresh"]:
                            self._expire(key, now, int(item.ttl_ms))
                if item.kind == "t":
                    total_key = state["sum_key"]
                    if first_push and weight > 0:
                        total = (self._get(total_key, now) or 0) + weight
                        if total_key not in self._data:
                            self._expires.pop(total_key, None)
                        self._data[total_key] = total
                        if total == weight or state["fresh"]:
                            self._expire(total_key, now, int(item.ttl_ms))
                    fields = ("t", key, total_key, weight, now, item.span)
                    consumed.append("\t".join(str(field) for field in fields))
                elif item.kind == "c":
                    entries = self._zset(key, now) or self._new(key, _SortedSet())
                    expires = now + int(item.span)
                    oldest = self._added(entries, expires, call.member, oldest)
                    self._expire(key, now, int(item.ttl_ms))
                    consumed.append(f"c\t{key}")
                elif item.kind != "r":  # a budget
                    fields = self._get(key, now)
                    if fields is None:
                        fields = self._new(key, {})
                    fields[state["field"]] = fields.get(state["field"], 0) + weight
                    fields.pop(state["stale"], None)
                    keep = DAY_US if item.span == "d" else 31 * DAY_US
                    self._expire(key, now, (state["period_end"] + keep - now) // 1000)
                    consumed.append(f"{item.kind}\t{key}\t{state['field']}\t{weight}")
                used += state["needed"]
            elif call.mode == "dry" and allowed:
                used += state["needed"]
            reset = 0
            if item.kind in ("r", "t"):
                if oldest is not None:
                    reset = oldest + int(item.span) - now
                elif used > 0:
                    reset = int(item.span)
            elif item.kind == "c":
                if oldest is not None:
                    reset = oldest - now
            else:
                reset = state["period_end"] - now
            values += [used, reset]
        mask = "".join(f"{index}," for index in shadow_denied)
        values.append(mask)

        if call.mode == "check":
            stored = ";".join(str(value) for value in values)
            self._data[call.record_key] = record_text(
                stored, None, call.prices + call.event, "\n".join(consumed)
            )
            self._expires[call.record_key] = now + call.record_ttl_ms * 1000
            if shadow_denied:
                counts = self._get(call.shadow_key, now) or self._new(call.shadow_key, {})
                for index in shadow_denied:
                    label = call.limits[index - 1].label
                    counts[label] = counts.get(label, 0) + 1
                self._expire(call.shadow_key, now, 7 * DAY_US // 1000)
            if allowed:
                self.events.append({"k": "check", "e": call.event, "t": str(now)})
            else:
                counts = self._get(call.denied_key, now) or self._new(call.denied_key, {})
                label = f"{now // 3_600_000_000}|{call.denied_label}"
                counts[label] = counts.get(label, 0) + 1
                self._expire(call.denied_key, now, 2 * DAY_US // 1000)
        return values, False

    @staticmethod
    def _added(entries: _SortedSet, score: int, member: str, oldest: int | None) -> int:
        """ZADD, and the oldest score after it, as check.lua works it out."""
        if not entries.add(score, member):
            return entries.items[0][0]
        return score if oldest is None or score < oldest else oldest

    def _delete(self, key: str) -> None:
        self._data.pop(key, None)
        self._expires.pop(key, None)

    def _new(self, key: str, value: Any) -> Any:
        self._data[key] = value
        self._expires.pop(key, None)
        return value

    def stored_request(self, record_key: str) -> StoredRequest | None:
        with self._lock:
            record = self._get(record_key, self._now())
            if record is None:
                return None
            decision, settled, extra, consumed = record_parts(record)
            if not decision.startswith("1;"):
                return None
            return StoredRequest(consumed=consumed, extra=extra, settled=settled)

    def commit(self, call: CommitCall, stored: StoredRequest) -> tuple[int, str]:
        with self._lock:
            now = self._now()
            record = self._get(call.record_key, now)
            if record is None:
                return -1, ""
            decision, settled, extra, consumed = record_parts(record)
            if not decision.startswith("1;"):
                return -1, ""
            if settled is not None:
                return 0, settled
            for line in consumed.split("\n"):
                if not line:
                    continue
                fields = line.split("\t")
                kind, key = fields[0], fields[1]
                if kind == "t":
                    weight, at, window = int(fields[3]), int(fields[4]), int(fields[5])
                    if at <= now - window:
                        continue
                    log = self._log(key, now)
                    index = log.find(f"{at}:{weight}:{call.member}") if log else None
                    if log is None or index is None:
                        continue  # the user's windows were reset: nothing to correct
                    if call.tokens > 0:
                        log.entries[index] = (at, f"{at}:{call.tokens}:{call.member}")
                    else:
                        del log.entries[index]
                    self._expire(key, now, 2 * window // 1000)
                    delta = call.tokens - weight
                    if delta:
                        total = (self._get(fields[2], now) or 0) + delta
                        if total <= 0:
                            self._delete(fields[2])
                        else:
                            if fields[2] not in self._data:
                                self._expires.pop(fields[2], None)
                            self._data[fields[2]] = total
                            self._expire(fields[2], now, 2 * window // 1000)
                elif kind == "c":
                    entries = self._zset(key, now)
                    if entries is not None:
                        entries.remove(call.member)
                else:
                    field, weight = fields[2], int(fields[3])
                    actual = call.tokens if kind == "k" else call.cost
                    counts = self._get(key, now)
                    if counts is not None and field in counts and actual != weight:
                        counts[field] = max(0, counts[field] + actual - weight)
            self._data[call.record_key] = record_text(decision, call.summary, extra, consumed)
            self.events.append({"k": "commit", "e": call.event, "t": str(now)})
            return 1, call.summary

    def delete(self, keys: list[str]) -> int:
        with self._lock:
            now = self._now()
            deleted = 0
            for key in keys:
                if self._get(key, now) is not None:
                    del self._data[key]
                    self._expires.pop(key, None)
                    deleted += 1
            return deleted

    def counters(self, key: str) -> dict[str, int]:
        with self._lock:
            return dict(self._get(key, self._now()) or {})

    def snapshot(self) -> dict[str, tuple[Any, int | None]]:
        """Every live key: a plain copy of its value (a sorted set as ``[(member, score)]``)
        and when it expires (µs, None for never). For inspection; counts nothing."""
        with self._lock:
            now = self._now()
            found: dict[str, tuple[Any, int | None]] = {}
            for key in list(self._data):
                value = self._get(key, now)
                if value is None:
                    continue
                if isinstance(value, _SortedSet):
                    plain: Any = [(member, score) for score, member in value.items]
                elif isinstance(value, _Log):
                    plain = [entry for _, entry in reversed(value.entries)]  # as LRANGE 0 -1
                elif isinstance(value, dict):
                    plain = dict(value)
                else:
                    plain = value
                found[key] = (plain, self._expires.get(key))
            return found


def _period_of(code: str, now: int) -> tuple[str, int, str]:
    """The budget period at ``now``: its field, its end (µs) and the field two back."""
    import datetime as dt

    days = now // DAY_US
    if code == "d":
        return f"d:{days}", (days + 1) * DAY_US, f"d:{days - 2}"
    day = dt.date(1970, 1, 1) + dt.timedelta(days=days)
    index = day.year * 12 + day.month - 1
    next_month = dt.date((index + 1) // 12, (index + 1) % 12 + 1, 1)
    end = (next_month - dt.date(1970, 1, 1)).days * DAY_US
    return f"m:{index}", end, f"m:{index - 2}"
