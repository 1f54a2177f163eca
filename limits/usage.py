"""Usage reports: what an inference really used, settled in the limiter's store, or kept in
Postgres while that store is unreachable and applied there once it is back.

The inference has run by the time its usage is reported, so a report must not be lost to a
Redis restart: the API, the middleware and the pass-through all report through
``usage_report``, and ``deferred_usage_apply`` (a task on beat's schedule) applies what was
kept, oldest first.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from django.db import DatabaseError, connection
from django.db.models import F

from limits import engine, metrics
from limits.models import DeferredUsageReport

logger = logging.getLogger(__name__)

# Room for the error text in DeferredUsageReport.last_error.
_ERROR_LENGTH = 300
# How many request ids of unknown reports one warning names.
_NAMED_UNKNOWN = 5


@dataclass(frozen=True)
class UsageOutcome:
    """What became of one usage report."""

    request_id: str
    input_tokens: int
    output_tokens: int
    status: str
    repeated: bool  # reported before: the first report stands
    deferred: bool  # kept in Postgres until the limiter's store is back


@dataclass(frozen=True)
class DeferredApplied:
    """One run of ``deferred_usage_apply``."""

    applied: int  # settled now or before (a repeat): their rows are gone
    unknown: int  # their check's record was lost with Redis: rows gone, estimates stand
    still_unavailable: bool  # the store was still away: the rest waits for the next run
    # Cancellations of checks whose answers were lost (``lost_check_cancel``): admitted by
    # Redis after all, now settled as cancelled; and those Redis never admitted (or whose
    # client had settled them first). Their rows are gone.
    lost_cancelled: int = 0
    lost_nothing_to_cancel: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def usage_report(
    *,
    tenant_id: int,
    request_id: str,
    input_tokens: int,
    output_tokens: int,
    status: str = "ok",
) -> UsageOutcome | None:
    """Settle a check with what it used; None when no allowed check has this request id.

    When the limiter's store is unreachable the report is kept in Postgres instead and the
    outcome says ``deferred``; sent again meanwhile, the first kept report stands. Raises
    ``engine.EngineUnavailable`` only when Postgres cannot keep it either.
    """
    try:
        settlement = engine.commit(tenant_id, request_id, input_tokens, output_tokens, status)
    except engine.EngineUnavailable as unavailable:
        try:
            report, created = _keep(
                tenant_id=tenant_id,
                request_id=request_id,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                status=status,
            )
        except DatabaseError:
            # Neither store can keep it: the caller hears so and reports again.
            raise unavailable from None
        if created:
            metrics.DEFERRED_USAGE_REPORTS.labels("deferred").inc()
        return UsageOutcome(
            request_id=report.request_id,
            input_tokens=report.input_tokens,
            output_tokens=report.output_tokens,
            status=report.status,
            repeated=not created,
            deferred=True,
        )
    if settlement is None:
        return None
    return UsageOutcome(
        request_id=settlement.request_id,
        input_tokens=settlement.input_tokens,
        output_tokens=settlement.output_tokens,
        status=settlement.status,
        repeated=settlement.repeated,
        deferred=False,
    )


def lost_check_cancel(*, tenant_id: int, request_id: str) -> None:
    """Keep a cancellation of a check whose answer was lost while its caller was told it is
    denied (``engine``): applied by ``deferred_usage_apply`` with the kept reports, it
    settles the check as cancelled with no tokens when Redis did run it. A usage report the
    client sends for the same request id takes its place."""
    try:
        _, created = _keep(
            tenant_id=tenant_id,
            request_id=request_id,
            input_tokens=0,
            output_tokens=0,
            status=DeferredUsageReport.Status.CANCELLED,
            lost_answer=True,
        )
    except DatabaseError as error:
        # Postgres is away too: the check stays as Redis decided it, billed if admitted.
        logger.warning(
            "quota: could not keep the cancellation of a check whose answer was lost "
            "(request %s): %s",
            request_id,
            error,
        )
        return
    if created:
        metrics.DEFERRED_USAGE_REPORTS.labels("lost_answer").inc()


def _keep(**fields: Any) -> tuple[DeferredUsageReport, bool]:
    """The kept report of this request (the first one), and whether this call stored it."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _keep_here(fields)
    # Settled by the middleware at the end of an async stream, on its event loop, where
    # Django refuses queries: keep it from a thread of its own, with a connection of its own.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(_keep_in_thread, fields).result()


