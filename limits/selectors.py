"""Reads of the quota model, shared by admin, policy compilation and the policy file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db.models import QuerySet

from limits.models import AuditEntry, LimitRule, PolicyVersion, Scope, Tenant

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


# Published versions: what a compiled document says, how two differ, and how to restore one.

RuleIdentity = tuple[str, str, str | None, int | None]  # scope, metric, model class, window


class UnreadableDocument(ValueError):
    """A stored policy document that does not have the shape ``policy_compile`` writes."""


@dataclass(frozen=True)
class OutlinedRule:
    """A rule as a published document holds it, apart from its owner."""

    limit: int
    is_shadow: bool


@dataclass
class TierOutline:
    fail_mode: str
    priority: int
    rules: dict[RuleIdentity, OutlinedRule]
    # Identities every tenant of the tier overrides: a tier rule with one of them is in
    # force for nobody, so the document does not hold it.
    hidden: set[RuleIdentity]


@dataclass
class TenantOutline:
    slug: str
    is_active: bool
    tier: str
    overrides: dict[RuleIdentity, OutlinedRule]
    budgets: dict[str, dict[str, Any]]  # period: tokens, cost, hard, alert_at


@dataclass
class PolicyOutline:
    """A compiled document regrouped by what operators edit: models, class capacity, tiers
    (read back from the rules' ``source``; only tiers some tenant is on) and tenants."""

    currency: str
    models: dict[str, dict[str, str]]  # model id: class, input, output (prices per 1K)
    capacity: dict[RuleIdentity, OutlinedRule]
    tiers: dict[str, TierOutline]
    tenants: dict[int, TenantOutline]


def policy_outline(*, document: dict[str, Any]) -> PolicyOutline:
    """What a published document says, per model, class capacity, tier and tenant."""
    try:
        return _outline(document)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise UnreadableDocument(
            f"the stored policy document cannot be read ({type(error).__name__}: {error})"
        ) from None


def _outline(document: dict[str, Any]) -> PolicyOutline:
    models = {
        str(model_id): {
            "class": str(model["class"]),
            "input": str(model["input_price_per_1k"]),
            "output": str(model["output_price_per_1k"]),
        }
        for model_id, model in document.get("models", {}).items()
    }
    capacity: dict[RuleIdentity, OutlinedRule] = {}
    tiers: dict[str, TierOutline] = {}
    tenants: dict[int, TenantOutline] = {}
    overridden_by_tier: dict[str, list[set[RuleIdentity]]] = {}
    for key, entry in document.get("tenants", {}).items():
        tier_name = str(entry["tier"])
        tier = tiers.setdefault(
            tier_name, TierOutline(str(entry["fail_mode"]), int(entry["priority"]), {}, set())
        )
        overrides: dict[RuleIdentity, OutlinedRule] = {}
        for rule in entry["rules"]:
            window = rule["window"]
            identity = (
                str(rule["scope"]),
                str(rule["metric"]),
                rule["class"],
                None if window is None else int(window),
            )
            outlined = OutlinedRule(int(rule["limit"]), bool(rule.get("shadow", False)))
            source = rule.get("source")
            if source == "capacity":
                capacity.setdefault(identity, outlined)
            elif source == "tenant":
                overrides[identity] = outlined
            else:
                tier.rules.setdefault(identity, outlined)
        overridden_by_tier.setdefault(tier_name, []).append(set(overrides))
        tenants[int(key)] = TenantOutline(
            slug=str(entry["slug"]),
            is_active=bool(entry.get("active", True)),
            tier=tier_name,
            overrides=overrides,
            budgets={
                str(budget["period"]): {
                    "tokens": budget.get("tokens"),
                    "cost": budget.get("cost"),
                    "hard": bool(budget.get("hard", True)),
                    "alert_at": list(budget.get("alert_at") or []),
                }
                for budget in entry.get("budgets", [])
            },
        )
    for name, override_sets in overridden_by_tier.items():
        tiers[name].hidden = set.intersection(*override_sets) - set(tiers[name].rules)
    return PolicyOutline(
        currency=str(document.get("currency", "")),
        models=models,
        capacity=capacity,
        tiers=tiers,
        tenants=tenants,
    )


def _identity_order(identity: RuleIdentity) -> tuple[object, ...]:
    scope, metric, model_class, window = identity
    return (
        SCOPE_ORDER.get(scope, 99),
        METRIC_ORDER.get(metric, 99),
        model_class or "",
        window or 0,
    )


def rule_identity_label(identity: RuleIdentity) -> str:
    """A rule by its identity, as LimitRule's str() spells it: ``user_model requests per 1h``."""
    from limits.models import format_window

    scope, metric, model_class, window = identity
    if scope == Scope.GLOBAL:
        return f"{metric} per {format_window(window)}" if window else metric
    text = f"{scope} {metric}"
    if window:
        text += f" per {format_window(window)}"
    if model_class:
        text += f" [{model_class}]"
    return text


def _rule_value(rule: OutlinedRule | None) -> str:
    if rule is None:
        return "—"
    return f"{rule.limit:,}" + (" (shadow)" if rule.is_shadow else "")


def _budget_value(budget: dict[str, Any] | None, currency: str) -> str:
    if budget is None:
        return "—"
    amounts = []
    if budget["tokens"] is not None:
        amounts.append(f"{budget['tokens']:,} tokens")
    if budget["cost"] is not None:
        amounts.append(f"{budget['cost']} {currency}".strip())
    parts = [" and ".join(amounts), "hard" if budget["hard"] else "soft"]
    if budget["alert_at"]:
        parts.append("alerts at " + ", ".join(f"{value} %" for value in budget["alert_at"]))
    return ", ".join(parts)


@dataclass(frozen=True)
class PolicyChange:
    """One difference between two published versions, as an operator reads it."""

    where: str  # "tier standard", "tenant alice", "capacity of frontier", "model gpt-4o"
    what: str  # "user_model requests per 1h", "month budget", "input price per 1K", …
    change: str  # "added", "removed" or "changed"
    old: str
    new: str


class _DiffWriter:
    def __init__(self) -> None:
        self.changes: list[PolicyChange] = []

    def row(self, where: str, what: str, old: str | None, new: str | None) -> None:
        change = "added" if old is None else "removed" if new is None else "changed"
        self.changes.append(PolicyChange(where, what, change, old or "—", new or "—"))

    def fields(
        self,
        where: str,
        old: dict[str, Any],
        new: dict[str, Any],
        labels: dict[str, str],
    ) -> None:
        for key, label in labels.items():
            if old.get(key) != new.get(key):
                self.row(where, label, _shown(old.get(key)), _shown(new.get(key)))

    def rules(
        self,
        where: str,
        old: dict[RuleIdentity, OutlinedRule],
        new: dict[RuleIdentity, OutlinedRule],
        prefix: str = "",
    ) -> None:
        for identity in sorted(old.keys() | new.keys(), key=_identity_order):
            before, after = old.get(identity), new.get(identity)
            if before != after:
                self.row(
                    where,
                    prefix + rule_identity_label(identity),
                    None if before is None else _rule_value(before),
                    None if after is None else _rule_value(after),
                )


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return "—" if value is None else str(value)


def policy_diff(*, old: dict[str, Any], new: dict[str, Any]) -> list[PolicyChange]:
    """What changed from the published document ``old`` to ``new``, model by model, class
    by class, tier by tier and tenant by tenant; rules are matched by scope, metric, model
    class and window, so a rule deleted and made again with the same values is no change.

    Raises ``UnreadableDocument`` when either document does not have the compiled shape.
    """
    before, after = policy_outline(document=old), policy_outline(document=new)
    diff = _DiffWriter()
    if before.currency != after.currency and old:
        diff.row("policy", "currency", before.currency or None, after.currency or None)

    for model_id in sorted(before.models.keys() | after.models.keys()):
        where = f"model {model_id}"
        was, now = before.models.get(model_id), after.models.get(model_id)
        if was is None or now is None:
            summary = "{class}: {input} in / {output} out per 1K"
            diff.row(
                where,
                "model",
                None if was is None else summary.format_map(was),
                None if now is None else summary.format_map(now),
            )
        else:
            labels = {
                "class": "model class",
                "input": "input price per 1K",
                "output": "output price per 1K",
            }
            diff.fields(where, was, now, labels)

    capacity_classes = {identity[2] or "" for identity in before.capacity.keys() | after.capacity}
    for class_name in sorted(capacity_classes):
        diff.rules(
            f"capacity of {class_name}",
            {key: rule for key, rule in before.capacity.items() if key[2] == class_name},
            {key: rule for key, rule in after.capacity.items() if key[2] == class_name},
        )

    for tier_name in sorted(before.tiers.keys() | after.tiers.keys()):
        where = f"tier {tier_name}"
        tier_was, tier_now = before.tiers.get(tier_name), after.tiers.get(tier_name)
        if tier_was is None or tier_now is None:
            # A tier is in a document only while some tenant is on it.
            diff.row(
                where,
                "tier (in use by a tenant)",
                None if tier_was is None else f"fail mode {tier_was.fail_mode}",
                None if tier_now is None else f"fail mode {tier_now.fail_mode}",
            )
        else:
            diff.fields(
                where,
                {"fail_mode": tier_was.fail_mode, "priority": tier_was.priority},
                {"fail_mode": tier_now.fail_mode, "priority": tier_now.priority},
                {"fail_mode": "fail mode", "priority": "priority"},
            )
        diff.rules(
            where,
            tier_was.rules if tier_was else {},
            tier_now.rules if tier_now else {},
        )

    def tenant_order(pk: int) -> tuple[str, int]:
        tenant = after.tenants.get(pk) or before.tenants[pk]
        return (tenant.slug, pk)

    for pk in sorted(before.tenants.keys() | after.tenants.keys(), key=tenant_order):
        tenant_was, tenant_now = before.tenants.get(pk), after.tenants.get(pk)
        where = f"tenant {(tenant_now or tenant_was).slug}"  # type: ignore[union-attr]
        if tenant_was is None or tenant_now is None:
            summary = "tier {tier}{inactive}"
            diff.row(
                where,
                "tenant",
                None
                if tenant_was is None
                else summary.format(
                    tier=tenant_was.tier, inactive="" if tenant_was.is_active else ", inactive"
                ),
                None
                if tenant_now is None
                else summary.format(
                    tier=tenant_now.tier, inactive="" if tenant_now.is_active else ", inactive"
                ),
            )
        else:
            diff.fields(
                where,
                {"slug": tenant_was.slug, "active": tenant_was.is_active, "tier": tenant_was.tier},
                {"slug": tenant_now.slug, "active": tenant_now.is_active, "tier": tenant_now.tier},
                {"slug": "slug", "active": "active", "tier": "tier"},
            )
        diff.rules(
            where,
            tenant_was.overrides if tenant_was else {},
            tenant_now.overrides if tenant_now else {},
            prefix="override ",
        )
        old_budgets = tenant_was.budgets if tenant_was else {}
        new_budgets = tenant_now.budgets if tenant_now else {}
        for period in sorted(old_budgets.keys() | new_budgets.keys()):
            was_budget, now_budget = old_budgets.get(period), new_budgets.get(period)
            if was_budget != now_budget:
                diff.row(
                    where,
                    f"{period} budget",
                    None if was_budget is None else _budget_value(was_budget, before.currency),
                    None if now_budget is None else _budget_value(now_budget, after.currency),
                )
    return diff.changes


@dataclass(frozen=True)
class PolicyRestore:
    """A published version as the data of a policy file (for ``policy_validate`` and
    ``policy_apply``, as ``loadpolicy`` loads one), and what restoring it leaves alone."""

    data: dict[str, Any]
    left_alone: list[str]


def _rule_file_entry(identity: RuleIdentity, rule: OutlinedRule) -> dict[str, Any]:
    scope, metric, model_class, window = identity
    entry: dict[str, Any] = {"metric": metric, "limit": rule.limit, "shadow": rule.is_shadow}
    if scope != Scope.GLOBAL:
        entry["scope"] = scope
        if model_class is not None:
            entry["model_class"] = model_class
    if window is not None:
        entry["window"] = window
    return entry


def _stored_identity(rule: LimitRule) -> RuleIdentity:
    return (
        rule.scope,
        rule.metric,
        rule.model_class.name if rule.model_class_id else None,  # type: ignore[union-attr]
        rule.window_seconds,
    )


def policy_restore_for(*, version: PolicyVersion) -> PolicyRestore:
    """What the database must say so that it compiles to ``version``'s document again.

    The document holds what is enforced: each tenant's effective rules and budgets, active
    models and their prices. From it come the tiers some tenant is on (fail mode, priority,
    default rules), the capacity of every class, the models, and each tenant's tier, active
    flag, overrides and budgets. What it does not hold stays as it is now: descriptions and
    tenant names, tiers no tenant was on, a tier rule every tenant overrode, models that
    were inactive or not there yet, tenants added since. A deleted tenant is not brought
    back (its API keys are gone with it). Raises ``UnreadableDocument``.
    """
    outline = policy_outline(document=version.document)
    name = str(version)
    left_alone: list[str] = []
    tenants = _restored_tenants(outline, name, left_alone)
    model_classes = _restored_model_classes(outline, name, left_alone)
    tiers = _restored_tiers(outline)
    data = {"model_classes": model_classes, "tiers": tiers, "tenants": tenants}
    return PolicyRestore(data=data, left_alone=left_alone)


def _sorted_rules(rules: dict[RuleIdentity, OutlinedRule]) -> list[dict[str, Any]]:
    return [
        _rule_file_entry(identity, rules[identity])
        for identity in sorted(rules, key=_identity_order)
    ]


def _restored_model_classes(
    outline: PolicyOutline, name: str, left_alone: list[str]
) -> list[dict[str, Any]]:
    from limits.models import AIModel, ModelClass

    descriptions = dict(ModelClass.objects.values_list("name", "description"))
    capacity: dict[str, dict[RuleIdentity, OutlinedRule]] = {}
    stored_capacity = list(capacity_rules_all())
    if outline.tenants:
        for identity, outlined in outline.capacity.items():
            capacity.setdefault(identity[2] or "", {})[identity] = outlined
        # A class that gained capacity since is listed too, so that it loses it again.
        for stored in stored_capacity:
            capacity.setdefault(stored.model_class.name, {})  # type: ignore[union-attr]
    else:
        # Capacity rules are in every tenant's rules; with no tenant the version says
        # nothing about them, so they stay as they are.
        for stored in stored_capacity:
            capacity.setdefault(stored.model_class.name, {})[_stored_identity(stored)] = (  # type: ignore[union-attr]
                OutlinedRule(stored.limit, stored.is_shadow)
            )
        left_alone.append(f"{name} has no tenants, so capacity limits are left as they are.")
    models_by_class: dict[str, list[dict[str, Any]]] = {}
    for model_id, model in sorted(outline.models.items()):
        models_by_class.setdefault(model["class"], []).append(
            {
                "id": model_id,
                "input_price_per_1k": model["input"],
                "output_price_per_1k": model["output"],
                "active": True,
            }
        )
    for model_id in (
        AIModel.objects.filter(is_active=True)
        .exclude(model_id__in=list(outline.models))
        .order_by("model_id")
        .values_list("model_id", flat=True)
    ):
        left_alone.append(
            f"AI model {model_id} is not in {name}; it stays active (switch it off by hand "
            "if it should go)."
        )
    # Every class a rule narrows to must be known to the policy file's validator.
    class_names = set(capacity) | set(models_by_class)
    for tier in outline.tiers.values():
        class_names |= {identity[2] for identity in tier.rules if identity[2]}
    for tenant in outline.tenants.values():
        class_names |= {identity[2] for identity in tenant.overrides if identity[2]}
    return [
        {
            "name": class_name,
            "description": descriptions.get(class_name, ""),
            "capacity": _sorted_rules(capacity.get(class_name, {})),
            "models": models_by_class.get(class_name, []),
        }
        for class_name in sorted(class_names)
    ]


def _restored_tiers(outline: PolicyOutline) -> list[dict[str, Any]]:
    from limits.models import Tier

    descriptions = dict(Tier.objects.values_list("name", "description"))
    hidden_rules: dict[str, dict[RuleIdentity, OutlinedRule]] = {}
    stored_rules = LimitRule.objects.filter(tier__name__in=list(outline.tiers)).select_related(
        "tier", "model_class"
    )
    for stored in stored_rules:
        tier_name = stored.tier.name  # type: ignore[union-attr]
        identity = _stored_identity(stored)
        if identity in outline.tiers[tier_name].hidden:
            hidden_rules.setdefault(tier_name, {})[identity] = OutlinedRule(
                stored.limit, stored.is_shadow
            )
    return [
        {
            "name": tier_name,
            "description": descriptions.get(tier_name, ""),
            "priority": tier.priority,
            "fail_mode": tier.fail_mode,
            "limits": _sorted_rules({**tier.rules, **hidden_rules.get(tier_name, {})}),
        }
        for tier_name, tier in sorted(outline.tiers.items())
    ]


def _restored_tenants(
    outline: PolicyOutline, name: str, left_alone: list[str]
) -> list[dict[str, Any]]:
    current = {tenant.pk: tenant for tenant in Tenant.objects.order_by("pk")}
    entries = []
    for pk, outlined in sorted(outline.tenants.items()):
        tenant = current.get(pk)
        if tenant is None:
            left_alone.append(
                f"Tenant {outlined.slug} was deleted after {name}; a rollback does not bring "
                "back a deleted tenant."
            )
            continue
        budgets = []
        for period, budget in sorted(outlined.budgets.items()):
            entry: dict[str, Any] = {"period": period, "hard": budget["hard"]}
            if budget["tokens"] is not None:
                entry["tokens"] = budget["tokens"]
            if budget["cost"] is not None:
                entry["cost"] = budget["cost"]
            entry["alert_at"] = budget["alert_at"]
            budgets.append(entry)
        entries.append(
            {
                # Tenants are matched by id: a slug changed since stays as it is now.
                "slug": tenant.slug,
                "name": tenant.name,
                "tier": outlined.tier,
                "active": outlined.is_active,
                "limits": _sorted_rules(outlined.overrides),
                "budgets": budgets,
            }
        )
    for pk, tenant in current.items():
        if pk not in outline.tenants:
            left_alone.append(f"Tenant {tenant.slug} is not in {name}; it is left as it is.")
    return entries


@dataclass(frozen=True)
class ShadowRuleRow:
    """A shadow rule of a published version and how many checks it would have denied."""

    owner: str  # "tier standard", "tenant alice (override)", "capacity of frontier"
    rule: str  # "user_model requests per 1h"
    limit: str
    rule_id: int
    # (tenant slug, count) for each tenant it applies to; None when Redis was unreachable.
    counts: list[tuple[str, int]] | None

    @property
    def total(self) -> int | None:
        return None if self.counts is None else sum(count for _slug, count in self.counts)


def shadow_rules_for(*, document: dict[str, Any]) -> list[ShadowRuleRow]:
    """The shadow rules of a published document with their would-have-denied counts.

    The engine counts shadow denials per tenant and rule id in the tenant's ``…:shadow``
    hash (kept 7 days after its last count), so a count covers every version that had the
    rule, not only this one. Raises ``UnreadableDocument``.
    """
    try:
        found = _shadow_rules(document)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise UnreadableDocument(
            f"the stored policy document cannot be read ({type(error).__name__}: {error})"
        ) from None
    if not found:
        return []
    tenant_ids = sorted(
        {tenant_id for _rule, tenant_ids in found.values() for tenant_id in tenant_ids}
    )
    counts = _shadow_counts(tenant_ids)
    slugs = {int(key): str(entry["slug"]) for key, entry in document["tenants"].items()}
    rows = []
    for rule_id, ((owner, identity, limit), applies_to) in found.items():
        per_tenant = None
        if counts is not None:
            per_tenant = [
                (slugs[tenant_id], counts.get(tenant_id, {}).get(f"rule:{rule_id}", 0))
                for tenant_id in sorted(applies_to, key=lambda pk: slugs[pk])
            ]
        rows.append(
            ShadowRuleRow(owner, rule_identity_label(identity), f"{limit:,}", rule_id, per_tenant)
        )
    return sorted(rows, key=lambda row: (row.owner, row.rule))


def _shadow_rules(
    document: dict[str, Any],
) -> dict[int, tuple[tuple[str, RuleIdentity, int], list[int]]]:
    found: dict[int, tuple[tuple[str, RuleIdentity, int], list[int]]] = {}
    for key, entry in document.get("tenants", {}).items():
        for rule in entry["rules"]:
            if not rule.get("shadow"):
                continue
            identity = (rule["scope"], rule["metric"], rule["class"], rule["window"])
            source = rule.get("source")
            if source == "capacity":
                owner = f"capacity of {rule['class']}"
            elif source == "tenant":
                owner = f"tenant {entry['slug']} (override)"
            else:
                owner = f"tier {entry['tier']}"
            _described, tenant_ids = found.setdefault(
                int(rule["id"]), ((owner, identity, int(rule["limit"])), [])
            )
            tenant_ids.append(int(key))
    return found


def _shadow_counts(tenant_ids: list[int]) -> dict[int, dict[str, int]] | None:
    """Each tenant's shadow counters by rule label; None when the store cannot be read."""
    import redis

    from limits import engine

    keys = [f"{engine.tenant_tag(tenant_id)}:shadow" for tenant_id in tenant_ids]
    store = engine.policy_store()
    if store.redis is None:
        local = engine.local_backend()
        return {
            tenant_id: local.counters(key) for tenant_id, key in zip(tenant_ids, keys, strict=True)
        }
    try:
        pipe = store.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        replies = pipe.execute()
    except redis.RedisError:
        return None
    return {
        tenant_id: {_text(field): int(value) for field, value in reply.items()}
        for tenant_id, reply in zip(tenant_ids, replies, strict=True)
    }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
