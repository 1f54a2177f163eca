"""The policy store on a real three-primary Redis Cluster: publishing, reading it in a
fresh process state, and reconciling after the keys are lost."""

from __future__ import annotations

import redis
from django.conf import settings as django_settings

from limits import engine, services
from limits.policystore import _keys, policy_reconcile


def cluster_client() -> redis.RedisCluster:
    return redis.RedisCluster.from_url(django_settings.REDIS_URL, decode_responses=True)


def test_a_published_policy_is_read_back_from_the_cluster(on_cluster, world):
    version = services.policy_publish(actor=services.SYSTEM, reason="cluster")
    assert version is not None
    engine.policy_store().publish(version.version, version.document)

    version_key, document_key = _keys()
    client = cluster_client()
    assert client.keyslot(version_key) == client.keyslot(document_key)
    assert int(client.get(version_key)) == version.version

    engine.reset_state()  # a new process: it knows only what the cluster holds
    assert engine.policy_store().current().version == version.version


def test_reconcile_restores_the_policy_the_cluster_lost(on_cluster, world):
    version = services.policy_publish(actor=services.SYSTEM, reason="cluster")
    assert version is not None
    client = cluster_client()
    client.delete(*_keys())

    assert policy_reconcile().outcome == "restored"
    assert int(client.get(_keys()[0])) == version.version
    assert policy_reconcile().outcome == "in sync"
