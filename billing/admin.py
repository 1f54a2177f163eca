"""Billing in the admin: read-only records for finance and superusers (usage, rollups,
price history, statements, adjustments and budget alerts). Everything here is written by
the drain and the billing tasks, never by hand."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from billing.models import (
    BudgetAlert,
    DailyRollup,
    HourlyRollup,
    ModelPrice,
    PendingCommit,
    Statement,
    StatementAdjustment,
    UsageEvent,
)


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Viewable with the view permission; nobody adds, changes or deletes."""

    # Counting a large table for every page is slow; the admin shows "Show all" instead.
    show_full_result_count = False
    list_per_page = 50

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(UsageEvent)
class UsageEventAdmin(ReadOnlyAdmin):
    list_display = (
        "occurred_at",
        "tenant",
        "request_id",
        "user_id",
        "model_id",
        "estimated_tokens",
        "input_tokens",
        "output_tokens",
        "status",
        "cost",
    )
    list_select_related = ("tenant",)
    search_fields = ("=request_id", "=user_id")


@admin.register(PendingCommit)
class PendingCommitAdmin(ReadOnlyAdmin):
    list_display = ("occurred_at", "tenant", "request_id", "event_id", "created_at")
    list_select_related = ("tenant",)


@admin.register(HourlyRollup)
class HourlyRollupAdmin(ReadOnlyAdmin):
    list_display = (
        "hour",
        "tenant",
        "model_id",
        "price_id",
        "requests",
        "denied",
        "input_tokens",
        "output_tokens",
        "estimated_requests",
        "cost",
    )
    list_select_related = ("tenant",)


@admin.register(DailyRollup)
class DailyRollupAdmin(ReadOnlyAdmin):
    list_display = (
        "day",
        "tenant",
        "model_id",
        "requests",
        "denied",
        "input_tokens",
        "output_tokens",
        "estimated_requests",
        "cost",
    )
    list_select_related = ("tenant",)


@admin.register(ModelPrice)
class ModelPriceAdmin(ReadOnlyAdmin):
    list_display = (
        "model_id",
        "input_price_per_1k",
        "output_price_per_1k",
        "valid_from",
        "valid_until",
    )
    search_fields = ("model_id",)


@admin.register(Statement)
class StatementAdmin(ReadOnlyAdmin):
    list_display = ("month", "tenant", "subtotal", "adjustments_total", "total", "finalised_at")
    list_select_related = ("tenant",)
    readonly_fields = ("printable",)

    @admin.display(description="printable statement")
    def printable(self, obj: Statement) -> str:
        if obj.tenant is None:
            return "—"
        url = reverse("billing:statement", args=[obj.tenant.slug, f"{obj.month:%Y-%m}"])
        return format_html('<a href="{}">{}</a>', url, "Open the statement")


@admin.register(StatementAdjustment)
class StatementAdjustmentAdmin(ReadOnlyAdmin):
    list_display = (
        "statement_month",
        "tenant",
        "kind",
        "request_id",
        "model_id",
        "usage_month",
        "input_tokens",
        "output_tokens",
        "cost",
    )
    list_select_related = ("tenant",)


@admin.register(BudgetAlert)
class BudgetAlertAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "tenant",
        "period",
        "period_start",
        "threshold_shown",
        "used_tokens",
        "token_limit",
        "used_cost",
        "cost_limit",
        "sent_at",
    )
    list_select_related = ("tenant", "budget")
    list_filter = ("period",)

    @admin.display(description="threshold", ordering="threshold")
    def threshold_shown(self, obj: BudgetAlert) -> str:
        return f"{obj.threshold}%"
