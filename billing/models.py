"""Usage as finance sees it: raw usage events, their rollups, prices over time, statements
and budget alerts.

Raw events are written by the drain (``billing/ingest.py``) exactly once per allowed check;
rollups are kept up to date in the same transaction. Money is ``Decimal`` with nine decimal
places everywhere (prices have six per 1,000 tokens, so a token's cost is exact); only a
statement's total is rounded, once, to cents.

Tenant references carry no database constraint: usage and statements outlive a deleted
tenant, and an event for a tenant that no longer exists must not stop the drain.
"""

from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q

from limits.models import PRICE_DIGITS, Budget, BudgetPeriod, DecimalDigits, Tenant

ZERO = Decimal("0")
# Up to 10^15 in the currency, exact to 10^-9.
COST_DIGITS: DecimalDigits = {"max_digits": 24, "decimal_places": 9}
NO_PRICE = 0  # price_id of a rollup row that only counts denied checks


def _tenant_reference(*, indexed: bool = True) -> models.ForeignKey[Tenant, Tenant]:
    """The tenant a row belongs to. ``indexed=False`` where a unique constraint or an index
    of the model starts with the tenant: that one serves lookups by tenant as well, and an
    index of its own would be one more to update for every row the drain writes."""
    return models.ForeignKey(
        Tenant,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="+",
        db_index=indexed,
    )


