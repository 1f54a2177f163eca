"""Gunicorn settings for the web processes: ``gunicorn -c quota_platform/gunicorn.conf.py``.

Listens on 127.0.0.1:$PORT (8000 by default); behind a proxy or in a container, add
``GUNICORN_CMD_ARGS="--bind 0.0.0.0:8000"``. WEB_CONCURRENCY overrides the worker count.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile

from django.core.exceptions import ImproperlyConfigured

from quota_platform.env import env_int

MAX_WORKERS = 8


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may use, not the machine's
    except AttributeError:
        return os.cpu_count() or 1


try:
    _port = env_int("PORT", 8000, minimum=1, maximum=65535)
    _workers = env_int(
        "WEB_CONCURRENCY", min(2 * _cpu_count() + 1, MAX_WORKERS), minimum=1, maximum=64
    )
except ImproperlyConfigured as error:
    print(f"configuration error: {error}", file=sys.stderr)
    sys.exit(2)

# Metrics of every worker in one scrape: prometheus-client keeps them in files here. Set
# before the application (and prometheus-client) is loaded.
_own_metrics_dir = None
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _own_metrics_dir = tempfile.mkdtemp(prefix="quota-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _own_metrics_dir


def when_ready(server: object) -> None:
    # What the master loaded before forking (Django, DRF, the URL conf, the schema
    # generator: about 100,000 objects) lives as long as the workers. Frozen, it is left out
    # of every worker's cyclic garbage collections: a full one walked it all, 50-80 ms
    # measured here, a pause that fell on whatever requests the worker had in hand and came
    # the more often the more requests it served. Workers forked later inherit the freeze.
    gc.freeze()


def child_exit(server: object, worker: object) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]


def on_exit(server: object) -> None:
    if _own_metrics_dir is not None:
        shutil.rmtree(_own_metrics_dir, ignore_errors=True)


wsgi_app = "quota_platform.wsgi:application"
bind = [f"127.0.0.1:{_port}"]
if os.environ.get("REDIS_URL"):
    workers = _workers
    # gunicorn's sync worker, woken alone for a new connection instead of all of them
    # together (quota_platform/gunicorn_worker.py).
    worker_class = "quota_platform.gunicorn_worker.ExclusiveAcceptWorker"
else:
    # The embedded default counts in this process: one process, many threads, so every
    # request sees the same counters and the policy this process published.
    workers = 1
    worker_class = "gthread"
    threads = _workers * 4
# Load Django once in the master: a bad setting stops start-up once, with one message,
# instead of every worker failing and being restarted forever.
preload_app = True

# Checks answer in milliseconds; a request still running after 30 s is stuck.
timeout = 30
graceful_timeout = 30
keepalive = 5
# Workers are not recycled after a number of requests: at check rates a limit of a few
# thousand restarts each worker every few seconds, and every restart costs its key cache,
# its policy and a set of metric files that stay in the directory above for good.
max_requests = 0

# One fixed socket path per user would clash between two instances on one machine.
control_socket_disable = True

# ACCESS_LOG: "-" (standard output, the default), a file, or empty for no access log.
accesslog = os.environ.get("ACCESS_LOG", "-") or None
errorlog = "-"
# The same lines as gunicorn's own logger, made for less (quota_platform/gunicorn_logging.py).
logger_class = "quota_platform.gunicorn_logging.AccessLogger"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
