"""Django admin for the quota model: operators edit limits, finance reads everything.

The admin stays thin. Every write goes through ``limits.services`` (``object_save``,
``object_delete``, ``apikey_create``, ``apikey_revoke``), so an edit made here is audited and
published exactly like one made by ``loadpolicy``; the plain-word validation messages come
from the models' ``clean()``. Who may change what comes from the ``operators`` and
``finance`` groups (``limits.roles``) through Django's ordinary model permissions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.options import IS_POPUP_VAR
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import models, transaction
from django.db.models import Count, F, Q, QuerySet
from django.db.models.fields import BLANK_CHOICE_DASH
from django.forms.models import BaseInlineFormSet
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, URLPattern, path, reverse
from django.utils.cache import add_never_cache_headers
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.translation import ngettext

from limits import services
from limits.apikeys import apikey_name_clean
from limits.engine import EngineUnavailable
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
    format_window,
)
from limits.selectors import (
    UnreadableDocument,
    audit_trail_for,
    effective_policy_for_tenant,
    policy_diff,
    policy_restore_for,
    rule_sort_key,
    shadow_rules_for,
)
from limits.services import Actor

AUDIT_TRAIL_LENGTH = 50

admin.site.site_header = "Quota platform"
admin.site.site_title = "Quota platform"
admin.site.index_title = "Tenants, tiers and limits"


if TYPE_CHECKING:
    _ModelAdmin = admin.ModelAdmin[Any]
    _BaseModelAdmin = admin.options.BaseModelAdmin[Any]
else:
    _ModelAdmin = _BaseModelAdmin = object


def _actor(request: HttpRequest) -> Actor:
    return Actor.from_user(request.user)


def _shown(value: object) -> str:
    """A value of an audit entry as an operator reads it."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _admin_change_url(model_name: str, pk: object) -> str:
    return reverse(f"admin:limits_{model_name}_change", args=[pk])


def _admin_link(model_name: str, pk: object, text: str) -> str:
    """A link to an object's change page; plain text when it has none."""
    try:
        return format_html('<a href="{}">{}</a>', _admin_change_url(model_name, pk), text)
    except NoReverseMatch:
        return text


# Forms


