"""Budgets: a hard budget denies at exhaustion (tokens and money) and starts again at the
UTC calendar boundary; thresholds alert exactly once per period."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.core import mail

from billing.ingest import drain
from billing.models import BudgetAlert
from billing.services import budget_alerts_check
from limits import engine
from limits.models import BudgetPeriod
from tests.billing.conftest import publish
from tests.factories import BudgetFactory

pytestmark = pytest.mark.django_db


def at(*args: int) -> int:
    return int(dt.datetime(*args, tzinfo=dt.UTC).timestamp() * 1_000_000)


def budget_states(decision):
    return {(state.metric, state.window): state.remaining for state in decision.limits}


def test_a_hard_token_budget_denies_at_exhaustion_and_resets_at_the_month_boundary(world, settings):
    BudgetFactory(
        tenant=world.alice, period=BudgetPeriod.MONTH, token_limit=1000, alert_thresholds=[]
    )
    publish()
    settings.QUOTA_TEST_NOW_US = at(2030, 3, 31, 23, 0)
    alice = world.alice.pk

    assert engine.check(alice, "u", "gpt-4o", tokens=400).allowed
    assert engine.check(alice, "u", "gpt-4o", tokens=400).allowed
    denied = engine.check(alice, "u", "gpt-4o", tokens=400)
    assert not denied.allowed
    assert (denied.denied_by.scope, denied.denied_by.metric) == ("budget", "tokens")
    # Denied at the end of the month: it may pass when April starts, in one hour.
    assert denied.retry_after == 3600.0
    # A denied check consumed nothing: exactly the 200 left still fit, then nothing does.
    assert budget_states(engine.quota(alice, "u", "gpt-4o"))[("tokens", "month")] == 200
    assert engine.check(alice, "u", "gpt-4o", tokens=200).allowed
    assert not engine.check(alice, "u", "gpt-4o", tokens=1).allowed
    # Another tenant's budget is its own business.
    assert engine.check(world.bob.pk, "u", "gpt-4o", tokens=5000).allowed

    settings.QUOTA_TEST_NOW_US = at(2030, 3, 31, 23, 59, 59, 999_999)
    assert not engine.check(alice, "u", "gpt-4o", tokens=1).allowed
    settings.QUOTA_TEST_NOW_US = at(2030, 4, 1, 0, 0)
    assert budget_states(engine.quota(alice, "u", "gpt-4o"))[("tokens", "month")] == 1000
    assert engine.check(alice, "u", "gpt-4o", tokens=1000).allowed
    assert not engine.check(alice, "u", "gpt-4o", tokens=1).allowed


def test_a_hard_cost_budget_denies_at_exhaustion_and_resets_at_the_day_boundary(world, settings):
    BudgetFactory(
        tenant=world.alice,
        period=BudgetPeriod.DAY,
        token_limit=None,
        cost_limit=Decimal("0.05"),
        alert_thresholds=[],
    )
    publish()
    settings.QUOTA_TEST_NOW_US = at(2030, 6, 15, 22, 30)
    alice = world.alice.pk

    # gpt-4o reserves at its dearer price, 0.0100 per 1K: 1,000 tokens cost 0.01.
    for _ in range(5):
        assert engine.check(alice, "u", "gpt-4o", tokens=1000).allowed
    denied = engine.check(alice, "u", "gpt-4o", tokens=1000)
    assert not denied.allowed
    assert (denied.denied_by.scope, denied.denied_by.metric) == ("budget", "cost")
    assert denied.denied_by.remaining == Decimal(0)
    assert denied.retry_after == 5400.0

    settings.QUOTA_TEST_NOW_US = at(2030, 6, 16, 0, 0)
    cost_left = budget_states(engine.quota(alice, "u", "gpt-4o"))[("cost", "day")]
    assert cost_left == Decimal("0.05")
    for _ in range(5):
        assert engine.check(alice, "u", "gpt-4o", tokens=1000).allowed
    assert not engine.check(alice, "u", "gpt-4o", tokens=1000).allowed


def test_a_commit_below_the_estimate_gives_the_budget_back(world, settings):
    BudgetFactory(
        tenant=world.alice, period=BudgetPeriod.MONTH, token_limit=1000, alert_thresholds=[]
    )
    publish()
    settings.QUOTA_TEST_NOW_US = at(2030, 3, 5, 10, 0)
    alice = world.alice.pk

    first = engine.check(alice, "u", "gpt-4o", tokens=1000)
    assert first.allowed
    assert not engine.check(alice, "u", "gpt-4o", tokens=1).allowed
    engine.commit(alice, first.request_id, input_tokens=300, output_tokens=100)
    assert engine.check(alice, "u", "gpt-4o", tokens=600).allowed
    assert not engine.check(alice, "u", "gpt-4o", tokens=1).allowed


def use(tenant_id: int, tokens: int) -> None:
    decision = engine.check(tenant_id, "u", "llama-3-8b", tokens=tokens)
    assert decision.allowed
    engine.commit(tenant_id, decision.request_id, input_tokens=tokens, output_tokens=0)


def test_soft_budget_alerts_fire_once_per_threshold_per_period(world, settings, finance_user):
    budget = BudgetFactory(
        tenant=world.alice,
        period=BudgetPeriod.MONTH,
        token_limit=10_000,
        is_hard=False,
        alert_thresholds=[50, 80, 100],
    )
    publish()
    settings.QUOTA_TEST_NOW_US = at(2030, 1, 20, 9, 0)
    alice = world.alice.pk

    use(alice, 4_999)
    drain()
    assert budget_alerts_check() == []

    use(alice, 1)  # 50 % exactly
    drain()
    recorded = budget_alerts_check()
    assert [(alert.threshold, alert.period_start) for alert in recorded] == [
        (50, dt.date(2030, 1, 1))
    ]
    assert len(mail.outbox) == 1
    assert mail.outbox[0].to == [finance_user.email]
    assert "alice reached 50%" in mail.outbox[0].subject
    assert "Tokens: 5,000 of 10,000" in mail.outbox[0].body

    assert budget_alerts_check() == []
    assert len(mail.outbox) == 1

    use(alice, 6_000)  # 110 %: both remaining thresholds at once, one mail each
    drain()
    assert sorted(alert.threshold for alert in budget_alerts_check()) == [80, 100]
    assert budget_alerts_check() == []
    assert len(mail.outbox) == 3
    # A soft budget never denies.
    assert engine.check(alice, "u", "llama-3-8b", tokens=50_000).allowed

    # A new month starts from nothing and may alert again.
    settings.QUOTA_TEST_NOW_US = at(2030, 2, 1, 0, 5)
    assert budget_alerts_check() == []
    use(alice, 8_000)
    drain()
    assert sorted(alert.threshold for alert in budget_alerts_check()) == [50, 80]
    assert budget_alerts_check() == []

    alerts = list(
        BudgetAlert.objects.filter(budget=budget).values_list("period_start", "threshold")
    )
    assert sorted(alerts) == [
        (dt.date(2030, 1, 1), 50),
        (dt.date(2030, 1, 1), 80),
        (dt.date(2030, 1, 1), 100),
        (dt.date(2030, 2, 1), 50),
        (dt.date(2030, 2, 1), 80),
    ]
    assert not BudgetAlert.objects.filter(sent_at__isnull=True).exists()
    assert len(mail.outbox) == 5
    # Bob has no budget: no alert about him.
    assert not BudgetAlert.objects.filter(tenant=world.bob).exists()


def test_a_daily_cost_budget_alerts_on_money_and_again_the_next_day(world, settings):
    settings.BILLING_ALERT_EMAILS = ["finance@example.com"]
    BudgetFactory(
        tenant=world.bob,
        period=BudgetPeriod.DAY,
        token_limit=None,
        cost_limit=Decimal("1.00"),
        is_hard=False,
        alert_thresholds=[80],
    )
    publish()
    settings.QUOTA_TEST_NOW_US = at(2030, 5, 5, 23, 0)
    bob = world.bob.pk
    # gpt-4o: 100,000 output tokens cost 1.00; 80,000 cost 0.80.
    decision = engine.check(bob, "u", "gpt-4o", tokens=0)
    engine.commit(bob, decision.request_id, input_tokens=0, output_tokens=79_999)
    drain()
    assert budget_alerts_check() == []
    decision = engine.check(bob, "u", "gpt-4o", tokens=0)
    engine.commit(bob, decision.request_id, input_tokens=0, output_tokens=1)
    drain()
    (alert,) = budget_alerts_check()
    assert (alert.used_cost, alert.period, alert.period_start) == (
        Decimal("0.8"),
        "day",
        dt.date(2030, 5, 5),
    )
    assert mail.outbox[-1].to == ["finance@example.com"]
    assert "Cost: 0.80 of 1.0000 USD" in mail.outbox[-1].body

    settings.QUOTA_TEST_NOW_US = at(2030, 5, 6, 1, 0)
    assert budget_alerts_check() == []
    decision = engine.check(bob, "u", "gpt-4o", tokens=0)
    engine.commit(bob, decision.request_id, input_tokens=0, output_tokens=90_000)
    drain()
    (alert,) = budget_alerts_check()
    assert alert.period_start == dt.date(2030, 5, 6)
