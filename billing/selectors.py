"""Reads for the finance pages and exports, all from the rollups (never the raw events), in
a fixed number of queries whatever the number of tenants, models or days."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.db.models import F, Q, Sum
from django.db.models.functions import TruncMonth

from billing.ingest import month_of, next_month
from billing.models import (
    BudgetAlert,
    DailyRollup,
    DailyUserRollup,
    MonthlyRollup,
    MonthlyUserRollup,
    Statement,
)
from billing.services import BudgetUse, budget_usage, period_of
from limits.models import Budget, BudgetPeriod, Tenant

ZERO = Decimal(0)
TOP_SERIES = 6
TOP_ROWS = 10
BURN_CHARTS = 6


@dataclass(frozen=True)
class Period:
    """A range of whole UTC days, both ends included."""

    start: dt.date
    end: dt.date

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1

    @property
    def bucket(self) -> str:
        return "day" if self.days <= 62 else "month"

    @property
    def whole_months(self) -> tuple[dt.date, dt.date]:
        """The first and the last-plus-one month lying wholly inside (maybe none)."""
        first = month_of(self.start)
        if first != self.start:
            first = next_month(first)
        after = month_of(self.end + dt.timedelta(days=1))
        return first, max(first, after)

    def buckets(self) -> list[dt.date]:
        if self.bucket == "day":
            return [self.start + dt.timedelta(days=index) for index in range(self.days)]
        months = []
        month = month_of(self.start)
        while month <= self.end:
            months.append(month)
            month = next_month(month)
        return months

    def label(self, bucket: dt.date) -> str:
        if self.bucket == "month":
            return f"{bucket:%b %Y}"
        return f"{bucket:%b} {bucket.day}"


@dataclass
class Totals:
    requests: int = 0
    denied: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    estimated_requests: int = 0
    cost: Decimal = ZERO

    @classmethod
    def of(cls, row: dict[str, Any]) -> Totals:
        return cls(
            requests=row.get("requests_sum") or 0,
            denied=row.get("denied_sum") or 0,
            input_tokens=row.get("input_sum") or 0,
            output_tokens=row.get("output_sum") or 0,
            estimated_requests=row.get("estimated_sum") or 0,
            cost=row.get("cost_sum") or ZERO,
        )

    def add(self, other: Totals) -> None:
        self.requests += other.requests
        self.denied += other.denied
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.estimated_requests += other.estimated_requests
        self.cost += other.cost

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def deny_rate(self) -> float:
        checks = self.requests + self.denied
        return 100.0 * self.denied / checks if checks else 0.0


SUMS = {
    "requests_sum": Sum("requests"),
    "denied_sum": Sum("denied"),
    "input_sum": Sum("input_tokens"),
    "output_sum": Sum("output_tokens"),
    "estimated_sum": Sum("estimated_requests"),
    "cost_sum": Sum("cost"),
}


@dataclass
class Ranked:
    key: Any
    label: str
    totals: Totals
    share: float = 0.0  # of the period's spend, percent
    extra: str = ""


@dataclass
class TimeSeries:
    labels: list[str]
    series: list[tuple[str, list[Decimal]]]  # label, one value per bucket


@dataclass
class BudgetRow:
    use: BudgetUse
    tenant_label: str
    burn: TimeSeries | None = None


@dataclass
class Dashboard:
    period: Period
    totals: Totals
    tenants: list[Ranked]
    models: list[Ranked]
    users: list[Ranked]
    spend_by_tenant: TimeSeries
    spend_by_model: TimeSeries
    deny_rate: TimeSeries
    budgets: list[BudgetRow]
    alerts: list[BudgetAlert] = field(default_factory=list)


def _grouped(
    period: Period,
    daily: type[Any],
    monthly: type[Any],
    fields: tuple[str, ...],
    sums: dict[str, Any],
) -> list[dict[str, Any]]:
    """Rollups of ``period`` summed per ``fields`` (which may include ``bucket``: the day,
    or the month for long periods), in one query. A long period reads whole months from
    the monthly rollups and only its partial first and last months from the daily ones."""
    if period.bucket == "day":
        return list(
            daily.objects.filter(day__gte=period.start, day__lte=period.end)
            .annotate(bucket=F("day"))
            .values(*fields)
            .annotate(**sums)
            .order_by()
        )
    first, after = period.whole_months
    edges = Q(day__gte=period.start, day__lt=first) | Q(day__gte=after, day__lte=period.end)
    days = (
        daily.objects.filter(edges)
        .annotate(bucket=TruncMonth("day"))
        .values(*fields)
        .annotate(**sums)
        .order_by()
    )
    months = (
        monthly.objects.filter(month__gte=first, month__lt=after)
        .annotate(bucket=F("month"))
        .values(*fields)
        .annotate(**sums)
        .order_by()
    )
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in months.union(days, all=True):
        key = tuple(_as_date(row[name]) if name == "bucket" else row[name] for name in fields)
        found = merged.get(key)
        if found is None:
            merged[key] = dict(row)
            continue
        for name in sums:
            found[name] = (found[name] or 0) + (row[name] or 0)
    return list(merged.values())


def _as_date(value: dt.date | dt.datetime) -> dt.date:
    return value.date() if isinstance(value, dt.datetime) else value


def _series(
    rows: list[tuple[dt.date, Any, Decimal]],
    period: Period,
    ranked: list[Ranked],
    labels: dict[Any, str],
) -> TimeSeries:
    """Spend per bucket of the top series by spend, the rest summed as "others"."""
    buckets = period.buckets()
    position = {bucket: index for index, bucket in enumerate(buckets)}
    top = [item.key for item in ranked[:TOP_SERIES]]
    values: dict[Any, list[Decimal]] = {key: [ZERO] * len(buckets) for key in top}
    others = [ZERO] * len(buckets)
    for bucket, key, cost in rows:
        index = position.get(_as_date(bucket))
        if index is None:
            continue
        target = values.get(key, others)
        target[index] += cost or ZERO
    series = [(labels.get(key, str(key)), values[key]) for key in top]
    if any(others):
        series.append(("others", others))
    return TimeSeries([period.label(bucket) for bucket in buckets], series)


def dashboard_for(*, period: Period, today: dt.date) -> Dashboard:
    """Everything the finance overview shows for ``period``; budgets as of ``today``."""
    tenant_labels = dict(Tenant.objects.values_list("pk", "slug"))

    # One pass over the rollups per dimension: totals per tenant and per model fall out of
    # the per-bucket rows the charts need.
    per_tenant: dict[Any, Totals] = defaultdict(Totals)
    by_tenant: list[tuple[dt.date, Any, Decimal]] = []
    checks: dict[dt.date, list[int]] = defaultdict(lambda: [0, 0])
    for row in _grouped(period, DailyRollup, MonthlyRollup, ("bucket", "tenant_id"), SUMS):
        item = Totals.of(row)
        per_tenant[row["tenant_id"]].add(item)
        bucket = _as_date(row["bucket"])
        by_tenant.append((bucket, row["tenant_id"], item.cost))
        checks[bucket][0] += item.requests
        checks[bucket][1] += item.denied
    per_model: dict[Any, Totals] = defaultdict(Totals)
    by_model: list[tuple[dt.date, Any, Decimal]] = []
    for row in _grouped(period, DailyRollup, MonthlyRollup, ("bucket", "model_id"), SUMS):
        item = Totals.of(row)
        per_model[row["model_id"]].add(item)
        by_model.append((_as_date(row["bucket"]), row["model_id"], item.cost))

    totals = Totals()
    tenants: list[Ranked] = []
    for key, item in per_tenant.items():
        totals.add(item)
        tenants.append(Ranked(key, tenant_labels.get(key, f"#{key}"), item))
    models = [Ranked(key, key, item) for key, item in per_model.items()]
    for ranking in (tenants, models):
        ranking.sort(key=lambda item: (-item.totals.cost, -item.totals.requests, item.label))
        for item in ranking:
            item.share = float(100 * item.totals.cost / totals.cost) if totals.cost else 0.0

    buckets = period.buckets()
    deny = TimeSeries(
        [period.label(bucket) for bucket in buckets],
        [
            (
                "denied checks",
                [_rate(*checks[bucket]) if bucket in checks else ZERO for bucket in buckets],
            )
        ],
    )

    users = []
    user_sums = {
        "requests_sum": Sum("requests"),
        "input_sum": Sum("input_tokens"),
        "output_sum": Sum("output_tokens"),
        "cost_sum": Sum("cost"),
    }
    if period.bucket == "day":
        user_rows = list(
            DailyUserRollup.objects.filter(day__gte=period.start, day__lte=period.end)
            .values("tenant_id", "user_id")
            .annotate(**user_sums)
            .order_by("-cost_sum", "-requests_sum", "tenant_id", "user_id")[:TOP_ROWS]
        )
    else:
        user_rows = _grouped(
            period, DailyUserRollup, MonthlyUserRollup, ("tenant_id", "user_id"), user_sums
        )
        user_rows.sort(
            key=lambda row: (
                -(row["cost_sum"] or 0),
                -(row["requests_sum"] or 0),
                row["tenant_id"],
                row["user_id"],
            )
        )
    for row in user_rows[:TOP_ROWS]:
        tenant = tenant_labels.get(row["tenant_id"], f"#{row['tenant_id']}")
        users.append(
            Ranked((row["tenant_id"], row["user_id"]), row["user_id"], Totals.of(row), 0.0, tenant)
        )
        if totals.cost:
            users[-1].share = float(100 * users[-1].totals.cost / totals.cost)

    return Dashboard(
        period=period,
        totals=totals,
        tenants=tenants,
        models=models,
        users=users,
        spend_by_tenant=_series(by_tenant, period, tenants, tenant_labels),
        spend_by_model=_series(by_model, period, models, {}),
        deny_rate=deny,
        budgets=budgets_for(today=today, tenant_labels=tenant_labels),
        alerts=list(BudgetAlert.objects.select_related("tenant").order_by("-created_at")[:8]),
    )


def _rate(requests: int, denied: int) -> Decimal:
    checks = requests + denied
    return Decimal(100 * denied) / Decimal(checks) if checks else ZERO


def budgets_for(*, today: dt.date, tenant_labels: dict[int, str]) -> list[BudgetRow]:
    """Each budget's use in its current period, most used first, with the month's
    burn-down (remaining per day) for monthly budgets."""
    budgets = list(Budget.objects.order_by("tenant_id", "period"))
    if not budgets:
        return []
    now = dt.datetime(today.year, today.month, today.day, 12, tzinfo=dt.UTC)
    rows = [
        BudgetRow(use, tenant_labels.get(use.budget.tenant_id, f"#{use.budget.tenant_id}"))
        for use in budget_usage(budgets=budgets, now=now)
    ]
    rows.sort(key=lambda row: (-row.use.percent, row.tenant_label, row.use.budget.period))
    # Burn-down charts for the most used monthly budgets only: a page, not a wall.
    monthly = [row for row in rows if row.use.budget.period == BudgetPeriod.MONTH][:BURN_CHARTS]
    if monthly:
        start, end = period_of(BudgetPeriod.MONTH, today)
        daily: dict[tuple[int, dt.date], tuple[int, Decimal]] = {}
        for row in (
            DailyRollup.objects.filter(
                day__gte=start,
                day__lt=end,
                tenant_id__in={row.use.budget.tenant_id for row in monthly},
            )
            .values("tenant_id", "day")
            .annotate(tokens=Sum(F("input_tokens") + F("output_tokens")), cost=Sum("cost"))
            .order_by()
        ):
            daily[(row["tenant_id"], row["day"])] = (row["tokens"] or 0, row["cost"] or ZERO)
        days = [start + dt.timedelta(days=index) for index in range((end - start).days)]
        for row in monthly:
            row.burn = _burn_down(row.use, days, today, daily)
    return rows


def _burn_down(
    use: BudgetUse,
    days: list[dt.date],
    today: dt.date,
    daily: dict[tuple[int, dt.date], tuple[int, Decimal]],
) -> TimeSeries:
    """Percent of the budget left at the end of each day so far, against an even pace."""
    budget = use.budget
    by_cost = use.cost_percent is not None and (
        use.token_percent is None or use.cost_percent >= use.token_percent
    )
    limit = Decimal(budget.cost_limit if by_cost else budget.token_limit or 0)
    used = ZERO
    left: list[Decimal | None] = []
    for day in days:
        if day > today:
            left.append(None)
            continue
        tokens, cost = daily.get((budget.tenant_id, day), (0, ZERO))
        used += cost if by_cost else Decimal(tokens)
        left.append(max(ZERO, 100 - 100 * used / limit) if limit else ZERO)
    pace = [
        Decimal(100) - Decimal(100 * (index + 1)) / Decimal(len(days)) for index in range(len(days))
    ]
    metric = "cost" if by_cost else "tokens"
    return TimeSeries(
        [f"{day:%b} {day.day}" for day in days],
        [(f"{metric} left", left), ("even pace", pace)],
    )


# -- statements and exports ----------------------------------------------------------
@dataclass(frozen=True)
class StatementListRow:
    tenant_id: int
    slug: str
    name: str
    requests: int
    cost: Decimal
    finalised_at: dt.datetime | None
    total: Decimal | None


def statements_for_month(*, month: dt.date) -> list[StatementListRow]:
    """Every tenant with usage in ``month`` or a finalised statement for it."""
    month = month_of(month)
    usage = {
        row["tenant_id"]: (row["requests_sum"] or 0, row["cost_sum"] or ZERO)
        for row in DailyRollup.objects.filter(day__gte=month, day__lt=next_month(month))
        .values("tenant_id")
        .annotate(requests_sum=Sum("requests"), cost_sum=Sum("cost"))
        .order_by()
    }
    finalised = {
        statement.tenant_id: statement for statement in Statement.objects.filter(month=month)
    }
    tenants = Tenant.objects.filter(pk__in=usage.keys() | finalised.keys()).order_by("slug")
    rows = []
    for tenant in tenants:
        requests, cost = usage.get(tenant.pk, (0, ZERO))
        statement = finalised.get(tenant.pk)
        rows.append(
            StatementListRow(
                tenant.pk,
                tenant.slug,
                tenant.name,
                requests,
                cost,
                statement.finalised_at if statement else None,
                statement.total if statement else None,
            )
        )
    return rows


CSV_COLUMNS = (
    "date",
    "tenant",
    "model",
    "requests",
    "denied",
    "input_tokens",
    "output_tokens",
    "cost",
)


def export_rows(*, start: dt.date, end: dt.date) -> Iterator[tuple[Any, ...]]:
    """One row per day, tenant and model with any checks, in that order (DESIGN.md)."""
    slugs = dict(Tenant.objects.values_list("pk", "slug"))
    rows = (
        DailyRollup.objects.filter(day__gte=start, day__lte=end)
        .values_list(
            "day",
            "tenant_id",
            "model_id",
            "requests",
            "denied",
            "input_tokens",
            "output_tokens",
            "cost",
        )
        .order_by("day", "tenant_id", "model_id")
    )
    buffered: list[tuple[Any, ...]] = []
    current: dt.date | None = None
    for day, tenant_id, *rest in rows.iterator(chunk_size=5000):
        if day != current:
            yield from sorted(buffered, key=lambda row: (row[1], row[2]))
            buffered = []
            current = day
        buffered.append((day.isoformat(), slugs.get(tenant_id, f"#{tenant_id}"), *rest))
    yield from sorted(buffered, key=lambda row: (row[1], row[2]))
