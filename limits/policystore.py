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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from django.conf import settings

if TYPE_CHECKING:
    from limits.engine import Plan

logger = logging.getLogger(__name__)

PUBLISH_LUA = (Path(__file__).resolve().parent / "lua" / "publish.lua").read_text()


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


def _keys() -> tuple[str, str]:
    prefix = settings.QUOTA_KEY_PREFIX
    return f"{prefix}:{{policy}}:version", f"{prefix}:{{policy}}:document"


class PolicyStore:
    def __init__(self) -> None:
        self._policy: Policy | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._pid = os.getpid()
        self.redis: redis.Redis | None = None
        if settings.REDIS_URL:
            # Policy traffic is rare and a document can be large: its own, patient client.
            self.redis = redis.Redis.from_url(
                settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=2
            )
            self._publish = self.redis.register_script(PUBLISH_LUA)

    # -- reading -------------------------------------------------------------------
    def current(self) -> Policy:
        policy = self._policy
        if policy is None or self._pid != os.getpid():
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
            if self._pid != os.getpid():  # forked: the parent's thread did not come along
                self._pid = os.getpid()
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
            if self.redis is not None and self._poller is None:
                self._stop.clear()
                self._poller = threading.Thread(
                    target=self._poll, name="quota-policy-poller", daemon=True
                )
                self._poller.start()
            return self._policy

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
        self._swap(newer, force=True)
        return True

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
        self._swap(Policy(version, document), force=force)
        if self.redis is not None:
            self._write_redis(version, document, force=force)

    def _swap(self, policy: Policy, *, force: bool) -> None:
        with self._lock:
            if force or self._policy is None or policy.version > self._policy.version:
                self._policy = policy

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


def policy_reconcile() -> str:
    """Make Redis hold the latest version in Postgres. Returns what it did."""
    from limits.engine import policy_store

    store = policy_store()
    latest = store._read_database()
    if latest is None:
        return "nothing published yet"
    if store.redis is None:
        store.publish(latest.version, latest.document)
        return "in-process"
    if store.redis_version() == latest.version:
        return "in sync"
    store.publish(latest.version, latest.document, force=True)
    return f"restored version {latest.version}"