_DURATION = re.compile(r"^(\d+)\s*([smhd]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class WindowField(forms.IntegerField):
    """A window typed the way policy files write it: whole seconds, or 30s, 15m, 1h, 1d."""

    widget = forms.TextInput(attrs={"size": 8, "placeholder": "e.g. 1h"})
    default_error_messages = {
        "invalid": "Write the window as whole seconds or a duration like 30s, 15m, 1h or 1d.",
    }

    def to_python(self, value: Any) -> int | None:
        if value in self.empty_values:
            return None
        if isinstance(value, int):
            return value
        match = _DURATION.match(str(value).strip().lower())
        if match is None:
            raise ValidationError(self.error_messages["invalid"], code="invalid")
        return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return format_window(value)
        return value


class WindowFormFieldMixin(_BaseModelAdmin):
    """Shows a rule's window as 1h and reads it back from 1h, 3600 or 60m."""

    def formfield_for_dbfield(
        self, db_field: models.Field, request: HttpRequest, **kwargs: Any
    ) -> Any:
        if db_field.name == "window_seconds":
            return WindowField(
                required=False,
                min_value=1,
                max_value=2**31 - 1,
                label="Window",
                help_text="Whole seconds or 30s, 15m, 1h, 1d; empty for concurrency limits.",
            )
        return super().formfield_for_dbfield(db_field, request, **kwargs)


class SharedChoicesField(forms.ModelChoiceField):
    """A select of a related object whose choices are read once for a whole formset.

    Django copies a form's fields for every form, and each copy reads its choices again:
    one query per inline row. The form class is built per request, so sharing the list
    read by its first copy never shows stale choices.
    """

    _shared_choices: list[Any] | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedChoicesField:
        result = super().__deepcopy__(memo)
        if self._shared_choices is None:
            self._shared_choices = list(cast(Iterable[Any], self.choices))
        result.widget.choices = self._shared_choices
        return result


DUPLICATE_RULE_MESSAGE = next(
    constraint.violation_error_message
    for constraint in LimitRule._meta.constraints
    if constraint.name == "limitrule_unique_per_owner"
)


class LimitRuleForm(forms.ModelForm):
    """The rule form of the LimitRule page, where the owner is chosen by hand."""

    class Meta:
        model = LimitRule
        fields = (
            "tier",
            "tenant",
            "scope",
            "metric",
            "window_seconds",
            "limit",
            "model_class",
            "is_shadow",
        )

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        # The model's clean() cannot tell which owner to keep when both are given; without
        # this the database constraint would answer with its name instead of a sentence.
        if cleaned.get("tier") and cleaned.get("tenant"):
            raise ValidationError(
                "A rule belongs to a tier (its default) or to a tenant (an override), not both."
            )
        return cleaned


class OwnedRuleForm(forms.ModelForm):
    """A rule inline on its tier's or tenant's page: any scope but global capacity."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        scope = cast(forms.ChoiceField, self.fields["scope"])
        scope.choices = BLANK_CHOICE_DASH + [
            (value, label) for value, label in Scope.choices if value != Scope.GLOBAL
        ]


class CapacityRuleForm(forms.ModelForm):
    """A capacity rule inline on its model class's page: the scope is always global."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Set before validation, so clean() checks the rule as the capacity rule it is.
        self.instance.scope = Scope.GLOBAL


class LimitRuleInlineFormSet(BaseInlineFormSet):
    """Rules of one owner; reports two rules with the same identity in plain words.

    The database constraint on (owner, scope, metric, class, window) cannot be checked
    per form here (the form does not carry every owner column), and the formset holds
    every rule of its owner, so comparing its forms with each other is the whole check.
    """

    def clean(self) -> None:
        super().clean()
        seen: set[tuple[object, ...]] = set()
        for form in self.forms:
            if not hasattr(form, "cleaned_data") or form.errors:
                continue
            if self.can_delete and form.cleaned_data.get("DELETE"):
                continue
            if form.instance.pk is None and not form.has_changed():
                continue
            rule = form.instance
            window = None if rule.metric == Metric.CONCURRENCY else rule.window_seconds
            identity = (rule.scope, rule.metric, rule.model_class_id, window)
            if identity in seen:
                form.add_error(None, str(DUPLICATE_RULE_MESSAGE))
            seen.add(identity)


class ApiKeyAddForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = ("tenant", "name")

    def clean_name(self) -> str:
        try:
            return apikey_name_clean(self.cleaned_data["name"])
        except ValidationError as error:
            raise ValidationError(error.message_dict["name"]) from None


class UserResetForm(forms.Form):
    """Whose windows to clear: one end user of a tenant, on every model or on one."""

    user_id = forms.CharField(
        label="End user id",
        max_length=200,
        # Kept exactly as typed: the engine counts the id byte for byte as services send it.
        strip=False,
        help_text="Exactly as the service sends it as user_id in its checks.",
    )
    model = forms.ChoiceField(label="Model", required=False)

    def __init__(self, *args: Any, model_ids: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        choices = [("", "every model"), *((model_id, model_id) for model_id in model_ids)]
        cast(forms.ChoiceField, self.fields["model"]).choices = choices

    def clean_user_id(self) -> str:
        user_id = str(self.cleaned_data["user_id"])
        if not user_id.strip():
            raise ValidationError("Enter the end user's id.", code="required")
        return user_id


# Writes through the services


class ServiceWritesMixin(_ModelAdmin):
    """Routes every write of a ModelAdmin (its form, its inlines, deletes, list edits and
    actions) through ``limits.services``, grouped into one transaction and one publish."""

    #: Related names of owned objects that are deleted (and audited) one by one before
    #: their owner, instead of vanishing by cascade without a trace.
    owned_relations: tuple[str, ...] = ()

    def _policy_batch(self, request: HttpRequest) -> Any:
        verbose_name = self.model._meta.verbose_name
        return services.policy_batch(
            actor=_actor(request), reason=f"{verbose_name} edited in admin"
        )

    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        if request.method != "POST":
            return super().changeform_view(request, object_id, form_url, extra_context)
        with self._policy_batch(request):
            return super().changeform_view(request, object_id, form_url, extra_context)

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if request.method != "POST":
            return super().changelist_view(request, extra_context)
        with self._policy_batch(request):
            return super().changelist_view(request, extra_context)

    def save_model(
        self, request: HttpRequest, obj: models.Model, form: forms.ModelForm, change: bool
    ) -> None:
        # The form has already run full_clean(); validating again would only repeat it.
        services.object_save(instance=obj, actor=_actor(request), validate=False)

    def delete_model(self, request: HttpRequest, obj: models.Model) -> None:
        actor = _actor(request)
        with self._policy_batch(request):
            for relation in self.owned_relations:
                for child in getattr(obj, relation).all():
                    services.object_delete(instance=child, actor=actor)
            services.object_delete(instance=obj, actor=actor)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        with self._policy_batch(request):
            for obj in queryset:
                self.delete_model(request, obj)

    def save_formset(
        self, request: HttpRequest, form: forms.ModelForm, formset: Any, change: bool
    ) -> None:
        actor = _actor(request)
        instances = formset.save(commit=False)
        # Deletions first, so a rule removed and added again in one save does not collide.
        for obj in formset.deleted_objects:
            services.object_delete(instance=obj, actor=actor)
        for obj in instances:
            services.object_save(instance=obj, actor=actor, validate=False)
        formset.save_m2m()

    def get_inlines(self, request: HttpRequest, obj: models.Model | None) -> list[type]:
        inlines = list(super().get_inlines(request, obj))
        if obj is None:
            # A rule's checks need its owner, which has no id before its first save: rules
            # are added on the change page the add page leads to (see response_add).
            inlines = [inline for inline in inlines if not issubclass(inline, LimitRuleInline)]
        return inlines

    def response_add(
        self, request: HttpRequest, obj: models.Model, post_url_continue: str | None = None
    ) -> HttpResponse:
        has_rule_inlines = any(issubclass(inline, LimitRuleInline) for inline in self.inlines)
        if has_rule_inlines and "_save" in request.POST and IS_POPUP_VAR not in request.POST:
            self.message_user(
                request,
                format_html(
                    "The {} “{}” was added. Now add its limits below.",
                    obj._meta.verbose_name,
                    obj,
                ),
                messages.SUCCESS,
            )
            return HttpResponseRedirect(_admin_change_url(obj._meta.model_name or "", obj.pk))
        return super().response_add(request, obj, post_url_continue)

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: models.Model | None = None,
    ) -> HttpResponse:
        if (
            isinstance(obj, services.AUDITED_MODELS)
            and obj.pk is not None
            and request.user.has_perm("limits.view_auditentry")
        ):
            context.update(audit_trail_context(obj))
        return super().render_change_form(request, context, add, change, form_url, obj)


class ReadOnlyAdmin(admin.ModelAdmin):
    """A record nobody edits in admin, superusers included: it is history."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


# Audit trail on each change page


@dataclass(frozen=True)
class AuditRow:
    created_at: Any
    actor: str
    action: str
    target: str
    changes: list[tuple[str, str, str]]


def audit_changes(entry: AuditEntry) -> list[tuple[str, str, str]]:
    changes = entry.changes if isinstance(entry.changes, dict) else {}
    rows = []
    for field_name, values in changes.items():
        old, new = values if isinstance(values, list) and len(values) == 2 else (None, values)
        rows.append((field_name, _shown(old), _shown(new)))
    return rows


def audit_trail_context(obj: models.Model) -> dict[str, Any]:
    """The latest entries of ``obj``'s audit trail and a link to all of them."""
    target_type = obj._meta.model_name or ""
    entries = list(
        audit_trail_for(target_type=target_type, target_id=obj.pk)[: AUDIT_TRAIL_LENGTH + 1]
    )
    rows = [
        AuditRow(
            created_at=entry.created_at,
            actor=entry.actor_label,
            action=entry.action,
            target=f"{entry.target_type} {entry.target_repr}",
            changes=audit_changes(entry),
        )
        for entry in entries[:AUDIT_TRAIL_LENGTH]
    ]
    query = urlencode({"trail": f"{target_type}:{obj.pk}"})
    return {
        "audit_trail": rows,
        "audit_trail_is_cut": len(entries) > AUDIT_TRAIL_LENGTH,
        "audit_trail_length": AUDIT_TRAIL_LENGTH,
        "audit_trail_url": f"{reverse('admin:limits_auditentry_changelist')}?{query}",
    }


# Effective policy on the tenant page


@dataclass(frozen=True)
class EffectiveRow:
    model_class: str
    scope: str
    metric: str
    window: str
    limit: str
    source: str
    is_shadow: bool


def effective_policy_rows(tenant: Tenant) -> list[EffectiveRow]:
    """The tenant's effective rules for display, grouped by model class (all models first)."""
    rules = effective_policy_for_tenant(tenant=tenant)
    tier_rules = LimitRule.objects.filter(tier_id=tenant.tier_id).select_related("model_class")
    tier_limits = {
        (
            rule.scope,
            rule.metric,
            rule.model_class.name if rule.model_class else None,
            rule.window_seconds,
        ): rule.limit
        for rule in tier_rules
    }
    rows = []
    for rule in sorted(rules, key=lambda rule: (rule.model_class or "", *rule_sort_key(rule))):
        if rule.source == "tier":
            source = f"tier {tenant.tier.name}"
        elif rule.source == "tenant":
            replaced = tier_limits.get(rule.identity)
            source = "override" if replaced is None else f"override (tier: {replaced:,})"
        else:
            source = "capacity (all tenants)"
        rows.append(
            EffectiveRow(
                model_class=rule.model_class or "every model",
                scope=rule.scope,
                metric=rule.metric,
                window=format_window(rule.window_seconds),
                limit=f"{rule.limit:,}",
                source=source,
                is_shadow=rule.is_shadow,
            )
        )
    return rows


# Inlines


class LimitRuleInline(WindowFormFieldMixin, admin.TabularInline):
    """Rules of one owner, on the owner's page."""

    model = LimitRule
    formset = LimitRuleInlineFormSet
    extra = 0
    verbose_name = "limit"
    verbose_name_plural = "limits"

    def formfield_for_foreignkey(
        self, db_field: models.ForeignKey, request: HttpRequest, **kwargs: Any
    ) -> Any:
        if db_field.name == "model_class":
            # Model classes are few; a plain select read once keeps long rule lists cheap.
            kwargs["form_class"] = SharedChoicesField
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def get_queryset(self, request: HttpRequest) -> QuerySet[LimitRule]:
        return super().get_queryset(request).select_related("model_class")


class OwnedLimitInline(LimitRuleInline):
    form = OwnedRuleForm
    fields = ("scope", "metric", "window_seconds", "limit", "model_class", "is_shadow")


class TierLimitInline(OwnedLimitInline):
    fk_name = "tier"
    verbose_name_plural = "default limits of this tier"


class TenantLimitInline(OwnedLimitInline):
    fk_name = "tenant"
    verbose_name = "override"
    verbose_name_plural = "overrides of the tier's limits"


class CapacityLimitInline(LimitRuleInline):
    fk_name = "model_class"
    form = CapacityRuleForm
    fields = ("metric", "window_seconds", "limit", "is_shadow")
    verbose_name = "capacity limit"
    verbose_name_plural = "capacity limits (every tenant together)"

    def get_queryset(self, request: HttpRequest) -> QuerySet[LimitRule]:
        return super().get_queryset(request).filter(scope=Scope.GLOBAL)


class AIModelInline(admin.TabularInline):
    model = AIModel
    fields = ("model_id", "input_price_per_1k", "output_price_per_1k", "is_active")
    extra = 0
    show_change_link = True


class BudgetInline(admin.TabularInline):
    model = Budget
    fields = ("period", "token_limit", "cost_limit", "is_hard", "alert_thresholds")
    extra = 0


class ApiKeyInline(admin.TabularInline):
    """The tenant's keys, read-only: keys are created and revoked through their own page."""

    model = ApiKey
    fields = ("name", "key", "created_at", "last_used_at", "revoked_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True
    verbose_name_plural = "API keys"

    @admin.display(description="key")
    def key(self, obj: ApiKey) -> str:
        return f"qk_{obj.prefix}_…"

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


# List filters


class RuleOwnerFilter(admin.SimpleListFilter):
    title = "owner"
    parameter_name = "owner"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            ("tier", "a tier (default)"),
            ("tenant", "a tenant (override)"),
            ("capacity", "a model class (capacity)"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value == "tier":
            return queryset.filter(tier__isnull=False)
        if value == "tenant":
            return queryset.filter(tenant__isnull=False)
        if value == "capacity":
            return queryset.filter(scope=Scope.GLOBAL)
        return queryset


class KeyStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("active", "active"), ("revoked", "revoked")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "active":
            return queryset.filter(revoked_at__isnull=True)
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        return queryset


class AuditTrailFilter(admin.SimpleListFilter):
    """``?trail=tenant:5``: an object's own entries and those of what it owns, as on its page.

    Shown in the sidebar only while in use, so it can be cleared from there.
    """

    title = "trail of"
    parameter_name = "trail"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        value = self.value()
        if not value or ":" not in value:
            return []
        target_type, target_id = value.split(":", 1)
        return [(value, f"{target_type} #{target_id}")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if not value:
            return queryset
        target_type, _, target_id = value.partition(":")
        return queryset.filter(
            Q(target_type=target_type, target_id=target_id)
            | Q(parent_type=target_type, parent_id=target_id)
        )


# Model admins


@admin.register(Tier)
class TierAdmin(ServiceWritesMixin, admin.ModelAdmin):
    list_display = ("name", "priority", "fail_mode", "tenant_count", "rule_count", "updated_at")
    list_filter = ("fail_mode",)
    search_fields = ("name", "description")
    fields = ("name", "description", "priority", "fail_mode")
    inlines = (TierLimitInline,)
    owned_relations = ("limits",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Tier]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                tenant_total=Count("tenants", distinct=True),
                rule_total=Count("limits", distinct=True),
            )
        )

    @admin.display(description="tenants", ordering="tenant_total")
    def tenant_count(self, obj: Tier) -> str:
        url = reverse("admin:limits_tenant_changelist") + f"?tier__id__exact={obj.pk}"
        return format_html('<a href="{}">{}</a>', url, obj.tenant_total)  # type: ignore[attr-defined]

    @admin.display(description="limits", ordering="rule_total")
    def rule_count(self, obj: Tier) -> int:
        return obj.rule_total  # type: ignore[attr-defined,no-any-return]


@admin.register(ModelClass)
class ModelClassAdmin(ServiceWritesMixin, admin.ModelAdmin):
    list_display = ("name", "description", "model_count", "capacity_count", "updated_at")
    search_fields = ("name", "description")
    fields = ("name", "description")
    inlines = (AIModelInline, CapacityLimitInline)
    owned_relations = ("limits",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[ModelClass]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                model_total=Count("models", distinct=True),
                capacity_total=Count("limits", filter=Q(limits__scope=Scope.GLOBAL), distinct=True),
            )
        )

    @admin.display(description="models", ordering="model_total")
    def model_count(self, obj: ModelClass) -> str:
        url = reverse("admin:limits_aimodel_changelist") + f"?model_class__id__exact={obj.pk}"
        return format_html('<a href="{}">{}</a>', url, obj.model_total)  # type: ignore[attr-defined]

    @admin.display(description="capacity limits", ordering="capacity_total")
    def capacity_count(self, obj: ModelClass) -> int:
        return obj.capacity_total  # type: ignore[attr-defined,no-any-return]


@admin.register(AIModel)
class AIModelAdmin(ServiceWritesMixin, admin.ModelAdmin):
    list_display = (
        "model_id",
        "model_class",
        "input_price_per_1k",
        "output_price_per_1k",
        "is_active",
        "updated_at",
    )
    list_filter = ("model_class", "is_active")
    list_select_related = ("model_class",)
    search_fields = ("model_id", "model_class__name")
    autocomplete_fields = ("model_class",)
    fields = ("model_id", "model_class", "input_price_per_1k", "output_price_per_1k", "is_active")


@admin.register(Tenant)
class TenantAdmin(ServiceWritesMixin, admin.ModelAdmin):
    list_display = (
        "slug",
        "name",
        "tier",
        "is_active",
        "override_count",
        "budget_count",
        "active_key_count",
        "updated_at",
    )
    list_filter = ("tier", "is_active")
    list_select_related = ("tier",)
    search_fields = ("slug", "name")
    autocomplete_fields = ("tier",)
    fields = ("slug", "name", "tier", "is_active")
    inlines = (TenantLimitInline, BudgetInline, ApiKeyInline)
    owned_relations = ("limits", "budgets", "api_keys")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Tenant]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                override_total=Count("limits", distinct=True),
                budget_total=Count("budgets", distinct=True),
                active_key_total=Count(
                    "api_keys", filter=Q(api_keys__revoked_at__isnull=True), distinct=True
                ),
            )
        )

    @admin.display(description="overrides", ordering="override_total")
    def override_count(self, obj: Tenant) -> int:
        return obj.override_total  # type: ignore[attr-defined,no-any-return]

    @admin.display(description="budgets", ordering="budget_total")
    def budget_count(self, obj: Tenant) -> int:
        return obj.budget_total  # type: ignore[attr-defined,no-any-return]

    @admin.display(description="active keys", ordering="active_key_total")
    def active_key_count(self, obj: Tenant) -> int:
        return obj.active_key_total  # type: ignore[attr-defined,no-any-return]

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: models.Model | None = None,
    ) -> HttpResponse:
        if isinstance(obj, Tenant) and obj.pk is not None:
            context["effective_policy"] = effective_policy_rows(obj)
            if request.user.has_perm("limits.add_apikey"):
                context["create_api_key_url"] = (
                    reverse("admin:limits_apikey_add") + f"?{urlencode({'tenant': obj.pk})}"
                )
            if self.has_change_permission(request, obj):
                context["reset_user_url"] = reverse("admin:limits_tenant_reset_user", args=[obj.pk])
        return super().render_change_form(request, context, add, change, form_url, obj)

    def get_urls(self) -> list[URLPattern]:
        reset_user = path(
            "<path:object_id>/reset-user/",
            self.admin_site.admin_view(self.reset_user_view),
            name="limits_tenant_reset_user",
        )
        return [reset_user, *super().get_urls()]

    def reset_user_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """Reset one end user's windows: a form, a confirmation, then the reset itself."""
        tenant = self.get_object(request, unquote(object_id))
        if tenant is None:
            raise Http404("No such tenant.")
        if not self.has_change_permission(request, tenant):
            raise PermissionDenied
        model_ids = list(
            AIModel.objects.filter(is_active=True)
            .order_by("model_id")
            .values_list("model_id", flat=True)
        )
        confirming = False
        if request.method == "POST":
            form = UserResetForm(request.POST, model_ids=model_ids)
            if form.is_valid() and "confirm" not in request.POST:
                confirming = True
            elif form.is_valid():
                user_id = form.cleaned_data["user_id"]
                model_id = form.cleaned_data["model"] or None
                try:
                    removed = services.user_reset(
                        tenant=tenant, user_id=user_id, model_id=model_id, actor=_actor(request)
                    )
                except ValidationError as error:
                    form.add_error(None, error.messages)
                except EngineUnavailable:
                    form.add_error(
                        None, "The limiter's store is unreachable, so nothing was reset. Try again."
                    )
                else:
                    self.message_user(
                        request,
                        f"Reset the windows of user {user_id} on {model_id or 'every model'} "
                        + ngettext("(%(count)d key removed).", "(%(count)d keys removed).", removed)
                        % {"count": removed},
                        messages.SUCCESS,
                    )
                    return HttpResponseRedirect(_admin_change_url("tenant", tenant.pk))
        else:
            form = UserResetForm(model_ids=model_ids)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "original": tenant,
            "title": "Reset a user's limits",
            "form": form,
            "confirming": confirming,
            "tenant_url": _admin_change_url("tenant", tenant.pk),
        }
        return TemplateResponse(request, "admin/limits/tenant/reset_user.html", context)


