"""The policy this process enforces, and how it follows what admin publishes.

Publishing writes the compiled document to Redis with one script (version and document
change together). Every process polls the version key, a single cheap GET, every
``QUOTA_POLICY_REFRESH_SECONDS`` from a background thread and swaps in the new document
whole, so a check sees either the old policy or the new one, never a mix. Without Redis
(the embedded default) the process that published holds the policy; the embedded default
runs one web process for that reason.

Postgres stays the source of truth: a process that finds nothing in Redis loads the latest
``PolicyVersion`` and republishes it, and the reconcile task does the same on a schedule
(after a ``FLUSHALL`` or a failover lost the keys).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from django.conf import settings
from redis.backoff import NoBackoff
from redis.retry import Retry

from limits.redis_client import Client, redis_client

if TYPE_CHECKING:
    from limits.engine import Plan

logger = logging.getLogger(__name__)

PUBLISH_LUA = (Path(__file__).resolve().parent / "lua" / "publish.lua").read_text()

# This process's id, kept across a fork: every check asks whether its process has forked
# since its policy and its Redis connection were made, and os.getpid() is a system call.
_process_id = os.getpid()


def _forked() -> None:
    global _process_id
    _process_id = os.getpid()


os.register_at_fork(after_in_child=_forked)


def process_id() -> int:
    """``os.getpid()``, without a system call."""
    return _process_id


class Policy:
    """One published version, and the plans compiled from it on demand."""

    __slots__ = ("version", "document", "tenants", "models", "plans")

    def __init__(self, version: int, document: dict[str, Any]) -> None:
        self.version = version
        self.document = document
        self.tenants: dict[str, Any] = document.get("tenants", {})
        self.models: dict[str, Any] = document.get("models", {})
        self.plans: dict[tuple[int, str], Plan] = {}


EMPTY = Policy(0, {})


@dataclass(frozen=True)
class Reconciled:
    """What one reconcile found and did."""

    outcome: str  # "in sync", "restored", "rolled back", "in-process", "nothing published"
    version: int | None  # the latest version in Postgres


def _keys() -> tuple[str, str]:
    prefix = settings.QUOTA_KEY_PREFIX
    return f"{prefix}:{{policy}}:version", f"{prefix}:{{policy}}:document"


class PolicyStore:
    def __init__(self) -> None:
        self._policy: Policy | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._pid = process_id()
        # Bumped by every swap: a poll that read Redis before a local publish must not put
        # the older document back over the newer one.
        self._generation = 0
        self.redis: Client | None = None
        if settings.REDIS_URL:
            # Policy traffic is rare and a document can be large: its own, patient client.
            # One immediate retry of a dropped connection, none of a timeout: redis-py's
            # default (ten retries with backoff) would hold a first check, or an admin save
            # publishing on commit, for many seconds while Redis is away.
            self.redis = redis_client(
                settings.REDIS_URL,
                socket_timeout=5,
                socket_connect_timeout=1,
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            )
            self._publish = self.redis.register_script(PUBLISH_LUA)

    # -- reading -------------------------------------------------------------------
    def current(self) -> Policy:
        policy = self._policy
        if policy is None or self._pid != process_id():
            policy = self._first_load()
        return policy

    @property
    def version(self) -> int:
        return self._policy.version if self._policy is not None else 0

    @property
    def loaded(self) -> bool:
        return self._policy is not None and self._policy.version > 0

    def _first_load(self) -> Policy:
        with self._lock:
            if self._pid != process_id():  # forked: the parent's thread did not come along
                self._pid = process_id()
                self._poller = None
            if self._policy is None:
                policy = None
                if self.redis is not None:
                    try:
                        policy = self._read_redis(0)
                    except redis.RedisError as error:
                        logger.warning("policy: Redis unreachable at start-up: %s", error)
                if policy is None:
                    policy = self._read_database()
                    if policy is not None and self.redis is not None:
                        self._write_redis(policy.version, policy.document, force=False)
                self._policy = policy or EMPTY
                self._generation += 1
            self._start_poller()
            return self._policy

    def _start_poller(self) -> None:
        """Follow Redis from now on (caller holds the lock)."""
        if self.redis is not None and self._poller is None:
            self._stop.clear()
            self._poller = threading.Thread(
                target=self._poll, name="quota-policy-poller", daemon=True
            )
            self._poller.start()

    def _read_redis(self, newer_than: int) -> Policy | None:
        if self.redis is None:
            return None
        version_key, document_key = _keys()
        raw = self.redis.get(version_key)
        if raw is None or int(raw) <= newer_than:
            return None
        document = self.redis.get(document_key)
        if document is None:
            return None
        parsed = json.loads(document)
        return Policy(int(parsed["version"]), parsed)

    def _read_database(self) -> Policy | None:
        from limits.models import PolicyVersion

        try:
            latest = PolicyVersion.objects.order_by("-version").first()
        except Exception as error:  # the database may be down too; say so, stay empty
            logger.error("policy: cannot read the latest version from the database: %s", error)
            return None
        if latest is None:
            return None
        return Policy(latest.version, latest.document)

    def refresh(self) -> bool:
        """Take a newer version from Redis if there is one; put ours back if Redis lost it."""
        if self.redis is None:
            return False
        version_key, _ = _keys()
        generation = self._generation
        current = self._policy
        raw = self.redis.get(version_key)
        if raw is None:
            if current is not None and current.version > 0:
                self._write_redis(current.version, current.document, force=False)
            return False
        if current is not None and int(raw) == current.version:
            return False
        newer = self._read_redis(0)
        if newer is None:
            return False
        # Redis decides, even when it went back (reconcile restored an older version).
        return self._swap(newer, force=True, generation=generation)

    def _poll(self) -> None:
        while not self._stop.wait(settings.QUOTA_POLICY_REFRESH_SECONDS):
            try:
                self.refresh()
            except Exception as error:  # keep enforcing the last policy; try again soon
                logger.warning("policy: refresh failed: %s", error)

    # -- writing -------------------------------------------------------------------
    def publish(self, version: int, document: dict[str, Any], *, force: bool = False) -> None:
        document = json.loads(json.dumps(document))
        document["version"] = version
        # Redis first: a poll that runs in between then finds this version there, never the
        # one before it to put back over ours.
        if self.redis is not None:
            self._write_redis(version, document, force=force)
        self._swap(Policy(version, document), force=force)
        if self._pid == process_id():
            # A process that published before its first check (an admin save) holds a policy
            # without having loaded one: it must follow the next publish of any other too.
            with self._lock:
                self._start_poller()

    def _swap(self, policy: Policy, *, force: bool, generation: int | None = None) -> bool:
        with self._lock:
            if generation is not None and generation != self._generation:
                return False  # swapped meanwhile; the next poll looks again
            if force or self._policy is None or policy.version > self._policy.version:
                self._policy = policy
                self._generation += 1
                return True
            return False

    def _write_redis(self, version: int, document: dict[str, Any], *, force: bool) -> bool:
        text = json.dumps(document, separators=(",", ":"))
        try:
            return bool(self._publish(keys=list(_keys()), args=[version, text, "force" * force]))
        except redis.RedisError as error:
            # The reconcile task puts it there once Redis is back.
            logger.error("policy: could not publish version %s to Redis: %s", version, error)
            return False

    def redis_version(self) -> int | None:
        if self.redis is None:
            return None
        raw = self.redis.get(_keys()[0])
        return None if raw is None else int(raw)

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None and self._poller.is_alive():
            self._poller.join(timeout=2)
        if self.redis is not None:
            self.redis.close()


def policy_reconcile() -> Reconciled:
    """Make Redis hold the latest version in Postgres, the source of truth.

    Idempotent: when Redis already holds that version (number and document) nothing is
    written. Redis behind (or emptied by a ``FLUSHALL``) gets the latest version; Redis ahead
    (a database restored to an earlier state) is put back to it. Raises ``redis.RedisError``
    when Redis cannot be reached, so that the task retries.
    """
    from limits.engine import policy_store
    from limits.models import PolicyVersion

    store = policy_store()
    latest_versions = PolicyVersion.objects.order_by("-version").only("version", "document")
    if store.redis is None:
        latest = latest_versions.first()
        if latest is None:
            return Reconciled("nothing published", None)
        store.publish(latest.version, latest.document)
        return Reconciled("in-process", latest.version)

    version_key, document_key = _keys()
    for _attempt in range(5):
        with store.redis.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(version_key, document_key)
                raw = pipe.get(version_key)
                has_document = bool(pipe.exists(document_key))
                # Postgres is read after the WATCH: a version committed after this read is
                # pushed after it too, that push touches the watched keys, and the EXEC below
                # then refuses to write an older version over it.
                latest = latest_versions.first()
                if latest is None:
                    return Reconciled("nothing published", None)
                current = None if raw is None else int(raw)
                if current == latest.version and has_document:
                    outcome = "in sync"
                else:
                    document = {**latest.document, "version": latest.version}
                    pipe.multi()
                    pipe.set(version_key, latest.version)
                    pipe.set(document_key, json.dumps(document, separators=(",", ":")))
                    pipe.execute()
                    ahead = current is not None and current > latest.version
                    outcome = "rolled back" if ahead else "restored"
            except redis.WatchError:
                continue  # published meanwhile; look again
        if outcome != "in sync":
            logger.warning("policy: Redis %s version %s", outcome, latest.version)
        if store.loaded:
            # Only a store that is enforcing (and has its poller) takes it now; a worker that
            # never checks must not end up holding a policy nobody refreshes.
            store.refresh()
        return Reconciled(outcome, latest.version)
    raise RuntimeError("the policy kept changing while it was being reconciled")