def _keep_here(fields: dict[str, Any]) -> tuple[DeferredUsageReport, bool]:
    keys = {name: fields.pop(name) for name in ("tenant_id", "request_id")}
    report, created = DeferredUsageReport.objects.get_or_create(**keys, defaults=fields)
    if not created and report.lost_answer and not fields.get("lost_answer"):
        # The client's own report of a check the platform meant to cancel: the client
        # was admitted after all (a repeat of its request id) and ran the inference.
        changed = DeferredUsageReport.objects.filter(pk=report.pk, lost_answer=True).update(
            **fields, lost_answer=False
        )
        if changed:
            report.refresh_from_db()
            return report, True
    return report, created


def _keep_in_thread(fields: dict[str, Any]) -> tuple[DeferredUsageReport, bool]:
    try:
        return _keep_here(fields)
    finally:
        connection.close()


def deferred_usage_apply(*, batch_size: int = 100, max_batches: int = 10) -> DeferredApplied:
    """Apply kept usage reports to the limiter's store, oldest first, deleting each one the
    store settled (now, or before: a repeat) or no longer knows. Stops at the first report
    the store cannot take, leaving it and the rest for the next run.

    Safe to run any number of times and concurrently: a report applied twice is a repeat.
    """
    applied = cancelled = nothing_to_cancel = 0
    unknown_ids: list[str] = []
    still_unavailable = False
    for _ in range(max_batches):
        batch = list(DeferredUsageReport.objects.order_by("received_at", "id")[:batch_size])
        done: list[int] = []
        for report in batch:
            try:
                settlement = engine.commit(
                    report.tenant_id,
                    report.request_id,
                    report.input_tokens,
                    report.output_tokens,
                    report.status,
                )
            except engine.EngineUnavailable as error:
                DeferredUsageReport.objects.filter(pk=report.pk).update(
                    attempts=F("attempts") + 1, last_error=str(error)[:_ERROR_LENGTH]
                )
                still_unavailable = True
                break
            if report.lost_answer:
                if settlement is None or settlement.repeated:
                    nothing_to_cancel += 1  # the usual case: the check never ran
                else:
                    cancelled += 1
            elif settlement is None:
                unknown_ids.append(report.request_id)
            else:
                applied += 1
            done.append(report.pk)
        # Deleted after the batch: a run that dies before this applies them again, as
        # repeats, next time.
        DeferredUsageReport.objects.filter(pk__in=done).delete()
        if still_unavailable or len(batch) < batch_size:
            break
    if applied:
        metrics.DEFERRED_USAGE_REPORTS.labels("applied").inc(applied)
    if cancelled:
        metrics.DEFERRED_USAGE_REPORTS.labels("cancelled").inc(cancelled)
        logger.warning(
            "quota: %d checks admitted by Redis while their callers were told they were "
            "denied (their answers were lost) were settled as cancelled, using nothing",
            cancelled,
        )
    if unknown_ids:
        metrics.DEFERRED_USAGE_REPORTS.labels("unknown").inc(len(unknown_ids))
        # One line a run, not one a report: after a Redis restart without persistence
        # there may be thousands.
        logger.warning(
            "quota: %d deferred usage reports found no check in the limiter's store (its "
            "records were lost with Redis); their estimates stand: %s",
            len(unknown_ids),
            ", ".join(unknown_ids[:_NAMED_UNKNOWN]),
        )
    if still_unavailable:
        metrics.DEFERRED_USAGE_REPORTS.labels("still_unavailable").inc()
    return DeferredApplied(
        applied=applied,
        unknown=len(unknown_ids),
        still_unavailable=still_unavailable,
        lost_cancelled=cancelled,
        lost_nothing_to_cancel=nothing_to_cancel,
    )
