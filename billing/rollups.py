"""Rollups checked against raw events.

The drain keeps the hourly, daily and monthly rollups up to date in the same transaction
that writes the raw events, adding exactly what it inserted or amended (the top-user
rollups follow when ``user_rollups_fold`` runs). ``rollups_reconcile``
recomputes hours from the raw events and repairs any bucket that differs (logging it), so
the rollups are also correct by construction for every hour it covers. It marks how far it
got: raw events are deleted (after ``BILLING_RAW_RETENTION_DAYS``) only below that mark.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q, Sum
from django.db.models.functions import TruncHour

from billing.ingest import EPOCH, HOUR_US, RollupDeltas, ledger_lock, rollup_upsert, to_us
from billing.models import HourlyRollup, LedgerState, UsageEvent

logger = logging.getLogger(__name__)

ZERO = Decimal(0)
FIELDS = ("requests", "input_tokens", "output_tokens", "estimated_requests", "cost")


def floor_hour(moment: dt.datetime) -> dt.datetime:
    return EPOCH + dt.timedelta(hours=to_us(moment) // HOUR_US)


@dataclass(frozen=True)
class ReconcileReport:
    start: dt.datetime
    end: dt.datetime
    buckets: int
    repaired: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "buckets": self.buckets,
            "repaired": self.repaired,
        }


def rollups_reconcile(
    *, start: dt.datetime, end: dt.datetime, now: dt.datetime | None = None
) -> ReconcileReport:
    """Recompute the hourly rollups of ``[start, end)`` from the raw events; repair every
    bucket that differs (and the daily rollups with it).

    Hours whose raw events retention may already have deleted are never recomputed.
    """
    from billing.services import billing_now

    now = now or billing_now()
    # Retention deletes at the horizon; keep a day clear of it.
    oldest = floor_hour(now - dt.timedelta(days=settings.BILLING_RAW_RETENTION_DAYS - 1))
    start = max(floor_hour(start), oldest)
    end = floor_hour(end - dt.timedelta(microseconds=1)) + dt.timedelta(hours=1)
    if end <= start:
        return ReconcileReport(start, start, 0, 0)
    repaired = 0
    with transaction.atomic():
        ledger_lock()
        expected: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        for row in (
            UsageEvent.objects.filter(occurred_at__gte=start, occurred_at__lt=end)
            .annotate(hour=TruncHour("occurred_at", tzinfo=dt.UTC))
            .values("hour", "tenant_id", "model_id", "price_id")
            .annotate(
                requests=Count("pk"),
                input_sum=Sum("billed_input_tokens"),
                output_sum=Sum("billed_output_tokens"),
                estimated=Count("pk", filter=Q(is_estimate=True)),
                cost_sum=Sum("cost"),
            )
            .order_by()
        ):
            key = (row["hour"], row["tenant_id"], row["model_id"], row["price_id"])
            expected[key] = (
                row["requests"],
                row["input_sum"] or 0,
                row["output_sum"] or 0,
                row["estimated"],
                row["cost_sum"] or ZERO,
            )
        stored: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        for row in HourlyRollup.objects.filter(hour__gte=start, hour__lt=end).values(
            "hour", "tenant_id", "model_id", "price_id", *FIELDS
        ):
            key = (row["hour"], row["tenant_id"], row["model_id"], row["price_id"])
            stored[key] = tuple(row[name] for name in FIELDS)
        zero = (0, 0, 0, 0, ZERO)
        fixes = []
        deltas = RollupDeltas()
        for key in expected.keys() | stored.keys():
            want = expected.get(key, zero)
            have = stored.get(key, zero)
            if want == have:
                continue
            repaired += 1
            logger.error(
                "billing: rollup %s differed from its raw events: stored %s, raw %s; repaired",
                key,
                have,
                want,
            )
            fixes.append((*key, *want))
            deltas.add_correction(
                to_us(key[0]) // HOUR_US,
                key[1],
                key[2],
                [new - old for new, old in zip(want, have, strict=True)],
            )
        rollup_upsert(
            HourlyRollup, ("hour", "tenant_id", "model_id", "price_id"), FIELDS, fixes, add=False
        )
        deltas.apply()
        through = min(end, floor_hour(now))
        marker, _ = LedgerState.objects.get_or_create(name="reconciled")
        if marker.value is None or through > marker.value:
            marker.value = through
            marker.save(update_fields=["value"])
    return ReconcileReport(start, end, len(expected), repaired)


def rollups_reconcile_recent(*, hours: int = 3, now: dt.datetime | None = None) -> ReconcileReport:
    """Check the last ``hours`` hours and the current one."""
    from billing.services import billing_now

    now = now or billing_now()
    current = floor_hour(now)
    return rollups_reconcile(
        start=current - dt.timedelta(hours=hours), end=current + dt.timedelta(hours=1), now=now
    )
