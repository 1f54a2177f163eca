"""gunicorn's logger, with the access line of the default format made for less.

gunicorn builds every access line from a dictionary of every request header, response
header and environ variable (some sixty entries for a check), then copies it once more to
escape quotes, whatever the format asks for. The default format asks for nine of them.
This logger writes the same line from those nine fields only: 14 µs a line against 29 µs
(docs/operations.md, "Access log"), on every request. Any other ``access_log_format`` goes
through gunicorn's own code.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

from gunicorn.config import AccessLogFormat
from gunicorn.glogging import Logger

DEFAULT_FORMAT: str = AccessLogFormat.default


class AccessLogger(Logger):
    """``logger_class`` for gunicorn: its lines, byte for byte, at a fraction of the cost."""

    _stamp_second = -1
    _stamp = ""

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        if self.cfg.access_log_format != DEFAULT_FORMAT:
            super().access(resp, req, environ, request_time)
            return
        if not self.access_log_enabled:
            return
        status = resp.status
        if isinstance(status, str):
            status = status.split(None, 1)[0]
        sent = getattr(resp, "sent", None)
        atoms = {
            "h": environ.get("REMOTE_ADDR", "-"),
            "l": "-",
            "u": self._get_user(environ) or "-",
            "t": self.now(),
            "r": f"{environ['REQUEST_METHOD']} {environ['RAW_URI']} {environ['SERVER_PROTOCOL']}",
            "s": status,
            "b": (sent is not None and str(sent)) or "-",
            "f": environ.get("HTTP_REFERER", "-"),
            "a": environ.get("HTTP_USER_AGENT", "-"),
        }
        try:
            # gunicorn's own wrapper escapes the quotes, as for its own lines.
            self.access_log.info(DEFAULT_FORMAT, self.atoms_wrapper_class(atoms))
        except Exception:  # noqa: BLE001 - as gunicorn: a bad line never fails a request
            self.error(traceback.format_exc())

    def now(self) -> str:
        # strftime once a second, not once a request; the text is the same within a second.
        moment = time.time()
        second = int(moment)
        if second != self._stamp_second:
            self._stamp = time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(moment))
            self._stamp_second = second
        return self._stamp
