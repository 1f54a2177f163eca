"""Billing fixtures: the shared world with its policy published to the limiter."""

from __future__ import annotations

import pytest

from limits import engine, services


def publish() -> int:
    """Compile and publish the policy now, into Redis (or the in-process store) directly:
    on_commit does not run inside a test's transaction."""
    version = services.policy_publish(actor=services.SYSTEM, reason="billing test", force=True)
    assert version is not None
    engine.policy_store().publish(version.version, version.document)
    return version.version


@pytest.fixture
def published(world):
    publish()
    return world
