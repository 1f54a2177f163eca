"""Request windows this process knows to be full, so that a tenant far over a limit costs
Redis almost nothing.

When check.lua denies a check because a request window is full, its answer says exactly
when that window lets one more request in (``retry_after``, on Redis's clock). Until then
every check that counts in that window is denied, whoever sends it: a tenant window is
shared by all the tenant's users. The engine remembers the window here, and answers the next
checks that meet it with ``deny.lua``, which only keeps the request id's decision and counts
the denial, instead of reading and trimming every window in check.lua. Envoy's rate limit
service has the same idea (its local over-limit cache).

Admissions stay exact: an answer from here is always a denial, and only ever for a window
that Redis said is full until a moment that has not come yet. What could make the window
free sooner is handled: a newer policy (entries keep the version they were decided under
and are ignored under another), a reset of a user (``deny.lua`` refuses to answer while the
tenant's reset mark exists, and the resetting process forgets its entries at once), a
request window never loses entries otherwise (a usage report settles tokens and leases,
never requests). An entry also lives at most ``QUOTA_OVER_LIMIT_CACHE_SECONDS``, which bounds
how long denials outlive counts that Redis itself lost (a flush, a failover without
persistence). Only request windows are kept: a token window's wait depends on the tokens
asked for, a lease's on other requests' reports.
"""

from __future__ import annotations

import threading
import time
from typing import NamedTuple


class FullWindow(NamedTuple):
    expires: float  # time.monotonic() after which this process no longer uses the entry
    until_us: int  # Redis time at which the window lets one request in again
    version: int  # the policy version the denial was decided under


class OverLimitCache:
    """Full request windows by key. Thread-safe: entries are replaced, never changed."""

    def __init__(self, seconds: float, max_entries: int) -> None:
        self.seconds = seconds
        self.max_entries = max_entries
        self._windows: dict[str, FullWindow] = {}
        # Entries per hash tag ("…{t:<tenant>}", "…{g:<class>}"): whether a check could be
        # answered here, asked before its body is even read (limits/cached_denials.py).
        self._tags: dict[str, int] = {}
        self._global = 0  # entries of global capacity windows, which deny every tenant
        self._next_sweep = 0.0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._windows)

    def find(
        self, keys: list[str], positions: tuple[tuple[int, int], ...], version: int
    ) -> tuple[int, str, FullWindow] | None:
        """The first full window among ``keys`` at ``positions`` ((limit index, position in
        keys) of a plan's request windows): (its limit index, its key, the entry)."""
        windows = self._windows
        now = None
        for index, position in positions:
            key = keys[position]
            entry = windows.get(key)
            if entry is None:
                continue
            if now is None:
                now = time.monotonic()
            if entry.version != version or entry.expires <= now:
                self.forget(key)
                continue
            return index, key, entry
        return None

    def remember(self, key: str, until_us: int, retry_seconds: float, version: int) -> None:
        now = time.monotonic()
        entry = FullWindow(now + min(retry_seconds, self.seconds), until_us, version)
        with self._lock:
            windows = self._windows
            if key not in windows and len(windows) >= self.max_entries:
                self._drop_expired(now)
                if len(windows) >= self.max_entries:
                    # Full of live entries: a tenant spreading over very many users. Start
                    # again rather than track ages; each entry costs one check to refill.
                    self._clear()
            if key not in windows:
                self._count(key, 1)
            windows[key] = entry

    def may_deny(self, tenant_tag: str) -> bool:
        """Whether a check of this tenant (its hash tag, ``engine.tenant_tag``) could meet a
        window known here: an entry of the tenant's, or of a global capacity."""
        if not self._windows:
            return False
        now = time.monotonic()
        if now >= self._next_sweep:
            # Expired entries of users who stopped sending would otherwise keep answering
            # "maybe" for their tenant's other users.
            with self._lock:
                self._next_sweep = now + 1.0
                self._drop_expired(now)
        return self._global > 0 or self._tags.get(tenant_tag, 0) > 0

    def forget(self, key: str) -> None:
        with self._lock:
            if self._windows.pop(key, None) is not None:
                self._count(key, -1)

    def clear(self) -> None:
        with self._lock:
            self._clear()

    def _drop_expired(self, now: float) -> None:
        for key in [k for k, v in self._windows.items() if v.expires <= now]:
            del self._windows[key]
            self._count(key, -1)

    def _clear(self) -> None:
        self._windows.clear()
        self._tags.clear()
        self._global = 0

    def _count(self, key: str, step: int) -> None:
        tag = key[: key.find("}") + 1]
        if ":{g:" in tag:
            self._global += step
            return
        left = self._tags.get(tag, 0) + step
        if left > 0:
            self._tags[tag] = left
        else:
            self._tags.pop(tag, None)
