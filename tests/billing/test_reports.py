"""Finance reports: the overview, the CSV export and monthly statements all equal the
rollups; draining again changes none of them; late usage of a finalised month becomes an
adjustment on the next statement."""

from __future__ import annotations

import csv
import datetime as dt
import io
from decimal import ROUND_HALF_EVEN, Decimal

import pytest
from django.core.management import call_command
from django.db.models import Sum
from django.urls import reverse

from billing.ingest import drain, user_rollups_fold
from billing.models import (
    DailyRollup,
    DailyUserRollup,
    HourlyRollup,
    LedgerState,
    Statement,
    StatementAdjustment,
    UsageEvent,
)
from billing.rollups import rollups_reconcile_recent
from billing.services import (
    budget_alerts_check,
    statement_finalise,
    statement_for,
    statements_finalise_due,
    usage_retention_run,
)
from limits import engine, services
from limits.models import BudgetPeriod
from tests.billing.conftest import publish
from tests.factories import AIModelFactory, BudgetFactory, TenantFactory, UserFactory

pytestmark = pytest.mark.django_db

CENT = Decimal("0.01")


def at(*args: int) -> int:
    return int(dt.datetime(*args, tzinfo=dt.UTC).timestamp() * 1_000_000)


def spend(tenant_id: int, user: str, model: str, used_in: int, used_out: int) -> None:
    decision = engine.check(tenant_id, user, model, tokens=used_in + used_out)
    assert decision.allowed
    engine.commit(tenant_id, decision.request_id, used_in, used_out)


@pytest.fixture
def usage(world, settings):
    """Two tenants' usage over two months, some of it never committed, some denied."""
    publish()
    days = [(2030, 1, 30, 10), (2030, 1, 31, 23), (2030, 2, 1, 0), (2030, 2, 14, 9)]
    for number, moment in enumerate(days):
        settings.QUOTA_TEST_NOW_US = at(*moment)
        spend(world.alice.pk, "ann", "gpt-4o", 1000 + number, 333 * number)
        spend(world.alice.pk, "al", "llama-3-8b", 12_345, 678)
        spend(world.bob.pk, "bo", "gpt-4o", 7, 3 * number)
        assert engine.check(world.bob.pk, "bo", "llama-3-8b", tokens=99).allowed
    settings.QUOTA_TEST_NOW_US = at(2030, 2, 14, 10)
    for _ in range(102):
        engine.check(world.alice.pk, "greedy", "gpt-4o")
    drain()
    user_rollups_fold()  # (beat's billing-user-rollups)
    return world


def export(client, start: str, end: str) -> list[dict[str, str]]:
    response = client.get(reverse("billing:export"), {"from": start, "to": end})
    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    text = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(text)))


def test_the_csv_export_equals_the_rollups(usage, client, finance_user):
    client.force_login(finance_user)
    rows = export(client, "2030-01-01", "2030-02-28")

    assert list(rows[0]) == [
        "date",
        "tenant",
        "model",
        "requests",
        "denied",
        "input_tokens",
        "output_tokens",
        "cost",
    ]
    expected = [
        {
            "date": row.day.isoformat(),
            "tenant": {usage.alice.pk: "alice", usage.bob.pk: "bob"}[row.tenant_id],
            "model": row.model_id,
            "requests": str(row.requests),
            "denied": str(row.denied),
            "input_tokens": str(row.input_tokens),
            "output_tokens": str(row.output_tokens),
            "cost": str(row.cost),
        }
        for row in DailyRollup.objects.order_by("day", "tenant_id", "model_id")
    ]
    assert rows == expected
    assert len(rows) == 4 * 4
    hourly = HourlyRollup.objects.aggregate(
        requests=Sum("requests"), denied=Sum("denied"), cost=Sum("cost")
    )
    assert sum(int(row["requests"]) for row in rows) == hourly["requests"] == 16 + 100
    assert sum(int(row["denied"]) for row in rows) == hourly["denied"] == 2
    assert sum(Decimal(row["cost"]) for row in rows) == hourly["cost"]
    # One day, one tenant: only that.
    assert {(row["date"], row["tenant"]) for row in export(client, "2030-02-14", "2030-02-14")} == {
        ("2030-02-14", "alice"),
        ("2030-02-14", "bob"),
    }
    assert export(client, "2029-01-01", "2029-12-31") == []


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({}, "give both from and to"),
        ({"from": "2030-01-01"}, "give both from and to"),
        ({"from": "2030-13-01", "to": "2030-12-31"}, "from=2030-13-01 is not a real date"),
        ({"from": "20300101", "to": "2030-01-31"}, "from must be a date written YYYY-MM-DD"),
        ({"from": "2030-01-01", "to": "yesterday"}, "to must be a date written YYYY-MM-DD"),
        ({"from": "2030-02-01", "to": "2030-01-01"}, "from (2030-02-01) is after to (2030-01-01)"),
        ({"from": "2020-01-01", "to": "2030-01-01"}, "the range is longer than"),
    ],
)
def test_the_csv_export_refuses_bad_dates_with_400_and_a_reason(
    client, finance_user, query, message
):
    client.force_login(finance_user)
    response = client.get(reverse("billing:export"), query)
    assert response.status_code == 400
    assert message in response.content.decode()


