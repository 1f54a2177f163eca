"""Gunicorn's sync worker, woken alone for each new connection.

Gunicorn's sync workers wait for connections with ``select()`` on the one listening socket
they share, and the kernel wakes every waiting worker for each connection: one accepts it,
the others find nothing (``EAGAIN``) and go back to waiting. With four workers mostly idle
that is three wasted wake-ups per request, each a context switch and a turn of gunicorn's
loop in Python, taken on the same cores as the requests. Four of the platform's workers
answering ``/healthz``, 3,000 requests on a connection each, made 4.9–5.4 context switches
per request with ``select()`` and 1.9–2.0 with this worker.

This worker waits in ``epoll`` with ``EPOLLEXCLUSIVE`` on the listening sockets (Linux 4.5
and later), so the kernel wakes one waiting worker per connection. Everything else is
gunicorn's sync worker unchanged: accepting, parsing, the application, the heartbeat that
tells the master it lives, and the wake-up pipe that signals write to. Where ``epoll`` or
the flag is missing it waits as the sync worker does.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from typing import Any

from gunicorn.workers.sync import StopWaiting, SyncWorker

EXCLUSIVE = getattr(select, "EPOLLEXCLUSIVE", None)


class ExclusiveAcceptWorker(SyncWorker):
    """A sync worker that the kernel wakes alone for a new connection."""

    _poll: Any = None
    _listeners: dict[int, socket.socket]

    def run(self) -> None:
        if EXCLUSIVE is not None:
            self._poll = select.epoll()
            self._listeners = {}
            for listener in self.sockets:
                self._poll.register(listener.fileno(), select.EPOLLIN | EXCLUSIVE)
                self._listeners[listener.fileno()] = listener
            # Not exclusive: the pipe is this worker's own (signals wake it through it).
            self._poll.register(self.PIPE[0], select.EPOLLIN)
        super().run()

    def wait(self, timeout: float) -> list[Any] | None:
        if self._poll is None:
            return super().wait(timeout)
        try:
            self.notify()
            events = self._poll.poll(timeout)
        except OSError as error:
            # As the sync worker's wait: closed sockets mean the worker is stopping.
            if error.errno == errno.EBADF:
                if self.nr < 0:
                    return self.sockets
                raise StopWaiting from error
            raise
        ready: list[Any] = []
        for fd, _ in events:
            if fd == self.PIPE[0]:
                try:
                    os.read(fd, 1)
                except BlockingIOError:
                    pass  # another wake-up took the byte
            else:
                ready.append(self._listeners[fd])
        return ready
