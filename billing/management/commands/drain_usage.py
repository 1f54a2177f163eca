"""``drain_usage``: move usage from the limiter into Postgres now, and check the rollups."""

from __future__ import annotations

import datetime as dt
import signal
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from billing.ingest import DrainReport, drain, source_default, user_rollups_fold
from billing.rollups import ReconcileReport, rollups_reconcile


class Command(BaseCommand):
    help = (
        "Drain the usage streams into Postgres (every event exactly once), bring the "
        "top-user rollups up to date and check the rollups of the hours it wrote against "
        "the raw events: what Celery beat runs every few seconds (and every minute). With "
        "--follow it keeps draining until stopped (Ctrl-C, SIGTERM) or idle for "
        "--stop-when-idle seconds."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--follow", action="store_true", help="keep draining")
        parser.add_argument(
            "--interval", type=float, default=1.0, help="seconds between drains with --follow"
        )
        parser.add_argument(
            "--stop-when-idle",
            type=float,
            default=None,
            metavar="SECONDS",
            help="with --follow: stop once nothing arrived for this long",
        )
        parser.add_argument(
            "--max-seconds", type=float, default=None, help="with --follow: stop after this long"
        )
        parser.add_argument(
            "--batch-size", type=int, default=None, help="events per stream per batch"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        self._stopping = False
        if options["follow"]:
            signal.signal(signal.SIGTERM, self._stop)
        source = source_default()
        started = idle_since = time.monotonic()
        try:
            while True:
                report = drain(source=source, max_batches=1000, batch_size=options["batch_size"])
                if report.batches:
                    user_rollups_fold()
                checked = self._reconcile(report)
                if report.batches or not options["follow"]:
                    self.stdout.write(self._summary(report, checked))
                if report.batches:
                    idle_since = time.monotonic()
                if not options["follow"] or self._stopping:
                    break
                now = time.monotonic()
                idle = options["stop_when_idle"]
                if idle is not None and now - idle_since >= idle:
                    break
                limit = options["max_seconds"]
                if limit is not None and now - started >= limit:
                    break
                time.sleep(options["interval"])
        except KeyboardInterrupt:
            pass
        finally:
            source.close()

    def _stop(self, signum: int, frame: object) -> None:
        self._stopping = True

    @staticmethod
    def _reconcile(report: DrainReport) -> ReconcileReport | None:
        hours = [hour for _, hour in report.written.hours]
        if not hours:
            return None
        return rollups_reconcile(start=min(hours), end=max(hours) + dt.timedelta(hours=1))

    @staticmethod
    def _summary(report: DrainReport, checked: ReconcileReport | None) -> str:
        values = report.as_dict()
        text = (
            f"drained {values['read']} stream entries in {values['batches']} batches "
            f"({values['seconds']} s): {values['inserted']} new events, "
            f"{values['amended']} commits applied, {values['duplicates']} already stored, "
            f"{values['pending_commits']} commits waiting for their check, "
            f"{values['denied_buckets']} denied counters, {values['adjustments']} adjustments"
        )
        if checked is not None:
            text += (
                f"; rollups of {checked.buckets} buckets checked against raw events, "
                f"{checked.repaired} repaired"
            )
        return text
