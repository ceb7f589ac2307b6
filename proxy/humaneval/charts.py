"""Server-rendered SVG charts for the results pages: no chart library, no JavaScript.

    ratings_svg(rows)   one row per model: a dot at its rating and a whisker over its interval,
                        on a shared horizontal axis with a dashed line at the reference (1500)

The SVG uses presentation attributes only (no `style=`), so a strict Content-Security-Policy
(style-src 'self') still draws it inline. Text is escaped here: the caller may mark the result safe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

_ROW_H = 28
_TOP = 12
_AXIS_H = 34
_LABEL_W = 170
_RIGHT_PAD = 56  # room for the value printed right of each row's whisker


@dataclass(frozen=True, slots=True)
class ChartRow:
    label: str
    value: float
    low: float | None = None  # the interval; None (or not finite) draws the dot alone
    high: float | None = None


def ratings_svg(
    rows: Sequence[ChartRow], *, title: str, reference: float | None = 1500.0, width: int = 640
) -> str:
    """An accessible (<title>, role="img") dot-and-whisker chart of `rows`, in the order given."""
    finite = [x for row in rows for x in (row.value, row.low, row.high) if x is not None and math.isfinite(x)]
    if reference is not None:
        finite.append(reference)
    if not rows or not finite:
        return ""
    lo, hi = min(finite), max(finite)
    ticks = _ticks(lo, hi)
    lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])
    plot_w = width - _LABEL_W - _RIGHT_PAD
    height = _TOP + len(rows) * _ROW_H + _AXIS_H

    def x(value: float) -> float:
        return _LABEL_W + (value - lo) / (hi - lo) * plot_w

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" role="img" '
        f'aria-labelledby="chart-title" class="chart">',
        f'<title id="chart-title">{escape(title)}</title>',
    ]
    axis_y = _TOP + len(rows) * _ROW_H
    for tick in ticks:
        tx = x(tick)
        parts.append(f'<line x1="{tx:.1f}" y1="{_TOP}" x2="{tx:.1f}" y2="{axis_y}" stroke="#e3e3e3"/>')
        parts.append(
            f'<text x="{tx:.1f}" y="{axis_y + 16}" text-anchor="middle" font-size="11" fill="#555">{tick:g}</text>'
        )
    parts.append(f'<line x1="{_LABEL_W}" y1="{axis_y}" x2="{_LABEL_W + plot_w}" y2="{axis_y}" stroke="#888"/>')
    if reference is not None:
        rx = x(reference)
        parts.append(
            f'<line x1="{rx:.1f}" y1="{_TOP}" x2="{rx:.1f}" y2="{axis_y}" stroke="#888" stroke-dasharray="4 3"/>'
        )
    for i, row in enumerate(rows):
        cy = _TOP + i * _ROW_H + _ROW_H / 2
        parts.append(
            f'<text x="{_LABEL_W - 8}" y="{cy + 4:.1f}" text-anchor="end" font-size="12" fill="#222">'
            f"{escape(row.label)}</text>"
        )
        if _finite(row.low) and _finite(row.high):
            assert row.low is not None and row.high is not None
            parts.append(
                f'<line x1="{x(row.low):.1f}" y1="{cy:.1f}" x2="{x(row.high):.1f}" y2="{cy:.1f}" '
                f'stroke="#2f5d9e" stroke-width="2"/>'
            )
            for end in (row.low, row.high):
                parts.append(
                    f'<line x1="{x(end):.1f}" y1="{cy - 5:.1f}" x2="{x(end):.1f}" y2="{cy + 5:.1f}" '
                    f'stroke="#2f5d9e" stroke-width="2"/>'
                )
        if math.isfinite(row.value):
            parts.append(f'<circle cx="{x(row.value):.1f}" cy="{cy:.1f}" r="5" fill="#2f5d9e"/>')
            right = max(row.value, row.high if _finite(row.high) and row.high is not None else row.value)
            parts.append(
                f'<text x="{x(right) + 8:.1f}" y="{cy + 4:.1f}" font-size="11" fill="#222">{row.value:.0f}</text>'
            )
    parts.append("</svg>")
    return "\n".join(parts)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering lo..hi."""
    if hi - lo < 1e-9:
        lo, hi = lo - 50, hi + 50
    raw = (hi - lo) / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(lo / step) * step
    count = math.ceil((hi - first) / step) + 1
    return [first + i * step for i in range(count)]
