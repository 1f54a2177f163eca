"""A committed world and a gunicorn serving it, one of each per test module.

The data is committed (a server in another process must see it), so these modules do not
use the ``db`` fixture's rolled-back transactions; the world is removed when the module
ends. Each test of such a module works on the server's key prefix and its own end-user
ids, so tests do not count against each other.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from limits import engine
from tests.api.live import Gunicorn, LiveWorld, live_world_create, live_world_delete, new_prefix


@pytest.fixture(scope="module")
def live_world(django_db_setup, django_db_blocker) -> Iterator[LiveWorld]:
    prefix = new_prefix()
    with django_db_blocker.unblock():
        try:
            yield live_world_create(prefix)
        finally:
            live_world_delete(prefix)
            engine.reset_state()


@pytest.fixture(scope="module")
def server(live_world, tmp_path_factory) -> Iterator[Gunicorn]:
    """Two sync workers on this module's world. Verified keys are cached for one second."""
    gunicorn = Gunicorn(
        tmp_path_factory.mktemp("gunicorn"),
        prefix=live_world.prefix,
        environ={"QUOTA_API_KEY_CACHE_SECONDS": "1"},
    )
    gunicorn.start()
    yield gunicorn
    gunicorn.stop()


@pytest.fixture
def user() -> str:
    """An end-user id of this test's own: no other test has counted anything for it."""
    return f"user-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def same_prefix(live_world, settings) -> str:
    """This test process's engine on the server's key prefix (to read Redis as it does)."""
    settings.QUOTA_KEY_PREFIX = live_world.prefix
    engine.reset_state()
    return live_world.prefix