def test_statements_equal_the_rollups_and_round_once_half_to_even(usage, client, finance_user):
    january = statement_for(tenant=usage.alice, month=dt.date(2030, 1, 1))
    start = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    end = dt.datetime(2030, 2, 1, tzinfo=dt.UTC)
    for line in january.lines:
        rollup = HourlyRollup.objects.filter(
            tenant_id=usage.alice.pk,
            model_id=line.model_id,
            price_id=line.price_id,
            hour__gte=start,
            hour__lt=end,
        ).aggregate(
            requests=Sum("requests"),
            input=Sum("input_tokens"),
            output=Sum("output_tokens"),
            cost=Sum("cost"),
        )
        assert (line.requests, line.input_tokens, line.output_tokens, line.amount) == (
            rollup["requests"],
            rollup["input"],
            rollup["output"],
            rollup["cost"],
        )
        assert line.amount == (
            line.input_tokens * line.input_price_per_1k
            + line.output_tokens * line.output_price_per_1k
        ) / Decimal(1000)
    assert [line.model_id for line in january.lines] == ["gpt-4o", "llama-3-8b"]
    month_cost = HourlyRollup.objects.filter(
        tenant_id=usage.alice.pk, hour__gte=start, hour__lt=end
    ).aggregate(cost=Sum("cost"))["cost"]
    assert january.subtotal == month_cost
    assert january.total == month_cost.quantize(CENT, rounding=ROUND_HALF_EVEN)
    assert not january.is_final

    client.force_login(finance_user)
    page = client.get(reverse("billing:statement", args=["alice", "2030-01"]))
    assert page.status_code == 200
    html = page.content.decode()
    assert "Statement January 2030" in html
    assert "Draft" in html
    assert f'id="total">{january.total:,.2f}<' in html
    assert html.count('class="line"') == 2


def test_draining_twice_changes_neither_the_export_nor_the_statements(usage, client, finance_user):
    client.force_login(finance_user)
    before_csv = export(client, "2030-01-01", "2030-02-28")
    before_page = client.get(reverse("billing:statement", args=["bob", "2030-02"])).content
    before_events = UsageEvent.objects.count()

    out = io.StringIO()
    call_command("drain_usage", stdout=out)
    call_command("drain_usage", stdout=out)

    assert "drained 0 stream entries" in out.getvalue()
    assert UsageEvent.objects.count() == before_events == 116
    assert export(client, "2030-01-01", "2030-02-28") == before_csv
    assert client.get(reverse("billing:statement", args=["bob", "2030-02"])).content == (
        before_page
    )


