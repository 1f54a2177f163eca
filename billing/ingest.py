"""The drain: usage events from the limiter's streams into Postgres, exactly once.

The engine appends one entry per allowed check (``k=check``) and one per commit
(``k=commit``) to the tenant's stream ``<prefix>:{t:<tenant>}:events``, in the same Lua call
that consumes the quota, and counts denied checks per hour and model in the hash
``<prefix>:{t:<tenant>}:denied``. A drain cycle:

1. reads a batch with ``XREADGROUP`` (consumer group ``billing``, created with ``MKSTREAM``),
   taking over with ``XAUTOCLAIM`` (at a reader's first read, then at most once a second,
   when ``XPENDING`` shows entries pending beyond the batch this reader is writing) what a
   consumer that died had read but never acknowledged (idle longer than
   ``BILLING_CLAIM_IDLE_SECONDS``);
2. writes it in one transaction: checks not stored yet (unique on tenant and stream entry
   id) are inserted; commits settle their check; the rollups get exactly the rows that were
   inserted or amended; denied counts are stored as the absolute values Redis holds;
3. acknowledges the batch only after that transaction committed (``XACK``), then trims the
   stream below the oldest entry that is still pending (``XTRIM MINID``).

From Redis, a second thread reads and lays out the next batch, and acknowledges the last
one, while a batch is written. On PostgreSQL the write is set-based SQL
(``billing/ledger_postgres.py``), and what it adds to the top-user rollups waits in
``UserUsageDelta`` until the drain folds it in at its end; elsewhere ``ledger_write_portable``
does the same in Python.

A drain killed anywhere leaves its batch pending: the next one claims and writes it again,
the unique key turns the repeat into nothing, and the rollups move only with rows that were
really written. Every ledger write holds the ``drain`` row of ``LedgerState``, so two drains
(or a drain and a rollup check) never interleave.

On a Redis Cluster (``REDIS_CLUSTER``) every command above touches one tenant's keys, so
one slot; the reads of a round go out as one pipeline per node, each stream's read sent
straight to the node that owns its slot.

With the in-process limiter (``QUOTA_BACKEND = "local"``, the embedded default) the same
entries come from ``engine.local_backend().events`` in this process instead.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime as dt
import gc
import json
import logging
import os
import socket
import time
import uuid
import weakref
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

import redis
from django.conf import settings
from django.db import connection, transaction

from billing.models import (
    NO_PRICE,
    DailyRollup,
    DailyUserRollup,
    HourlyRollup,
    LedgerState,
    ModelPrice,
    MonthlyRollup,
    MonthlyUserRollup,
    PendingCommit,
    Statement,
    StatementAdjustment,
    UsageEvent,
)
from limits.redis_client import Client, redis_client

if TYPE_CHECKING:
    from billing.ledger_postgres import Staged

logger = logging.getLogger(__name__)

GROUP = "billing"
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
HOUR_US = 3_600_000_000
ZERO = Decimal(0)
THOUSAND_TH = Decimal("0.001")
# Pending commits retried per cycle; more wait for the next one.
PENDING_PER_WRITE = 5000
# Tenant streams asked per pipeline round trip.
STREAMS_PER_ROUND = 50
# How often a stream is searched for what a dead consumer left pending (XAUTOCLAIM walks
# the stream's pending entries, this drain's own included, and costs Redis more than reading
# new ones): at a source's first read, then at most this often.
CLAIM_EVERY_SECONDS = 1.0
# Usage event ids one fold of the top-user rollups takes in a transaction: a fold after a
# long backlog holds the ledger lock, which the drain waits for, for a second or two at most.
FOLD_MOST = 500_000
# A drain's first batch is read while Postgres has nothing to do; each later one while the
# one before it is written. So the first read takes an eighth of the batch size (but no
# fewer than this many entries per stream) and each read after it twice the last, up to the
# batch size: Postgres starts after a small read instead of a whole batch's, for three more
# transactions (writing a batch takes Postgres about as long as reading and laying it out
# takes Redis and the reading thread, so a batch twice the last one is not always ready).
FIRST_READ_LEAST = 100


def from_us(at_us: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=at_us)


def to_us(moment: dt.datetime) -> int:
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def hour_of(at_us: int) -> dt.datetime:
    return EPOCH + dt.timedelta(hours=at_us // HOUR_US)


def month_of(day: dt.date) -> dt.date:
    return day.replace(day=1)


def next_month(month: dt.date) -> dt.date:
    return (month + dt.timedelta(days=32)).replace(day=1)


# -- entries ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One usage stream entry: a check or a commit."""

    tenant_id: int
    entry_id: str
    kind: str
    data: dict[str, Any]
    at_us: int


# The limiter writes microseconds of Redis time and token counts; anything outside these
# bounds is not something it wrote (and would not fit PostgreSQL's bigint and timestamp).
MAX_COUNT = 2**62
MAX_AT_US = 253_402_300_800_000_000  # year 10000


def _count(value: Any) -> int:
    number = int(value)
    if not -MAX_COUNT < number < MAX_COUNT:
        raise ValueError(f"{value!r} is out of range")
    return number


def entry_parse(tenant_id: int, entry_id: str, fields: dict[str, str]) -> Entry | None:
    """An entry as the engine wrote it; None (logged) for one that is not."""
    try:
        data = json.loads(fields["e"])
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return entry_normalised(Entry(tenant_id, entry_id, fields["k"], data, int(fields["t"])))
    except (KeyError, TypeError, ValueError, OverflowError, UnicodeError) as error:
        logger.error(
            "billing: skipping malformed usage entry %s of tenant %s (%r): %s",
            entry_id,
            tenant_id,
            fields,
            error,
        )
        return None


def entry_normalised(entry: Entry) -> Entry:
    """The entry with the values billing reads in the types it writes them (the request id
    and names as text, counts as integers); raises ValueError, TypeError or KeyError for an
    entry the engine cannot have written."""
    data = entry.data
    tenant_id = _count(entry.tenant_id)
    if entry.kind not in ("check", "commit"):
        raise ValueError(f"kind {entry.kind!r}")
    if not 0 <= entry.at_us < MAX_AT_US:
        raise ValueError(f"time {entry.at_us!r}")
    if data["request_id"] is None:
        raise ValueError("no request id")
    normal = {**data, "request_id": _name(data["request_id"])}
    if entry.kind == "check":
        key = data.get("key")
        normal["key"] = None if key is None else _count(key)
        normal["tokens"] = _count(data["tokens"])
        normal["user"] = _name(data.get("user") or "")
        normal["model"] = _name(data.get("model") or "")
        normal["version"] = _count(data.get("version") or 0)
    else:
        normal["input_tokens"] = _count(data["input_tokens"])
        normal["output_tokens"] = _count(data["output_tokens"])
        normal["status"] = _name(str(data.get("status") or "ok")[:16])
    return Entry(tenant_id, _name(entry.entry_id, 64), entry.kind, normal, entry.at_us)


def _name(value: Any, longest: int = 200) -> str:
    """A request id, user, model or status as the database can hold it."""
    text = str(value)
    if len(text) > longest or "\x00" in text:
        raise ValueError(f"{text[:40]!r}… is longer than {longest} or holds a NUL")
    text.encode()  # a lone surrogate (from a JSON escape) cannot be stored
    return text


