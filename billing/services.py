"""Writes of billing: price history, statements, budget alerts, retention.

Usage itself is written by the drain (``billing.ingest``) and checked against raw events by
``billing.rollups``. Every function here is safe to run again: a second run finds its work
done and changes nothing.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import F, Q, Sum
from django.utils import timezone

from billing.ingest import EPOCH, from_us, ledger_lock, month_of, next_month, user_rollups_fold
from billing.models import (
    BudgetAlert,
    DailyRollup,
    HourlyRollup,
    LedgerState,
    ModelPrice,
    MonthlyRollup,
    PendingCommit,
    Statement,
    StatementAdjustment,
    UsageEvent,
)
from limits.models import AIModel, Budget, BudgetPeriod, Tenant

logger = logging.getLogger(__name__)

ZERO = Decimal(0)
CENT = Decimal("0.01")


def billing_now() -> dt.datetime:
    """Now, as the limiter sees it: tests move both with ``QUOTA_TEST_NOW_US``."""
    from limits.backends import test_clock_us

    now_us = test_clock_us()
    return timezone.now() if now_us is None else from_us(now_us)


def round_money(amount: Decimal) -> Decimal:
    """The one rounding of money: to cents, half to even (banker's rounding)."""
    return amount.quantize(CENT, rounding=ROUND_HALF_EVEN)


# -- prices ------------------------------------------------------------------------------
def model_price_seed(*, model_id: str) -> ModelPrice | None:
    """Give a model without price history its current price since the beginning; None
    when the model is unknown."""
    model = AIModel.objects.filter(model_id=model_id).first()
    if model is None:
        logger.error("billing: no price for unknown model %r; its usage costs nothing", model_id)
        return None
    try:
        with transaction.atomic():
            return ModelPrice.objects.create(
                model_id=model_id,
                input_price_per_1k=model.input_price_per_1k,
                output_price_per_1k=model.output_price_per_1k,
                valid_from=EPOCH,
            )
    except IntegrityError:
        return ModelPrice.objects.filter(model_id=model_id, valid_until__isnull=True).first()


def model_price_record(
    *, model: AIModel, previous: AIModel | None = None, at: dt.datetime | None = None
) -> ModelPrice | None:
    """Record the model's prices from ``at`` (now) on, closing the price in force.

    Called by ``limits.services.object_save`` in the transaction that saves the model, so
    every price change made in admin or by a policy file is recorded. ``previous`` is the
    model as stored before: a model that has no history yet keeps its old price for
    everything before ``at``. Returns the new price, or None when nothing changed.
    """
    at = at or billing_now()
    model_id = model.model_id
    new_prices = (model.input_price_per_1k, model.output_price_per_1k)
    current = (
        ModelPrice.objects.select_for_update()
        .filter(model_id=model_id, valid_until__isnull=True)
        .first()
    )
    if current is None:
        latest = ModelPrice.objects.filter(model_id=model_id).order_by("-valid_from").first()
        start = EPOCH
        if latest is not None and latest.valid_until is not None:
            start = max(latest.valid_until, at)
        elif (
            previous is not None
            and previous.model_id == model_id
            and (previous.input_price_per_1k, previous.output_price_per_1k) != new_prices
            and at > EPOCH
        ):
            ModelPrice.objects.create(
                model_id=model_id,
                input_price_per_1k=previous.input_price_per_1k,
                output_price_per_1k=previous.output_price_per_1k,
                valid_from=EPOCH,
                valid_until=at,
            )
            start = at
        return ModelPrice.objects.create(
            model_id=model_id,
            input_price_per_1k=new_prices[0],
            output_price_per_1k=new_prices[1],
            valid_from=start,
        )
    if (current.input_price_per_1k, current.output_price_per_1k) == new_prices:
        return None
    if at <= current.valid_from:
        # Not in force yet (the clock has not passed its start): correct it in place.
        current.input_price_per_1k, current.output_price_per_1k = new_prices
        current.save(update_fields=["input_price_per_1k", "output_price_per_1k"])
        return current
    current.valid_until = at
    current.save(update_fields=["valid_until"])
    return ModelPrice.objects.create(
        model_id=model_id,
        input_price_per_1k=new_prices[0],
        output_price_per_1k=new_prices[1],
        valid_from=at,
    )


# -- statements --------------------------------------------------------------------------
@dataclass(frozen=True)
class StatementLine:
    model_id: str
    price_id: int
    input_price_per_1k: Decimal
    output_price_per_1k: Decimal
    requests: int
    estimated_requests: int
    input_tokens: int
    output_tokens: int
    amount: Decimal  # exact

    def as_json(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "price_id": self.price_id,
            "input_price_per_1k": str(self.input_price_per_1k),
            "output_price_per_1k": str(self.output_price_per_1k),
            "requests": self.requests,
            "estimated_requests": self.estimated_requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "amount": str(self.amount),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StatementLine:
        return cls(
            model_id=data["model_id"],
            price_id=int(data["price_id"]),
            input_price_per_1k=Decimal(data["input_price_per_1k"]),
            output_price_per_1k=Decimal(data["output_price_per_1k"]),
            requests=int(data["requests"]),
            estimated_requests=int(data["estimated_requests"]),
            input_tokens=int(data["input_tokens"]),
            output_tokens=int(data["output_tokens"]),
            amount=Decimal(data["amount"]),
        )


@dataclass
class MonthlyStatement:
    """A tenant's statement for one month: finalised (as sent) or a live draft."""

    tenant: Tenant
    month: dt.date
    currency: str
    lines: list[StatementLine]
    adjustments: list[StatementAdjustment] = field(default_factory=list)
    finalised_at: dt.datetime | None = None

    @property
    def is_final(self) -> bool:
        return self.finalised_at is not None

    @property
    def subtotal(self) -> Decimal:
        return sum((line.amount for line in self.lines), ZERO)

    @property
    def adjustments_total(self) -> Decimal:
        return sum((item.cost for item in self.adjustments), ZERO)

    @property
    def total(self) -> Decimal:
        return round_money(self.subtotal + self.adjustments_total)

    @property
    def requests(self) -> int:
        return sum(line.requests for line in self.lines)

    @property
    def input_tokens(self) -> int:
        return sum(line.input_tokens for line in self.lines)

    @property
    def output_tokens(self) -> int:
        return sum(line.output_tokens for line in self.lines)


def month_bounds(month: dt.date) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime(month.year, month.month, 1, tzinfo=dt.UTC)
    end_month = next_month(month)
    return start, dt.datetime(end_month.year, end_month.month, 1, tzinfo=dt.UTC)


def statement_lines(*, tenant_id: int, month: dt.date) -> list[StatementLine]:
    """One line per model and price from the month's hourly rollups."""
    start, end = month_bounds(month)
    grouped = (
        HourlyRollup.objects.filter(tenant_id=tenant_id, hour__gte=start, hour__lt=end)
        .values("model_id", "price_id")
        .annotate(
            requests_sum=Sum("requests"),
            estimated_sum=Sum("estimated_requests"),
            input_sum=Sum("input_tokens"),
            output_sum=Sum("output_tokens"),
            cost_sum=Sum("cost"),
        )
        .filter(requests_sum__gt=0)
        .order_by("model_id", "price_id")
    )
    rows = list(grouped)
    prices = ModelPrice.objects.in_bulk({row["price_id"] for row in rows if row["price_id"]})
    lines = []
    for row in rows:
        price = prices.get(row["price_id"])
        lines.append(
            StatementLine(
                model_id=row["model_id"],
                price_id=row["price_id"],
                input_price_per_1k=price.input_price_per_1k if price else ZERO,
                output_price_per_1k=price.output_price_per_1k if price else ZERO,
                requests=row["requests_sum"],
                estimated_requests=row["estimated_sum"],
                input_tokens=row["input_sum"],
                output_tokens=row["output_sum"],
                amount=row["cost_sum"],
            )
        )
    return lines


def statement_for(*, tenant: Tenant, month: dt.date) -> MonthlyStatement:
    """The statement as sent when finalised, else the draft from the rollups as they are."""
    month = month_of(month)
    adjustments = list(
        StatementAdjustment.objects.filter(tenant_id=tenant.pk, statement_month=month).order_by(
            "usage_month", "created_at", "id"
        )
    )
    stored = Statement.objects.filter(tenant_id=tenant.pk, month=month).first()
    if stored is not None:
        return MonthlyStatement(
            tenant=tenant,
            month=month,
            currency=stored.currency,
            lines=[StatementLine.from_json(line) for line in stored.lines],
            adjustments=adjustments,
            finalised_at=stored.finalised_at,
        )
    return MonthlyStatement(
        tenant=tenant,
        month=month,
        currency=settings.BILLING_CURRENCY,
        lines=statement_lines(tenant_id=tenant.pk, month=month),
        adjustments=adjustments,
    )


def statement_finalise(*, tenant: Tenant, month: dt.date) -> Statement:
    """Freeze a tenant's statement for a month; usage of that month written later lands
    on the next open statement as an adjustment. Finalising again returns the same one."""
    month = month_of(month)
    with transaction.atomic():
        ledger_lock()  # no drain writes between reading the rollups and storing them
        stored = Statement.objects.filter(tenant_id=tenant.pk, month=month).first()
        if stored is not None:
            return stored
        draft = statement_for(tenant=tenant, month=month)
        return Statement.objects.create(
            tenant_id=tenant.pk,
            month=month,
            currency=draft.currency,
            lines=[line.as_json() for line in draft.lines],
            subtotal=draft.subtotal,
            adjustments_total=draft.adjustments_total,
            total=draft.total,
            finalised_at=timezone.now(),
        )


def statements_finalise_due(*, now: dt.datetime | None = None) -> list[Statement]:
    """Finalise the last month's statements once its grace period has passed: every tenant
    with usage or adjustments in it."""
    now = now or billing_now()
    grace = dt.timedelta(hours=settings.BILLING_STATEMENT_GRACE_HOURS)
    month = month_of((now - grace).date())
    previous = month_of(month - dt.timedelta(days=1))
    start, end = month_bounds(previous)
    tenant_ids = set(
        HourlyRollup.objects.filter(hour__gte=start, hour__lt=end, requests__gt=0)
        .values_list("tenant_id", flat=True)
        .distinct()
    )
    tenant_ids |= set(
        StatementAdjustment.objects.filter(statement_month=previous).values_list(
            "tenant_id", flat=True
        )
    )
    tenant_ids -= set(Statement.objects.filter(month=previous).values_list("tenant_id", flat=True))
    finalised = []
    for tenant in Tenant.objects.filter(pk__in=tenant_ids).order_by("pk"):
        finalised.append(statement_finalise(tenant=tenant, month=previous))
    return finalised


# -- budgets -----------------------------------------------------------------------------
@dataclass(frozen=True)
class BudgetUse:
    budget: Budget
    period_start: dt.date
    period_end: dt.date  # exclusive
    used_tokens: int
    used_cost: Decimal

    @property
    def token_percent(self) -> Decimal | None:
        if self.budget.token_limit is None:
            return None
        if self.budget.token_limit == 0:
            return Decimal(100) if self.used_tokens else ZERO
        return Decimal(self.used_tokens * 100) / Decimal(self.budget.token_limit)

    @property
    def cost_percent(self) -> Decimal | None:
        limit = self.budget.cost_limit
        if limit is None:
            return None
        if limit == 0:
            return Decimal(100) if self.used_cost else ZERO
        return self.used_cost * 100 / limit

    @property
    def percent(self) -> Decimal:
        values = [value for value in (self.token_percent, self.cost_percent) if value is not None]
        return max(values, default=ZERO)


def period_of(period: str, day: dt.date) -> tuple[dt.date, dt.date]:
    if period == BudgetPeriod.DAY:
        return day, day + dt.timedelta(days=1)
    return month_of(day), next_month(month_of(day))


def budget_usage(*, budgets: list[Budget], now: dt.datetime | None = None) -> list[BudgetUse]:
    """How much of each budget its tenant has used in the current period (from the
    rollups; two queries whatever the number of budgets)."""
    now = now or billing_now()
    today = now.date()
    tenant_ids = {budget.tenant_id for budget in budgets}
    usage: dict[tuple[str, int], tuple[int, Decimal]] = {}
    for period in (BudgetPeriod.DAY, BudgetPeriod.MONTH):
        if not any(budget.period == period for budget in budgets):
            continue
        start, end = period_of(period, today)
        if period == BudgetPeriod.DAY:
            rollups: Any = DailyRollup.objects.filter(tenant_id__in=tenant_ids, day=start)
        else:
            rollups = MonthlyRollup.objects.filter(tenant_id__in=tenant_ids, month=start)
        for row in (
            rollups.values("tenant_id")
            .annotate(tokens=Sum(F("input_tokens") + F("output_tokens")), cost=Sum("cost"))
            .order_by()
        ):
            usage[(period, row["tenant_id"])] = (row["tokens"] or 0, row["cost"] or ZERO)
    result = []
    for budget in budgets:
        start, end = period_of(budget.period, today)
        tokens, cost = usage.get((budget.period, budget.tenant_id), (0, ZERO))
        result.append(BudgetUse(budget, start, end, tokens, cost))
    return result


def budget_alerts_check(*, now: dt.datetime | None = None) -> list[BudgetAlert]:
    """Record every threshold crossed in the current period, once; then mail those not
    mailed yet. Returns the alerts recorded by this run."""
    now = now or billing_now()
    budgets = [
        budget
        for budget in Budget.objects.select_related("tenant").order_by("pk")
        if budget.alert_thresholds
    ]
    crossed = []
    for use in budget_usage(budgets=budgets, now=now):
        percent = use.percent
        for threshold in sorted({int(value) for value in use.budget.alert_thresholds}):
            if percent >= threshold:
                crossed.append(
                    BudgetAlert(
                        tenant_id=use.budget.tenant_id,
                        budget=use.budget,
                        period=use.budget.period,
                        period_start=use.period_start,
                        threshold=threshold,
                        used_tokens=use.used_tokens,
                        used_cost=use.used_cost,
                        token_limit=use.budget.token_limit,
                        cost_limit=use.budget.cost_limit,
                    )
                )
    recorded: list[BudgetAlert] = []
    if crossed:
        known = set(
            BudgetAlert.objects.filter(
                budget_id__in={alert.budget_id for alert in crossed},
                period_start__in={alert.period_start for alert in crossed},
            ).values_list("budget_id", "period_start", "threshold")
        )
        fresh = [
            alert
            for alert in crossed
            if (alert.budget_id, alert.period_start, alert.threshold) not in known
        ]
        for alert in fresh:
            try:
                with transaction.atomic():
                    alert.save(force_insert=True)
            except IntegrityError:
                continue  # another run recorded it first
            recorded.append(alert)
    budget_alerts_send()
    return recorded


def alert_recipients() -> list[str]:
    if settings.BILLING_ALERT_EMAILS:
        return list(settings.BILLING_ALERT_EMAILS)
    users = (
        get_user_model()
        .objects.filter(is_active=True)
        .filter(Q(is_superuser=True) | Q(groups__name="finance"))
    )
    return sorted({user.email for user in users if user.email})


def budget_alerts_send() -> int:
    """Mail every recorded alert not mailed yet; returns how many were sent."""
    sent = 0
    recipients = alert_recipients()
    with transaction.atomic():
        unsent = list(
            BudgetAlert.objects.select_for_update(skip_locked=True)
            .filter(sent_at__isnull=True)
            .select_related("tenant", "budget")
            .order_by("created_at", "pk")[:100]
        )
        for alert in unsent:
            if recipients:
                send_mail(
                    subject=_alert_subject(alert),
                    message=_alert_body(alert),
                    from_email=None,
                    recipient_list=recipients,
                )
            alert.sent_at = timezone.now()
            alert.recipients = ", ".join(recipients)
            alert.save(update_fields=["sent_at", "recipients"])
            sent += 1
    return sent


def _alert_subject(alert: BudgetAlert) -> str:
    return (
        f"Budget alert: {alert.tenant.slug} reached {alert.threshold}% of its "
        f"{alert.period}ly budget"
    )


def _alert_body(alert: BudgetAlert) -> str:
    currency = settings.BILLING_CURRENCY
    lines = [
        f"Tenant {alert.tenant.name} ({alert.tenant.slug}) has used {alert.threshold}% or more "
        f"of its {alert.period}ly budget for the period starting {alert.period_start:%Y-%m-%d}.",
        "",
    ]
    if alert.token_limit is not None:
        lines.append(f"Tokens: {alert.used_tokens:,} of {alert.token_limit:,}")
    if alert.cost_limit is not None:
        lines.append(f"Cost: {round_money(alert.used_cost)} of {alert.cost_limit} {currency}")
    kind = "hard: checks are denied once it is spent" if alert.budget.is_hard else "soft"
    lines += ["", f"The budget is {kind}."]
    return "\n".join(lines)


# -- retention ---------------------------------------------------------------------------
def usage_retention_run(
    *, now: dt.datetime | None = None, chunk: int = 10_000, max_chunks: int = 100
) -> int:
    """Delete raw usage events older than ``BILLING_RAW_RETENTION_DAYS`` whose hours the
    rollups were checked against; rollups are kept. Returns how many were deleted."""
    # The top-user rollups read new events from the table when they are folded in: a late
    # event past retention must be in them before it goes.
    user_rollups_fold()
    now = now or billing_now()
    reconciled = LedgerState.objects.filter(name="reconciled").values_list("value", flat=True)
    through = reconciled.first()
    if through is None:
        return 0
    cutoff = min(now - dt.timedelta(days=settings.BILLING_RAW_RETENTION_DAYS), through)
    deleted = 0
    for _ in range(max_chunks):
        ids = list(
            UsageEvent.objects.filter(occurred_at__lt=cutoff)
            .order_by("occurred_at")
            .values_list("pk", flat=True)[:chunk]
        )
        if not ids:
            break
        deleted += UsageEvent.objects.filter(pk__in=ids).delete()[0]
    stale = PendingCommit.objects.filter(occurred_at__lt=cutoff)
    for pending in stale[:100]:
        logger.error(
            "billing: dropping the commit of request %s (tenant %s): its check never arrived",
            pending.request_id,
            pending.tenant_id,
        )
    stale.delete()
    return deleted