@admin.register(LimitRule)
class LimitRuleAdmin(WindowFormFieldMixin, ServiceWritesMixin, admin.ModelAdmin):
    form = LimitRuleForm
    list_display = (
        "__str__",
        "owner",
        "scope",
        "metric",
        "window",
        "limit",
        "model_class",
        "is_shadow",
    )
    list_display_links = ("__str__",)
    list_editable = ("limit", "is_shadow")
    list_filter = (RuleOwnerFilter, "scope", "metric", "is_shadow", "model_class", "tier")
    list_select_related = ("tier", "tenant", "model_class")
    search_fields = ("tier__name", "tenant__slug", "tenant__name", "model_class__name")
    autocomplete_fields = ("tier", "tenant", "model_class")
    fieldsets = (
        (
            "Owner",
            {
                "fields": ("tier", "tenant"),
                "description": "A tier (its default), a tenant (an override), or neither for "
                "global capacity of a model class.",
            },
        ),
        (
            "Rule",
            {
                "fields": (
                    "scope",
                    "metric",
                    "window_seconds",
                    "limit",
                    "model_class",
                    "is_shadow",
                )
            },
        ),
    )

    @admin.display(description="owner")
    def owner(self, obj: LimitRule) -> str:
        return obj.owner_label

    @admin.display(description="window", ordering="window_seconds")
    def window(self, obj: LimitRule) -> str:
        return format_window(obj.window_seconds)


