"""A tiny SVG chart helper: time series and bar charts as inline markup, no JavaScript.

Charts are computed on the server and sent inside the page, so the dashboard
needs no front-end build and no chart library, and a chart is in the DOM the
moment the page is (the browser tests look for it there). Only presentation
attributes are used (no ``style=``), which the page's Content-Security-Policy
allows. Every text that reaches the markup is escaped.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

PALETTE = ("#2563eb", "#16a34a", "#d97706", "#dc2626", "#7c3aed", "#0891b2")
W, H = 640, 180
PAD_L, PAD_R, PAD_T, PAD_B = 44, 12, 12, 24


@dataclass(frozen=True)
class Series:
    """One line: a label and (time, value) points; None values break the line."""

    label: str
    points: Sequence[tuple[dt.datetime, float | None]]
    color: str = ""


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    for step in (1, 2, 2.5, 5, 10):
        for mag in range(-2, 9):
            top = step * 10**mag
            if top >= v:
                return float(top)
    return v


def _fmt(v: float) -> str:
    if v >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:g}"


def _frame(title: str, y_max: float, unit: str, width: int, height: int) -> list[str]:
    inner_h = height - PAD_T - PAD_B
    out = [
        f'<figure class="chart-box"><figcaption>{escape(title)}</figcaption>',
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    for i in range(5):
        y = PAD_T + inner_h * i / 4
        value = y_max * (4 - i) / 4
        out.append(
            f'<line x1="{PAD_L}" y1="{y:.1f}" x2="{width - PAD_R}" y2="{y:.1f}" '
            f'stroke="#e5e7eb" stroke-width="1"/>'
        )
        out.append(
            f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="10" '
            f'fill="#6b7280">{escape(_fmt(value))}{escape(unit)}</text>'
        )
    return out


def line_chart(
    title: str,
    series: Sequence[Series],
    *,
    start: dt.datetime,
    end: dt.datetime,
    unit: str = "",
    y_max: float | None = None,
    width: int = W,
    height: int = H,
) -> Markup:
    """Lines over [start, end]; an empty chart says "no data" rather than vanishing."""
    values = [v for s in series for _, v in s.points if v is not None]
    top = y_max if y_max is not None else _nice_max(max(values, default=0.0) * 1.1)
    out = _frame(title, top, unit, width, height)
    span = max((end - start).total_seconds(), 1.0)
    inner_w, inner_h = width - PAD_L - PAD_R, height - PAD_T - PAD_B
    for i in range(5):  # time labels
        t = start + (end - start) * i / 4
        x = PAD_L + inner_w * i / 4
        label = t.strftime("%H:%M") if span <= 2 * 86400 else t.strftime("%d %b")
        out.append(
            f'<text x="{x:.1f}" y="{height - 6}" text-anchor="middle" font-size="10" '
            f'fill="#6b7280">{escape(label)}</text>'
        )
    if not values:
        out.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" font-size="12" '
            f'fill="#9ca3af">no data in this period</text>'
        )
    for n, s in enumerate(series):
        color = s.color or PALETTE[n % len(PALETTE)]
        runs: list[list[str]] = [[]]
        for t, v in s.points:
            if v is None:
                runs.append([])
                continue
            x = PAD_L + inner_w * (t - start).total_seconds() / span
            y = PAD_T + inner_h * (1 - min(v, top) / top)
            runs[-1].append(f"{x:.1f},{y:.1f}")
        for run in runs:
            if len(run) == 1:
                cx, cy = run[0].split(",")
                out.append(f'<circle class="point" cx="{cx}" cy="{cy}" r="2" fill="{color}"/>')
            elif run:
                out.append(
                    f'<polyline class="line" fill="none" stroke="{color}" stroke-width="1.5" '
                    f'points="{" ".join(run)}"/>'
                )
    legend_x = PAD_L
    for n, s in enumerate(series):
        color = s.color or PALETTE[n % len(PALETTE)]
        out.append(
            f'<rect x="{legend_x}" y="2" width="8" height="8" fill="{color}"/>'
            f'<text x="{legend_x + 11}" y="10" font-size="10" fill="#374151">'
            f"{escape(s.label)}</text>"
        )
        legend_x += 14 + 7 * len(s.label)
    out.append("</svg></figure>")
    return Markup("".join(out))  # noqa: S704 -- every text above went through escape()


def bar_chart(
    title: str,
    bars: Sequence[tuple[str, float, float]],
    *,
    labels: tuple[str, str] = ("answered", "other"),
    unit: str = "",
    width: int = W,
    height: int = H,
    every: int = 1,
) -> Markup:
    """Stacked bars (first part, second part) with a label each; ``every`` thins the labels."""
    totals = [a + b for _, a, b in bars]
    top = _nice_max(max(totals, default=0.0) * 1.1)
    out = _frame(title, top, unit, width, height)
    inner_w, inner_h = width - PAD_L - PAD_R, height - PAD_T - PAD_B
    n = max(len(bars), 1)
    slot = inner_w / n
    bw = max(slot * 0.7, 1.0)
    if not bars or not any(totals):
        out.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" font-size="12" '
            f'fill="#9ca3af">no calls in this period</text>'
        )
    for i, (label, a, b) in enumerate(bars):
        x = PAD_L + slot * i + (slot - bw) / 2
        ha = inner_h * a / top
        hb = inner_h * b / top
        base = PAD_T + inner_h
        if a:
            out.append(
                f'<rect class="bar" x="{x:.1f}" y="{base - ha:.1f}" width="{bw:.1f}" '
                f'height="{ha:.1f}" fill="{PALETTE[0]}"><title>{escape(label)}: '
                f"{a:g} {escape(labels[0])}</title></rect>"
            )
        if b:
            out.append(
                f'<rect class="bar" x="{x:.1f}" y="{base - ha - hb:.1f}" width="{bw:.1f}" '
                f'height="{hb:.1f}" fill="#cbd5e1"><title>{escape(label)}: {b:g} '
                f"{escape(labels[1])}</title></rect>"
            )
        if i % every == 0:
            out.append(
                f'<text x="{x + bw / 2:.1f}" y="{height - 6}" text-anchor="middle" '
                f'font-size="10" fill="#6b7280">{escape(label)}</text>'
            )
    out.append(
        f'<rect x="{PAD_L}" y="2" width="8" height="8" fill="{PALETTE[0]}"/>'
        f'<text x="{PAD_L + 11}" y="10" font-size="10" fill="#374151">{escape(labels[0])}</text>'
        f'<rect x="{PAD_L + 80}" y="2" width="8" height="8" fill="#cbd5e1"/>'
        f'<text x="{PAD_L + 91}" y="10" font-size="10" fill="#374151">{escape(labels[1])}</text>'
    )
    out.append("</svg></figure>")
    return Markup("".join(out))  # noqa: S704 -- every text above went through escape()
