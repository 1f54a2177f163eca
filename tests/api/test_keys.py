"""API keys on the check path: verified once, then remembered briefly in each process, so a
warm check costs no SQL and one Redis call; a revoked key dies within the cache time."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from django.test import Client

from limits import engine
from limits.apikeys import apikey_generate
from limits.authentication import api_client_cache_clear
from limits.services import SYSTEM, apikey_create, apikey_revoke, policy_publish
from tests.api.live import (
    Gunicorn,
    committed,
    live_world_create,
    live_world_delete,
    new_prefix,
)
from tests.processes import RedisServer

CHECK = {"user_id": "u1", "model": "gpt-4o", "tokens": 5}


def _post(client: Client, key: str, body: dict[str, object] = CHECK) -> object:
    return client.post(
        "/api/v1/check",
        data=json.dumps(body),
        content_type="application/json",
        headers={"Authorization": f"Bearer {key}"},
    )


@pytest.fixture
def alices_key(world, django_capture_on_commit_callbacks) -> str:
    _, key = apikey_create(tenant=world.alice, name="backend", actor=SYSTEM)
    with django_capture_on_commit_callbacks(execute=True):
        policy_publish(actor=SYSTEM, reason="key tests")
    api_client_cache_clear()
    yield key
    api_client_cache_clear()


def test_a_warm_check_costs_no_sql(client, alices_key, django_assert_num_queries):
    assert _post(client, alices_key).status_code == 200  # verifies the key, loads the policy

    with django_assert_num_queries(0):
        answer = _post(client, alices_key)

    assert answer.status_code == 200
    assert answer.json()["allowed"] is True
    assert answer.json()["limits"][0]["remaining"] == 98


def test_the_first_check_of_a_key_verifies_it_in_the_database(
    client, alices_key, django_assert_max_num_queries
):
    engine.policy_store().current()

    with django_assert_max_num_queries(2) as captured:  # the key; its last use, once a minute
        assert _post(client, alices_key).status_code == 200

    assert "limits_apikey" in captured.captured_queries[0]["sql"]


def test_keys_with_a_bad_checksum_cost_no_sql(client, alices_key, django_assert_num_queries):
    keys = [apikey_generate().key for _ in range(50)]
    bogus = [key[:-1] + ("1" if key.endswith("0") else "0") for key in keys]

    with django_assert_num_queries(0):
        statuses = {_post(client, key).status_code for key in bogus}

    assert statuses == {401}


def test_a_well_formed_unknown_key_costs_one_query_and_is_not_cached(
    client, alices_key, django_assert_num_queries
):
    unknown = apikey_generate().key

    for _ in range(2):
        with django_assert_num_queries(1):
            assert _post(client, unknown).status_code == 401


@pytest.fixture
def own_redis(tmp_path, settings) -> Iterator[RedisServer]:
    """The engine, the policy and Django's cache on a Redis server of this test's own, with
    the policy poller idle, so that every command the server counts came from the check."""
    if not RedisServer.available():
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    settings.REDIS_URL = server.url
    settings.QUOTA_POLICY_REFRESH_SECONDS = 3600
    settings.CACHES = {
        "default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": server.url}
    }
    engine.reset_state()
    yield server
    engine.reset_state()
    server.stop()


class CommandLog:
    """Every command a Redis server receives from its clients (not those its scripts run),
    read with MONITOR between two markers."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.commands: list[str] = []

    def __enter__(self) -> CommandLog:
        self._client = self.server.client()
        self._markers = self.server.client()
        self._markers.ping()  # connected before MONITOR starts: its handshake is not logged
        self._monitor = self._client.monitor().__enter__()
        self._marker("start")
        return self

    def _marker(self, name: str) -> None:
        self._markers.echo(f"marker-{name}")
        while True:  # bounded: the marker was sent, and reading times out after 5 s
            command = self._monitor.next_command()
            if command["command"] == f"ECHO marker-{name}":
                return
            if name != "start" and command["client_type"] != "lua":
                self.commands.append(command["command"].split(" ", 1)[0].upper())

    def __exit__(self, *exc_info: object) -> None:
        self._marker("end")
        self._monitor.__exit__(*exc_info)
        self._client.close()
        self._markers.close()


def test_a_warm_check_is_one_redis_call(client, own_redis, alices_key):
    assert _post(client, alices_key).status_code == 200

    with CommandLog(own_redis) as log:
        answer = _post(client, alices_key, {**CHECK, "user_id": "u2"})

    assert answer.status_code == 200
    assert answer.json()["allowed"] is True
    assert log.commands == ["EVALSHA"]


@pytest.mark.slow
def test_a_revoked_key_stops_working_on_every_worker_within_the_cache_time(db, tmp_path):
    prefix = new_prefix()
    world = committed(live_world_create, prefix)
    cache_seconds = 1.0
    server = Gunicorn(
        tmp_path, prefix=prefix, environ={"QUOTA_API_KEY_CACHE_SECONDS": str(cache_seconds)}
    )
    try:
        server.start()
        quota = "/api/v1/quota?user_id=u&model=gpt-4o"
        # Both workers verify and cache the key (requests land on either).
        assert {server.call("GET", quota, key=world.alice_key).status for _ in range(20)} == {200}

        committed(apikey_revoke, api_key=world.alice_api_key, actor=SYSTEM)
        revoked = time.monotonic()
        time.sleep(max(0.0, revoked + cache_seconds + 0.05 - time.monotonic()))

        statuses = [server.call("GET", quota, key=world.alice_key).status for _ in range(20)]
        assert set(statuses) == {401}
        assert server.call("GET", quota, key=world.bob_key).status == 200
    finally:
        server.stop()
        committed(live_world_delete, prefix)
