"""Decisions: every applicable limit checked and consumed together (filled in by the engine
work). For now it only holds the policy store that publishing writes to.
"""

from __future__ import annotations

import json
import threading
from typing import Any


class PolicyStore:
    """The current policy document of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.version = 0
        self.document: dict[str, Any] = {}

    def publish(self, version: int, document: dict[str, Any]) -> None:
        with self._lock:
            if version >= self.version:
                self.version = version
                self.document = json.loads(json.dumps(document))


_store: PolicyStore | None = None


def policy_store() -> PolicyStore:
    global _store
    if _store is None:
        _store = PolicyStore()
    return _store


def reset_state() -> None:
    """Forget everything this process holds (tests, and after settings change)."""
    global _store
    _store = None
