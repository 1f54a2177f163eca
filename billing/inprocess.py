"""Billing's scheduled work inside the web process, for the embedded default.

With no broker there is no Celery beat, and the in-process limiter's usage events live
only in the process that served the checks: so that process drains them itself, on a
daemon thread, on the same schedule as beat (``CELERY_BEAT_SCHEDULE``) and through the
same functions as the tasks.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

from django.conf import settings
from django.db import close_old_connections

logger = logging.getLogger(__name__)

_started: dict[int, threading.Thread] = {}
_lock = threading.Lock()


def is_embedded() -> bool:
    return settings.QUOTA_BACKEND == "local" and bool(settings.CELERY_TASK_ALWAYS_EAGER)


def install() -> None:
    """Start the scheduler where requests are served: in every forked worker (gunicorn),
    or in the serving process of ``runserver``."""
    if not is_embedded():
        return
    os.register_at_fork(after_in_child=start)
    serving_runserver = "runserver" in sys.argv and (
        os.environ.get("RUN_MAIN") == "true" or "--noreload" in sys.argv
    )
    if serving_runserver:
        start()


def _jobs() -> list[tuple[str, float, Callable[[], object]]]:
    """Beat's billing entries and the limiter's deferred usage reports, each with the
    service its task calls."""
    from billing import services
    from billing.ingest import drain, user_rollups_fold
    from billing.rollups import rollups_reconcile_recent
    from limits.usage import deferred_usage_apply

    services_by_task: dict[str, Callable[[], object]] = {
        "limits.tasks.deferred_usage_apply": deferred_usage_apply,
        "billing.tasks.drain_usage": drain,
        "billing.tasks.user_rollups": user_rollups_fold,
        "billing.tasks.rollup": rollups_reconcile_recent,
        "billing.tasks.budget_alerts": services.budget_alerts_check,
        "billing.tasks.statements_finalise": services.statements_finalise_due,
        "billing.tasks.retention": services.usage_retention_run,
    }
    jobs = []
    for name, entry in settings.CELERY_BEAT_SCHEDULE.items():
        function = services_by_task.get(str(entry["task"]))
        if function is not None:
            jobs.append((name, float(str(entry["schedule"])), function))
    return jobs


def start() -> None:
    with _lock:
        pid = os.getpid()
        if pid in _started:
            return
        thread = threading.Thread(target=_loop, name="billing-scheduler", daemon=True)
        _started[pid] = thread
        thread.start()


def _loop() -> None:
    jobs = _jobs()
    due = {name: time.monotonic() + interval for name, interval, _ in jobs}
    while True:
        time.sleep(1.0)
        now = time.monotonic()
        for name, interval, run in jobs:
            if now < due[name]:
                continue
            due[name] = now + interval
            try:
                run()
            except Exception:  # one failed run must not end the schedule
                logger.exception("billing: scheduled %s failed", name)
            finally:
                close_old_connections()