@admin.register(Budget)
class BudgetAdmin(ServiceWritesMixin, admin.ModelAdmin):
    list_display = (
        "tenant",
        "period",
        "token_limit",
        "cost_limit",
        "is_hard",
        "alert_at",
        "updated_at",
    )
    list_filter = ("period", "is_hard", "tenant__tier")
    list_select_related = ("tenant",)
    search_fields = ("tenant__slug", "tenant__name")
    autocomplete_fields = ("tenant",)
    fields = ("tenant", "period", "token_limit", "cost_limit", "is_hard", "alert_thresholds")

    @admin.display(description="alert at")
    def alert_at(self, obj: Budget) -> str:
        thresholds = obj.alert_thresholds if isinstance(obj.alert_thresholds, list) else []
        return ", ".join(f"{value}%" for value in thresholds) or "—"


@admin.register(ApiKey)
class ApiKeyAdmin(ServiceWritesMixin, admin.ModelAdmin):
    """Keys are created through ``apikey_create`` (the full key shown once, on the page that
    answers the save) and revoked through ``apikey_revoke``; their hash is never shown."""

    list_display = ("key", "tenant", "name", "created_at", "last_used_at", "revoked_at")
    list_filter = (KeyStatusFilter, "tenant__tier")
    list_select_related = ("tenant",)
    search_fields = ("name", "prefix", "tenant__slug", "tenant__name")
    autocomplete_fields = ("tenant",)
    actions = ("revoke_selected",)

    @admin.display(description="key", ordering="prefix")
    def key(self, obj: ApiKey) -> str:
        return f"qk_{obj.prefix}_…"

    def get_form(
        self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any
    ) -> Any:
        if obj is None:
            kwargs["form"] = ApiKeyAddForm
        return super().get_form(request, obj, change, **kwargs)

    def get_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        if obj is None:
            return ("tenant", "name")
        return ("tenant", "name", "key", "created_at", "created_by", "last_used_at", "revoked_at")

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        if obj is None:
            return ()
        return ("tenant", "key", "created_at", "created_by", "last_used_at", "revoked_at")

    def save_model(
        self, request: HttpRequest, obj: Any, form: forms.ModelForm, change: bool
    ) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        created, secret = services.apikey_create(
            tenant=obj.tenant, name=obj.name, actor=_actor(request)
        )
        obj.pk = created.pk
        obj.refresh_from_db()
        # Kept on this object only, for the one page that shows it (response_add).
        obj._secret_shown_once = secret

    def response_add(
        self, request: HttpRequest, obj: Any, post_url_continue: str | None = None
    ) -> HttpResponse:
        secret = getattr(obj, "_secret_shown_once", None)
        if secret is None:
            return super().response_add(request, obj, post_url_continue)
        # The key is shown in the answer to the POST itself, never stored for a later page
        # (a message would end up in a cookie or the session table).
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Copy the new API key",
            "api_key": obj,
            "secret": secret,
            "key_url": _admin_change_url("apikey", obj.pk),
            "tenant_url": _admin_change_url("tenant", obj.tenant_id),
        }
        response = TemplateResponse(request, "admin/limits/apikey/created.html", context)
        add_never_cache_headers(response)
        return response

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        actor = _actor(request)
        revoked = 0
        with transaction.atomic():
            for api_key in queryset.filter(revoked_at__isnull=True).select_related("tenant"):
                services.apikey_revoke(api_key=api_key, actor=actor)
                revoked += 1
        self.message_user(
            request,
            ngettext("Revoked %(count)d key.", "Revoked %(count)d keys.", revoked)
            % {"count": revoked},
            messages.SUCCESS,
        )


