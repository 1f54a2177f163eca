"""The two staff roles in the admin: operators edit limits, finance reads and changes nothing,
and the history (audit trail, policy versions) is read-only for everyone."""

from __future__ import annotations

import pytest
from django.contrib import admin
from django.contrib.auth.models import Group
from django.test import RequestFactory
from django.urls import reverse

from limits import services
from limits.models import ApiKey, AuditEntry, LimitRule, PolicyVersion, Tier
from limits.roles import FINANCE, OPERATORS
from tests.limits.test_admin import LIMITS_MODELS, READ_ONLY_MODELS, admin_url, form_data

ALL_ADMINS = sorted(admin.site._registry.items(), key=lambda item: item[0]._meta.label)


def admin_request(user):  # type: ignore[no-untyped-def]
    request = RequestFactory().get("/admin/")
    request.user = user
    return request


def test_both_groups_exist_with_their_permissions(db):
    operators = set(
        Group.objects.get(name=OPERATORS).permissions.values_list("codename", flat=True)
    )
    finance = set(Group.objects.get(name=FINANCE).permissions.values_list("codename", flat=True))

    assert {"change_limitrule", "add_tier", "delete_budget", "change_apikey"} <= operators
    assert {"view_auditentry", "view_policyversion"} <= operators
    assert not {"change_auditentry", "add_policyversion", "delete_auditentry"} & operators
    assert finance
    assert all(codename.startswith("view_") for codename in finance)


@pytest.mark.parametrize(
    ("model", "model_admin"), ALL_ADMINS, ids=[model._meta.label for model, _ in ALL_ADMINS]
)
def test_finance_may_not_add_change_or_delete_anything(world, finance_user, model, model_admin):
    request = admin_request(finance_user)
    instance = model._default_manager.first()

    assert model_admin.has_add_permission(request) is False
    assert model_admin.has_change_permission(request) is False
    assert model_admin.has_change_permission(request, instance) is False
    assert model_admin.has_delete_permission(request) is False
    assert model_admin.has_delete_permission(request, instance) is False
    assert model_admin.get_actions(request) == {}


@pytest.mark.parametrize("model", LIMITS_MODELS, ids=lambda model: model._meta.model_name)
def test_finance_may_view_every_list(client, world, finance_user, model):
    client.force_login(finance_user)

    assert client.get(admin_url(model, "changelist")).status_code == 200


def test_finance_sees_the_tier_page_read_only(client, world, finance_user):
    client.force_login(finance_user)

    response = client.get(admin_url(Tier, "change", world.tier.pk))

    assert response.status_code == 200
    assert response.context["has_change_permission"] is False
    assert response.context["adminform"].form.fields == {}
    assert "audit_trail" in response.context


def test_a_finance_post_to_a_change_page_is_refused_and_changes_nothing(
    client, world, operator, finance_user
):
    url = admin_url(Tier, "change", world.tier.pk)
    client.force_login(operator)
    data = form_data(client.get(url))
    data.update({"priority": "7", "limits-0-limit": "999"})
    client.force_login(finance_user)

    response = client.post(url, data)

    assert response.status_code == 403
    world.tier.refresh_from_db()
    world.rule.refresh_from_db()
    assert (world.tier.priority, world.rule.limit) == (100, 100)
    assert AuditEntry.objects.count() == 0


def test_finance_may_not_add_a_rule(client, world, finance_user):
    client.force_login(finance_user)
    data = {"tier": world.tier.pk, "scope": "user", "metric": "requests", "limit": "5"}

    response = client.post(admin_url(LimitRule, "add"), {**data, "window_seconds": "60"})

    assert response.status_code == 403
    assert LimitRule.objects.count() == 1


def test_finance_may_not_revoke_a_key(client, world, finance_user):
    api_key, _ = services.apikey_create(tenant=world.alice, name="ci", actor=services.SYSTEM)
    client.force_login(finance_user)

    client.post(
        admin_url(ApiKey, "changelist"),
        {"action": "revoke_selected", "_selected_action": [api_key.pk]},
    )

    api_key.refresh_from_db()
    assert api_key.revoked_at is None
    assert AuditEntry.objects.filter(action="revoked").count() == 0


@pytest.mark.parametrize("model", LIMITS_MODELS, ids=lambda model: model._meta.model_name)
def test_operators_edit_limits_and_only_read_history(world, operator, model):
    model_admin = admin.site._registry[model]
    request = admin_request(operator)
    may_edit = model not in READ_ONLY_MODELS

    assert model_admin.has_view_permission(request) is True
    assert model_admin.has_add_permission(request) is may_edit
    assert model_admin.has_change_permission(request) is may_edit
    assert model_admin.has_delete_permission(request) is may_edit


@pytest.mark.parametrize("model", sorted(READ_ONLY_MODELS, key=lambda model: model.__name__))
def test_history_is_read_only_even_for_superusers(world, superuser, model):
    model_admin = admin.site._registry[model]
    request = admin_request(superuser)

    assert model_admin.has_view_permission(request) is True
    assert model_admin.has_add_permission(request) is False
    assert model_admin.has_change_permission(request) is False
    assert model_admin.has_delete_permission(request) is False


def test_a_superuser_post_to_an_audit_entry_is_refused(client, world, superuser):
    world.rule.limit = 200
    services.object_save(instance=world.rule, actor=services.SYSTEM)
    entry = AuditEntry.objects.get()
    version = services.policy_publish(actor=services.SYSTEM, reason="test")
    client.force_login(superuser)

    assert client.post(admin_url(AuditEntry, "change", entry.pk), {}).status_code == 403
    assert (
        client.post(admin_url(AuditEntry, "delete", entry.pk), {"post": "yes"}).status_code == 403
    )
    assert (
        client.post(admin_url(PolicyVersion, "delete", version.pk), {"post": "yes"}).status_code
        == 403
    )
    assert AuditEntry.objects.get().changes == {"limit": [100, 200]}
    assert PolicyVersion.objects.count() == 1


def test_staff_without_a_group_sees_no_quota_model(client, world, django_user_model):
    user = django_user_model.objects.create_user("nobody", password="pw", is_staff=True)
    client.force_login(user)

    assert client.get(reverse("admin:limits_tier_changelist")).status_code == 403
