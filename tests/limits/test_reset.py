"""Resetting one end user's windows: the service, and the admin form an operator uses."""

from __future__ import annotations

import pytest
from django.contrib.messages import get_messages
from django.core.exceptions import ValidationError
from django.urls import reverse
from pytest_django.asserts import assertContains, assertNotContains

from limits import engine, services
from limits.engine import EngineUnavailable
from limits.models import AuditEntry, Tenant
from tests.processes import free_port


@pytest.fixture
def at_limit(world):
    """User u1 of alice and of bob has used both of their 2 requests on gpt-4o."""
    world.rule.limit = 2
    world.rule.save()
    version = services.policy_publish(actor=services.SYSTEM, reason="limit of 2")
    engine.policy_store().publish(version.version, version.document)
    for tenant in (world.alice, world.bob):
        for _ in range(2):
            assert engine.check(tenant.pk, "u1", "gpt-4o").allowed
        assert not engine.check(tenant.pk, "u1", "gpt-4o").allowed
    assert engine.check(world.alice.pk, "u1", "llama-3-8b").allowed
    return version


def remaining(tenant: Tenant, user_id: str, model: str) -> int:
    (state,) = engine.quota(tenant.pk, user_id, model).limits
    return int(state.remaining)


def reset_url(tenant: Tenant) -> str:
    return reverse("admin:limits_tenant_reset_user", args=[tenant.pk])


def tenant_url(tenant: Tenant) -> str:
    return reverse("admin:limits_tenant_change", args=[tenant.pk])


# The service


def test_user_reset_clears_the_users_windows_on_every_model(world, at_limit, operator):
    removed = services.user_reset(
        tenant=world.alice, user_id="u1", actor=services.Actor.from_user(operator)
    )

    assert removed == 2  # the windows of gpt-4o and llama-3-8b
    assert remaining(world.alice, "u1", "gpt-4o") == 2
    assert remaining(world.alice, "u1", "llama-3-8b") == 2
    assert remaining(world.bob, "u1", "gpt-4o") == 0
    entry = AuditEntry.objects.get(action=AuditEntry.Action.RESET)
    assert (entry.target_type, entry.target_id, entry.target_repr) == (
        "tenant",
        str(world.alice.pk),
        str(world.alice),
    )
    assert entry.changes == {
        "user_id": [None, "u1"],
        "model": [None, "every model"],
        "keys_removed": [None, 2],
    }
    assert (entry.actor, entry.actor_label) == (operator, "olivia")
    assert entry.policy_version == at_limit.version


def test_user_reset_of_one_model_leaves_the_users_other_models(world, at_limit):
    removed = services.user_reset(
        tenant=world.alice, user_id="u1", model_id="llama-3-8b", actor=services.SYSTEM
    )

    assert removed == 1
    assert remaining(world.alice, "u1", "llama-3-8b") == 2
    assert remaining(world.alice, "u1", "gpt-4o") == 0
    entry = AuditEntry.objects.get(action=AuditEntry.Action.RESET)
    assert entry.changes["model"] == [None, "llama-3-8b"]


def test_user_reset_of_a_user_with_nothing_counted_removes_nothing_and_says_so(world, at_limit):
    removed = services.user_reset(tenant=world.alice, user_id="nobody", actor=services.SYSTEM)

    assert removed == 0
    assert AuditEntry.objects.get(action="reset").changes["keys_removed"] == [None, 0]


@pytest.mark.parametrize(
    ("user_id", "model_id", "field"),
    [("", None, "user_id"), ("   ", None, "user_id"), ("u1", "no-such-model", "model_id")],
)
def test_user_reset_refuses_bad_input_and_changes_nothing(
    world, at_limit, user_id, model_id, field
):
    with pytest.raises(ValidationError) as raised:
        services.user_reset(
            tenant=world.alice, user_id=user_id, model_id=model_id, actor=services.SYSTEM
        )

    assert list(raised.value.message_dict) == [field]
    assert remaining(world.alice, "u1", "gpt-4o") == 0
    assert not AuditEntry.objects.filter(action="reset").exists()


def test_user_reset_with_redis_unreachable_raises_and_records_nothing(world, settings):
    world.rule.limit = 2
    world.rule.save()
    version = services.policy_publish(actor=services.SYSTEM, reason="limit of 2")
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    engine.reset_state()
    engine.policy_store().publish(version.version, version.document)

    with pytest.raises(EngineUnavailable):
        services.user_reset(tenant=world.alice, user_id="u1", actor=services.SYSTEM)

    assert not AuditEntry.objects.filter(action="reset").exists()


