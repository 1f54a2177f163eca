"""Reads of the quota model, shared by admin, policy compilation and the policy file."""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import QuerySet

from limits.models import AuditEntry, LimitRule, Scope, Tenant

SCOPE_ORDER = {scope: index for index, scope in enumerate(Scope.values)}
METRIC_ORDER = {"requests": 0, "tokens": 1, "concurrency": 2}


@dataclass(frozen=True)
class EffectiveRule:
    """A rule as it applies to one tenant, and where it comes from."""

    source: str  # "tier", "tenant" (override) or "capacity" (model class, every tenant)
    scope: str
    metric: str
    window_seconds: int | None
    limit: int
    model_class: str | None
    is_shadow: bool
    rule_id: int

    @property
    def identity(self) -> tuple[str, str, str | None, int | None]:
        return (self.scope, self.metric, self.model_class, self.window_seconds)


def rule_sort_key(rule: LimitRule | EffectiveRule) -> tuple[object, ...]:
    model_class = (
        rule.model_class
        if isinstance(rule, EffectiveRule)
        else (rule.model_class.name if rule.model_class_id else None)
    )
    return (
        SCOPE_ORDER.get(rule.scope, 99),
        METRIC_ORDER.get(rule.metric, 99),
        model_class or "",
        rule.window_seconds or 0,
    )


def _effective(rule: LimitRule, source: str) -> EffectiveRule:
    return EffectiveRule(
        source=source,
        scope=rule.scope,
        metric=rule.metric,
        window_seconds=rule.window_seconds,
        limit=rule.limit,
        model_class=rule.model_class.name if rule.model_class_id else None,
        is_shadow=rule.is_shadow,
        rule_id=rule.pk,
    )


def effective_policy_for_tenant(
    *, tenant: Tenant, capacity_rules: list[LimitRule] | None = None
) -> list[EffectiveRule]:
    """The tier's rules with the tenant's overrides applied, plus global capacity rules.

    An override replaces the tier rule with the same scope, metric, model class and
    window; everything else is added.
    """
    merged: dict[tuple[str, str, str | None, int | None], EffectiveRule] = {}
    tier_rules = LimitRule.objects.filter(tier_id=tenant.tier_id).select_related("model_class")
    for rule in tier_rules:
        effective = _effective(rule, "tier")
        merged[effective.identity] = effective
    tenant_rules = LimitRule.objects.filter(tenant_id=tenant.pk).select_related("model_class")
    for rule in tenant_rules:
        effective = _effective(rule, "tenant")
        merged[effective.identity] = effective
    if capacity_rules is None:
        capacity_rules = list(capacity_rules_all())
    rules = list(merged.values()) + [_effective(rule, "capacity") for rule in capacity_rules]
    return sorted(rules, key=rule_sort_key)


def capacity_rules_all() -> QuerySet[LimitRule]:
    return LimitRule.objects.filter(scope=Scope.GLOBAL).select_related("model_class")


def audit_trail_for(*, target_type: str, target_id: object) -> QuerySet[AuditEntry]:
    """An object's own audit entries and those of the rules, budgets and keys it owns."""
    from django.db.models import Q

    key = str(target_id)
    return AuditEntry.objects.filter(
        Q(target_type=target_type, target_id=key) | Q(parent_type=target_type, parent_id=key)
    ).select_related("actor")
