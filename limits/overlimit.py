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
                windows.pop(key, None)
                continue
            return index, key, entry
        return None

    def remember(self, key: str, until_us: int, retry_seconds: float, version: int) -> None:
        now = time.monotonic()
        entry = FullWindow(now + min(retry_seconds, self.seconds), until_us, version)
        with self._lock:
            windows = self._windows
            if key not in windows and len(windows) >= self.max_entries:
                for old in [k for k, v in windows.items() if v.expires <= now]:
                    del windows[old]
                if len(windows) >= self.max_entries:
                    # Full of live entries: a tenant spreading over very many users. Start
                    # again rather than track ages; each entry costs one check to refill.
                    windows.clear()
            windows[key] = entry

    def forget(self, key: str) -> None:
        self._windows.pop(key, None)

    def clear(self) -> None:
        self._windows.clear()
