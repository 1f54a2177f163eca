"""The quota model: what operators edit in admin and what the engine enforces.

PostgreSQL is the source of truth. Invariants that must never hold are database
constraints; plain-word validation for forms and policy files lives in ``clean()``.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, TypedDict

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q
from django.db.models.functions import Coalesce

from limits.identifiers import InvalidIdentifier, normalize_model_id, normalize_slug

ZERO = Decimal("0")


class DecimalDigits(TypedDict):
    """A ``DecimalField``'s precision, shared by the fields that hold one kind of amount."""

    max_digits: int
    decimal_places: int


PRICE_DIGITS: DecimalDigits = {"max_digits": 14, "decimal_places": 6}
MONEY_DIGITS: DecimalDigits = {"max_digits": 16, "decimal_places": 4}


class FailMode(models.TextChoices):
    OPEN = "open", "open (allow, flagged degraded)"
    CLOSED = "closed", "closed (deny)"
    LOCAL = "local", "local (in-process limiter)"


class Scope(models.TextChoices):
    USER_MODEL = "user_model", "one end user on one model"
    USER = "user", "one end user, all models"
    TENANT_MODEL = "tenant_model", "the tenant on one model"
    TENANT = "tenant", "the tenant, all models"
    GLOBAL = "global", "every tenant on a model class"


class Metric(models.TextChoices):
    REQUESTS = "requests", "requests"
    TOKENS = "tokens", "tokens"
    CONCURRENCY = "concurrency", "concurrent requests"


class BudgetPeriod(models.TextChoices):
    DAY = "day", "calendar day (UTC)"
    MONTH = "month", "calendar month (UTC)"


def format_window(seconds: int | None) -> str:
    """Render a window the way policy files write it: 30s, 15m, 1h, 1d."""
    if not seconds:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _normalized_slug(value: str, field: str) -> str:
    try:
        return normalize_slug(value)
    except InvalidIdentifier as error:
        raise ValidationError({field: f"This name {error}."}) from None