class StreamEntries:
    """Stream entries as Redis returned them (bytes), per tenant stream: laid out for
    PostgreSQL's ``COPY`` without an object per entry (``staged``), or parsed into
    ``Entry`` objects (``parsed``: the portable write, and batches a value of which must be
    checked entry by entry)."""

    def __init__(self) -> None:
        self.streams: list[tuple[int, list[Any]]] = []
        self.count = 0
        self._staged: Staged | None = None
        self._staged_made = False

    def add(self, tenant_id: int, items: list[Any]) -> None:
        self.streams.append((tenant_id, items))
        self.count += len(items)
        self._staged_made = False

    def __len__(self) -> int:
        return self.count

    def staged(self) -> Staged | None:
        """The entries laid out for PostgreSQL's ``COPY``, or None when a value needs
        escaping; worked out once."""
        if not self._staged_made:
            from billing.ledger_postgres import staged_from_stream

            self._staged = staged_from_stream(self.streams)
            self._staged_made = True
        return self._staged

    def parsed(self) -> list[Entry]:
        """The entries parsed and normalised in Python; malformed ones logged and left out."""
        entries: dict[tuple[int, str], Entry] = {}
        for tenant_id, items in self.streams:
            for raw_id, flat in items:
                entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                try:
                    fields = {
                        _text(name): _text(value)
                        for name, value in zip(flat[::2], flat[1::2], strict=False)
                    }
                except UnicodeDecodeError as error:
                    logger.error(
                        "billing: skipping malformed usage entry %s of tenant %s (%r): %s",
                        entry_id,
                        tenant_id,
                        flat,
                        error,
                    )
                    continue
                entry = entry_parse(tenant_id, entry_id, fields)
                if entry is not None:
                    entries[(tenant_id, entry_id)] = entry
        return list(entries.values())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class Batch:
    """What one read returned, and what its source needs to acknowledge it."""

    entries: list[Entry] | StreamEntries = field(default_factory=list)
    # tenant -> {"<hour>|<model>": denied checks}, the counters' current absolute values
    denied: dict[int, dict[str, int]] = field(default_factory=dict)
    # tenant -> entry ids read (acknowledged after the write)
    ids: dict[int, list[Any]] = field(default_factory=dict)
    local_count: int = 0
    complete_round: bool = True  # every tenant was asked


# -- sources -----------------------------------------------------------------------------
def _tenant_ids() -> list[int]:
    from limits.models import Tenant

    return list(Tenant.objects.order_by("id").values_list("id", flat=True))


def stream_key(tenant_id: int) -> str:
    from limits.engine import tenant_tag

    return f"{tenant_tag(tenant_id)}:events"


def denied_key(tenant_id: int) -> str:
    from limits.engine import tenant_tag

    return f"{tenant_tag(tenant_id)}:denied"


def _raw_reply(response: Any, **options: Any) -> Any:
    return response


# Replies whose stream entries stay bytes, in the lists Redis sends (see RedisSource).
RAW_COMMANDS = ("XREADGROUP", "XAUTOCLAIM")


def _keep_entries_raw(client: Client) -> None:
    """Leave ``RAW_COMMANDS`` replies as Redis sent them. A cluster client parses replies
    with the client of the node that answered, one per node, so each gets the callback;
    the cluster may have introduced nodes since the last call."""
    if isinstance(client, redis.RedisCluster):
        targets = [node.redis_connection for node in client.get_nodes()]
    else:
        targets = [client]
    for target in targets:
        if target is not None and target.response_callbacks.get("XREADGROUP") is not _raw_reply:
            for command in RAW_COMMANDS:
                target.set_response_callback(command, _raw_reply)