# Models a rollback writes to: whoever rolls back must be allowed to edit every one of them,
# as operators and superusers are and finance is not.
ROLLBACK_PERMISSIONS = tuple(
    f"limits.{action}_{model_name}"
    for model_name in ("tier", "modelclass", "aimodel", "tenant", "limitrule", "budget")
    for action in ("add", "change", "delete")
)


class RollbackFilter(admin.SimpleListFilter):
    title = "published by"
    parameter_name = "kind"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("rollback", "a rollback"), ("edit", "an edit or a policy file")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "rollback":
            return queryset.filter(restores__isnull=False)
        if self.value() == "edit":
            return queryset.filter(restores__isnull=True)
        return queryset


@admin.register(PolicyVersion)
class PolicyVersionAdmin(ReadOnlyAdmin):
    """Every published version: who published it, when and why, what changed from the
    version before, its shadow rules with their counts, and a rollback to it.

    The rollback is a POST to ``<id>/rollback/`` that calls ``services.policy_rollback``;
    the pages only read (``limits.selectors``)."""

    list_display = ("__str__", "created_at", "actor_label", "reason", "restores_link")
    list_display_links = ("__str__",)
    list_filter = (RollbackFilter,)
    search_fields = ("reason", "actor_label")
    date_hierarchy = "created_at"
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "version",
                    "created_at",
                    "actor_label",
                    "created_by",
                    "reason",
                    "restores_link",
                )
            },
        ),
        ("Compiled document", {"classes": ("collapse",), "fields": ("pretty_document",)}),
    )
    readonly_fields = (
        "version",
        "created_at",
        "actor_label",
        "created_by",
        "reason",
        "restores_link",
        "pretty_document",
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[PolicyVersion]:
        # Documents hold the whole policy; the list needs none of them, and the restored
        # version's number comes by annotation instead of loading that version too.
        return (
            super()
            .get_queryset(request)
            .defer("document")
            .annotate(restores_number=F("restores__version"))
        )

    @admin.display(description="restores", ordering="restores__version")
    def restores_link(self, obj: PolicyVersion) -> str:
        if obj.restores_id is None:
            return "—"
        number = getattr(obj, "restores_number", None) or obj.restores_id
        return format_html(
            'rollback to <a href="{}">v{}</a>',
            _admin_change_url("policyversion", obj.restores_id),
            number,
        )

    @admin.display(description="document")
    def pretty_document(self, obj: PolicyVersion) -> str:
        text = json.dumps(obj.document, indent=2, sort_keys=True, ensure_ascii=False)
        return format_html('<pre class="policy-document">{}</pre>', text)

    def has_rollback_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perms(ROLLBACK_PERMISSIONS))

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: models.Model | None = None,
    ) -> HttpResponse:
        if isinstance(obj, PolicyVersion):
            context.update(self.history_context(request, obj))
        return super().render_change_form(request, context, add, change, form_url, obj)

    def history_context(self, request: HttpRequest, version: PolicyVersion) -> dict[str, Any]:
        previous = PolicyVersion.objects.filter(version__lt=version.version).first()
        latest = PolicyVersion.objects.first()
        is_latest = latest is None or latest.pk == version.pk
        context: dict[str, Any] = {
            "previous_version": previous,
            "latest_version": latest,
            "is_latest": is_latest,
            "can_roll_back": not is_latest and self.has_rollback_permission(request),
            "rollback_url": reverse("admin:limits_policyversion_rollback", args=[version.pk]),
        }
        try:
            context["changes"] = policy_diff(
                old=previous.document if previous else {}, new=version.document
            )
            context["shadow_rules"] = shadow_rules_for(document=version.document)
            if latest is not None and not is_latest:
                context["rollback_changes"] = policy_diff(old=latest.document, new=version.document)
                context["rollback_left_alone"] = policy_restore_for(version=version).left_alone
        except UnreadableDocument as error:
            context["document_error"] = str(error)
            context["can_roll_back"] = False
        return context

    def get_urls(self) -> list[URLPattern]:
        rollback = path(
            "<path:object_id>/rollback/",
            self.admin_site.admin_view(self.rollback_view),
            name="limits_policyversion_rollback",
        )
        return [rollback, *super().get_urls()]

    def rollback_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """Roll back to one version: a POST from the button on its page, nothing else."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_rollback_permission(request):
            raise PermissionDenied
        version = self.get_object(request, unquote(object_id))
        if version is None:
            raise Http404("No such policy version.")
        page = _admin_change_url("policyversion", version.pk)
        try:
            result = services.policy_rollback(version=version, actor=_actor(request))
        except services.RollbackRefused as refused:
            self.message_user(request, str(refused), messages.WARNING)
            return HttpResponseRedirect(page)
        if not result.changes:
            self.message_user(
                request,
                f"Nothing to change: the database already holds what {version} holds.",
                messages.WARNING,
            )
        elif result.published is None:
            self.message_user(
                request,
                f"Rolled back to {version} in the database; what is enforced did not change, "
                "so no new version was published.",
                messages.SUCCESS,
            )
        else:
            count = len(result.changes)
            self.message_user(
                request,
                f"Rolled back to {version}: published {result.published} "
                + ngettext("(%(count)d change).", "(%(count)d changes).", count) % {"count": count},
                messages.SUCCESS,
            )
            page = _admin_change_url("policyversion", result.published.pk)
        for note in result.left_alone:
            self.message_user(request, note, messages.INFO)
        return HttpResponseRedirect(page)


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "actor_label",
        "action",
        "target_type",
        "target_repr",
        "change_summary",
        "policy_version",
    )
    list_filter = (AuditTrailFilter, "action", "target_type")
    search_fields = ("target_repr", "actor_label", "target_id")
    date_hierarchy = "created_at"
    fields = (
        "created_at",
        "actor_label",
        "action",
        "target",
        "parent",
        "policy_version",
        "change_table",
    )
    readonly_fields = fields

    @admin.display(description="changes")
    def change_summary(self, obj: AuditEntry) -> str:
        summary = "; ".join(f"{name}: {old} → {new}" for name, old, new in audit_changes(obj))
        return summary if len(summary) <= 120 else summary[:119] + "…"

    @admin.display(description="object")
    def target(self, obj: AuditEntry) -> str:
        return format_html(
            "{} {}", obj.target_type, _admin_link(obj.target_type, obj.target_id, obj.target_repr)
        )

    @admin.display(description="belongs to")
    def parent(self, obj: AuditEntry) -> str:
        if not obj.parent_type:
            return "—"
        return _admin_link(obj.parent_type, obj.parent_id, f"{obj.parent_type} #{obj.parent_id}")

    @admin.display(description="old → new")
    def change_table(self, obj: AuditEntry) -> str:
        rows = audit_changes(obj)
        if not rows:
            return "—"
        return format_html(
            "<table><thead><tr><th>field</th><th>old</th><th>new</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td></tr>", rows),
        )
