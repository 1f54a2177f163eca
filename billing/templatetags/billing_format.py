"""Number formats of the finance pages."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from django import template

register = template.Library()

CENT = Decimal("0.01")


@register.filter
def money(value: Any) -> str:
    """An amount to cents, with thousands separators (display only; statements round
    their total themselves)."""
    if value is None or value == "":
        return "—"
    amount = Decimal(value).quantize(CENT, rounding=ROUND_HALF_EVEN)
    return f"{amount:,.2f}"


@register.filter
def exact(value: Any) -> str:
    """An amount as stored, every significant digit, at least to cents."""
    if value is None or value == "":
        return "—"
    amount = Decimal(value)
    if amount == amount.quantize(CENT):
        return f"{amount.quantize(CENT):,.2f}"
    return f"{amount.normalize():,f}"


@register.filter
def count(value: Any) -> str:
    if value is None or value == "":
        return "—"
    return f"{int(value):,}"


@register.filter
def percent(value: Any, digits: int = 1) -> str:
    if value is None or value == "":
        return "—"
    return f"{float(value):.{int(digits)}f}%"


@register.filter
def price(value: Any) -> str:
    """A unit price per 1K tokens, without trailing zeros past cents."""
    if value is None or value == "":
        return "—"
    amount = Decimal(value)
    text = f"{amount.normalize():f}"
    if "." not in text or len(text.split(".")[1]) < 2:
        return f"{amount:.2f}"
    return text