def test_a_finalised_statement_never_changes_and_late_usage_lands_on_the_next_one(world, settings):
    publish()
    settings.QUOTA_TEST_NOW_US = at(2030, 1, 31, 23, 30)
    spend(world.alice.pk, "ann", "gpt-4o", 1000, 1000)
    late = engine.check(world.alice.pk, "ann", "gpt-4o", tokens=4000)  # reported in February
    drain()

    settings.QUOTA_TEST_NOW_US = at(2030, 2, 2, 0, 0)  # the 24-hour grace is over
    (finalised,) = statements_finalise_due()
    assert statements_finalise_due() == []
    assert (finalised.tenant_id, finalised.month) == (world.alice.pk, dt.date(2030, 1, 1))
    # 1000 × 0.0025 + 1000 × 0.01 = 0.0125; the estimate 4000 × 0.0025 = 0.01
    assert finalised.subtotal == Decimal("0.0225")
    assert finalised.total == Decimal("0.02")
    sent = Statement.objects.get().lines

    engine.commit(world.alice.pk, late.request_id, input_tokens=100, output_tokens=500)
    spend(world.alice.pk, "ann", "gpt-4o", 2000, 0)
    drain()

    january = statement_for(tenant=world.alice, month=dt.date(2030, 1, 1))
    assert january.is_final
    assert january.total == Decimal("0.02")
    assert Statement.objects.get().lines == sent
    (adjustment,) = StatementAdjustment.objects.all()
    assert (adjustment.kind, adjustment.usage_month, adjustment.statement_month) == (
        "commit",
        dt.date(2030, 1, 1),
        dt.date(2030, 2, 1),
    )
    # Actual 100 × 0.0025 + 500 × 0.01 = 0.00525 less the estimate billed, 0.01.
    assert adjustment.cost == Decimal("-0.00475")
    assert (adjustment.input_tokens, adjustment.output_tokens) == (-3900, 500)
    february = statement_for(tenant=world.alice, month=dt.date(2030, 2, 1))
    assert february.subtotal == Decimal("0.005")
    assert february.adjustments == [adjustment]
    assert february.total == Decimal("0.00")  # 0.005 − 0.00475 = 0.00025
    # The rollups keep the usage where it happened: January now holds the actuals.
    january_rollups = HourlyRollup.objects.filter(
        tenant_id=world.alice.pk, hour__lt=dt.datetime(2030, 2, 1, tzinfo=dt.UTC)
    ).aggregate(cost=Sum("cost"))
    assert january_rollups["cost"] == Decimal("0.01775")
    # Draining again adds no second adjustment.
    drain()
    assert StatementAdjustment.objects.count() == 1

    finalised_again = statement_finalise(tenant=world.alice, month=dt.date(2030, 1, 1))
    assert finalised_again.pk == finalised.pk


def test_a_price_change_within_a_month_gives_the_model_a_line_per_price(world, settings):
    publish()
    settings.QUOTA_TEST_NOW_US = at(2030, 3, 3, 3)
    spend(world.bob.pk, "u", "gpt-4o", 1000, 0)
    drain()
    settings.QUOTA_TEST_NOW_US = at(2030, 3, 20, 3)
    world.gpt.input_price_per_1k = Decimal("0.005")
    services.object_save(instance=world.gpt, actor=services.SYSTEM)
    publish()
    spend(world.bob.pk, "u", "gpt-4o", 1000, 0)
    spend(world.bob.pk, "u", "gpt-4o", 1000, 0)
    drain()

    march = statement_for(tenant=world.bob, month=dt.date(2030, 3, 1))

    assert [
        (line.model_id, line.requests, line.input_price_per_1k, line.amount) for line in march.lines
    ] == [
        ("gpt-4o", 1, Decimal("0.0025"), Decimal("0.0025")),
        ("gpt-4o", 2, Decimal("0.005"), Decimal("0.01")),
    ]
    assert march.total == Decimal("0.01")


def test_retention_deletes_old_raw_events_only_once_their_hours_were_checked(world, settings):
    publish()
    settings.QUOTA_TEST_NOW_US = at(2030, 1, 1, 12)
    spend(world.alice.pk, "u", "llama-3-8b", 10, 10)
    settings.QUOTA_TEST_NOW_US = at(2030, 2, 20, 12)
    spend(world.alice.pk, "u", "llama-3-8b", 20, 20)
    drain()
    totals = DailyRollup.objects.aggregate(requests=Sum("requests"), cost=Sum("cost"))

    assert usage_retention_run() == 0  # no hour was checked against raw events yet
    rollups_reconcile_recent()
    assert LedgerState.objects.get(name="reconciled").value == dt.datetime(
        2030, 2, 20, 12, tzinfo=dt.UTC
    )

    assert usage_retention_run() == 1
    assert list(UsageEvent.objects.values_list("input_tokens", flat=True)) == [20]
    assert DailyRollup.objects.aggregate(requests=Sum("requests"), cost=Sum("cost")) == totals
    assert usage_retention_run() == 0
    # The drain left the top users to their fold, which retention ran before deleting.
    assert sorted(
        DailyUserRollup.objects.filter(user_id="u").values_list("day", "input_tokens")
    ) == [(dt.date(2030, 1, 1), 10), (dt.date(2030, 2, 20), 20)]


def test_finance_and_superusers_read_billing_operators_get_403_strangers_log_in(
    usage, client, finance_user, superuser, operator
):
    pages = [
        reverse("billing:dashboard"),
        reverse("billing:statements"),
        reverse("billing:statement", args=["alice", "2030-01"]),
        reverse("billing:export") + "?from=2030-01-01&to=2030-01-31",
    ]
    for page in pages:
        response = client.get(page)
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("admin:login"))
    for user in (operator, UserFactory(username="plain")):
        client.force_login(user)
        for page in pages:
            response = client.get(page)
            assert response.status_code == 403
            assert b"alice" not in response.content
    for user in (finance_user, superuser):
        client.force_login(user)
        for page in pages:
            assert client.get(page).status_code == 200
    # Read-only: nothing here takes a POST.
    assert client.post(reverse("billing:dashboard")).status_code == 405


