"""Compiling the quota model into the document the engine enforces, and publishing it.

The document is self-contained (rules, budgets, prices, model classes), so a process
that holds it needs no SQL to decide a check. Every publish is a new version; a process
swaps the whole document at once, never half of it.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

from limits.models import AIModel, Budget, Tenant
from limits.selectors import EffectiveRule, capacity_rules_all, effective_policy_for_tenant


def _rule_document(rule: EffectiveRule) -> dict[str, Any]:
    return {
        "id": rule.rule_id,
        "source": rule.source,
        "scope": rule.scope,
        "metric": rule.metric,
        "window": rule.window_seconds,
        "limit": rule.limit,
        "class": rule.model_class,
        "shadow": rule.is_shadow,
    }


def policy_compile() -> dict[str, Any]:
    """The whole enforced policy as plain JSON-able data (version added on publish)."""
    models = {
        model.model_id: {
            "class": model.model_class.name,
            "input_price_per_1k": str(model.input_price_per_1k),
            "output_price_per_1k": str(model.output_price_per_1k),
        }
        for model in AIModel.objects.filter(is_active=True).select_related("model_class")
    }
    capacity = list(capacity_rules_all())
    budgets_by_tenant: dict[int, list[dict[str, Any]]] = {}
    for budget in Budget.objects.order_by("tenant_id", "period"):
        budgets_by_tenant.setdefault(budget.tenant_id, []).append(
            {
                "id": budget.pk,
                "period": budget.period,
                "tokens": budget.token_limit,
                "cost": str(budget.cost_limit) if budget.cost_limit is not None else None,
                "hard": budget.is_hard,
                "alert_at": list(budget.alert_thresholds),
            }
        )
    tenants: dict[str, Any] = {}
    for tenant in Tenant.objects.select_related("tier").order_by("pk"):
        rules = effective_policy_for_tenant(tenant=tenant, capacity_rules=capacity)
        tenants[str(tenant.pk)] = {
            "slug": tenant.slug,
            "active": tenant.is_active,
            "tier": tenant.tier.name,
            "fail_mode": tenant.tier.fail_mode,
            "priority": tenant.tier.priority,
            "rules": [_rule_document(rule) for rule in rules],
            "budgets": budgets_by_tenant.get(tenant.pk, []),
        }
    return {"currency": settings.BILLING_CURRENCY, "models": models, "tenants": tenants}


def policy_push(*, version: Any) -> None:
    """Hand a freshly recorded version to the enforcement layer (Redis or in-process)."""
    from limits import engine

    engine.policy_store().publish(version.version, version.document)
