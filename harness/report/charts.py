"""Inline SVG charts for the readiness report, drawn from numbers (no JS library, no network).

Why here: the page must open offline and self-contained. Each function returns an SVG
string built by this module; every text in it (titles, node names, labels) goes through
`esc`, so the templates may insert the result with `|safe`.
"""

from __future__ import annotations

import json
import math
from typing import Any

from markupsafe import escape

PALETTE = (
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
    "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22",
)
OUTCOME_COLOURS = {
    "passed": "#2e7d32", "kept": "#2e7d32", "ok": "#2e7d32", "coerced": "#7cb342",
    "failed": "#c62828", "rejected": "#9e9e9e", "error": "#8e0000", "lost": "#8e0000",
    "skipped": "#9e9e9e", "altered": "#ef6c00",
}
MAX_POINTS = 400  # markers per series (the line keeps every point)


def esc(value: Any) -> str:
    """Text for SVG/HTML: &, <, >, quotes escaped."""
    return str(escape(str(value)))


def num(value: Any) -> float | None:
    """A finite number as float, else None (booleans are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if math.isnan(value) or math.isinf(value):
        return None
    return float(value)


def is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def fmt(value: Any) -> str:
    """A number a person reads: 4 significant digits, thousands separators for integers."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value == int(value) and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:.4g}"
    if value is None:
        return "–"
    if isinstance(value, list) and all(is_scalar(v) for v in value):
        return ", ".join("" if v is None else str(v) for v in value)
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)[:300]
    return str(value)


def ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round axis ticks covering lo..hi."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    value = math.floor(lo / step) * step
    out = [round(value, 10)]
    while out[-1] < hi - step * 0.001:  # the last tick covers the highest value
        value += step
        out.append(round(value, 10))
    return out


