"""Policy history in the admin: every published version with who, when and why, what
changed from the version before, shadow rules with their counts, and a rollback that goes
through the same loading code as ``loadpolicy`` and is enforced by the engine at once."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import reverse
from pytest_django.asserts import assertContains, assertNotContains

from limits import engine, services
from limits.models import (
    AIModel,
    AuditEntry,
    Budget,
    LimitRule,
    Metric,
    PolicyVersion,
    Scope,
    Tenant,
)
from limits.selectors import PolicyChange, policy_diff
from tests.factories import BudgetFactory, LimitRuleFactory, TenantFactory, TierFactory


def version_url(version: PolicyVersion) -> str:
    return reverse("admin:limits_policyversion_change", args=[version.pk])


def rollback_url(version: PolicyVersion) -> str:
    return reverse("admin:limits_policyversion_rollback", args=[version.pk])


def messages_of(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


@pytest.fixture
def publish(django_capture_on_commit_callbacks):
    """Publish the database as it is now (to Redis too), as a commit in admin would."""

    def publish(reason: str = "edited") -> PolicyVersion:
        with django_capture_on_commit_callbacks(execute=True):
            version = services.policy_publish(actor=services.SYSTEM, reason=reason)
        assert version is not None
        return version

    return publish


@pytest.fixture
def operator_client(client, operator):
    client.force_login(operator)
    return client


@pytest.fixture
def finance_client(client, finance_user):
    client.force_login(finance_user)
    return client


def set_limit(rule: LimitRule, limit: int) -> None:
    rule.limit = limit
    services.object_save(instance=rule, actor=services.SYSTEM)


# The history


def test_history_lists_every_version_with_who_when_and_why(operator_client, world, publish):
    first = publish("first load")
    set_limit(world.rule, 250)
    second = publish("limit rule saved")

    response = operator_client.get(reverse("admin:limits_policyversion_changelist"))

    assert [version.version for version in response.context["cl"].result_list] == [
        second.version,
        first.version,
    ]
    assertContains(response, "first load")
    assertContains(response, "limit rule saved")
    assertContains(response, "system")


def test_version_page_shows_each_change_from_the_version_before_as_old_and_new(
    operator_client, world, publish
):
    BudgetFactory(tenant=world.alice, token_limit=1_000_000, cost_limit=None)
    first = publish()
    set_limit(world.rule, 250)
    LimitRuleFactory(tier=None, tenant=world.alice, scope=Scope.USER, limit=500)
    budget = Budget.objects.get(tenant=world.alice)
    budget.token_limit = 2_000_000
    services.object_save(instance=budget, actor=services.SYSTEM)
    second = publish()

    response = operator_client.get(version_url(second))

    assert response.status_code == 200
    assertContains(response, f"Changes from {first}")
    assertContains(
        response,
        '<tr class="policy-change-group"><th colspan="4" scope="rowgroup">tier standard</th></tr>',
        html=True,
    )
    assertContains(
        response,
        '<tr class="policy-change"><td>user_model requests per 1h</td><td>changed</td>'
        "<td>100</td><td>250</td></tr>",
        html=True,
    )
    assertContains(
        response,
        '<tr class="policy-change"><td>override user requests per 1h</td><td>added</td>'
        "<td>—</td><td>500</td></tr>",
        html=True,
    )
    assertContains(
        response,
        '<tr class="policy-change"><td>month budget</td><td>changed</td>'
        "<td>1,000,000 tokens, hard, alerts at 80 %, 100 %</td>"
        "<td>2,000,000 tokens, hard, alerts at 80 %, 100 %</td></tr>",
        html=True,
    )
    assert response.context["changes"] == policy_diff(old=first.document, new=second.document)


def test_the_first_version_lists_everything_as_added(operator_client, world, publish):
    first = publish()

    response = operator_client.get(version_url(first))

    assertContains(response, "The first published version")
    assert (
        PolicyChange("tier standard", "user_model requests per 1h", "added", "—", "100")
        in response.context["changes"]
    )


# Rollback


def test_rollback_through_the_admin_restores_the_old_limits_and_the_engine_enforces_them(
    operator_client, world, operator, publish, django_capture_on_commit_callbacks
):
    old = publish("first load")
    set_limit(world.rule, 2)
    lowered = publish("limit lowered")
    decisions = [engine.check(world.alice.pk, "u1", "gpt-4o") for _ in range(3)]
    assert [decision.allowed for decision in decisions] == [True, True, False]
    assert {decision.policy_version for decision in decisions} == {lowered.version}

    with django_capture_on_commit_callbacks(execute=True):
        response = operator_client.post(rollback_url(old))

    restored = PolicyVersion.objects.get(version=lowered.version + 1)
    assert response.status_code == 302
    assert response["Location"] == version_url(restored)
    assert (restored.restores, restored.created_by, restored.actor_label, restored.reason) == (
        old,
        operator,
        "olivia",
        f"rollback to {old}",
    )
    world.rule.refresh_from_db()
    assert world.rule.limit == 100
    assert policy_diff(old=old.document, new=restored.document) == []
    deadline = time.monotonic() + 1.0
    decision = engine.check(world.alice.pk, "u1", "gpt-4o")
    while decision.policy_version != restored.version and time.monotonic() < deadline:
        time.sleep(0.05)
        decision = engine.check(world.alice.pk, "u1", "gpt-4o")
    assert decision.allowed
    assert decision.policy_version == restored.version
    [state] = decision.limits
    assert (state.limit, state.remaining) == (100, 97)
    # A process that starts now reads the restored version from Redis.
    engine.reset_state()
    assert engine.policy_store().current().version == restored.version


def test_rollback_writes_an_audit_row_naming_who_and_which_version(
    operator_client, world, operator, publish, django_capture_on_commit_callbacks
):
    old = publish()
    set_limit(world.rule, 2)
    lowered = publish()

    with django_capture_on_commit_callbacks(execute=True):
        operator_client.post(rollback_url(old))

    restored = PolicyVersion.objects.get(restores=old)
    entry = AuditEntry.objects.get(action=AuditEntry.Action.ROLLED_BACK)
    assert (
        entry.actor,
        entry.actor_label,
        entry.target_type,
        entry.target_id,
        entry.target_repr,
        entry.changes,
        entry.policy_version,
    ) == (
        operator,
        "olivia",
        "policyversion",
        str(old.pk),
        str(old),
        {"policy": [str(lowered), str(old)]},
        restored.version,
    )
    rule_entry = AuditEntry.objects.filter(target_type="limitrule").first()
    assert (rule_entry.changes, rule_entry.actor, rule_entry.policy_version) == (
        {"limit": [2, 100]},
        operator,
        restored.version,
    )


def test_rollback_restores_rules_budgets_prices_capacity_and_tiers_and_leaves_new_tenants(
    operator_client, world, publish, django_capture_on_commit_callbacks
):
    override = LimitRuleFactory(tier=None, tenant=world.alice, limit=500)
    BudgetFactory(tenant=world.alice, token_limit=1000, cost_limit=Decimal("80.00"))
    LimitRuleFactory(
        tier=None, scope=Scope.GLOBAL, model_class=world.frontier, window_seconds=60, limit=5000
    )
    old = publish()
    with services.policy_batch(actor=services.SYSTEM, reason="many edits"):
        services.object_delete(instance=override, actor=services.SYSTEM)
        services.object_delete(
            instance=LimitRule.objects.get(scope=Scope.GLOBAL), actor=services.SYSTEM
        )
        budget = Budget.objects.get(tenant=world.alice)
        budget.token_limit = 2000
        services.object_save(instance=budget, actor=services.SYSTEM)
        world.gpt.input_price_per_1k = Decimal("0.0030")
        services.object_save(instance=world.gpt, actor=services.SYSTEM)
        premium = TierFactory(name="premium")
        LimitRuleFactory(tier=premium, limit=9000)
        world.bob.tier = premium
        services.object_save(instance=world.bob, actor=services.SYSTEM)
        TenantFactory(slug="carol", tier=world.tier)
    changed = publish("many edits")
    assert policy_diff(old=old.document, new=changed.document) != []

    with django_capture_on_commit_callbacks(execute=True):
        response = operator_client.post(rollback_url(old), follow=True)

    restored = PolicyVersion.objects.get(restores=old)
    assert response.status_code == 200
    override = LimitRule.objects.get(tenant=world.alice)
    assert (override.scope, override.metric, override.window_seconds, override.limit) == (
        Scope.USER_MODEL,
        Metric.REQUESTS,
        3600,
        500,
    )
    capacity = LimitRule.objects.get(scope=Scope.GLOBAL)
    assert (capacity.model_class, capacity.window_seconds, capacity.limit) == (
        world.frontier,
        60,
        5000,
    )
    budget = Budget.objects.get(tenant=world.alice)
    assert (budget.token_limit, budget.cost_limit) == (1000, Decimal("80.00"))
    assert AIModel.objects.get(pk=world.gpt.pk).input_price_per_1k == Decimal("0.0025")
    assert Tenant.objects.get(pk=world.bob.pk).tier == world.tier
    # What the version did not know stays: the new tenant, and the tier nobody uses now.
    assert Tenant.objects.filter(slug="carol").exists()
    assert LimitRule.objects.filter(tier__name="premium", limit=9000).exists()
    assert policy_diff(old=old.document, new=restored.document) == [
        PolicyChange("tenant carol", "tenant", "added", "—", "tier standard")
    ]
    assertContains(response, f"Rolled back to {old}: published {restored}")
    assertContains(response, f"Tenant carol is not in {old}; it is left as it is.")


def test_finance_sees_history_but_cannot_roll_back(finance_client, world, publish):
    old = publish()
    set_limit(world.rule, 2)
    publish()

    page = finance_client.get(version_url(old))
    response = finance_client.post(rollback_url(old))

    assert page.status_code == 200
    assertContains(page, "Roll back to v1")  # the preview of what it would change
    assertNotContains(page, 'id="rollback-form"')
    assert response.status_code == 403
    world.rule.refresh_from_db()
    assert world.rule.limit == 2
    assert PolicyVersion.objects.count() == 2
    assert not AuditEntry.objects.filter(action=AuditEntry.Action.ROLLED_BACK).exists()


def test_operators_and_superusers_get_the_rollback_button(client, world, publish, superuser):
    old = publish()
    set_limit(world.rule, 2)
    publish()
    client.force_login(superuser)

    response = client.get(version_url(old))

    assertContains(response, 'id="rollback-form"')
    assertContains(response, f'action="{rollback_url(old)}"')
    assertContains(response, "csrfmiddlewaretoken")


def test_rollback_without_a_csrf_token_is_refused(world, operator, publish):
    old = publish()
    set_limit(world.rule, 2)
    publish()
    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)

    response = client.post(rollback_url(old))

    assert response.status_code == 403
    world.rule.refresh_from_db()
    assert world.rule.limit == 2


def test_rollback_is_a_post_only(operator_client, world, publish):
    old = publish()
    set_limit(world.rule, 2)
    publish()

    response = operator_client.get(rollback_url(old))

    assert response.status_code == 405
    assert PolicyVersion.objects.count() == 2


def test_rollback_to_the_version_in_force_changes_nothing_and_says_so(
    operator_client, world, publish
):
    current = publish()

    response = operator_client.post(rollback_url(current))

    assert response.status_code == 302
    assert response["Location"] == version_url(current)
    assert messages_of(response) == [
        f"{current} is the policy in force already; there is nothing to roll back."
    ]
    assert PolicyVersion.objects.count() == 1
    assert AuditEntry.objects.count() == 0
    page = operator_client.get(version_url(current))
    assertContains(page, "is the latest version: the policy in force.")
    assertNotContains(page, 'id="rollback-form"')


def test_rollback_to_a_version_equal_to_the_one_in_force_changes_nothing(
    operator_client, world, publish
):
    old = publish()
    set_limit(world.rule, 2)
    publish()
    set_limit(world.rule, 100)
    publish()
    audit_entries = AuditEntry.objects.count()

    response = operator_client.post(rollback_url(old))

    assert response.status_code == 302
    assert messages_of(response) == [
        f"Nothing to change: the database already holds what {old} holds."
    ]
    assert PolicyVersion.objects.count() == 3
    assert AuditEntry.objects.count() == audit_entries


def test_a_version_whose_document_cannot_be_read_is_shown_and_refused_in_plain_words(
    operator_client, world, publish
):
    broken = PolicyVersion.objects.create(
        version=1, actor_label="system", document={"tenants": {"1": {"slug": "x"}}}
    )
    publish()

    page = operator_client.get(version_url(broken))
    response = operator_client.post(rollback_url(broken))

    assert page.status_code == 200
    assertContains(page, "The stored policy document cannot be read")
    assertNotContains(page, 'id="rollback-form"')
    assert response.status_code == 302
    [message] = messages_of(response)
    assert message.startswith("v1 cannot be restored: the stored policy document cannot be read")
    assert PolicyVersion.objects.count() == 2


def test_rollback_of_a_missing_version_is_not_found(operator_client, world):
    response = operator_client.post(reverse("admin:limits_policyversion_rollback", args=[999]))

    assert response.status_code == 404


def test_the_rollback_preview_shows_what_it_would_change_now(operator_client, world, publish):
    old = publish()
    set_limit(world.rule, 2)
    current = publish()

    response = operator_client.get(version_url(old))

    assertContains(response, f"Compared with {current}, in force now")
    assert response.context["rollback_changes"] == [
        PolicyChange("tier standard", "user_model requests per 1h", "changed", "2", "100")
    ]


# Shadow rules


def test_shadow_rules_show_how_many_checks_they_would_have_denied(operator_client, world, publish):
    LimitRuleFactory(tier=world.tier, window_seconds=60, limit=1, is_shadow=True)
    version = publish()
    decisions = [engine.check(world.alice.pk, "u1", "gpt-4o") for _ in range(3)]
    engine.check(world.bob.pk, "u1", "gpt-4o")
    assert all(decision.allowed for decision in decisions)

    response = operator_client.get(version_url(version))

    [row] = response.context["shadow_rules"]
    assert (row.owner, row.rule, row.limit, row.counts, row.total) == (
        "tier standard",
        "user_model requests per 1m",
        "1",
        [("alice", 2), ("bob", 0)],
        2,
    )
    assertContains(
        response,
        '<tr class="shadow-rule"><td>tier standard</td><td>user_model requests per 1m</td>'
        "<td>1</td><td>2</td><td>alice: 2, bob: 0</td></tr>",
        html=True,
    )


def test_shadow_counts_say_unknown_when_redis_cannot_be_read(
    operator_client, world, publish, settings
):
    LimitRuleFactory(tier=world.tier, window_seconds=60, limit=1, is_shadow=True)
    version = publish()
    settings.REDIS_URL = "redis://127.0.0.1:9/0"  # nothing listens on the discard port
    engine.reset_state()

    response = operator_client.get(version_url(version))

    assert response.status_code == 200
    [row] = response.context["shadow_rules"]
    assert (row.counts, row.total) == (None, None)
    assertContains(response, "unknown (the limiter's Redis could not be read)")


def test_a_version_without_shadow_rules_says_so(operator_client, world, publish):
    version = publish()

    response = operator_client.get(version_url(version))

    assertContains(response, "This version has no shadow rules.")


# Costs


def test_version_page_costs_a_bounded_number_of_queries(
    operator_client, world, publish, django_assert_max_num_queries
):
    for number in range(20):
        tenant = TenantFactory(slug=f"tenant{number:02}", tier=world.tier)
        LimitRuleFactory(tier=None, tenant=tenant, limit=500 + number)
        BudgetFactory(tenant=tenant)
    old = publish()
    set_limit(world.rule, 2)
    publish()

    with django_assert_max_num_queries(16):
        response = operator_client.get(version_url(old))

    assert response.status_code == 200