class Tier(models.Model):
    """A quality-of-service class with default limits and what to do when Redis is down."""

    name = models.CharField(max_length=64, unique=True)
    description = models.CharField(max_length=500, blank=True)
    priority = models.PositiveSmallIntegerField(
        default=100, help_text="Higher numbers are served first when capacity is short."
    )
    fail_mode = models.CharField(
        max_length=8,
        choices=FailMode.choices,
        default=FailMode.CLOSED,
        help_text="What a check answers when Redis is unreachable.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-priority", "name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(fail_mode__in=FailMode.values), name="tier_fail_mode_valid"
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        self.name = _normalized_slug(self.name, "name")


class ModelClass(models.Model):
    """A cost class of models; its capacity rules protect a GPU pool across all tenants."""

    name = models.CharField(max_length=64, unique=True)
    description = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "model class"
        verbose_name_plural = "model classes"

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        self.name = _normalized_slug(self.name, "name")


class AIModel(models.Model):
    """A model id as callers send it, its cost class and its prices per 1,000 tokens."""

    model_id = models.CharField(
        "model id",
        max_length=200,
        unique=True,
        help_text="As callers send it; stored case-folded and NFKC-normalised.",
    )
    model_class = models.ForeignKey(ModelClass, on_delete=models.PROTECT, related_name="models")
    input_price_per_1k = models.DecimalField(
        "input price per 1K tokens",
        default=ZERO,
        validators=[MinValueValidator(ZERO)],
        **PRICE_DIGITS,
    )
    output_price_per_1k = models.DecimalField(
        "output price per 1K tokens",
        default=ZERO,
        validators=[MinValueValidator(ZERO)],
        **PRICE_DIGITS,
    )
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model_id"]
        verbose_name = "AI model"
        verbose_name_plural = "AI models"
        constraints = [
            models.CheckConstraint(
                condition=Q(input_price_per_1k__gte=0) & Q(output_price_per_1k__gte=0),
                name="aimodel_prices_not_negative",
            ),
        ]

    def __str__(self) -> str:
        return self.model_id

    def clean(self) -> None:
        try:
            self.model_id = normalize_model_id(self.model_id)
        except InvalidIdentifier as error:
            raise ValidationError({"model_id": f"The model id {error}."}) from None


class Tenant(models.Model):
    """A customer organisation; gets its tier's limits unless it overrides them."""

    slug = models.CharField(
        max_length=64, unique=True, help_text="Stored case-folded and NFKC-normalised."
    )
    name = models.CharField(max_length=200)
    tier = models.ForeignKey(Tier, on_delete=models.PROTECT, related_name="tenants")
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug

    def clean(self) -> None:
        self.slug = _normalized_slug(self.slug, "slug")


class LimitRule(models.Model):
    """One limit: scope x metric x window x limit, optionally narrowed to a model class.

    Owned by a tier (its default), a tenant (an override replacing the tier's rule with
    the same scope, metric, class and window), or, for scope ``global``, by nobody but its
    model class (capacity shared by every tenant).
    """

    tier = models.ForeignKey(
        Tier, null=True, blank=True, on_delete=models.CASCADE, related_name="limits"
    )
    tenant = models.ForeignKey(
        Tenant, null=True, blank=True, on_delete=models.CASCADE, related_name="limits"
    )
    scope = models.CharField(max_length=16, choices=Scope.choices)
    metric = models.CharField(max_length=16, choices=Metric.choices)
    window_seconds = models.PositiveIntegerField(
        "window (seconds)",
        null=True,
        blank=True,
        help_text="Length of the sliding window; empty for concurrency limits.",
    )
    limit = models.PositiveBigIntegerField()
    model_class = models.ForeignKey(
        ModelClass,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="limits",
        help_text="Only requests for models of this class count; empty means every model.",
    )
    is_shadow = models.BooleanField(
        "shadow",
        default=False,
        help_text="Evaluated and counted, never denies: try a new limit on live traffic first.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["scope", "metric", "window_seconds"]
        verbose_name = "limit rule"
        constraints = [
            models.CheckConstraint(condition=Q(limit__gte=1), name="limitrule_limit_positive"),
            models.CheckConstraint(
                condition=(Q(metric="concurrency") & Q(window_seconds__isnull=True))
                | (~Q(metric="concurrency") & Q(window_seconds__gte=1)),
                name="limitrule_window_matches_metric",
            ),
            models.CheckConstraint(
                condition=(
                    Q(scope="global")
                    & Q(tier__isnull=True)
                    & Q(tenant__isnull=True)
                    & Q(model_class__isnull=False)
                )
                | (~Q(scope="global") & Q(tier__isnull=False) & Q(tenant__isnull=True))
                | (~Q(scope="global") & Q(tier__isnull=True) & Q(tenant__isnull=False)),
                name="limitrule_has_one_owner",
            ),
            models.CheckConstraint(
                condition=Q(scope__in=Scope.values) & Q(metric__in=Metric.values),
                name="limitrule_scope_metric_valid",
            ),
            models.UniqueConstraint(
                Coalesce("tier", 0),
                Coalesce("tenant", 0),
                "scope",
                "metric",
                Coalesce("model_class", 0),
                Coalesce("window_seconds", 0),
                name="limitrule_unique_per_owner",
                violation_error_message=(
                    "This owner already has a rule with the same scope, metric, model class "
                    "and window."
                ),
            ),
        ]

    def __str__(self) -> str:
        narrowed = f" [{self.model_class.name}]" if self.model_class_id else ""
        window = f" per {format_window(self.window_seconds)}" if self.window_seconds else ""
        shadow = " (shadow)" if self.is_shadow else ""
        return f"{self.scope} {self.metric} {self.limit}{window}{narrowed}{shadow}"

    @property
    def owner_label(self) -> str:
        if self.tenant_id:
            return f"tenant {self.tenant}"
        if self.tier_id:
            return f"tier {self.tier}"
        return f"model class {self.model_class}"

    def clean(self) -> None:
        errors: dict[str, str] = {}
        if self.metric == Metric.CONCURRENCY:
            if self.window_seconds:
                errors["window_seconds"] = "Concurrency limits have no window; leave it empty."
            self.window_seconds = None
        elif self.metric and not self.window_seconds:
            errors["window_seconds"] = (
                "Request and token limits need a window of at least 1 second."
            )
        if self.scope == Scope.GLOBAL:
            if self.tier_id or self.tenant_id:
                errors["scope"] = (
                    "Global capacity belongs to a model class, not to a tier or tenant."
                )
            if not self.model_class_id:
                errors["model_class"] = "Global capacity needs the model class it protects."
        elif self.scope and not (self.tier_id or self.tenant_id):
            errors["scope"] = "Only global capacity rules may stand without a tier or tenant."
        if self.limit is not None and self.limit < 1:
            errors["limit"] = "The limit must be at least 1."
        if errors:
            raise ValidationError(errors)


class Budget(models.Model):
    """A tenant's allowance per calendar period (UTC), in tokens and/or money."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="budgets")
    period = models.CharField(max_length=8, choices=BudgetPeriod.choices)
    token_limit = models.PositiveBigIntegerField("tokens", null=True, blank=True)
    cost_limit = models.DecimalField(
        "cost", null=True, blank=True, validators=[MinValueValidator(ZERO)], **MONEY_DIGITS
    )
    is_hard = models.BooleanField(
        "hard", default=True, help_text="Hard budgets deny when spent; soft ones only alert."
    )
    alert_thresholds = models.JSONField(
        "alert at (%)",
        default=list,
        blank=True,
        help_text="Percentages of the budget that send an alert, e.g. [80, 100].",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["tenant", "period"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "period"],
                name="budget_one_per_tenant_period",
                violation_error_message="This tenant already has a budget for that period.",
            ),
            models.CheckConstraint(
                condition=Q(token_limit__isnull=False) | Q(cost_limit__isnull=False),
                name="budget_has_an_amount",
            ),
            models.CheckConstraint(
                condition=Q(cost_limit__isnull=True) | Q(cost_limit__gte=0),
                name="budget_cost_not_negative",
            ),
            models.CheckConstraint(
                condition=Q(period__in=BudgetPeriod.values), name="budget_period_valid"
            ),
        ]

    def __str__(self) -> str:
        amounts = []
        if self.token_limit is not None:
            amounts.append(f"{self.token_limit} tokens")
        if self.cost_limit is not None:
            amounts.append(f"{self.cost_limit} {settings.BILLING_CURRENCY}")
        kind = "hard" if self.is_hard else "soft"
        return f"{self.tenant} {self.period} {kind}: {' / '.join(amounts) or 'nothing'}"

    def clean(self) -> None:
        errors: dict[str, str] = {}
        if self.token_limit is None and self.cost_limit is None:
            errors["token_limit"] = "Give a token amount, a cost amount, or both."  # noqa: S105
        thresholds = self.alert_thresholds
        if not isinstance(thresholds, list) or not all(
            isinstance(item, int) and not isinstance(item, bool) and 1 <= item <= 1000
            for item in thresholds
        ):
            errors["alert_thresholds"] = (
                "Alert thresholds are a list of whole percentages from 1 to 1000, e.g. [80, 100]."
            )
        else:
            self.alert_thresholds = sorted(set(thresholds))
        if errors:
            raise ValidationError(errors)


class ApiKey(models.Model):
    """A tenant's API key. Only a keyed hash of the secret is stored; it is shown once."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    secret_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["tenant", "name"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} (qk_{self.prefix}_…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None


class PolicyVersion(models.Model):
    """One publish: the whole compiled policy as it was enforced, who and when."""

    version = models.PositiveBigIntegerField(unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    actor_label = models.CharField("by", max_length=150, blank=True)
    reason = models.CharField(max_length=500, blank=True)
    restores = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        # A version is history and never deleted; SET_NULL only keeps the database honest.
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="For a rollback: the earlier version whose policy this one brought back.",
    )
    document = models.JSONField()

    class Meta:
        ordering = ["-version"]
        get_latest_by = "version"

    def __str__(self) -> str:
        return f"v{self.version}"


class AuditEntry(models.Model):
    """An append-only record of one change to limits, budgets, tiers, classes or prices."""

    class Action(models.TextChoices):
        CREATED = "created"
        CHANGED = "changed"
        DELETED = "deleted"
        REVOKED = "revoked"
        RESET = "reset"
        ROLLED_BACK = "rolled back"

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    actor_label = models.CharField("by", max_length=150)
    action = models.CharField(max_length=16, choices=Action.choices)
    target_type = models.CharField(max_length=32)
    target_id = models.CharField(max_length=64)
    target_repr = models.CharField("object", max_length=300)
    parent_type = models.CharField(max_length=32, blank=True)
    parent_id = models.CharField(max_length=64, blank=True)
    changes = models.JSONField(default=dict, help_text="field: [old, new]")
    policy_version = models.PositiveBigIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "audit entry"
        verbose_name_plural = "audit trail"
        indexes = [
            models.Index(fields=["target_type", "target_id"]),
            models.Index(fields=["parent_type", "parent_id"]),
        ]

    def __str__(self) -> str:
        return f"{self.actor_label} {self.action} {self.target_type} {self.target_repr}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None and not kwargs.get("force_insert"):
            raise ValueError("Audit entries are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise ValueError("Audit entries are append-only")


class DeferredUsageReport(models.Model):
    """A usage report that arrived while the limiter's store was unreachable, kept here until
    a task can apply it there (``limits.usage.deferred_usage_apply``), then deleted.

    One per tenant and request id: a report sent again while this one waits changes nothing,
    the first report stands, as it does for a report the store accepted.
    """

    class Status(models.TextChoices):
        OK = "ok"
        ERROR = "error"
        CANCELLED = "cancelled"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    request_id = models.CharField(max_length=200)
    input_tokens = models.PositiveBigIntegerField()
    output_tokens = models.PositiveBigIntegerField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OK)
    received_at = models.DateTimeField(auto_now_add=True, db_index=True)
    attempts = models.PositiveIntegerField(
        default=0, help_text="Tries to apply it that found the store still unreachable."
    )
    last_error = models.CharField(max_length=300, blank=True)
    lost_answer = models.BooleanField(
        default=False,
        help_text="Kept by the platform, not sent by a client: a check whose answer was lost "
        "(Redis may have admitted it) while its caller was told it was denied. Applied, it "
        "settles that check as cancelled, using nothing.",
    )

    class Meta:
        ordering = ["received_at", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "request_id"], name="deferredusagereport_once_per_request"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id}:{self.request_id}"
