"""A Celery app for a worker that tests restart the Redis broker under: the platform's broker
settings (Django's, ``CELERY_*``), and one task, sent by beat several times a second, that
counts its runs in the broker's Redis."""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "quota_platform.settings")

MARKS_KEY = "broker-test:marks"

# Not the current app: importing this module (the tests do) must leave the platform's in place.
app = Celery("broker_test", set_as_current=False)
app.config_from_object("django.conf:settings", namespace="CELERY")
# A steady flow of messages, so that some are delivered and not yet acknowledged whenever
# the broker goes away; none of the platform's own tasks.
app.conf.beat_schedule = {"mark": {"task": "tests.broker_app.mark", "schedule": 0.3}}


@app.task(name="tests.broker_app.mark")
def mark() -> None:
    with redis.Redis.from_url(app.conf.broker_url, socket_timeout=5) as client:
        client.incr(MARKS_KEY)
    time.sleep(0.1)