# The admin form


def test_operator_resets_a_user_from_the_tenant_page_and_their_next_check_passes(
    client, operator, world, at_limit
):
    client.force_login(operator)
    page = client.get(tenant_url(world.alice))
    assertContains(
        page, f'<a href="{reset_url(world.alice)}">Reset a user\'s limits</a>', html=True
    )

    form = client.get(reset_url(world.alice))
    assert form.status_code == 200
    assertContains(form, '<option value="gpt-4o">gpt-4o</option>', html=True)
    assertContains(form, '<option value="llama-3-8b">llama-3-8b</option>', html=True)

    confirmation = client.post(reset_url(world.alice), {"user_id": "u1", "model": "gpt-4o"})
    assert confirmation.status_code == 200
    assertContains(confirmation, 'name="confirm"')
    assertContains(confirmation, "<strong>u1</strong>", html=True)
    # Asking is not doing: nothing was reset before the confirmation.
    assert remaining(world.alice, "u1", "gpt-4o") == 0
    assert not AuditEntry.objects.filter(action="reset").exists()

    done = client.post(
        reset_url(world.alice), {"user_id": "u1", "model": "gpt-4o", "confirm": "Yes, reset"}
    )

    assert done.status_code == 302
    assert done["Location"] == tenant_url(world.alice)
    assert [str(message) for message in get_messages(done.wsgi_request)] == [
        "Reset the windows of user u1 on gpt-4o (1 key removed)."
    ]
    decision = engine.check(world.alice.pk, "u1", "gpt-4o")
    assert decision.allowed
    assert decision.limits[0].remaining == 1
    assert not engine.check(world.bob.pk, "u1", "gpt-4o").allowed
    entry = AuditEntry.objects.get(action=AuditEntry.Action.RESET)
    assert (entry.target_type, entry.target_id, entry.actor) == (
        "tenant",
        str(world.alice.pk),
        operator,
    )
    assert entry.changes["user_id"] == [None, "u1"]
    trail = client.get(tenant_url(world.alice))
    assertContains(trail, "user_id: — → u1")


def test_superuser_may_reset_too(client, superuser, world, at_limit):
    client.force_login(superuser)

    response = client.post(reset_url(world.alice), {"user_id": "u1", "model": "", "confirm": "1"})

    assert response.status_code == 302
    assert remaining(world.alice, "u1", "gpt-4o") == 2


def test_finance_may_neither_see_nor_use_the_reset(client, finance_user, world, at_limit):
    client.force_login(finance_user)

    page = client.get(tenant_url(world.alice))
    form = client.get(reset_url(world.alice))
    post = client.post(reset_url(world.alice), {"user_id": "u1", "model": "", "confirm": "1"})

    assert page.status_code == 200
    assertNotContains(page, "Reset a user")
    assert (form.status_code, post.status_code) == (403, 403)
    assert remaining(world.alice, "u1", "gpt-4o") == 0
    assert not AuditEntry.objects.filter(action="reset").exists()


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"user_id": "", "model": ""}, "This field is required."),
        ({"user_id": "  ", "model": "", "confirm": "1"}, "Enter the end user&#x27;s id."),
        (
            {"user_id": "u1", "model": "no-such-model", "confirm": "1"},
            "Select a valid choice. no-such-model is not one of the available choices.",
        ),
    ],
    ids=["empty user", "blank user", "unknown model"],
)
def test_bad_input_in_the_reset_form_is_a_form_error(
    client, operator, world, at_limit, data, error
):
    client.force_login(operator)

    response = client.post(reset_url(world.alice), data)

    assertContains(response, error, status_code=200)
    assertNotContains(response, 'name="confirm"')
    assert remaining(world.alice, "u1", "gpt-4o") == 0
    assert not AuditEntry.objects.filter(action="reset").exists()


def test_reset_form_of_an_unknown_tenant_is_not_found(client, operator, world):
    client.force_login(operator)

    response = client.get(reverse("admin:limits_tenant_reset_user", args=[999_999]))

    assert response.status_code == 404


def test_reset_with_redis_unreachable_is_a_form_error(client, operator, world, settings):
    version = services.policy_publish(actor=services.SYSTEM, reason="first")
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    engine.reset_state()
    engine.policy_store().publish(version.version, version.document)
    client.force_login(operator)

    response = client.post(reset_url(world.alice), {"user_id": "u1", "model": "", "confirm": "1"})

    assertContains(response, "unreachable, so nothing was reset", status_code=200)
    assert not AuditEntry.objects.filter(action="reset").exists()
