"""Charts drawn on the server as inline SVG: no JavaScript, no CDN, readable when printed.

Each function takes plain numbers and labels and returns markup safe to place in a
template; every text that came from data is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

PALETTE = (
    "#2f6fdf",
    "#18a58a",
    "#f29d38",
    "#d9485f",
    "#8a63d2",
    "#3fb6d9",
    "#b58a2e",
    "#6b7a8f",
    "#e377c2",
    "#7fbf3f",
)
OTHERS_COLOUR = "#c3cad5"

WIDTH = 760
HEIGHT = 260
LEFT = 64
RIGHT = 16
TOP = 12
BOTTOM = 34


@dataclass(frozen=True)
class Series:
    label: str
    values: Sequence[float | Decimal | int]
    colour: str = ""


def colours(series: Sequence[Series]) -> list[Series]:
    """The series with a colour each: the palette in order, grey for "others"."""
    coloured = []
    for index, item in enumerate(series):
        colour = item.colour or (
            OTHERS_COLOUR if item.label == "others" else PALETTE[index % len(PALETTE)]
        )
        coloured.append(Series(item.label, item.values, colour))
    return coloured


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 × 10^n at or above ``value`` (axis top)."""
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        candidate = step * 10**exponent
        if candidate >= value * 0.999999:
            return float(candidate)
    return float(10 ** (exponent + 1))


def format_axis(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value:g}%"
    prefix = "$" if unit == "$" else ""
    magnitude = abs(value)
    if magnitude >= 1_000_000:
        return f"{prefix}{value / 1_000_000:g}M"
    if magnitude >= 1_000:
        return f"{prefix}{value / 1_000:g}k"
    if magnitude and magnitude < 1:
        return f"{prefix}{value:.2g}"
    return f"{prefix}{value:g}"


def _frame(top_value: float, unit: str, labels: Sequence[str], slot: float) -> list[str]:
    parts = []
    plot_height = HEIGHT - TOP - BOTTOM
    for index in range(5):
        fraction = index / 4
        y = TOP + plot_height * (1 - fraction)
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
        )
        parts.append(
            f'<text class="axis" x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(format_axis(top_value * fraction, unit))}</text>"
        )
    every = max(1, math.ceil(len(labels) / 12))
    for index, label in enumerate(labels):
        if index % every:
            continue
        x = LEFT + slot * (index + 0.5)
        parts.append(
            f'<text class="axis" x="{x:.1f}" y="{HEIGHT - BOTTOM + 18}" text-anchor="middle">'
            f"{escape(label)}</text>"
        )
    return parts


def _svg(parts: list[str], title: str, kind: str) -> SafeString:
    body = "".join(parts)
    return mark_safe(  # noqa: S308 - every data-derived text above went through escape()
        f'<svg class="chart chart-{kind}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}" preserveAspectRatio="xMidYMid meet">'
        f"<title>{escape(title)}</title>{body}</svg>"
    )


def stacked_bars(
    series: Sequence[Series], labels: Sequence[str], *, title: str, unit: str = "$"
) -> SafeString:
    """Columns per bucket, one coloured segment per series."""
    coloured = colours(series)
    totals = [sum(float(item.values[index]) for item in coloured) for index in range(len(labels))]
    top_value = nice_ceiling(max(totals, default=0.0))
    slot = (WIDTH - LEFT - RIGHT) / max(1, len(labels))
    bar = max(1.0, slot * 0.72)
    plot_height = HEIGHT - TOP - BOTTOM
    parts = _frame(top_value, unit, labels, slot)
    for index, label in enumerate(labels):
        x = LEFT + slot * index + (slot - bar) / 2
        base = TOP + plot_height
        for item in coloured:
            value = float(item.values[index])
            if value <= 0:
                continue
            height = plot_height * value / top_value
            base -= height
            parts.append(
                f'<rect class="bar" x="{x:.1f}" y="{base:.1f}" width="{bar:.1f}" '
                f'height="{max(height, 0.5):.1f}" fill="{item.colour}">'
                f"<title>{escape(item.label)}, {escape(label)}: "
                f"{escape(format_value(value, unit))}</title></rect>"
            )
    if not any(totals):
        parts.append(_empty("No usage in this period"))
    return _svg(parts, title, "bars")


def lines(
    series: Sequence[Series],
    labels: Sequence[str],
    *,
    title: str,
    unit: str = "%",
    top: float | None = None,
    dashed: Sequence[str] = (),
    empty: str = "No usage in this period",
) -> SafeString:
    """One polyline per series, a dot per value."""
    coloured = colours(series)
    highest = max(
        (float(value) for item in coloured for value in item.values if value is not None),
        default=0.0,
    )
    top_value = top if top is not None else nice_ceiling(highest)
    slot = (WIDTH - LEFT - RIGHT) / max(1, len(labels))
    plot_height = HEIGHT - TOP - BOTTOM
    parts = _frame(top_value, unit, labels, slot)
    for item in coloured:
        points = []
        for index, value in enumerate(item.values):
            if value is None:
                continue
            x = LEFT + slot * (index + 0.5)
            y = TOP + plot_height * (1 - min(float(value), top_value) / top_value)
            points.append((x, y, float(value), labels[index]))
        if not points:
            continue
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in points)
        style = ' stroke-dasharray="6 4"' if item.label in dashed else ""
        parts.append(
            f'<polyline class="line" points="{path}" fill="none" stroke="{item.colour}" '
            f'stroke-width="2"{style}/>'
        )
        if len(points) <= 62:
            for x, y, value, label in points:
                parts.append(
                    f'<circle class="dot" cx="{x:.1f}" cy="{y:.1f}" r="2.5" '
                    f'fill="{item.colour}"><title>{escape(item.label)}, {escape(label)}: '
                    f"{escape(format_value(value, unit))}</title></circle>"
                )
    if highest <= 0 and empty:
        parts.append(_empty(empty))
    return _svg(parts, title, "lines")


def format_value(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value:.2f}%"
    if unit == "$":
        return f"{value:,.4f}"
    return f"{value:,.0f}"


def _empty(text: str) -> str:
    return (
        f'<text class="empty" x="{(WIDTH + LEFT) / 2:.0f}" y="{HEIGHT / 2:.0f}" '
        f'text-anchor="middle">{escape(text)}</text>'
    )


def meter(percent: float) -> SafeString:
    """A horizontal bar filled to ``percent`` (capped at 100, red past it)."""
    filled = max(0.0, min(percent, 100.0))
    state = "over" if percent >= 100 else "warn" if percent >= 80 else "ok"
    return mark_safe(  # noqa: S308 - numbers only
        f'<svg class="meter meter-{state}" viewBox="0 0 100 8" preserveAspectRatio="none" '
        f'role="img" aria-label="{percent:.1f}% used">'
        f'<rect class="meter-track" x="0" y="0" width="100" height="8" rx="4"/>'
        f'<rect class="meter-fill" x="0" y="0" width="{filled:.2f}" height="8" rx="4"/></svg>'
    )
