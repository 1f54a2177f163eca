"""Readiness follows the policy: a server with nothing published is not ready, and becomes
ready once a policy is published, without a restart."""

from __future__ import annotations

import time

import pytest

from tests.api.live import Gunicorn, committed, live_world_create, live_world_delete, new_prefix


@pytest.mark.slow
def test_readyz_is_503_until_a_policy_is_published(db, tmp_path):
    prefix = new_prefix()
    server = Gunicorn(tmp_path, prefix=prefix)
    try:
        server.start()
        answer = server.call("GET", "/readyz")
        assert answer.status == 503
        assert answer.json == {
            "ready": False,
            "checks": {"database": "ok", "redis": "ok", "policy": "none loaded"},
        }

        committed(live_world_create, prefix)  # publishes version 1 to Redis
        # Each worker polls Redis every 0.5 s: soon every answer is 200, whichever worker.
        deadline = time.monotonic() + 10
        in_a_row = 0
        while in_a_row < 20:
            assert time.monotonic() < deadline, "the workers did not all become ready in 10 s"
            in_a_row = in_a_row + 1 if server.call("GET", "/readyz").status == 200 else 0
            time.sleep(0.02)
    finally:
        server.stop()
        committed(live_world_delete, prefix)
