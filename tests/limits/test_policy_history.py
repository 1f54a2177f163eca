"""Reading published versions (``limits.selectors``): the difference between two compiled
documents, and what restoring one leaves as it is."""

from __future__ import annotations

from decimal import Decimal

import pytest

from limits import services
from limits.models import LimitRule, Scope
from limits.policy import policy_compile
from limits.selectors import (
    PolicyChange,
    UnreadableDocument,
    policy_diff,
    policy_restore_for,
)
from tests.factories import (
    AIModelFactory,
    BudgetFactory,
    LimitRuleFactory,
    TenantFactory,
    TierFactory,
)


def test_nothing_changed_is_no_difference(world):
    document = policy_compile()

    assert policy_diff(old=document, new=document) == []


def test_a_rule_made_again_with_the_same_values_is_no_difference(world):
    before = policy_compile()
    world.rule.delete()
    LimitRuleFactory(tier=world.tier, limit=100, window_seconds=3600)

    after = policy_compile()

    assert before["tenants"] != after["tenants"]  # the rule's id differs
    assert policy_diff(old=before, new=after) == []


def test_changes_are_listed_per_model_capacity_tier_and_tenant(world):
    before = policy_compile()
    world.gpt.input_price_per_1k = Decimal("0.003")
    world.gpt.save()
    AIModelFactory(model_id="gpt-5", model_class=world.frontier)
    LimitRuleFactory(
        tier=None, scope=Scope.GLOBAL, model_class=world.frontier, window_seconds=60, limit=5000
    )
    world.rule.limit = 250
    world.rule.is_shadow = True
    world.rule.save()
    LimitRuleFactory(
        tier=None,
        tenant=world.alice,
        scope=Scope.TENANT,
        metric="tokens",
        window_seconds=86400,
        limit=1_000_000,
        model_class=world.frontier,
    )
    BudgetFactory(tenant=world.bob, token_limit=None, cost_limit=Decimal("800.00"), is_hard=False)
    premium = TierFactory(name="premium", fail_mode="open")
    TenantFactory(slug="carol", tier=premium)

    after = policy_compile()

    assert policy_diff(old=before, new=after) == [
        PolicyChange("model gpt-4o", "input price per 1K", "changed", "0.002500", "0.003000"),
        PolicyChange(
            "model gpt-5", "model", "added", "—", "frontier: 0.002500 in / 0.010000 out per 1K"
        ),
        PolicyChange("capacity of frontier", "requests per 1m", "added", "—", "5,000"),
        PolicyChange("tier premium", "tier (in use by a tenant)", "added", "—", "fail mode open"),
        PolicyChange(
            "tier standard", "user_model requests per 1h", "changed", "100", "250 (shadow)"
        ),
        PolicyChange(
            "tenant alice", "override tenant tokens per 1d [frontier]", "added", "—", "1,000,000"
        ),
        PolicyChange(
            "tenant bob", "month budget", "added", "—", "800.0000 USD, soft, alerts at 80 %, 100 %"
        ),
        PolicyChange("tenant carol", "tenant", "added", "—", "tier premium"),
    ]


def test_a_removed_tenant_and_tier_are_listed_with_what_they_had(world):
    LimitRuleFactory(tier=None, tenant=world.bob, scope=Scope.USER, limit=7)
    before = policy_compile()
    world.bob.delete()
    world.alice.is_active = False
    world.alice.save()

    after = policy_compile()

    assert policy_diff(old=before, new=after) == [
        PolicyChange("tenant alice", "active", "changed", "yes", "no"),
        PolicyChange("tenant bob", "tenant", "removed", "tier standard", "—"),
        PolicyChange("tenant bob", "override user requests per 1h", "removed", "7", "—"),
    ]


def test_a_document_of_another_shape_is_reported_not_crashed_on(world):
    with pytest.raises(UnreadableDocument, match="cannot be read"):
        policy_diff(old={"tenants": {"1": {"tier": "x"}}}, new=policy_compile())


def test_restoring_keeps_a_tier_rule_that_every_tenant_overrides(world):
    # Both tenants override the tier's rule, so no document holds the tier's own value.
    LimitRuleFactory(tier=None, tenant=world.alice, limit=500)
    LimitRuleFactory(tier=None, tenant=world.bob, limit=600)
    old = services.policy_publish(actor=services.SYSTEM, reason="overrides")
    world.rule.limit = 50
    world.rule.save()

    restore = policy_restore_for(version=old)

    [tier] = restore.data["tiers"]
    assert tier["limits"] == [
        {"metric": "requests", "limit": 50, "shadow": False, "scope": "user_model", "window": 3600}
    ]


def test_restoring_names_what_it_leaves_alone(world):
    old = services.policy_publish(actor=services.SYSTEM, reason="two tenants")
    TenantFactory(slug="carol", tier=world.tier)
    AIModelFactory(model_id="gpt-5", model_class=world.frontier)
    bob_slug = world.bob.slug
    world.bob.delete()

    restore = policy_restore_for(version=old)

    assert restore.left_alone == [
        f"Tenant {bob_slug} was deleted after {old}; a rollback does not bring back a deleted "
        "tenant.",
        f"Tenant carol is not in {old}; it is left as it is.",
        f"AI model gpt-5 is not in {old}; it stays active (switch it off by hand if it should go).",
    ]
    assert [tenant["slug"] for tenant in restore.data["tenants"]] == ["alice"]


def test_a_version_without_tenants_leaves_capacity_as_it_is(world):
    LimitRule.objects.all().delete()
    world.alice.delete()
    world.bob.delete()
    old = services.policy_publish(actor=services.SYSTEM, reason="no tenants")
    LimitRuleFactory(
        tier=None, scope=Scope.GLOBAL, model_class=world.frontier, window_seconds=60, limit=5000
    )

    restore = policy_restore_for(version=old)

    frontier = next(item for item in restore.data["model_classes"] if item["name"] == "frontier")
    assert frontier["capacity"] == [
        {"metric": "requests", "limit": 5000, "shadow": False, "window": 60}
    ]
    assert restore.left_alone == [f"{old} has no tenants, so capacity limits are left as they are."]