def _svg_open(title: str, width: int, height: int) -> list[str]:
    return [
        f'<svg class="chart" role="img" aria-label="{esc(title)}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{esc(title)}</title>",
    ]


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    title: str,
    x_label: str = "",
    y_label: str = "",
    events: list[dict[str, Any]] | None = None,
    bad_points: dict[str, list[tuple[float, float]]] | None = None,
    limits: list[tuple[str, float]] | None = None,
    width: int = 760,
    height: int = 260,
) -> str:
    """Lines over x (time, percentile...): fault events as shaded bands, failed attempts as
    crosses, thresholds (`limits`: label, y) as dashed horizontal lines."""
    points = [p for pts in series.values() for p in pts]
    points += [p for pts in (bad_points or {}).values() for p in pts]
    if not points:
        return ""
    left, right, top, bottom = 60, 20, 30, 42
    xs = [p[0] for p in points]
    ys = [p[1] for p in points] + [y for _, y in limits or []]
    event_xs = []
    for event in events or []:
        t = num(event.get("t"))
        if t is not None:
            event_xs += [t, t + (num(event.get("duration_s")) or 0.0)]
    x_ticks = ticks(min(xs + event_xs), max(xs + event_xs))
    y_ticks = ticks(min(0.0, min(ys)), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1) * plot_w

    def sy(y: float) -> float:
        return top + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h

    parts = _svg_open(title, width, height)
    parts.append(f'<text x="{left}" y="18" class="ctitle">{esc(title)}'
                 f"{esc(f' ({y_label})') if y_label else ''}</text>")
    for y in y_ticks:
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" '
                     f'y2="{sy(y):.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" class="tick" '
                     f'text-anchor="end">{esc(fmt(y))}</text>')
    for x in x_ticks:
        parts.append(f'<text x="{sx(x):.1f}" y="{top + plot_h + 16}" class="tick" '
                     f'text-anchor="middle">{esc(fmt(x))}</text>')
    for event in events or []:
        t = num(event.get("t"))
        if t is None:
            continue
        duration = num(event.get("duration_s")) or 0.0
        band = max(2.0, sx(t + duration) - sx(t))
        what = str(event.get("what", "fault"))
        parts.append(
            f'<rect class="fault" x="{sx(t):.1f}" y="{top}" width="{band:.1f}" '
            f'height="{plot_h}"><title>{esc(what)} at t={esc(fmt(t))} s for '
            f"{esc(fmt(duration))} s</title></rect>"
        )
        parts.append(f'<text x="{sx(t) + 3:.1f}" y="{top + 11}" class="faultlabel">'
                     f"{esc(what[:40])}</text>")
    for label, y in limits or []:
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
                     f'class="limit"><title>{esc(label)}</title></line>')
        parts.append(f'<text x="{width - right - 4}" y="{sy(y) - 4:.1f}" class="limitlabel" '
                     f'text-anchor="end">{esc(label[:60])}</text>')
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" class="axis"/>')
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{top + plot_h}" '
                 f'y2="{top + plot_h}" class="axis"/>')
    for index, (name, pts) in enumerate(series.items()):
        colour = PALETTE[index % len(PALETTE)]
        ordered = sorted(pts)
        if len(ordered) > 1:
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in ordered)
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" '
                         f'stroke-width="1.8"><title>{esc(name)}</title></polyline>')
        for x, y in ordered[:MAX_POINTS]:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.2" fill="{colour}">'
                         f"<title>{esc(name)}: {esc(fmt(x))}, {esc(fmt(y))}</title></circle>")
    for name, pts in (bad_points or {}).items():
        for x, y in pts[:MAX_POINTS]:
            parts.append(f'<path d="M{sx(x) - 4:.1f},{sy(y) - 4:.1f}l8,8m0,-8l-8,8" '
                         f'class="badpoint"><title>{esc(name)} failed at {esc(fmt(x))}'
                         "</title></path>")
    legend_x = left
    for index, name in enumerate(series):
        colour = PALETTE[index % len(PALETTE)]
        parts.append(f'<rect x="{legend_x}" y="{height - 14}" width="10" height="10" '
                     f'fill="{colour}"/><text x="{legend_x + 14}" y="{height - 5}" '
                     f'class="tick">{esc(name)}</text>')
        legend_x += 24 + 7 * len(name)
    if x_label:
        parts.append(f'<text x="{width - right}" y="{top + plot_h + 30}" class="tick" '
                     f'text-anchor="end">{esc(x_label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(rows: dict[str, dict[str, float]], title: str, width: int = 760) -> str:
    """Horizontal (stacked) bars: one bar per row, one segment per key of its dict."""
    rows = {k: {s: v for s, v in segs.items() if (num(v) or 0) > 0} for k, segs in rows.items()}
    if not rows:
        return ""
    label_w, bar_h, gap, top = 260, 16, 6, 30
    segments: list[str] = []
    for segs in rows.values():
        segments += [s for s in segs if s not in segments]
    colours = {seg: OUTCOME_COLOURS.get(seg, PALETTE[index % len(PALETTE)])
               for index, seg in enumerate(segments)}
    single = segments == ["count"]
    total_max = max((sum(segs.values()) for segs in rows.values()), default=0) or 1
    plot_w = width - label_w - 70
    height = top + len(rows) * (bar_h + gap) + 24
    parts = _svg_open(title, width, height)
    parts.append(f'<text x="4" y="18" class="ctitle">{esc(title)}</text>')
    y = top
    for label, segs in rows.items():
        short = label if len(label) <= 38 else label[:36] + "…"
        parts.append(f'<text x="{label_w - 6}" y="{y + 12}" class="tick" text-anchor="end">'
                     f"<title>{esc(label)}</title>{esc(short)}</text>")
        x = float(label_w)
        for seg, value in segs.items():
            w = value / total_max * plot_w
            fill = OUTCOME_COLOURS.get(label, colours[seg]) if single else colours[seg]
            parts.append(f'<rect x="{x:.1f}" y="{y}" width="{max(w, 1):.1f}" height="{bar_h}" '
                         f'fill="{fill}"><title>{esc(label)}: {esc(seg)} '
                         f"{esc(fmt(value))}</title></rect>")
            x += w
        parts.append(f'<text x="{x + 4:.1f}" y="{y + 12}" class="tick">'
                     f"{esc(fmt(sum(segs.values())))}</text>")
        y += bar_h + gap
    if not single:
        legend_x = 4
        for seg in segments:
            parts.append(f'<rect x="{legend_x}" y="{y + 4}" width="10" height="10" '
                         f'fill="{colours[seg]}"/><text x="{legend_x + 14}" y="{y + 13}" '
                         f'class="tick">{esc(seg)}</text>')
            legend_x += 24 + 7 * len(seg)
    parts.append("</svg>")
    return "".join(parts)


def status_strip(rows: list[list[Any]], title: str, width: int = 760) -> str:
    """Availability over time: one lane per node, green where probes succeeded, red not.

    rows: [t, node, ok, ...] as the availability monitor records them.
    """
    lanes: dict[str, list[tuple[float, bool]]] = {}
    for row in rows:
        t = num(row[0]) if len(row) > 2 else None
        if t is None:
            continue
        lanes.setdefault(str(row[1]), []).append((t, bool(row[2])))
    if not lanes:
        return ""
    times = [t for lane in lanes.values() for t, _ in lane]
    t0, t1 = min(times), max(times)
    span = (t1 - t0) or 1.0
    label_w, lane_h, top = 90, 18, 28
    plot_w = width - label_w - 20
    height = top + len(lanes) * (lane_h + 6) + 20
    parts = _svg_open(title, width, height)
    parts.append(f'<text x="4" y="18" class="ctitle">{esc(title)}</text>')
    y = top
    for name, lane in lanes.items():
        lane.sort()
        parts.append(f'<text x="{label_w - 6}" y="{y + 13}" class="tick" text-anchor="end">'
                     f"{esc(name)}</text>")
        for index, (t, ok) in enumerate(lane):
            end = lane[index + 1][0] if index + 1 < len(lane) else t1 + span / max(len(lane), 1)
            x = label_w + (t - t0) / span * plot_w
            w = max(1.0, min(end - t, t1 + span - t) / span * plot_w)
            w = min(w, label_w + plot_w - x) if x < label_w + plot_w else 1.0
            colour = "#43a047" if ok else "#e53935"
            parts.append(f'<rect x="{x:.1f}" y="{y}" width="{max(w, 1):.1f}" '
                         f'height="{lane_h}" fill="{colour}"><title>{esc(name)} at '
                         f"t={esc(fmt(t))}: {'ok' if ok else 'inaccessible'}</title></rect>")
        y += lane_h + 6
    parts.append(f'<text x="{label_w}" y="{y + 10}" class="tick">t={esc(fmt(t0))} s</text>')
    parts.append(f'<text x="{label_w + plot_w}" y="{y + 10}" class="tick" text-anchor="end">'
                 f"t={esc(fmt(t1))} s</text>")
    parts.append("</svg>")
    return "".join(parts)
