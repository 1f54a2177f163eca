"""Finance pages: the overview, monthly statements and the CSV export.

For members of the ``finance`` group and superusers, read-only; any other signed-in user
gets 403, anyone else the login page.
"""

from __future__ import annotations

import csv
import datetime as dt
import re
from collections.abc import Callable, Iterator
from functools import wraps
from typing import Any

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    StreamingHttpResponse,
)
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils.http import urlencode
from django.views.decorators.http import require_GET

from billing import charts
from billing.ingest import month_of, next_month
from billing.selectors import (
    CSV_COLUMNS,
    Dashboard,
    Period,
    TimeSeries,
    dashboard_for,
    export_rows,
    statements_for_month,
)
from billing.services import billing_now, statement_for
from limits.models import Tenant
from limits.roles import FINANCE

DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
MONTH = re.compile(r"^(\d{4})-(\d{2})$")
DEFAULT_DAYS = 30
MAX_DAYS = 3 * 366


def may_read_billing(user: Any) -> bool:
    if not user.is_active:
        return False
    if user.is_superuser:
        return True
    return any(group.name == FINANCE for group in user.groups.all())


def finance_only(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path(), reverse(settings.LOGIN_URL))
        if not may_read_billing(request.user):
            return render(request, "billing/forbidden.html", status=403)
        return view(request, *args, **kwargs)

    return wrapper


class BadDates(ValueError):
    pass


def parse_day(value: str, name: str) -> dt.date:
    if not DATE.match(value):
        raise BadDates(f"{name} must be a date written YYYY-MM-DD, not {value!r}")
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise BadDates(f"{name}={value} is not a real date") from None


def parse_period(params: Any, *, required: bool) -> Period:
    """The ``from`` and ``to`` days of a query (both included); the last 30 days when
    absent and not required."""
    start_text = params.get("from", "").strip()
    end_text = params.get("to", "").strip()
    if not start_text and not end_text and not required:
        today = billing_now().date()
        return Period(today - dt.timedelta(days=DEFAULT_DAYS - 1), today)
    if not start_text or not end_text:
        raise BadDates("give both from and to, as YYYY-MM-DD (e.g. ?from=2030-01-01&to=2030-01-31)")
    start = parse_day(start_text, "from")
    end = parse_day(end_text, "to")
    if end < start:
        raise BadDates(f"from ({start}) is after to ({end})")
    if (end - start).days >= MAX_DAYS:
        raise BadDates(f"the range is longer than {MAX_DAYS} days; ask for less at a time")
    return Period(start, end)


def _chart_bars(data: TimeSeries, title: str) -> Any:
    series = [charts.Series(label, values) for label, values in data.series]
    return charts.stacked_bars(series, data.labels, title=title, unit="$")


def _legend(data: TimeSeries) -> list[tuple[str, str]]:
    coloured = charts.colours([charts.Series(label, values) for label, values in data.series])
    return [(item.label, item.colour) for item in coloured]


@require_GET
@finance_only
def dashboard(request: HttpRequest) -> HttpResponse:
    error = ""
    try:
        period = parse_period(request.GET, required=False)
    except BadDates as problem:
        error = str(problem)
        period = parse_period({}, required=False)
    today = billing_now().date()
    data: Dashboard = dashboard_for(period=period, today=today)
    deny = data.deny_rate
    budgets = []
    for row in data.budgets:
        burn = None
        if row.burn is not None:
            burn = charts.lines(
                [charts.Series(label, values) for label, values in row.burn.series],
                row.burn.labels,
                title=f"{row.tenant_label}: budget left this month",
                unit="%",
                top=100.0,
                dashed=("even pace",),
                empty="",
            )
        budgets.append(
            {
                "row": row,
                "meter": charts.meter(float(row.use.percent)),
                "burn": burn,
            }
        )
    context = {
        "section": "overview",
        "period": period,
        "error": error,
        "data": data,
        "currency": settings.BILLING_CURRENCY,
        "spend_by_tenant": _chart_bars(data.spend_by_tenant, "Spend per tenant"),
        "tenant_legend": _legend(data.spend_by_tenant),
        "spend_by_model": _chart_bars(data.spend_by_model, "Spend per model"),
        "model_legend": _legend(data.spend_by_model),
        "deny_chart": charts.lines(
            [charts.Series(label, values) for label, values in deny.series],
            deny.labels,
            title="Share of checks denied",
            unit="%",
            empty="No denied checks in this period",
        ),
        "budgets": budgets,
        "export_url": reverse("billing:export")
        + "?"
        + urlencode({"from": period.start.isoformat(), "to": period.end.isoformat()}),
        "statements_url": reverse("billing:statements"),
        "presets": _presets(today),
    }
    return render(request, "billing/dashboard.html", context)


def _presets(today: dt.date) -> list[tuple[str, str]]:
    month = month_of(today)
    previous = month_of(month - dt.timedelta(days=1))
    year = today.replace(month=1, day=1)
    ranges = [
        ("Last 7 days", today - dt.timedelta(days=6), today),
        ("Last 30 days", today - dt.timedelta(days=29), today),
        ("This month", month, today),
        ("Last month", previous, month - dt.timedelta(days=1)),
        ("Last 12 months", today - dt.timedelta(days=364), today),
        ("This year", year, today),
    ]
    base = reverse("billing:dashboard")
    return [
        (label, base + "?" + urlencode({"from": start.isoformat(), "to": end.isoformat()}))
        for label, start, end in ranges
    ]


class _Echo:
    def write(self, value: str) -> str:
        return value


@require_GET
@finance_only
def export_csv(request: HttpRequest) -> HttpResponse:
    try:
        period = parse_period(request.GET, required=True)
    except BadDates as problem:
        return HttpResponseBadRequest(
            f"Bad date range: {problem}.\n", content_type="text/plain; charset=utf-8"
        )
    writer = csv.writer(_Echo(), lineterminator="\n")

    def lines() -> Iterator[str]:
        yield writer.writerow(CSV_COLUMNS)
        for row in export_rows(start=period.start, end=period.end):
            yield writer.writerow(row)

    response = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = (
        f'attachment; filename="usage-{period.start.isoformat()}-{period.end.isoformat()}.csv"'
    )
    return response


def parse_month(value: str) -> dt.date:
    match = MONTH.match(value)
    if match is None or not 1 <= int(match.group(2)) <= 12:
        raise Http404("no such month")
    return dt.date(int(match.group(1)), int(match.group(2)), 1)


@require_GET
@finance_only
def statements(request: HttpRequest) -> HttpResponse:
    today = billing_now().date()
    value = request.GET.get("month", "")
    month = parse_month(value) if value else month_of(today)
    previous = month_of(month - dt.timedelta(days=1))
    following = next_month(month)
    context = {
        "section": "statements",
        "month": month,
        "rows": statements_for_month(month=month),
        "previous": previous,
        "following": following if following <= month_of(today) else None,
        "currency": settings.BILLING_CURRENCY,
    }
    return render(request, "billing/statements.html", context)


@require_GET
@finance_only
def statement(request: HttpRequest, tenant: str, month: str) -> HttpResponse:
    found = get_object_or_404(Tenant, slug=tenant)
    current = statement_for(tenant=found, month=parse_month(month))
    start = current.month
    end = next_month(start) - dt.timedelta(days=1)
    context = {
        "section": "statements",
        "statement": current,
        "tenant": found,
        "period_end": end,
        "currency": current.currency,
        "issued": billing_now(),
    }
    return render(request, "billing/statement.html", context)
