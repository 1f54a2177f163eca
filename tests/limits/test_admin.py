"""The admin an operator works in: every page renders, every write is validated, audited and
published through the services, keys are shown once, and lists cost a constant number of
queries."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django import forms
from django.contrib import admin
from django.contrib.admin.models import LogEntry
from django.contrib.sessions.models import Session
from django.db import connection, models
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from pytest_django.asserts import assertContains, assertNotContains, assertTemplateUsed

from limits import services
from limits.admin import AUDIT_TRAIL_LENGTH, EffectiveRow
from limits.models import (
    AIModel,
    ApiKey,
    AuditEntry,
    Budget,
    LimitRule,
    Metric,
    ModelClass,
    PolicyVersion,
    Scope,
    Tenant,
    Tier,
)
from tests.factories import BudgetFactory, LimitRuleFactory, TenantFactory

LIMITS_MODELS = sorted(
    (model for model in admin.site._registry if model._meta.app_label == "limits"),
    key=lambda model: model._meta.model_name,
)
READ_ONLY_MODELS = {AuditEntry, PolicyVersion}
DUPLICATE_RULE = (
    "This owner already has a rule with the same scope, metric, model class and window."
)


def admin_url(model: type[models.Model], view: str, *args: object) -> str:
    return reverse(f"admin:limits_{model._meta.model_name}_{view}", args=args)


def form_data(response: Any) -> dict[str, Any]:
    """What a browser sends back when the change page in ``response`` is saved untouched."""
    context_forms = [response.context["adminform"].form]
    for inline_admin_formset in response.context["inline_admin_formsets"]:
        formset = inline_admin_formset.formset
        context_forms.append(formset.management_form)
        context_forms.extend(formset.forms)
    data: dict[str, Any] = {}
    for form in context_forms:
        for bound_field in form:
            value = bound_field.value()
            if isinstance(bound_field.field, forms.BooleanField):
                if value:
                    data[bound_field.html_name] = "on"
                continue
            data[bound_field.html_name] = "" if value is None else value
    return data


def with_new_rule(data: dict[str, Any], prefix: str, **fields: object) -> dict[str, Any]:
    """``data`` plus one more inline form under ``prefix``."""
    index = int(data[f"{prefix}-TOTAL_FORMS"])
    data = {**data, f"{prefix}-TOTAL_FORMS": str(index + 1)}
    for name, value in fields.items():
        data[f"{prefix}-{index}-{name}"] = value
    return data


@pytest.fixture
def one_of_each(world, operator) -> dict[type[models.Model], models.Model]:
    """A stored object of every model registered in the admin."""
    budget = BudgetFactory(tenant=world.alice)
    api_key, _secret = services.apikey_create(
        tenant=world.alice, name="ci", actor=services.Actor.from_user(operator)
    )
    version = services.policy_publish(actor=services.SYSTEM, reason="first publish")
    return {
        Tier: world.tier,
        ModelClass: world.frontier,
        AIModel: world.gpt,
        Tenant: world.alice,
        LimitRule: world.rule,
        Budget: budget,
        ApiKey: api_key,
        PolicyVersion: version,
        AuditEntry: AuditEntry.objects.get(target_type="apikey", target_id=str(api_key.pk)),
    }


@pytest.fixture
def operator_client(client, operator):
    client.force_login(operator)
    return client


# Every page renders


def test_every_limits_model_is_registered():
    assert {model._meta.model_name for model in LIMITS_MODELS} == {
        "aimodel",
        "apikey",
        "auditentry",
        "budget",
        "limitrule",
        "modelclass",
        "policyversion",
        "tenant",
        "tier",
    }


@pytest.mark.parametrize("model", LIMITS_MODELS, ids=lambda model: model._meta.model_name)
def test_operator_sees_every_changelist(operator_client, one_of_each, model):
    response = operator_client.get(admin_url(model, "changelist"))

    assert response.status_code == 200
    assert response.context["cl"].result_count >= 1


@pytest.mark.parametrize("model", LIMITS_MODELS, ids=lambda model: model._meta.model_name)
def test_operator_gets_every_add_page_except_for_history(operator_client, world, model):
    response = operator_client.get(admin_url(model, "add"))

    assert response.status_code == (403 if model in READ_ONLY_MODELS else 200)


@pytest.mark.parametrize("model", LIMITS_MODELS, ids=lambda model: model._meta.model_name)
def test_operator_sees_every_change_page(operator_client, one_of_each, model):
    response = operator_client.get(admin_url(model, "change", one_of_each[model].pk))

    assert response.status_code == 200
    if model in READ_ONLY_MODELS:
        assertNotContains(response, 'name="_save"')
    else:
        assertContains(response, 'name="_save"')


def test_policy_version_page_shows_the_document_pretty_printed(operator_client, one_of_each):
    version = one_of_each[PolicyVersion]

    response = operator_client.get(admin_url(PolicyVersion, "change", version.pk))

    assertContains(response, '<pre class="policy-document">{\n  &quot;currency&quot;')
    assertContains(response, "first publish")


# Edits go through the services


def test_editing_a_limit_on_the_tier_page_audits_old_and_new_value(
    operator_client, world, operator, django_capture_on_commit_callbacks
):
    url = admin_url(Tier, "change", world.tier.pk)
    data = form_data(operator_client.get(url))
    assert data["limits-0-id"] == world.rule.pk
    data["limits-0-limit"] = "250"

    with django_capture_on_commit_callbacks(execute=True):
        response = operator_client.post(url, data)

    assert response.status_code == 302
    world.rule.refresh_from_db()
    assert world.rule.limit == 250
    entry = AuditEntry.objects.get(target_type="limitrule", target_id=str(world.rule.pk))
    assert entry.action == "changed"
    assert entry.changes == {"limit": [100, 250]}
    assert entry.actor == operator
    assert entry.actor_label == "olivia"
    assert (entry.parent_type, entry.parent_id) == ("tier", str(world.tier.pk))
    published = PolicyVersion.objects.get()
    assert entry.policy_version == published.version
    assert published.actor_label == "olivia"
    alice_rules = published.document["tenants"][str(world.alice.pk)]["rules"]
    assert [(rule["id"], rule["limit"]) for rule in alice_rules] == [(world.rule.pk, 250)]


def test_saving_the_tier_page_unchanged_writes_no_audit_entry(operator_client, world):
    url = admin_url(Tier, "change", world.tier.pk)

    response = operator_client.post(url, form_data(operator_client.get(url)))

    assert response.status_code == 302
    assert AuditEntry.objects.count() == 0


def test_editing_a_limit_on_its_own_page_audits_old_and_new_value(operator_client, world, operator):
    url = admin_url(LimitRule, "change", world.rule.pk)
    data = form_data(operator_client.get(url))
    assert data["window_seconds"] == "1h"
    data.update(limit="40", window_seconds="30m")

    response = operator_client.post(url, data)

    assert response.status_code == 302
    world.rule.refresh_from_db()
    assert (world.rule.limit, world.rule.window_seconds) == (40, 1800)
    entry = AuditEntry.objects.get()
    assert entry.changes == {"limit": [100, 40], "window_seconds": [3600, 1800]}
    assert entry.actor == operator


def test_adding_a_rule_on_the_tier_page_creates_it_for_that_tier(operator_client, world):
    url = admin_url(Tier, "change", world.tier.pk)
    data = with_new_rule(
        form_data(operator_client.get(url)),
        "limits",
        scope=Scope.TENANT,
        metric=Metric.TOKENS,
        window_seconds="1d",
        limit="1000000",
        model_class=world.frontier.pk,
    )

    response = operator_client.post(url, data)

    assert response.status_code == 302
    rule = LimitRule.objects.get(metric=Metric.TOKENS)
    assert (rule.tier, rule.tenant, rule.scope, rule.window_seconds, rule.limit) == (
        world.tier,
        None,
        Scope.TENANT,
        86400,
        1_000_000,
    )
    assert rule.model_class == world.frontier
    entry = AuditEntry.objects.get()
    assert (entry.action, entry.target_type, entry.parent_type) == ("created", "limitrule", "tier")


def test_deleting_a_rule_on_the_tier_page_audits_the_deletion(operator_client, world):
    url = admin_url(Tier, "change", world.tier.pk)
    data = form_data(operator_client.get(url))
    data["limits-0-DELETE"] = "on"

    response = operator_client.post(url, data)

    assert response.status_code == 302
    assert LimitRule.objects.count() == 0
    entry = AuditEntry.objects.get()
    assert entry.action == "deleted"
    assert entry.changes["limit"] == [100, None]


def test_a_concurrency_rule_with_a_window_is_refused_in_plain_words(operator_client, world):
    url = admin_url(Tier, "change", world.tier.pk)
    data = with_new_rule(
        form_data(operator_client.get(url)),
        "limits",
        scope=Scope.USER,
        metric=Metric.CONCURRENCY,
        window_seconds="60",
        limit="4",
    )

    response = operator_client.post(url, data)

    assert response.status_code == 200
    assertContains(response, "Concurrency limits have no window; leave it empty.")
    assert list(LimitRule.objects.values_list("pk", flat=True)) == [world.rule.pk]
    assert AuditEntry.objects.count() == 0


def test_a_duplicate_rule_on_the_tier_page_shows_the_models_message(operator_client, world):
    url = admin_url(Tier, "change", world.tier.pk)
    data = with_new_rule(
        form_data(operator_client.get(url)),
        "limits",
        scope=Scope.USER_MODEL,
        metric=Metric.REQUESTS,
        window_seconds="3600",
        limit="7",
    )
    data["limits-0-limit"] = "300"

    response = operator_client.post(url, data)

    assert response.status_code == 200
    assertContains(response, DUPLICATE_RULE)
    world.rule.refresh_from_db()
    assert world.rule.limit == 100
    assert LimitRule.objects.count() == 1
    assert AuditEntry.objects.count() == 0


def test_a_window_that_is_not_a_duration_is_refused_in_plain_words(operator_client, world):
    url = admin_url(LimitRule, "change", world.rule.pk)
    data = form_data(operator_client.get(url))
    data["window_seconds"] = "an hour"

    response = operator_client.post(url, data)

    assert response.status_code == 200
    assertContains(
        response, "Write the window as whole seconds or a duration like 30s, 15m, 1h or 1d."
    )
    world.rule.refresh_from_db()
    assert world.rule.window_seconds == 3600


def test_a_duplicate_rule_on_the_rule_page_shows_the_models_message(operator_client, world):
    data = {
        "tier": world.tier.pk,
        "scope": Scope.USER_MODEL,
        "metric": Metric.REQUESTS,
        "window_seconds": "1h",
        "limit": "5",
    }

    response = operator_client.post(admin_url(LimitRule, "add"), data)

    assert response.status_code == 200
    assertContains(response, DUPLICATE_RULE)
    assert LimitRule.objects.count() == 1


def test_a_rule_with_both_a_tier_and_a_tenant_is_refused_in_plain_words(operator_client, world):
    data = {
        "tier": world.tier.pk,
        "tenant": world.alice.pk,
        "scope": Scope.USER,
        "metric": Metric.REQUESTS,
        "window_seconds": "60",
        "limit": "5",
    }

    response = operator_client.post(admin_url(LimitRule, "add"), data)

    assert response.status_code == 200
    assertContains(response, "A rule belongs to a tier (its default) or to a tenant")
    assert LimitRule.objects.count() == 1


def test_a_capacity_rule_added_on_the_model_class_page_is_global(operator_client, world):
    url = admin_url(ModelClass, "change", world.frontier.pk)
    data = with_new_rule(
        form_data(operator_client.get(url)),
        "limits",
        metric=Metric.REQUESTS,
        window_seconds="1m",
        limit="5000",
    )

    response = operator_client.post(url, data)

    assert response.status_code == 302
    rule = LimitRule.objects.get(model_class=world.frontier)
    assert (rule.scope, rule.tier, rule.tenant, rule.window_seconds, rule.limit) == (
        Scope.GLOBAL,
        None,
        None,
        60,
        5000,
    )


def test_a_new_tier_leads_to_its_page_to_add_limits(operator_client, db):
    response = operator_client.post(
        reverse("admin:limits_tier_add"),
        {"name": " Premium ", "priority": "200", "fail_mode": "open", "_save": "Save"},
    )

    tier = Tier.objects.get(name="premium")
    assert response.status_code == 302
    assert response["Location"] == reverse("admin:limits_tier_change", args=[tier.pk])
    entry = AuditEntry.objects.get()
    assert (entry.action, entry.target_type, entry.actor_label) == ("created", "tier", "olivia")


def test_editing_a_limit_in_the_rule_list_audits_old_and_new_value(
    operator_client, world, operator
):
    response = operator_client.post(
        admin_url(LimitRule, "changelist"),
        {
            "form-TOTAL_FORMS": "1",
            "form-INITIAL_FORMS": "1",
            "form-0-id": str(world.rule.pk),
            "form-0-limit": "120",
            "_save": "Save",
        },
    )

    assert response.status_code == 302
    world.rule.refresh_from_db()
    assert world.rule.limit == 120
    entry = AuditEntry.objects.get()
    assert (entry.changes, entry.actor) == ({"limit": [100, 120]}, operator)


def test_a_zero_limit_in_the_rule_list_is_refused_in_plain_words(operator_client, world):
    response = operator_client.post(
        admin_url(LimitRule, "changelist"),
        {
            "form-TOTAL_FORMS": "1",
            "form-INITIAL_FORMS": "1",
            "form-0-id": str(world.rule.pk),
            "form-0-limit": "0",
            "_save": "Save",
        },
    )

    assert response.status_code == 200
    assertContains(response, "The limit must be at least 1.")
    world.rule.refresh_from_db()
    assert world.rule.limit == 100
    assert AuditEntry.objects.count() == 0


def test_a_new_tenant_with_a_budget_is_created_and_leads_to_its_page(operator_client, world):
    add_url = admin_url(Tenant, "add")
    data = form_data(operator_client.get(add_url))
    assert "limits-TOTAL_FORMS" not in data
    data.update(
        {
            "slug": "Carol",
            "name": "Carol Inc",
            "tier": world.tier.pk,
            "is_active": "on",
            "budgets-TOTAL_FORMS": "1",
            "budgets-0-period": "month",
            "budgets-0-token_limit": "20000000",
            "budgets-0-cost_limit": "800.00",
            "budgets-0-is_hard": "on",
            "budgets-0-alert_thresholds": "[100, 80]",
            "_save": "Save",
        }
    )

    response = operator_client.post(add_url, data)

    carol = Tenant.objects.get(slug="carol")
    assert response["Location"] == admin_url(Tenant, "change", carol.pk)
    budget = Budget.objects.get(tenant=carol)
    assert (budget.token_limit, str(budget.cost_limit), budget.alert_thresholds) == (
        20_000_000,
        "800.0000",
        [80, 100],
    )
    assert sorted(AuditEntry.objects.values_list("target_type", "action")) == [
        ("budget", "created"),
        ("tenant", "created"),
    ]


def test_the_tier_list_counts_tenants_and_links_to_them(operator_client, world):
    response = operator_client.get(admin_url(Tier, "changelist"))

    tenants_url = admin_url(Tenant, "changelist") + f"?tier__id__exact={world.tier.pk}"
    assertContains(response, f'<a href="{tenants_url}">2</a>', html=True)
    tenants = operator_client.get(tenants_url)
    assert [tenant.slug for tenant in tenants.context["cl"].result_list] == ["alice", "bob"]


def test_deleting_a_tenant_audits_its_overrides_budgets_and_keys(operator_client, world, operator):
    override = LimitRuleFactory(tier=None, tenant=world.alice, limit=500)
    BudgetFactory(tenant=world.alice)
    services.apikey_create(tenant=world.alice, name="ci", actor=services.SYSTEM)
    before = AuditEntry.objects.count()

    response = operator_client.post(admin_url(Tenant, "delete", world.alice.pk), {"post": "yes"})

    assert response.status_code == 302
    deleted = AuditEntry.objects.filter(action="deleted").order_by("id")
    assert AuditEntry.objects.count() == before + 4
    assert [entry.target_type for entry in deleted] == ["limitrule", "budget", "apikey", "tenant"]
    assert deleted[0].target_id == str(override.pk)
    assert not LimitRule.objects.filter(pk=override.pk).exists()


# The tenant page


def test_tenant_page_shows_the_override_in_place_of_the_tier_rule(operator_client, world):
    LimitRuleFactory(tier=None, tenant=world.alice, limit=500, window_seconds=3600)
    LimitRuleFactory(
        tier=world.tier,
        scope=Scope.TENANT,
        metric=Metric.TOKENS,
        window_seconds=86400,
        limit=1_000_000,
        model_class=world.frontier,
    )
    LimitRuleFactory(
        tier=None,
        scope=Scope.GLOBAL,
        metric=Metric.CONCURRENCY,
        window_seconds=None,
        limit=64,
        model_class=world.frontier,
        is_shadow=True,
    )

    response = operator_client.get(admin_url(Tenant, "change", world.alice.pk))

    assert response.context["effective_policy"] == [
        EffectiveRow(
            "every model", "user_model", "requests", "1h", "500", "override (tier: 100)", False
        ),
        EffectiveRow("frontier", "tenant", "tokens", "1d", "1,000,000", "tier standard", False),
        EffectiveRow(
            "frontier", "global", "concurrency", "-", "64", "capacity (all tenants)", True
        ),
    ]
    assertContains(
        response,
        "<tr class='effective-rule'><td>user_model</td><td>requests</td><td>1h</td>"
        "<td>500</td><td>every model</td><td>override (tier: 100)</td><td>—</td></tr>",
        html=True,
    )
    bob = operator_client.get(admin_url(Tenant, "change", world.bob.pk))
    assert bob.context["effective_policy"][0] == EffectiveRow(
        "every model", "user_model", "requests", "1h", "100", "tier standard", False
    )


def test_tenant_page_shows_the_audit_trail_of_its_overrides(operator_client, world):
    url = admin_url(Tenant, "change", world.alice.pk)
    data = with_new_rule(
        form_data(operator_client.get(url)),
        "limits",
        scope=Scope.USER_MODEL,
        metric=Metric.REQUESTS,
        window_seconds="1h",
        limit="500",
    )
    assert operator_client.post(url, data).status_code == 302

    response = operator_client.get(url)

    [row] = response.context["audit_trail"]
    assert (row.actor, row.action, row.target) == (
        "olivia",
        "created",
        "limitrule user_model requests 500 per 1h",
    )
    assert ("limit", "—", "500") in row.changes
    assertContains(response, "limit: — → 500")
    trail_url = reverse("admin:limits_auditentry_changelist") + f"?trail=tenant%3A{world.alice.pk}"
    assert response.context["audit_trail_url"] == trail_url
    trail = operator_client.get(trail_url)
    assert [entry.target_type for entry in trail.context["cl"].result_list] == ["limitrule"]
    bob = operator_client.get(admin_url(Tenant, "change", world.bob.pk))
    assert bob.context["audit_trail"] == []


def test_audit_trail_on_a_page_shows_the_latest_entries_only(operator_client, world):
    for limit in range(101, 101 + AUDIT_TRAIL_LENGTH + 5):
        world.rule.limit = limit
        services.object_save(instance=world.rule, actor=services.SYSTEM)

    response = operator_client.get(admin_url(LimitRule, "change", world.rule.pk))

    rows = response.context["audit_trail"]
    assert len(rows) == AUDIT_TRAIL_LENGTH
    assert rows[0].changes == [("limit", "154", "155")]
    assert response.context["audit_trail_is_cut"] is True
    assertContains(response, f"The latest {AUDIT_TRAIL_LENGTH} entries.")


# API keys


def test_creating_a_key_shows_it_once_and_never_again(operator_client, world, operator):
    response = operator_client.post(
        admin_url(ApiKey, "add"), {"tenant": world.alice.pk, "name": " deploy bot "}
    )

    assert response.status_code == 200
    assertTemplateUsed(response, "admin/limits/apikey/created.html")
    secret = response.context["secret"]
    assert re.fullmatch(r"qk_[A-Za-z0-9]+_\S+", secret)
    assertContains(response, f'value="{secret}"')
    assert "no-store" in response["Cache-Control"]
    api_key = ApiKey.objects.get()
    assert (api_key.tenant, api_key.name, api_key.created_by) == (
        world.alice,
        "deploy bot",
        operator,
    )
    assert secret.startswith(f"qk_{api_key.prefix}_")
    for url in (
        admin_url(ApiKey, "change", api_key.pk),
        admin_url(ApiKey, "changelist"),
        admin_url(Tenant, "change", world.alice.pk),
        reverse("admin:limits_auditentry_changelist"),
    ):
        page = operator_client.get(url)
        assertNotContains(page, secret)
        assertNotContains(page, api_key.secret_hash)
    assertContains(
        operator_client.get(admin_url(ApiKey, "change", api_key.pk)), f"qk_{api_key.prefix}_…"
    )
    for session in Session.objects.all():
        assert secret not in str(session.get_decoded())
    for log_entry in LogEntry.objects.all():
        assert secret not in f"{log_entry.object_repr} {log_entry.change_message}"
    entry = AuditEntry.objects.get(target_type="apikey")
    assert (entry.action, entry.actor) == ("created", operator)


def test_a_key_without_a_name_is_refused_in_plain_words(operator_client, world):
    response = operator_client.post(
        admin_url(ApiKey, "add"), {"tenant": world.alice.pk, "name": "  "}
    )

    assert response.status_code == 200
    assertContains(response, "This field is required.")
    assert ApiKey.objects.count() == 0


def test_the_tenant_page_links_to_creating_a_key_for_that_tenant(operator_client, world):
    response = operator_client.get(admin_url(Tenant, "change", world.alice.pk))

    add_url = admin_url(ApiKey, "add") + f"?tenant={world.alice.pk}"
    assertContains(response, f'href="{add_url}"')
    add_page = operator_client.get(add_url)
    assert add_page.context["adminform"].form.initial["tenant"] == str(world.alice.pk)


def test_revoking_selected_keys_sets_revoked_at_and_audits(operator_client, world, operator):
    alice_key, _ = services.apikey_create(tenant=world.alice, name="a", actor=services.SYSTEM)
    bob_key, _ = services.apikey_create(tenant=world.bob, name="b", actor=services.SYSTEM)

    response = operator_client.post(
        admin_url(ApiKey, "changelist"),
        {"action": "revoke_selected", "_selected_action": [alice_key.pk]},
        follow=True,
    )

    assertContains(response, "Revoked 1 key.")
    alice_key.refresh_from_db()
    bob_key.refresh_from_db()
    assert alice_key.revoked_at is not None
    assert bob_key.revoked_at is None
    entry = AuditEntry.objects.get(action="revoked")
    assert (entry.target_id, entry.actor) == (str(alice_key.pk), operator)


def test_an_api_key_page_offers_no_way_to_edit_its_prefix_or_see_its_hash(operator_client, world):
    api_key, _ = services.apikey_create(tenant=world.alice, name="ci", actor=services.SYSTEM)
    url = admin_url(ApiKey, "change", api_key.pk)

    form = operator_client.get(url).context["adminform"].form

    assert set(form.fields) == {"name"}
    response = operator_client.post(
        url, {"name": "renamed", "prefix": "stolen", "secret_hash": "0" * 64}
    )
    assert response.status_code == 302
    stored = ApiKey.objects.get()
    assert (stored.name, stored.prefix, stored.secret_hash) == (
        "renamed",
        api_key.prefix,
        api_key.secret_hash,
    )


# Query counts


@pytest.fixture
def twenty_tenants(world) -> None:
    for number in range(20):
        tenant = TenantFactory(slug=f"tenant{number:02}", tier=world.tier)
        LimitRuleFactory(tier=None, tenant=tenant, limit=500 + number)
        BudgetFactory(tenant=tenant)
        services.apikey_create(tenant=tenant, name="ci", actor=services.SYSTEM)
    services.policy_publish(actor=services.SYSTEM, reason="twenty tenants")


@pytest.mark.parametrize(
    ("model_name", "max_queries"),
    [
        ("tier", 7),
        ("tenant", 8),
        ("limitrule", 9),
        ("budget", 8),
        ("apikey", 8),
        ("aimodel", 8),
        ("modelclass", 7),
        ("auditentry", 10),
        ("policyversion", 9),
    ],
)
def test_changelists_cost_a_constant_number_of_queries(
    operator_client, twenty_tenants, django_assert_max_num_queries, model_name, max_queries
):
    url = reverse(f"admin:limits_{model_name}_changelist")

    with django_assert_max_num_queries(max_queries):
        response = operator_client.get(url)

    assert response.status_code == 200


@pytest.mark.parametrize("model_name", ["tier", "tenant"])
def test_rule_pages_cost_the_same_queries_for_one_rule_or_ten(
    operator_client, world, django_assert_num_queries, model_name
):
    owner = {"tier": world.tier, "tenant": world.alice}[model_name]
    url = reverse(f"admin:limits_{model_name}_change", args=[owner.pk])
    operator_client.get(url)  # warms the caches every first request fills
    with CaptureQueriesContext(connection) as one_rule:
        operator_client.get(url)
    for seconds in range(60, 70):
        LimitRuleFactory(
            tier=world.tier if model_name == "tier" else None,
            tenant=world.alice if model_name == "tenant" else None,
            window_seconds=seconds,
            model_class=world.frontier,
        )

    with django_assert_num_queries(len(one_rule)):
        response = operator_client.get(url)

    assert len(response.context["inline_admin_formsets"][0].formset.forms) >= 10


def test_tenant_page_costs_a_bounded_number_of_queries(
    operator_client, twenty_tenants, world, django_assert_max_num_queries
):
    with django_assert_max_num_queries(17):
        response = operator_client.get(admin_url(Tenant, "change", world.alice.pk))

    assert response.status_code == 200