def test_the_overview_shows_charts_tops_and_budgets(usage, client, finance_user, settings):
    BudgetFactory(tenant=usage.alice, period=BudgetPeriod.MONTH, token_limit=20_000)
    budget_alerts_check()
    client.force_login(finance_user)
    settings.QUOTA_TEST_NOW_US = at(2030, 2, 14, 12)

    response = client.get(reverse("billing:dashboard"), {"from": "2030-01-01", "to": "2030-02-28"})

    assert response.status_code == 200
    html = response.content.decode()
    assert html.count('<svg class="chart') == 4  # tenants, models, deny rate, burn-down
    assert html.count('class="bar"') > 0
    assert "Top tenants" in html and "Top users" in html and "Top models" in html
    data = response.context["data"]
    assert [item.label for item in data.tenants] == ["alice", "bob"]
    assert data.totals.requests == 116
    assert data.totals.denied == 2
    assert data.totals.cost == HourlyRollup.objects.aggregate(cost=Sum("cost"))["cost"]
    assert data.users[0].label == "al"
    (budget,) = data.budgets
    assert budget.use.used_tokens == 2 * (12_345 + 678) + (1002 + 666) + (1003 + 999)
    assert "80%" in html  # the alert it raised
    # A bad range says so and shows the default instead of failing.
    response = client.get(reverse("billing:dashboard"), {"from": "2030-02-30", "to": "x"})
    assert response.status_code == 200
    assert "is not a real date" in response.content.decode()


def test_the_overview_costs_the_same_few_queries_however_many_tenants_and_models(
    usage, client, finance_user, django_assert_max_num_queries, settings
):
    settings.QUOTA_TEST_NOW_US = at(2030, 2, 14, 12)
    client.force_login(finance_user)
    query = {"from": "2030-01-01", "to": "2030-02-28"}
    with django_assert_max_num_queries(13):
        assert client.get(reverse("billing:dashboard"), query).status_code == 200

    for index in range(12):
        tenant = TenantFactory(slug=f"extra{index}", tier=usage.tier)
        AIModelFactory(model_id=f"model-x{index}", model_class=usage.small)
        BudgetFactory(tenant=tenant, period=BudgetPeriod.MONTH, token_limit=1000)
    publish()
    settings.QUOTA_TEST_NOW_US = at(2030, 2, 10, 8)
    for index in range(12):
        tenant_id = TenantFactory(slug=f"extra{index}").pk
        spend(tenant_id, f"user{index}", f"model-x{index}", 100, 100)
    drain()
    settings.QUOTA_TEST_NOW_US = at(2030, 2, 14, 12)
    with django_assert_max_num_queries(13):
        response = client.get(reverse("billing:dashboard"), query)
    assert len(response.context["data"].tenants) == 14


def test_a_long_range_reads_whole_months_and_agrees_with_the_days(usage, client, finance_user):
    """Past 62 days the overview reads whole months from the monthly rollups and the
    partial first and last months from the daily ones: the same numbers."""
    client.force_login(finance_user)
    query = {"from": "2029-12-15", "to": "2030-02-20"}
    data = client.get(reverse("billing:dashboard"), query).context["data"]

    assert data.period.bucket == "month"
    assert data.period.whole_months == (dt.date(2030, 1, 1), dt.date(2030, 2, 1))
    days = DailyRollup.objects.filter(day__gte="2029-12-15", day__lte="2030-02-20")
    for item in data.tenants:
        expected = days.filter(tenant_id=item.key).aggregate(
            requests=Sum("requests"), denied=Sum("denied"), cost=Sum("cost")
        )
        assert (item.totals.requests, item.totals.denied, item.totals.cost) == (
            expected["requests"],
            expected["denied"],
            expected["cost"],
        )
    assert data.spend_by_tenant.labels == ["Dec 2029", "Jan 2030", "Feb 2030"]
    alice = dict(data.spend_by_tenant.series)["alice"]
    assert (
        alice[1]
        == days.filter(tenant_id=usage.alice.pk, day__lt="2030-02-01").aggregate(cost=Sum("cost"))[
            "cost"
        ]
    )
    assert [item.label for item in data.users[:2]] == ["al", "ann"]