class ModelPrice(models.Model):
    """A model's prices per 1,000 tokens for one stretch of time, ``[valid_from, valid_until)``.

    A price change closes the open row and opens a new one, so usage is always priced as it
    was when it happened and a change never rewrites the past.
    """

    model_id = models.CharField("model id", max_length=200)
    input_price_per_1k = models.DecimalField(**PRICE_DIGITS)
    output_price_per_1k = models.DecimalField(**PRICE_DIGITS)
    valid_from = models.DateTimeField()
    valid_until = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model_id", "valid_from"]
        verbose_name = "model price"
        constraints = [
            models.UniqueConstraint(
                fields=["model_id", "valid_from"], name="modelprice_one_start_per_model"
            ),
            models.UniqueConstraint(
                fields=["model_id"],
                condition=Q(valid_until__isnull=True),
                name="modelprice_one_open_price_per_model",
            ),
            models.CheckConstraint(
                condition=Q(valid_until__isnull=True) | Q(valid_until__gt=models.F("valid_from")),
                name="modelprice_ends_after_start",
            ),
            models.CheckConstraint(
                condition=Q(input_price_per_1k__gte=0) & Q(output_price_per_1k__gte=0),
                name="modelprice_not_negative",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model_id} {self.input_price_per_1k}/{self.output_price_per_1k}"


class UsageEvent(models.Model):
    """One allowed check as the limiter recorded it, amended by its commit.

    ``event_id`` is the id of the check's entry in the tenant's usage stream; with the
    tenant it is unique, which is what makes a repeated drain write nothing twice. The
    ``billed_*`` columns are what the rollups count: the actuals once committed, until then
    the estimate as input tokens (``is_estimate``).
    """

    tenant = _tenant_reference(indexed=False)
    event_id = models.CharField(max_length=64)
    request_id = models.CharField(max_length=200)
    api_key_id = models.BigIntegerField(null=True, blank=True)
    user_id = models.CharField("user id", max_length=200)
    model_id = models.CharField("model id", max_length=200)
    policy_version = models.BigIntegerField(default=0, db_default=0)
    occurred_at = models.DateTimeField()
    estimated_tokens = models.BigIntegerField()
    input_tokens = models.BigIntegerField(null=True, blank=True)
    output_tokens = models.BigIntegerField(null=True, blank=True)
    status = models.CharField(max_length=16, blank=True)
    committed_at = models.DateTimeField(null=True, blank=True)
    commit_event_id = models.CharField(max_length=64, blank=True)
    billed_input_tokens = models.BigIntegerField()
    billed_output_tokens = models.BigIntegerField()
    is_estimate = models.BooleanField()
    price_id = models.BigIntegerField(help_text="The ModelPrice in force when it happened.")
    cost = models.DecimalField(**COST_DIGITS)

    class Meta:
        ordering = ["-occurred_at"]
        verbose_name = "usage event"
        constraints = [
            models.UniqueConstraint(fields=["tenant", "event_id"], name="usageevent_unique_event"),
        ]
        indexes = [
            models.Index(fields=["tenant", "request_id"], name="usageevent_request"),
            models.Index(fields=["occurred_at"], name="usageevent_occurred"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.request_id}"


class PendingCommit(models.Model):
    """A commit whose check has not reached Postgres yet (another drain holds it); applied
    as soon as the check arrives."""

    tenant = _tenant_reference(indexed=False)
    event_id = models.CharField(max_length=64)
    request_id = models.CharField(max_length=200)
    occurred_at = models.DateTimeField()
    payload = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["occurred_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "event_id"], name="pendingcommit_unique_event"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.request_id}"


class HourlyRollup(models.Model):
    """Usage of one tenant on one model in one hour (UTC), at one price.

    A price change within the hour splits the bucket, so that statement lines keep one unit
    price each. Denied checks have no price: they are counted in the row with ``price_id``
    0. Tokens are billed tokens (actuals, or the estimate where nothing was committed, and
    ``estimated_requests`` says how many were estimates).
    """

    hour = models.DateTimeField()
    tenant = _tenant_reference(indexed=False)
    model_id = models.CharField("model id", max_length=200)
    price_id = models.BigIntegerField(default=NO_PRICE, db_default=NO_PRICE)
    requests = models.BigIntegerField(default=0, db_default=0)
    denied = models.BigIntegerField(default=0, db_default=0)
    input_tokens = models.BigIntegerField(default=0, db_default=0)
    output_tokens = models.BigIntegerField(default=0, db_default=0)
    estimated_requests = models.BigIntegerField(default=0, db_default=0)
    cost = models.DecimalField(default=ZERO, db_default=ZERO, **COST_DIGITS)

    class Meta:
        ordering = ["-hour", "tenant", "model_id"]
        verbose_name = "hourly rollup"
        constraints = [
            models.UniqueConstraint(
                fields=["hour", "tenant", "model_id", "price_id"], name="hourlyrollup_bucket"
            ),
        ]
        indexes = [models.Index(fields=["tenant", "hour"], name="hourlyrollup_tenant_hour")]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H}h {self.tenant_id} {self.model_id}"


class DailyRollup(models.Model):
    """The hourly rollups of one tenant and model summed over a UTC day (the reports' grain)."""

    day = models.DateField()
    tenant = _tenant_reference(indexed=False)
    model_id = models.CharField("model id", max_length=200)
    requests = models.BigIntegerField(default=0, db_default=0)
    denied = models.BigIntegerField(default=0, db_default=0)
    input_tokens = models.BigIntegerField(default=0, db_default=0)
    output_tokens = models.BigIntegerField(default=0, db_default=0)
    estimated_requests = models.BigIntegerField(default=0, db_default=0)
    cost = models.DecimalField(default=ZERO, db_default=ZERO, **COST_DIGITS)

    class Meta:
        ordering = ["-day", "tenant", "model_id"]
        verbose_name = "daily rollup"
        constraints = [
            models.UniqueConstraint(
                fields=["day", "tenant", "model_id"], name="dailyrollup_bucket"
            ),
        ]
        indexes = [models.Index(fields=["tenant", "day"], name="dailyrollup_tenant_day")]

    def __str__(self) -> str:
        return f"{self.day} {self.tenant_id} {self.model_id}"


class MonthlyRollup(models.Model):
    """The daily rollups of one tenant and model summed over a UTC calendar month, so that
    reports over many months read a few rows instead of a year of days."""

    month = models.DateField(help_text="The first day of the month (UTC).")
    tenant = _tenant_reference()
    model_id = models.CharField("model id", max_length=200)
    requests = models.BigIntegerField(default=0, db_default=0)
    denied = models.BigIntegerField(default=0, db_default=0)
    input_tokens = models.BigIntegerField(default=0, db_default=0)
    output_tokens = models.BigIntegerField(default=0, db_default=0)
    estimated_requests = models.BigIntegerField(default=0, db_default=0)
    cost = models.DecimalField(default=ZERO, db_default=ZERO, **COST_DIGITS)

    class Meta:
        ordering = ["-month", "tenant", "model_id"]
        verbose_name = "monthly rollup"
        constraints = [
            models.UniqueConstraint(
                fields=["month", "tenant", "model_id"], name="monthlyrollup_bucket"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.month:%Y-%m} {self.tenant_id} {self.model_id}"


class DailyUserRollup(models.Model):
    """Usage of one end user of a tenant over a UTC day, all models: the top users."""

    day = models.DateField()
    tenant = _tenant_reference()
    user_id = models.CharField("user id", max_length=200)
    requests = models.BigIntegerField(default=0, db_default=0)
    input_tokens = models.BigIntegerField(default=0, db_default=0)
    output_tokens = models.BigIntegerField(default=0, db_default=0)
    cost = models.DecimalField(default=ZERO, db_default=ZERO, **COST_DIGITS)

    class Meta:
        ordering = ["-day", "tenant", "user_id"]
        verbose_name = "daily user rollup"
        constraints = [
            models.UniqueConstraint(
                fields=["day", "tenant", "user_id"], name="dailyuserrollup_bucket"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.day} {self.tenant_id} {self.user_id}"


class MonthlyUserRollup(models.Model):
    """Usage of one end user of a tenant over a UTC calendar month, all models."""

    month = models.DateField(help_text="The first day of the month (UTC).")
    tenant = _tenant_reference()
    user_id = models.CharField("user id", max_length=200)
    requests = models.BigIntegerField(default=0, db_default=0)
    input_tokens = models.BigIntegerField(default=0, db_default=0)
    output_tokens = models.BigIntegerField(default=0, db_default=0)
    cost = models.DecimalField(default=ZERO, db_default=ZERO, **COST_DIGITS)

    class Meta:
        ordering = ["-month", "tenant", "user_id"]
        verbose_name = "monthly user rollup"
        constraints = [
            models.UniqueConstraint(
                fields=["month", "tenant", "user_id"], name="monthlyuserrollup_bucket"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.month:%Y-%m} {self.tenant_id} {self.user_id}"


class UserUsageDelta(models.Model):
    """What an amendment adds to the top-user rollups, until the fold takes it in.

    A batch touches thousands of (day, tenant, user) buckets; adding to them for every
    batch cost the drain more than writing its events. On PostgreSQL the drain leaves them
    alone, and ``user_rollups_fold`` (beat, every minute) folds the usage events written
    since the last fold (by id, ``LedgerState`` ``users``) into ``DailyUserRollup`` and
    ``MonthlyUserRollup``. A commit that amends an event already folded in leaves what it
    changes here, in its batch's transaction, and the fold adds and deletes it in its own:
    each counts once, and the top users lag by at most a minute and a drain.
    """

    day = models.DateField()
    tenant_id = models.BigIntegerField()
    user_id = models.CharField("user id", max_length=200)
    requests = models.BigIntegerField()
    input_tokens = models.BigIntegerField()
    output_tokens = models.BigIntegerField()
    cost = models.DecimalField(**COST_DIGITS)

    class Meta:
        verbose_name = "user usage delta"

    def __str__(self) -> str:
        return f"{self.day} {self.tenant_id} {self.user_id}"


class LedgerState(models.Model):
    """Named markers of the ledger. The row ``drain`` is locked by every transaction that
    writes usage or rollups, so they never interleave; ``reconciled`` holds the hour up to
    which rollups were last checked against raw events (retention deletes only below it);
    ``users`` holds (``position``) the greatest usage event id the top-user rollups include
    (on PostgreSQL ``user_rollups_fold`` folds newer events in, every minute)."""

    name = models.CharField(max_length=32, primary_key=True)
    value = models.DateTimeField(null=True, blank=True)
    position = models.BigIntegerField(null=True, blank=True)

    class Meta:
        verbose_name = "ledger state"

    def __str__(self) -> str:
        return f"{self.name}: {self.value}"


class Statement(models.Model):
    """A tenant's finalised monthly statement: what was sent, frozen.

    ``lines`` holds one entry per model and price (requests, tokens, unit prices, amount);
    ``adjustments_total`` the late usage of earlier, already finalised months that landed on
    this one. ``total`` is ``subtotal + adjustments_total`` rounded half to even to cents:
    the one place money is rounded.
    """

    tenant = _tenant_reference(indexed=False)
    month = models.DateField(help_text="The first day of the month (UTC).")
    currency = models.CharField(max_length=3)
    lines = models.JSONField(default=list)
    subtotal = models.DecimalField(**COST_DIGITS)
    adjustments_total = models.DecimalField(**COST_DIGITS)
    total = models.DecimalField(max_digits=18, decimal_places=2)
    finalised_at = models.DateTimeField()

    class Meta:
        ordering = ["-month", "tenant"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "month"], name="statement_one_per_month"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.month:%Y-%m}"


class StatementAdjustment(models.Model):
    """Usage that reached the ledger after its month's statement was finalised (a late
    commit, or a late event): it lands on the next open statement instead of changing the
    one that was sent."""

    tenant = _tenant_reference(indexed=False)
    event_id = models.CharField(max_length=64)
    kind = models.CharField(max_length=16, help_text="commit or event")
    request_id = models.CharField(max_length=200)
    model_id = models.CharField("model id", max_length=200)
    usage_month = models.DateField(help_text="The finalised month the usage belongs to.")
    statement_month = models.DateField(help_text="The statement it lands on.")
    input_tokens = models.BigIntegerField()
    output_tokens = models.BigIntegerField()
    cost = models.DecimalField(**COST_DIGITS)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["statement_month", "tenant", "created_at"]
        verbose_name = "statement adjustment"
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "event_id", "kind"], name="statementadjustment_once"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.request_id} → {self.statement_month:%Y-%m}"


class BudgetAlert(models.Model):
    """A budget threshold crossed in one period: recorded once, then mailed."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    budget = models.ForeignKey(Budget, on_delete=models.CASCADE, related_name="+")
    period = models.CharField(max_length=8, choices=BudgetPeriod.choices)
    period_start = models.DateField()
    threshold = models.PositiveIntegerField(help_text="Percent of the budget.")
    used_tokens = models.BigIntegerField()
    used_cost = models.DecimalField(**COST_DIGITS)
    token_limit = models.BigIntegerField(null=True, blank=True)
    cost_limit = models.DecimalField(null=True, blank=True, max_digits=16, decimal_places=4)
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    recipients = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "budget alert"
        constraints = [
            models.UniqueConstraint(
                fields=["budget", "period_start", "threshold"], name="budgetalert_once"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.period} {self.period_start} {self.threshold}%"

    @property
    def currency(self) -> str:
        return settings.BILLING_CURRENCY