@contextlib.contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a batch is read and laid out (and, in a
    drain from Redis, until the drain ends).

    A batch is hundreds of thousands of small objects (the reply's bytes and lists, the
    parsed documents) and none of them is part of a cycle, but each few hundred made trigger
    a collection that walks them again: with it running, reading a batch takes about twice
    as long. Reference counting still frees everything; the collector resumes after."""
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


class RedisSource:
    """Reads the tenants' usage streams in Redis through the consumer group ``billing``.

    On a Redis Cluster (``REDIS_CLUSTER``; ``url`` names any one node) the same commands run
    through redis-py's cluster client, each on the node that owns its tenant's slot."""

    def __init__(self, url: str | None = None, *, consumer: str | None = None) -> None:
        address = str(url or settings.REDIS_URL)
        options: dict[str, Any] = {"socket_timeout": 30, "socket_connect_timeout": 5}
        self.client = redis_client(address, decode_responses=True, **options)
        # Stream entries stay bytes, in the lists Redis sends (no dict or str per entry),
        # and are parsed once, where they are laid out for the database.
        self.entries_client = redis_client(address, **options)
        self.is_cluster = isinstance(self.entries_client, redis.RedisCluster)
        _keep_entries_raw(self.entries_client)
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._grouped: set[str] = set()
        self._claimed_at: dict[int, float] = {}
        self._offset = 0
        self._denied_seen: dict[int, dict[str, int]] = {}

    def close(self) -> None:
        try:
            self._forget_idle_consumers()
        except (redis.RedisError, redis.exceptions.RedisClusterException) as error:
            logger.warning("billing: idle stream consumers left for the next drain: %s", error)
        self.client.close()
        self.entries_client.close()

    def _forget_idle_consumers(self) -> None:
        """Remove from the groups of the streams this source read its own consumer and any
        other idle for ten claim periods, each only while it holds nothing pending.

        Every drain reads as a consumer of its own name, and Redis keeps a group's consumers
        until told otherwise: without this each stream would hold one more consumer for
        every drain ever run (one every few seconds). A consumer that holds pending entries
        is kept whatever its age: removing it would drop them from the group's pending list,
        where nobody could claim them any more. A live reader is never ten claim periods
        idle: each read resets its idle time."""
        keys = sorted(self._grouped)
        if not keys:
            return
        forget_ms = 10 * settings.BILLING_CLAIM_IDLE_SECONDS * 1000
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.xinfo_consumers(key, GROUP)
        found = pipe.execute(raise_on_error=False)
        pipe = self.client.pipeline(transaction=False)
        queued = False
        for key, consumers in zip(keys, found, strict=True):
            if isinstance(consumers, Exception):
                continue  # the stream or its group is gone (Redis lost it): nothing to keep
            for consumer in consumers:
                name = str(consumer["name"])
                if int(consumer["pending"]) == 0 and (
                    name == self.consumer or int(consumer["idle"]) >= forget_ms
                ):
                    pipe.xgroup_delconsumer(key, GROUP, name)
                    queued = True
        if queued:
            pipe.execute(raise_on_error=False)

    def _ensure_groups(self, keys: Iterable[str]) -> None:
        missing = [key for key in keys if key not in self._grouped]
        if not missing:
            return
        pipe = self.client.pipeline(transaction=False)
        for key in missing:
            # From id 0: entries written before the group existed are read too.
            pipe.xgroup_create(key, GROUP, id="0", mkstream=True)
        for key, result in zip(missing, pipe.execute(raise_on_error=False), strict=True):
            if isinstance(result, Exception) and "BUSYGROUP" not in str(result):
                raise result
            self._grouped.add(key)

    def read(
        self,
        count: int,
        *,
        tenants: Sequence[int] | None = None,
        held: dict[int, list[Any]] | None = None,
    ) -> Batch:
        """Up to about ``count`` entries (``count`` per stream, streams visited in turn until
        that many were read). ``held``: entries this consumer is still writing, which a
        claim must not hand back to it."""
        if tenants is None:
            tenants = _tenant_ids()
        if not tenants:
            return Batch()
        with cyclic_gc_paused():
            return self._read(count, tenants, held)

    def _read(self, count: int, tenants: Sequence[int], held: dict[int, list[Any]] | None) -> Batch:
        batch = Batch()
        start = self._offset % len(tenants)
        order = [*tenants[start:], *tenants[:start]]
        idle_ms = int(settings.BILLING_CLAIM_IDLE_SECONDS * 1000)
        entries = StreamEntries()
        batch.entries = entries
        visited = 0
        total = 0
        for first in range(0, len(order), STREAMS_PER_ROUND):
            chunk = order[first : first + STREAMS_PER_ROUND]
            keys = [stream_key(tenant) for tenant in chunk]
            self._ensure_groups(keys)
            if self.is_cluster:
                _keep_entries_raw(self.entries_client)
            pipe = self.entries_client.pipeline(transaction=False)
            now = time.monotonic()
            claiming = [
                now - self._claimed_at.get(tenant, -CLAIM_EVERY_SECONDS) >= CLAIM_EVERY_SECONDS
                for tenant in chunk
            ]
            if any(claiming):
                claiming = self._claimable(chunk, keys, claiming, held, now)
            for tenant, key, claim in zip(chunk, keys, claiming, strict=True):
                if claim:
                    pipe.xautoclaim(key, GROUP, self.consumer, idle_ms, start_id="0-0", count=count)
                if self.is_cluster:
                    self._queue_read_on_its_node(pipe, key, count)
                else:
                    pipe.xreadgroup(GROUP, self.consumer, {key: ">"}, count=count)
                pipe.hgetall(denied_key(tenant))
            results = iter(pipe.execute(raise_on_error=False))
            for index, tenant in enumerate(chunk):
                claimed = next(results) if claiming[index] else None
                fresh, denied = next(results), next(results)
                for result in (claimed, fresh, denied):
                    if isinstance(result, Exception):
                        if "NOGROUP" in str(result):
                            self._grouped.discard(keys[index])  # the stream was deleted
                            continue
                        raise result
                raw: list[Any] = []
                if claiming[index]:
                    # A full claim may have left more to take: look again next read.
                    full = (
                        isinstance(claimed, list) and len(claimed) > 1 and len(claimed[1]) >= count
                    )
                    self._claimed_at[tenant] = -CLAIM_EVERY_SECONDS if full else now
                if isinstance(claimed, list) and len(claimed) > 1 and claimed[1]:
                    # Entries deleted while pending come back without fields (Redis 6.2).
                    mine = set(held.get(tenant, ())) if held else set()
                    raw.extend(
                        item
                        for item in claimed[1]
                        if item and item[1] is not None and item[0] not in mine
                    )
                if fresh:
                    # A map under RESP3, a list of [stream, entries] pairs under RESP2.
                    for _stream, items in fresh.items() if isinstance(fresh, dict) else fresh:
                        raw.extend(items)
                if raw:
                    batch.ids[tenant] = [entry_id for entry_id, _ in raw]
                    entries.add(tenant, raw)
                total += len(raw)
                if isinstance(denied, dict) and denied:
                    counts = {_text(name): int(value) for name, value in denied.items()}
                    if counts != self._denied_seen.get(tenant):
                        batch.denied[tenant] = counts
            visited += len(chunk)
            if total >= count:
                break
        self._offset = start + visited
        batch.complete_round = visited == len(order)
        if connection.vendor == "postgresql":
            # Laid out here, on the reading thread, while the previous batch is written.
            entries.staged()
        return batch

    def _claimable(
        self,
        tenants: Sequence[int],
        keys: Sequence[str],
        claiming: list[bool],
        held: dict[int, list[Any]] | None,
        now: float,
    ) -> list[bool]:
        """Which of the streams due for a claim may hold something to claim: entries pending
        under another consumer, or under this one beyond the batch it is writing.

        XPENDING's summary (the pending count, and the consumers that have any) costs Redis
        little; XAUTOCLAIM walks the pending entries, this drain's own read-ahead too, and
        for a stream only this drain reads it found nothing at a far higher price. A stream
        passed over counts as searched."""
        due = [index for index, claim in enumerate(claiming) if claim]
        pipe = self.client.pipeline(transaction=False)
        for index in due:
            pipe.xpending(keys[index], GROUP)
        claimable = list(claiming)
        for index, summary in zip(due, pipe.execute(raise_on_error=False), strict=True):
            if not isinstance(summary, dict):
                continue  # (a missing group, say) XAUTOCLAIM runs and says what is wrong
            tenant = tenants[index]
            mine = len(held.get(tenant, ())) if held else 0
            others = any(
                consumer["name"] != self.consumer for consumer in summary.get("consumers") or ()
            )
            if not others and int(summary["pending"]) == mine:
                claimable[index] = False
                self._claimed_at[tenant] = now
        return claimable

    def _queue_read_on_its_node(self, pipe: Any, key: str, count: int) -> None:
        """Queue one stream's XREADGROUP for the node that owns its slot.

        One XREADGROUP per stream: on a cluster a command naming streams of several slots
        is refused (CROSSSLOT), even when one node owns them all. Its node is named here
        from the client's slot map because XREADGROUP's keys have no fixed place (they
        follow STREAMS): left to route it, redis-py asks a node for them (COMMAND GETKEYS)
        before every read, a round trip per stream. A read that meets a moved slot is sent
        again by redis-py to the slot's new owner."""
        node = cast(redis.RedisCluster, self.entries_client).get_node_from_key(key)
        pipe.execute_command(
            "XREADGROUP",
            "GROUP",
            GROUP,
            self.consumer,
            "COUNT",
            count,
            "STREAMS",
            key,
            ">",
            target_nodes=node,
        )

    def ack(self, batch: Batch) -> None:
        """Acknowledge a written batch, trim below what is acknowledged, and drop denied
        counters of hours that can no longer grow."""
        touched = [tenant for tenant, ids in batch.ids.items() if ids]
        if touched:
            pipe = self.client.pipeline(transaction=False)
            for tenant in touched:
                pipe.xack(stream_key(tenant), GROUP, *batch.ids[tenant])
            pipe.execute()
            self._trim(touched)
        for tenant, counts in batch.denied.items():
            self._denied_seen[tenant] = counts
        self._forget_old_denied(batch.denied)

    def _trim(self, tenants: Sequence[int]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for tenant in tenants:
            pipe.xpending(stream_key(tenant), GROUP)
            pipe.xinfo_groups(stream_key(tenant))
        results = pipe.execute(raise_on_error=False)
        pipe = self.client.pipeline(transaction=False)
        for index, tenant in enumerate(tenants):
            pending, groups = results[2 * index], results[2 * index + 1]
            if isinstance(pending, Exception) or isinstance(groups, Exception):
                continue
            ours = [group for group in groups if group["name"] == GROUP]
            if not ours:
                continue
            last = str(ours[0]["last-delivered-id"])
            if pending["pending"]:
                # Everything older than the oldest pending entry is acknowledged.
                threshold = str(pending["min"])
            else:
                milliseconds, sequence = last.split("-")
                threshold = f"{milliseconds}-{int(sequence) + 1}"
            pipe.xtrim(stream_key(tenant), minid=threshold, approximate=False)
        pipe.execute(raise_on_error=False)

    def _forget_old_denied(self, denied: dict[int, dict[str, int]]) -> None:
        """Counters of hours two or more before the newest counted hour never change
        again (the limiter counts in Redis time) and are stored: drop them."""
        pipe = self.client.pipeline(transaction=False)
        queued = False
        for tenant, counts in denied.items():
            hours = {name: int(name.split("|", 1)[0]) for name in counts}
            newest = max(hours.values(), default=0)
            old = [name for name, hour in hours.items() if hour <= newest - 2]
            if old:
                pipe.hdel(denied_key(tenant), *old)
                queued = True
                seen = self._denied_seen.get(tenant)
                if seen is not None:
                    for name in old:
                        seen.pop(name, None)
        if queued:
            pipe.execute()

    def backlog(self) -> int:
        """Entries waiting in every tenant's stream: not yet read, or read and pending."""
        total = 0
        tenants = _tenant_ids()
        for first in range(0, len(tenants), STREAMS_PER_ROUND):
            keys = [stream_key(tenant) for tenant in tenants[first : first + STREAMS_PER_ROUND]]
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.xinfo_groups(key)
            for result in pipe.execute(raise_on_error=False):
                if isinstance(result, Exception):
                    continue
                for group in result:
                    if group["name"] == GROUP:
                        total += int(group.get("lag") or 0) + int(group["pending"])
        return total


class LocalSource:
    """The in-process limiter's events (the embedded default): this process's own."""

    def __init__(self) -> None:
        from limits import engine

        self.backend = engine.local_backend()
        self._denied_seen: dict[int, dict[str, int]] = {}

    def close(self) -> None:
        pass

    def read(
        self,
        count: int,
        *,
        tenants: Sequence[int] | None = None,
        held: dict[int, list[Any]] | None = None,
    ) -> Batch:
        batch = Batch()
        entries: list[Entry] = []
        batch.entries = entries
        taken = self.backend.events[:count]
        batch.local_count = len(taken)
        for raw in taken:
            try:
                tenant = int(json.loads(raw["e"])["tenant"])
            except (KeyError, TypeError, ValueError):
                tenant = 0
            entry = entry_parse(tenant, f"L{uuid.uuid4().hex}", raw)
            if entry is not None:
                entries.append(entry)
        for tenant in _tenant_ids() if tenants is None else tenants:
            counts = self.backend.counters(denied_key(tenant))
            if counts and counts != self._denied_seen.get(tenant):
                batch.denied[tenant] = {name: int(value) for name, value in counts.items()}
        return batch

    def ack(self, batch: Batch) -> None:
        # Only this drain removes events, and only from the front: appends go to the end.
        del self.backend.events[: batch.local_count]
        for tenant, counts in batch.denied.items():
            self._denied_seen[tenant] = counts

    def backlog(self) -> int:
        return len(self.backend.events)


def source_default() -> RedisSource | LocalSource:
    if settings.QUOTA_BACKEND == "redis":
        return RedisSource()
    return LocalSource()


# -- prices ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Price:
    id: int
    input_per_1k: Decimal
    output_per_1k: Decimal
    valid_from_us: int
    valid_until_us: int | None

    def cost(self, input_tokens: int, output_tokens: int) -> Decimal:
        return (input_tokens * self.input_per_1k + output_tokens * self.output_per_1k) * THOUSAND_TH


UNPRICED = Price(NO_PRICE, ZERO, ZERO, 0, None)


class PriceBook:
    """Every model's price history, to price usage at the moment it happened."""

    def __init__(self, rows: Iterable[ModelPrice]) -> None:
        self._starts: dict[str, list[int]] = defaultdict(list)
        self._prices: dict[str, list[Price]] = defaultdict(list)
        for row in sorted(rows, key=lambda row: (row.model_id, row.valid_from)):
            self._add(row)

    def _add(self, row: ModelPrice) -> None:
        price = Price(
            row.pk,
            row.input_price_per_1k,
            row.output_price_per_1k,
            to_us(row.valid_from),
            None if row.valid_until is None else to_us(row.valid_until),
        )
        self._starts[row.model_id].append(price.valid_from_us)
        self._prices[row.model_id].append(price)

    @classmethod
    def load(cls, model_ids: Iterable[str]) -> PriceBook:
        from billing.services import model_price_seed

        wanted = set(model_ids)
        book = cls(ModelPrice.objects.filter(model_id__in=wanted))
        for model_id in wanted - set(book._prices):
            # A model priced before billing kept a history (or written around the
            # services): its current price has applied since the beginning.
            seeded = model_price_seed(model_id=model_id)
            if seeded is not None:
                book._add(seeded)
        return book

    def at(self, model_id: str, at_us: int) -> Price:
        starts = self._starts.get(model_id)
        if not starts:
            return UNPRICED
        index = bisect.bisect_right(starts, at_us) - 1
        if index < 0:
            index = 0  # before the first known price: the first price
        return self._prices[model_id][index]


# -- the ledger write --------------------------------------------------------------------
@dataclass
class WriteReport:
    read: int = 0
    inserted: int = 0
    amended: int = 0
    duplicates: int = 0
    pending_commits: int = 0
    denied_buckets: int = 0
    adjustments: int = 0
    hours: set[tuple[int, dt.datetime]] = field(default_factory=set)

    def add(self, other: WriteReport) -> None:
        self.read += other.read
        self.inserted += other.inserted
        self.amended += other.amended
        self.duplicates += other.duplicates
        self.pending_commits = other.pending_commits
        self.denied_buckets += other.denied_buckets
        self.adjustments += other.adjustments
        self.hours |= other.hours


EVENT_COLUMNS = (
    "tenant_id",
    "event_id",
    "request_id",
    "api_key_id",
    "user_id",
    "model_id",
    "policy_version",
    "occurred_at",
    "estimated_tokens",
    "input_tokens",
    "output_tokens",
    "status",
    "committed_at",
    "commit_event_id",
    "billed_input_tokens",
    "billed_output_tokens",
    "is_estimate",
    "price_id",
    "cost",
)


class _Row:
    """A usage event row being written, with what the rollups need to know."""

    __slots__ = (
        "api_key_id",
        "at_us",
        "commit_event_id",
        "committed_at_us",
        "estimated_tokens",
        "event_id",
        "input_tokens",
        "model_id",
        "output_tokens",
        "policy_version",
        "price",
        "request_id",
        "status",
        "tenant_id",
        "user_id",
    )

    def __init__(
        self,
        *,
        tenant_id: int,
        event_id: str,
        request_id: str,
        api_key_id: int | None,
        user_id: str,
        model_id: str,
        policy_version: int,
        at_us: int,
        estimated_tokens: int,
        price: Price,
    ) -> None:
        self.tenant_id = tenant_id
        self.event_id = event_id
        self.request_id = request_id
        self.api_key_id = api_key_id
        self.user_id = user_id
        self.model_id = model_id
        self.policy_version = policy_version
        self.at_us = at_us
        self.estimated_tokens = estimated_tokens
        self.price = price
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.status = ""
        self.committed_at_us: int | None = None
        self.commit_event_id = ""

    @property
    def billed(self) -> tuple[int, int, bool]:
        if self.input_tokens is None or self.output_tokens is None:
            # Never reported: billed as its estimate, counted as input tokens.
            return self.estimated_tokens, 0, True
        return self.input_tokens, self.output_tokens, False

    @property
    def cost(self) -> Decimal:
        billed_input, billed_output, _ = self.billed
        return self.price.cost(billed_input, billed_output)

    def values(self) -> tuple[Any, ...]:
        billed_input, billed_output, is_estimate = self.billed
        return (
            self.tenant_id,
            self.event_id,
            self.request_id,
            self.api_key_id,
            self.user_id,
            self.model_id,
            self.policy_version,
            from_us(self.at_us),
            self.estimated_tokens,
            self.input_tokens,
            self.output_tokens,
            self.status,
            None if self.committed_at_us is None else from_us(self.committed_at_us),
            self.commit_event_id,
            billed_input,
            billed_output,
            is_estimate,
            self.price.id,
            self.price.cost(billed_input, billed_output),
        )


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _row_from_check(entry: Entry, prices: PriceBook) -> _Row:
    data = entry.data
    model_id = str(data.get("model") or "")
    return _Row(
        tenant_id=entry.tenant_id,
        event_id=entry.entry_id,
        request_id=str(data["request_id"]),
        api_key_id=_int_or_none(data.get("key")),
        user_id=str(data.get("user") or ""),
        model_id=model_id,
        policy_version=int(data.get("version") or 0),
        at_us=entry.at_us,
        estimated_tokens=max(0, int(data["tokens"])),
        price=prices.at(model_id, entry.at_us),
    )


def _settle(row: _Row, commit: Entry) -> None:
    row.input_tokens = max(0, int(commit.data["input_tokens"]))
    row.output_tokens = max(0, int(commit.data["output_tokens"]))
    row.status = str(commit.data.get("status") or "ok")[:16]
    row.committed_at_us = commit.at_us
    row.commit_event_id = commit.entry_id


EPOCH_ORDINAL = EPOCH.date().toordinal()
DAY_US = 86_400_000_000


class _Calendar:
    """Hour, day and month of microsecond times, each worked out once per batch."""

    def __init__(self) -> None:
        self._months: dict[int, int] = {}

    def month_index(self, day_index: int) -> int:
        month = self._months.get(day_index)
        if month is None:
            day = dt.date.fromordinal(EPOCH_ORDINAL + day_index)
            month = self._months[day_index] = day.year * 12 + day.month - 1
        return month


def hour_from_index(index: int) -> dt.datetime:
    return EPOCH + dt.timedelta(hours=index)


def day_from_index(index: int) -> dt.date:
    return dt.date.fromordinal(EPOCH_ORDINAL + index)


def month_from_index(index: int) -> dt.date:
    return dt.date(index // 12, index % 12 + 1, 1)


class RollupDeltas:
    """What one write adds to each rollup, keyed by bucket (hours, days and months as
    integer indexes until written)."""

    def __init__(self) -> None:
        self.calendar = _Calendar()
        # (hour, tenant, model, price) -> [requests, input, output, estimated, cost]
        self.hourly: dict[tuple[Any, ...], list[Any]] = {}
        # (day, tenant, model) and (month, tenant, model)
        #     -> [requests, denied, input, output, estimated, cost]
        self.daily: dict[tuple[Any, ...], list[Any]] = {}
        self.monthly: dict[tuple[Any, ...], list[Any]] = {}
        # (day, tenant, user) and (month, tenant, user) -> [requests, input, output, cost]
        self.users: dict[tuple[Any, ...], list[Any]] = {}
        self.monthly_users: dict[tuple[Any, ...], list[Any]] = {}

    def add(
        self,
        row: _Row,
        requests: int,
        input_tokens: int,
        output_tokens: int,
        estimated: int,
        cost: Decimal,
    ) -> None:
        hour = row.at_us // HOUR_US
        day = row.at_us // DAY_US
        month = self.calendar.month_index(day)
        tenant = row.tenant_id
        key = (hour, tenant, row.model_id, row.price.id)
        found = self.hourly.get(key)
        if found is None:
            self.hourly[key] = [requests, input_tokens, output_tokens, estimated, cost]
        else:
            found[0] += requests
            found[1] += input_tokens
            found[2] += output_tokens
            found[3] += estimated
            found[4] += cost
        for table, bucket, subject in (
            (self.daily, day, row.model_id),
            (self.monthly, month, row.model_id),
        ):
            key = (bucket, tenant, subject)
            found = table.get(key)
            if found is None:
                table[key] = [requests, 0, input_tokens, output_tokens, estimated, cost]
            else:
                found[0] += requests
                found[2] += input_tokens
                found[3] += output_tokens
                found[4] += estimated
                found[5] += cost
        for table, bucket in ((self.users, day), (self.monthly_users, month)):
            key = (bucket, tenant, row.user_id)
            found = table.get(key)
            if found is None:
                table[key] = [requests, input_tokens, output_tokens, cost]
            else:
                found[0] += requests
                found[1] += input_tokens
                found[2] += output_tokens
                found[3] += cost

    def add_correction(
        self, hour_index: int, tenant_id: int, model_id: str, difference: Sequence[Any]
    ) -> None:
        """Carry a repaired hourly bucket's difference (requests, input, output, estimated,
        cost) into the day and month above it."""
        day = hour_index // 24
        for table, bucket in ((self.daily, day), (self.monthly, self.calendar.month_index(day))):
            key = (bucket, tenant_id, model_id)
            found = table.setdefault(key, [0, 0, 0, 0, 0, ZERO])
            found[0] += difference[0]
            found[2] += difference[1]
            found[3] += difference[2]
            found[4] += difference[3]
            found[5] += difference[4]

    def add_denied(self, hour_index: int, tenant_id: int, model_id: str, more: int) -> None:
        day = hour_index // 24
        for table, bucket in ((self.daily, day), (self.monthly, self.calendar.month_index(day))):
            key = (bucket, tenant_id, model_id)
            found = table.get(key)
            if found is None:
                table[key] = [0, more, 0, 0, 0, ZERO]
            else:
                found[1] += more

    def apply(self) -> None:
        """Add every delta to its rollup."""
        rollup_upsert(
            HourlyRollup,
            ("hour", "tenant_id", "model_id", "price_id"),
            ("requests", "input_tokens", "output_tokens", "estimated_requests", "cost"),
            [(hour_from_index(key[0]), *key[1:], *values) for key, values in self.hourly.items()],
            add=True,
        )
        counters = (
            "requests",
            "denied",
            "input_tokens",
            "output_tokens",
            "estimated_requests",
            "cost",
        )
        rollup_upsert(
            DailyRollup,
            ("day", "tenant_id", "model_id"),
            counters,
            [(day_from_index(key[0]), *key[1:], *values) for key, values in self.daily.items()],
            add=True,
        )
        rollup_upsert(
            MonthlyRollup,
            ("month", "tenant_id", "model_id"),
            counters,
            [(month_from_index(key[0]), *key[1:], *values) for key, values in self.monthly.items()],
            add=True,
        )
        user_counters = ("requests", "input_tokens", "output_tokens", "cost")
        rollup_upsert(
            DailyUserRollup,
            ("day", "tenant_id", "user_id"),
            user_counters,
            [(day_from_index(key[0]), *key[1:], *values) for key, values in self.users.items()],
            add=True,
        )
        rollup_upsert(
            MonthlyUserRollup,
            ("month", "tenant_id", "user_id"),
            user_counters,
            [
                (month_from_index(key[0]), *key[1:], *values)
                for key, values in self.monthly_users.items()
            ],
            add=True,
        )


def ledger_lock() -> None:
    """Take the ledger's write lock for the rest of the current transaction."""
    LedgerState.objects.get_or_create(name="drain")
    LedgerState.objects.select_for_update().filter(name="drain").first()


def ledger_write(
    entries: Sequence[Entry] | StreamEntries,
    denied: dict[int, dict[str, int]],
    *,
    defer_user_rollups: bool = False,
) -> WriteReport:
    """Write one batch of stream entries and denied counts, with their rollups, in one
    transaction. Writing the same batch again changes nothing.

    On PostgreSQL the work is set-based SQL (``billing/ledger_postgres.py``); elsewhere (the
    embedded SQLite) it is done here in Python, by the same rules. ``defer_user_rollups``
    (PostgreSQL): leave what the batch adds to the top-user rollups in ``UserUsageDelta``
    for ``user_rollups_fold``, as the drain does."""
    if connection.vendor == "postgresql":
        return _ledger_write_postgres(entries, denied, fold=not defer_user_rollups)
    if isinstance(entries, StreamEntries):
        entries = entries.parsed()
    return ledger_write_portable(entries, denied)


def _ledger_write_postgres(
    entries: Sequence[Entry] | StreamEntries, denied: dict[int, dict[str, int]], *, fold: bool
) -> WriteReport:
    from billing import ledger_postgres

    if isinstance(entries, StreamEntries):
        staged = entries.staged()
        if staged is not None:
            try:
                with transaction.atomic():
                    return _write_staged(staged, denied, fold=fold)
            except ledger_postgres.NotAsWritten as error:
                # A value the database refused (too long, out of range, not text): lay the
                # batch out again with every entry checked, leaving out what is malformed.
                logger.warning("billing: a batch is checked entry by entry: %s", error)
        careful = ledger_postgres.staged_from_entries(entries.parsed())
    else:
        careful = ledger_postgres.staged_from_entries(entries)
    with transaction.atomic():
        return _write_staged(careful, denied, fold=fold)


def _write_staged(staged: Staged, denied: dict[int, dict[str, int]], *, fold: bool) -> WriteReport:
    from billing import ledger_postgres

    ledger_postgres.begin(staged)
    written = ledger_postgres.write_staged(staged, pending_limit=PENDING_PER_WRITE)
    report = WriteReport(
        read=staged.entries,
        inserted=written.inserted,
        amended=written.amended,
        duplicates=staged.checks - written.inserted,
        pending_commits=written.pending,
        adjustments=written.adjustments,
        hours=written.hours,
    )
    deltas = RollupDeltas()
    report.denied_buckets = _store_denied(denied, deltas)
    deltas.apply()
    if fold:
        while not ledger_postgres.user_rollups_fold(most=FOLD_MOST)[1]:
            pass
    return report


def user_rollups_fold() -> int:
    """Bring the top-user rollups up to date with the batches the drain wrote (PostgreSQL;
    elsewhere each batch adds to them itself): beat's ``billing-user-rollups``, outside the
    drain. Returns how many events and deltas it folded."""
    if connection.vendor != "postgresql":
        return 0
    from billing import ledger_postgres

    folded = 0
    while True:
        with transaction.atomic():
            ledger_lock()
            more, done = ledger_postgres.user_rollups_fold(most=FOLD_MOST)
        folded += more
        if done:
            return folded


def ledger_write_portable(
    entries: Sequence[Entry], denied: dict[int, dict[str, int]]
) -> WriteReport:
    """``ledger_write`` in Python and portable SQL: the embedded SQLite's, and the reference
    the PostgreSQL write is tested against."""
    report = WriteReport(read=len(entries))
    checks: dict[tuple[int, str], Entry] = {}
    commits: dict[tuple[int, str], Entry] = {}
    for entry in entries:
        target = checks if entry.kind == "check" else commits
        target[(entry.tenant_id, entry.entry_id)] = entry

    with transaction.atomic():
        ledger_lock()
        pending = list(PendingCommit.objects.order_by("occurred_at", "id")[:PENDING_PER_WRITE])
        pending_keys: dict[tuple[int, str], int] = {}
        for item in pending:
            key = (item.tenant_id, item.event_id)
            pending_keys[key] = item.pk
            if key not in commits:
                commits[key] = Entry(
                    item.tenant_id, item.event_id, "commit", item.payload, to_us(item.occurred_at)
                )
        prices = PriceBook.load({str(entry.data.get("model") or "") for entry in checks.values()})
        rows = {key: _row_from_check(entry, prices) for key, entry in checks.items()}

        # A commit settles the latest check of its request at or before it; in this batch
        # when the check is here (even after the commit), else in the database.
        in_batch: dict[tuple[int, str], list[_Row]] = defaultdict(list)
        for row in rows.values():
            in_batch[(row.tenant_id, row.request_id)].append(row)
        for candidates in in_batch.values():
            if len(candidates) > 1:
                candidates.sort(key=lambda row: (row.at_us, row.event_id))
        merged: dict[tuple[int, str], Entry] = {}  # check key -> its commit
        unmatched: list[Entry] = []
        for entry in sorted(commits.values(), key=lambda entry: entry.at_us):
            candidates = in_batch.get((entry.tenant_id, str(entry.data["request_id"])), [])
            row = _latest_at_or_before(candidates, entry.at_us)
            if row is not None and not row.commit_event_id:
                _settle(row, entry)
                merged[(row.tenant_id, row.event_id)] = entry
            else:
                unmatched.append(entry)

        inserted = _insert_events(list(rows.values()))
        report.inserted = len(inserted)
        report.duplicates = len(rows) - len(inserted)
        for key, entry in merged.items():
            if key not in inserted:
                unmatched.append(entry)  # the check was written before: amend it there

        deltas = RollupDeltas()
        new_rows = [rows[key] for key in inserted]
        for row in new_rows:
            billed_input, billed_output, is_estimate = row.billed
            deltas.add(
                row,
                1,
                billed_input,
                billed_output,
                int(is_estimate),
                row.price.cost(billed_input, billed_output),
            )
        report.hours.update((tenant, hour_from_index(hour)) for hour, tenant, _, _ in deltas.hourly)

        amended, orphans, settled_before = _amend_events(unmatched, prices, deltas, report)
        report.amended = len(amended)

        settled = {
            (entry.tenant_id, entry.entry_id)
            for entry in [*merged.values(), *(commit for commit, _ in amended), *settled_before]
        }
        applied_pending = [pk for key, pk in pending_keys.items() if key in settled]
        if applied_pending:
            PendingCommit.objects.filter(pk__in=applied_pending).delete()
        new_orphans = [
            PendingCommit(
                tenant_id=entry.tenant_id,
                event_id=entry.entry_id,
                request_id=str(entry.data["request_id"]),
                occurred_at=from_us(entry.at_us),
                payload=entry.data,
            )
            for entry in orphans
            if (entry.tenant_id, entry.entry_id) not in pending_keys
        ]
        PendingCommit.objects.bulk_create(new_orphans, ignore_conflicts=True)
        report.pending_commits = len(pending) - len(applied_pending) + len(new_orphans)

        report.denied_buckets = _store_denied(denied, deltas)
        report.adjustments = _adjust_finalised(new_rows, amended)
        deltas.apply()
    return report


def _latest_at_or_before(candidates: list[_Row], at_us: int) -> _Row | None:
    if len(candidates) == 1:
        return candidates[0]
    found = None
    for row in candidates:
        if row.at_us <= at_us:
            found = row
    if found is None and candidates:
        # Clocks agree within a script call; a commit stamped before its check can only
        # come from a moved test clock. The request id still names the check.
        found = candidates[-1]
    return found


# Temporary tables this process made on each database connection (they live as long as it).
_temporary_tables: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


BINARY_TYPES = {
    "BigAutoField": "int8",
    "BigIntegerField": "int8",
    "ForeignKey": "int8",
    "CharField": "text",
    "DateTimeField": "timestamptz",
    "DateField": "date",
    "BooleanField": "bool",
    "DecimalField": "numeric",
}


def copy_types(model: Any, columns: Sequence[str]) -> list[str]:
    """PostgreSQL type names of ``columns`` for a binary COPY."""
    return [
        BINARY_TYPES[model._meta.get_field(name).get_internal_type()]
        for name in _field_names(columns)
    ]


def _copy_into_temporary(
    cursor: Any, model: Any, columns: Sequence[str], rows: Iterable[Any]
) -> str:
    """COPY rows (binary) into an empty temporary twin of ``model``'s table; returns its
    name."""
    table = model._meta.db_table
    names = ", ".join(columns)
    temporary = f"billing_incoming_{table}_{zlib.crc32(names.encode()):08x}"
    made = _temporary_tables.setdefault(connection.connection, set())
    if temporary not in made:
        cursor.execute(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {temporary} ON COMMIT DELETE ROWS "  # noqa: S608
            f"AS SELECT {names} FROM {table} WITH NO DATA"
        )
        # Remembered once it is sure to exist: a rolled-back transaction takes it along.
        transaction.on_commit(lambda: made.add(temporary))
    # Empty at every commit, but a transaction may fill it more than once.
    cursor.execute(f"TRUNCATE {temporary}")
    statement = f"COPY {temporary} ({names}) FROM STDIN (FORMAT BINARY)"  # noqa: S608
    with cursor.cursor.copy(statement) as copy:
        copy.set_types(copy_types(model, columns))
        for row in rows:
            copy.write_row(row)
    return temporary


def _insert_events(rows: list[_Row]) -> set[tuple[int, str]]:
    """Insert rows whose (tenant, event id) is new; returns the keys inserted."""
    if not rows:
        return set()
    table = UsageEvent._meta.db_table
    columns = ", ".join(EVENT_COLUMNS)
    inserted: set[tuple[int, str]] = set()
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            temporary = _copy_into_temporary(
                cursor, UsageEvent, EVENT_COLUMNS, (row.values() for row in rows)
            )
            cursor.execute(
                f"INSERT INTO {table} ({columns}) SELECT {columns} "  # noqa: S608
                f"FROM {temporary} ON CONFLICT (tenant_id, event_id) DO NOTHING "
                f"RETURNING tenant_id, event_id"
            )
            inserted.update(cursor.fetchall())
            return inserted
        fields = [UsageEvent._meta.get_field(name) for name in _field_names(EVENT_COLUMNS)]
        placeholders = "(" + ", ".join(["%s"] * len(EVENT_COLUMNS)) + ")"
        chunk = max(1, 30000 // len(EVENT_COLUMNS))
        for first in range(0, len(rows), chunk):
            part = rows[first : first + chunk]
            params: list[Any] = []
            for row in part:
                params.extend(
                    model_field.get_db_prep_save(value, connection)
                    for model_field, value in zip(fields, row.values(), strict=True)
                )
            cursor.execute(
                f"INSERT INTO {table} ({columns}) VALUES "  # noqa: S608
                + ", ".join([placeholders] * len(part))
                + " ON CONFLICT (tenant_id, event_id) DO NOTHING RETURNING tenant_id, event_id",
                params,
            )
            inserted.update((int(tenant), str(event)) for tenant, event in cursor.fetchall())
    return inserted


def _field_names(columns: Iterable[str]) -> list[str]:
    return ["tenant" if column == "tenant_id" else column for column in columns]


def _amend_events(
    commits: list[Entry], prices: PriceBook, deltas: RollupDeltas, report: WriteReport
) -> tuple[list[tuple[Entry, _Row]], list[Entry], list[Entry]]:
    """Settle stored checks with their commits. Returns (commit, amended row) pairs, the
    commits whose check is not stored yet, and those that had been applied before."""
    if not commits:
        return [], [], []
    wanted: dict[int, set[str]] = defaultdict(set)
    for entry in commits:
        wanted[entry.tenant_id].add(str(entry.data["request_id"]))
    stored: dict[tuple[int, str], list[UsageEvent]] = defaultdict(list)
    for tenant_id, request_ids in wanted.items():
        ordered = sorted(request_ids)
        for first in range(0, len(ordered), 1000):
            for event in UsageEvent.objects.filter(
                tenant_id=tenant_id, request_id__in=ordered[first : first + 1000]
            ).order_by("occurred_at", "id"):
                stored[(event.tenant_id, event.request_id)].append(event)

    amended: list[tuple[Entry, _Row]] = []
    orphans: list[Entry] = []
    settled_before: list[Entry] = []
    updates: list[UsageEvent] = []
    for entry in sorted(commits, key=lambda entry: entry.at_us):
        candidates = stored.get((entry.tenant_id, str(entry.data["request_id"])), [])
        event = None
        for candidate in candidates:
            if to_us(candidate.occurred_at) <= entry.at_us:
                event = candidate
        if event is None and candidates:
            event = candidates[-1]
        if event is None:
            orphans.append(entry)
            continue
        if event.commit_event_id:
            settled_before.append(entry)
            if event.commit_event_id != entry.entry_id:
                logger.warning(
                    "billing: request %s of tenant %s was already settled by %s; ignoring %s",
                    event.request_id,
                    event.tenant_id,
                    event.commit_event_id,
                    entry.entry_id,
                )
            continue
        row = _Row(
            tenant_id=event.tenant_id,
            event_id=event.event_id,
            request_id=event.request_id,
            api_key_id=event.api_key_id,
            user_id=event.user_id,
            model_id=event.model_id,
            policy_version=event.policy_version,
            at_us=to_us(event.occurred_at),
            estimated_tokens=event.estimated_tokens,
            price=_price_of(event, prices),
        )
        old_input, old_output, old_estimate = (
            event.billed_input_tokens,
            event.billed_output_tokens,
            event.is_estimate,
        )
        old_cost = event.cost
        _settle(row, entry)
        new_input, new_output, new_estimate = row.billed
        new_cost = row.cost
        deltas.add(
            row,
            0,
            new_input - old_input,
            new_output - old_output,
            int(new_estimate) - int(old_estimate),
            new_cost - old_cost,
        )
        event.input_tokens = row.input_tokens
        event.output_tokens = row.output_tokens
        event.status = row.status
        event.committed_at = from_us(entry.at_us)
        event.commit_event_id = entry.entry_id
        event.billed_input_tokens = new_input
        event.billed_output_tokens = new_output
        event.is_estimate = new_estimate
        event.cost = new_cost
        updates.append(event)
        amended.append((entry, row))
        report.hours.add((row.tenant_id, hour_of(row.at_us)))
    if updates:
        UsageEvent.objects.bulk_update(
            updates,
            [
                "input_tokens",
                "output_tokens",
                "status",
                "committed_at",
                "commit_event_id",
                "billed_input_tokens",
                "billed_output_tokens",
                "is_estimate",
                "cost",
            ],
            batch_size=500,
        )
    return amended, orphans, settled_before


def _price_of(event: UsageEvent, prices: PriceBook) -> Price:
    """The price the event was first billed at (kept, so a later price change never
    reprices it)."""
    found = prices.at(event.model_id, to_us(event.occurred_at))
    if found.id == event.price_id:
        return found
    row = ModelPrice.objects.filter(pk=event.price_id).first()
    if row is None:
        return UNPRICED
    return Price(row.pk, row.input_price_per_1k, row.output_price_per_1k, 0, None)


def _store_denied(denied: dict[int, dict[str, int]], deltas: RollupDeltas) -> int:
    """Store denied counters as absolute values; a counter only grows, so storing the
    larger of the two makes a repeat (or an older read) change nothing."""
    wanted: dict[tuple[int, int, str], int] = {}
    for tenant_id, counts in denied.items():
        for name, count in counts.items():
            hour_text, _, model_id = name.partition("|")
            try:
                hour = int(hour_text)
            except ValueError:
                continue
            wanted[(hour, tenant_id, model_id)] = int(count)
    if not wanted:
        return 0
    existing: dict[tuple[int, int, str], int] = {}
    for hour, tenant_id, model_id, stored in HourlyRollup.objects.filter(
        price_id=NO_PRICE,
        hour__in={hour_from_index(key[0]) for key in wanted},
        tenant_id__in={key[1] for key in wanted},
    ).values_list("hour", "tenant_id", "model_id", "denied"):
        existing[(to_us(hour) // HOUR_US, tenant_id, model_id)] = stored
    changed = []
    for key, count in wanted.items():
        before = existing.get(key, 0)
        if count > before:
            changed.append((hour_from_index(key[0]), key[1], key[2], NO_PRICE, count))
            deltas.add_denied(key[0], key[1], key[2], count - before)
    rollup_upsert(
        HourlyRollup,
        ("hour", "tenant_id", "model_id", "price_id"),
        ("denied",),
        changed,
        add=False,
    )
    return len(changed)


def _adjust_finalised(inserted: list[_Row], amended: list[tuple[Entry, _Row]]) -> int:
    """Usage of a month whose statement was already sent lands on the next open one."""
    rows = [("event", row) for row in inserted] + [("commit", row) for _, row in amended]
    if not rows:
        return 0
    tenants = {row.tenant_id for _, row in rows}
    oldest = month_of(from_us(min(row.at_us for _, row in rows)).date())
    finalised: dict[int, set[dt.date]] = defaultdict(set)
    for tenant_id, month in Statement.objects.filter(
        tenant_id__in=tenants, month__gte=oldest
    ).values_list("tenant_id", "month"):
        finalised[tenant_id].add(month)
    if not finalised:
        return 0  # the usual case: nothing written belongs to a finalised month
    adjustments = []
    for kind, row in rows:
        months = finalised.get(row.tenant_id)
        if not months:
            continue
        month = month_of(from_us(row.at_us).date())
        if month not in months:
            continue
        landing = next_month(month)
        while landing in months:
            landing = next_month(landing)
        adjustments.append(_adjustment(kind, row, month, landing))
    StatementAdjustment.objects.bulk_create(adjustments, ignore_conflicts=True)
    return len(adjustments)


def _adjustment(kind: str, row: _Row, month: dt.date, landing: dt.date) -> StatementAdjustment:
    billed_input, billed_output, _ = row.billed
    if kind == "commit":
        # What the commit changed: the actuals less the estimate that was billed.
        estimate_cost = row.price.cost(row.estimated_tokens, 0)
        input_tokens = billed_input - row.estimated_tokens
        output_tokens = billed_output
        cost = row.cost - estimate_cost
    else:
        input_tokens, output_tokens, cost = billed_input, billed_output, row.cost
    return StatementAdjustment(
        tenant_id=row.tenant_id,
        event_id=row.event_id,
        kind=kind,
        request_id=row.request_id,
        model_id=row.model_id,
        usage_month=month,
        statement_month=landing,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost=cost,
    )


def rollup_upsert(
    model: Any,
    keys: Sequence[str],
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    add: bool,
) -> None:
    """INSERT … ON CONFLICT (keys) DO UPDATE: add to the stored values, or replace them.
    Each key may appear once in ``rows``."""
    if not rows:
        return
    table = model._meta.db_table
    names = [*keys, *columns]
    if add:
        assignments = ", ".join(f"{name} = {table}.{name} + excluded.{name}" for name in columns)
    else:
        assignments = ", ".join(f"{name} = excluded.{name}" for name in columns)
    conflict = f" ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {assignments}"
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            temporary = _copy_into_temporary(cursor, model, names, rows)
            cursor.execute(
                f"INSERT INTO {table} ({', '.join(names)}) "  # noqa: S608
                f"SELECT {', '.join(names)} FROM {temporary}" + conflict
            )
            return
        fields = [model._meta.get_field(name) for name in _field_names(names)]
        placeholders = "(" + ", ".join(["%s"] * len(names)) + ")"
        chunk = max(1, 30000 // len(names))
        for first in range(0, len(rows), chunk):
            part = rows[first : first + chunk]
            params: list[Any] = []
            for row in part:
                params.extend(
                    model_field.get_db_prep_save(value, connection)
                    for model_field, value in zip(fields, row, strict=True)
                )
            cursor.execute(
                f"INSERT INTO {table} ({', '.join(names)}) VALUES "  # noqa: S608
                + ", ".join([placeholders] * len(part))
                + conflict,
                params,
            )


# -- the drain ---------------------------------------------------------------------------
@dataclass
class DrainReport:
    batches: int = 0
    written: WriteReport = field(default_factory=WriteReport)
    seconds: float = 0.0
    # Where the time went. In Postgres transactions, and waiting for the reading thread;
    # that thread's own time reading and laying out batches, and acknowledging them, is
    # spent while Postgres works (with the in-process limiter, in turn).
    write_seconds: float = 0.0
    wait_seconds: float = 0.0
    read_seconds: float = 0.0
    ack_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "read": self.written.read,
            "inserted": self.written.inserted,
            "amended": self.written.amended,
            "duplicates": self.written.duplicates,
            "pending_commits": self.written.pending_commits,
            "denied_buckets": self.written.denied_buckets,
            "adjustments": self.written.adjustments,
            "seconds": round(self.seconds, 3),
            "write_seconds": round(self.write_seconds, 3),
            "wait_seconds": round(self.wait_seconds, 3),
            "read_seconds": round(self.read_seconds, 3),
            "ack_seconds": round(self.ack_seconds, 3),
        }


def drain(
    *,
    source: RedisSource | LocalSource | None = None,
    max_batches: int = 50,
    batch_size: int | None = None,
) -> DrainReport:
    """Drain batches until every stream is empty (or ``max_batches``); each batch is written
    in one transaction and acknowledged after it committed.

    From Redis, a second thread reads (and lays out) the next batch and acknowledges the
    last one while this one is written: Redis, Python and Postgres work at the same time. A
    batch read ahead is pending under this consumer like any other, and one written but not
    yet acknowledged is recognised when it comes back, so a drain that dies loses nothing
    and doubles nothing. The first batches are smaller (``FIRST_READ_LEAST``), so that
    Postgres starts early.

    On PostgreSQL the top-user rollups take the new events later, when
    ``user_rollups_fold`` runs (beat, every minute): folding a minute of drains at once
    upserts each user-day once instead of once a drain."""
    started = time.monotonic()
    owned = source is None
    chosen = source or source_default()
    count = batch_size or settings.BILLING_DRAIN_BATCH
    report = DrainReport()
    tenants = _tenant_ids()

    def read(size: int, held: dict[int, list[Any]] | None = None) -> Batch:
        moment = time.perf_counter()
        batch = chosen.read(size, tenants=tenants, held=held)
        report.read_seconds += time.perf_counter() - moment
        return batch

    def ack(batch: Batch) -> None:
        moment = time.perf_counter()
        chosen.ack(batch)
        report.ack_seconds += time.perf_counter() - moment

    reader = (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="billing-read")
        if isinstance(chosen, RedisSource)
        else None
    )
    ahead: Future[Batch] | None = None
    acked: Future[None] | None = None
    # Batches start small only where a second thread reads one while another is written.
    size = count if reader is None else max(min(count, FIRST_READ_LEAST), count // 8)
    # Python's cyclic collector stays paused until the drain ends, not only while a batch is
    # read: a batch's reply lives on while it is written and acknowledged, and a collection
    # set off meanwhile walked its tens of thousands of lists (and promoted them, to be walked
    # again). Reference counting frees every batch all the same.
    paused = cyclic_gc_paused() if reader is not None else contextlib.nullcontext()
    try:
        with paused:
            for number in range(max_batches):
                if ahead is not None:
                    moment = time.perf_counter()
                    batch, ahead = ahead.result(), None
                    report.wait_seconds += time.perf_counter() - moment
                else:
                    moment = time.perf_counter()
                    batch = read(size)
                    report.wait_seconds += time.perf_counter() - moment
                if not (batch.ids or batch.local_count or batch.denied):
                    if batch.complete_round:
                        break
                    continue
                if reader is not None and number + 1 < max_batches:
                    size = min(count, 2 * size)
                    ahead = reader.submit(read, size, batch.ids)
                if batch.entries or batch.denied:
                    moment = time.perf_counter()
                    report.written.add(
                        ledger_write(batch.entries, batch.denied, defer_user_rollups=True)
                    )
                    report.write_seconds += time.perf_counter() - moment
                if reader is None:
                    ack(batch)
                else:
                    if acked is not None:
                        acked.result()  # a failed acknowledgement stops the drain
                    acked = reader.submit(ack, batch)
                report.batches += 1
            if acked is not None:
                acked.result()
    finally:
        if reader is not None:
            reader.shutdown(wait=True)
        if owned:
            chosen.close()
    report.seconds = time.monotonic() - started
    return report
