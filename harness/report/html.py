"""The go-live readiness report: one self-contained index.html per run.

Why: the people who decide on a go-live read a page, not a pytest log. The page is built from
report.json and logs/ only, so it can be re-rendered after the run (`pacs-harness report`) and
opened offline: no JS library, no network, charts are inline SVG drawn here. Every string is
HTML-escaped and anything that looks like a secret is redacted before it is rendered.

Metrics are rendered generically (numbers, small tables, bar charts for counts, line charts
for lists of points) and specifically where their shape is recognised: the connectivity
scenario's `accepted.<node>` tables become the node compatibility matrix, availability
summaries (`inaccessible_share`, `latency_s`, `timeline`) a status strip and a latency chart,
per-operation percentiles a percentile curve chart, fault events `[{t, what, duration_s}]`
shaded bands on the scenario's time charts, and lists of findings a table with a CSV download
and breakdowns by type, modality and facility.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
import shlex
import urllib.parse
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.phases import PHASES
from harness.report.gate import GateResult, evaluate_gate

REDACTED = "[redacted]"
LOG_TAIL_LINES = 40
MAX_TABLE_ROWS = 200
PALETTE = (
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
    "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22",
)
OUTCOME_COLOURS = {
    "passed": "#2e7d32", "kept": "#2e7d32", "ok": "#2e7d32",
    "failed": "#c62828", "rejected": "#c62828", "error": "#8e0000",
    "skipped": "#9e9e9e", "altered": "#ef6c00",
}
BREAKDOWN_COLUMNS = ("type", "modality", "facility", "institution", "outcome", "level",
                     "transfer_syntax", "charset", "sop_class")
PERCENTILE_KEY = re.compile(r"^(p\d{1,2}(\.\d+)?|min|max|median|mean)$")

# ---------------------------------------------------------------------------------------
# Redaction

_SECRET_WORDS = {
    "password", "passwd", "pwd", "secret", "secrets", "token", "tokens", "key", "apikey",
    "credential", "credentials", "passphrase", "authorization", "cookie",
}
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^\s:/@]+):([^\s@/]+)@")
_ASSIGNED_SECRET = re.compile(
    r"(?i)\b(password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|secret[_-]?key|"
    r"private[_-]?key|credentials?|passphrase)(\s*[\"']?\s*[:=]\s*[\"']?)([^\s\"',;&]+)"
)
_AUTH_HEADER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")


def _is_secret_key(name: str) -> bool:
    """A mapping key names a secret: password, api_key, authToken, credentials...

    Keys with spaces are human labels (SOP class names such as 'Key Object Selection
    Document Storage'), never configuration keys, so they are not taken for secrets.
    """
    if " " in name:
        return False
    words = re.findall(r"[a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower())
    return any(word in _SECRET_WORDS for word in words)


def redact_text(text: str) -> str:
    """Hide `user:pass@` in URLs, `password=...`-style assignments and auth headers."""
    text = _URL_USERINFO.sub(lambda m: f"{m.group(1)}{m.group(2)}:{REDACTED}@", text)
    text = _ASSIGNED_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    return _AUTH_HEADER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)


def redact(value: Any) -> Any:
    """A copy of a JSON-like value with secret-named keys' values and secret text replaced."""
    if isinstance(value, dict):
        return {
            key: (REDACTED if _is_secret_key(str(key)) else redact(item))
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


# ---------------------------------------------------------------------------------------
# Small formatting helpers


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


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
    if isinstance(value, list) and all(_is_scalar(v) for v in value):
        return ", ".join("" if v is None else str(v) for v in value)
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)[:300]
    return str(value)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if math.isnan(value) or math.isinf(value):
        return None
    return float(value)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _badge(outcome: str) -> str:
    return f'<span class="badge {esc(outcome)}">{esc(outcome)}</span>'


def _table(headers: list[str], rows: list[list[Any]], cls: str = "", raw: bool = False) -> str:
    """An HTML table; cells are escaped unless raw (already-built HTML from this module)."""
    shown = rows[:MAX_TABLE_ROWS]
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in shown:
        cells = "".join(
            f"<td>{cell if raw else esc(fmt(cell))}</td>" for cell in row
        )
        body.append(f"<tr>{cells}</tr>")
    more = ""
    if len(rows) > len(shown):
        more = (f'<p class="note">{len(rows) - len(shown)} more rows not shown '
                "(see report.json)</p>")
    return (f'<div class="scroll"><table class="{esc(cls)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>{more}")


# ---------------------------------------------------------------------------------------
# Charts: inline SVG


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    value = math.floor(lo / step) * step
    ticks = [round(value, 10)]
    while ticks[-1] < hi - step * 0.001:  # the last tick covers the highest value
        value += step
        ticks.append(round(value, 10))
    return ticks


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    title: str,
    x_label: str = "",
    y_label: str = "",
    events: list[dict[str, Any]] | None = None,
    bad_points: dict[str, list[tuple[float, float]]] | None = None,
    width: int = 760,
    height: int = 260,
) -> str:
    """Lines over x (time, percentile...) with fault events as shaded bands and labels."""
    points = [p for pts in series.values() for p in pts]
    points += [p for pts in (bad_points or {}).values() for p in pts]
    if not points:
        return ""
    left, right, top, bottom = 60, 20, 30, 42
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    event_xs = []
    for event in events or []:
        t = _num(event.get("t"))
        if t is not None:
            event_xs += [t, t + (_num(event.get("duration_s")) or 0.0)]
    x_ticks = _ticks(min(xs + event_xs), max(xs + event_xs))
    y_ticks = _ticks(min(0.0, min(ys)), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1) * plot_w

    def sy(y: float) -> float:
        return top + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h

    parts = [
        f'<svg class="chart" role="img" aria-label="{esc(title)}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{esc(title)}</title>",
        f'<text x="{left}" y="18" class="ctitle">{esc(title)}'
        f"{esc(f' ({y_label})') if y_label else ''}</text>",
    ]
    for y in y_ticks:
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" '
                     f'y2="{sy(y):.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" class="tick" '
                     f'text-anchor="end">{esc(fmt(y))}</text>')
    for x in x_ticks:
        parts.append(f'<text x="{sx(x):.1f}" y="{top + plot_h + 16}" class="tick" '
                     f'text-anchor="middle">{esc(fmt(x))}</text>')
    for event in events or []:
        t = _num(event.get("t"))
        if t is None:
            continue
        duration = _num(event.get("duration_s")) or 0.0
        band = max(2.0, sx(t + duration) - sx(t))
        what = str(event.get("what", "fault"))
        parts.append(
            f'<rect class="fault" x="{sx(t):.1f}" y="{top}" width="{band:.1f}" '
            f'height="{plot_h}"><title>{esc(what)} at t={esc(fmt(t))} s for '
            f"{esc(fmt(duration))} s</title></rect>"
        )
        parts.append(f'<text x="{sx(t) + 3:.1f}" y="{top + 11}" class="faultlabel">'
                     f"{esc(what[:40])}</text>")
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
        for x, y in ordered[:400]:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.2" fill="{colour}">'
                         f"<title>{esc(name)}: {esc(fmt(x))}, {esc(fmt(y))}</title></circle>")
    for name, pts in (bad_points or {}).items():
        for x, y in pts[:400]:
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
    rows = {k: {s: v for s, v in segs.items() if (_num(v) or 0) > 0} for k, segs in rows.items()}
    if not rows:
        return ""
    label_w, bar_h, gap, top = 260, 16, 6, 30
    segments: list[str] = []
    for segs in rows.values():
        segments += [s for s in segs if s not in segments]
    colours = {}
    for index, seg in enumerate(segments):
        colours[seg] = OUTCOME_COLOURS.get(seg, PALETTE[index % len(PALETTE)])
    single = segments == ["count"]
    total_max = max((sum(segs.values()) for segs in rows.values()), default=0) or 1
    plot_w = width - label_w - 70
    height = top + len(rows) * (bar_h + gap) + 24
    parts = [
        f'<svg class="chart" role="img" aria-label="{esc(title)}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{esc(title)}</title>",
        f'<text x="4" y="18" class="ctitle">{esc(title)}</text>',
    ]
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
                         f'fill="{fill}">'
                         f'<title>{esc(label)}: {esc(seg)} '
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
    """Availability over time: one lane per node, green where probes succeeded, red not."""
    lanes: dict[str, list[tuple[float, bool]]] = {}
    for row in rows:
        t = _num(row[0]) if len(row) > 2 else None
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
    parts = [
        f'<svg class="chart" role="img" aria-label="{esc(title)}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{esc(title)}</title>",
        f'<text x="4" y="18" class="ctitle">{esc(title)}</text>',
    ]
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


# ---------------------------------------------------------------------------------------
# Shape recognition


def _points(value: Any) -> list[tuple[float, float]] | None:
    """[[x, y], ...] with numbers (extra columns ignored), else None."""
    if not isinstance(value, list) or len(value) < 2:
        return None
    out = []
    for item in value:
        if not isinstance(item, list | tuple) or len(item) < 2:
            return None
        x, y = _num(item[0]), _num(item[1])
        if x is None or y is None:
            return None
        out.append((x, y))
    return out


def _is_timeline(value: Any) -> bool:
    """Availability rows [t, node, ok, latency]."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(
            isinstance(r, list | tuple) and len(r) >= 3 and _num(r[0]) is not None
            and isinstance(r[1], str) and isinstance(r[2], bool | int)
            for r in value
        )
    )


def _is_events(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(e, dict) and "t" in e and "what" in e for e in value)
    )


def _is_percentiles(value: Any) -> bool:
    """{op: {p50: x, p95: y, ...}} (None allowed for an operation with no figures)."""
    if not isinstance(value, dict) or not value:
        return False
    inner = [v for v in value.values() if v is not None]
    return bool(inner) and all(
        isinstance(v, dict) and v and all(PERCENTILE_KEY.match(str(k)) for k in v)
        and all(_num(x) is not None for x in v.values())
        for v in inner
    )


def _percentile_x(key: str) -> float | None:
    if key.startswith("p"):
        try:
            return float(key[1:])
        except ValueError:
            return None
    return {"min": 0.0, "median": 50.0, "max": 100.0}.get(key)


def _is_counts(value: Any) -> bool:
    return (isinstance(value, dict) and len(value) >= 1
            and all(_num(v) is not None for v in value.values()))


def _is_nested_counts(value: Any) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(_is_counts(v) for v in value.values()))


def _is_record_series(value: Any) -> bool:
    """[{t: ..., metric: number, ...}, ...]: a throughput or progress timeline."""
    return (
        isinstance(value, list) and len(value) >= 2
        and all(isinstance(r, dict) and _num(r.get("t")) is not None for r in value)
        and any(_num(v) is not None for k, v in value[0].items() if k != "t")
    )


# ---------------------------------------------------------------------------------------
# Metric rendering


def _csv_link(rows: list[dict[str, Any]], name: str) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([
            json.dumps(row.get(c), default=str) if isinstance(row.get(c), dict | list)
            else ("" if row.get(c) is None else row.get(c))
            for c in columns
        ])
    href = "data:text/csv;charset=utf-8," + urllib.parse.quote(buffer.getvalue())
    filename = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".csv"
    return f'<a class="csv" download="{esc(filename)}" href="{esc(href)}">download CSV</a>'


def _records_table(name: str, rows: list[dict[str, Any]]) -> str:
    """A list of dicts (findings, rejected objects...): breakdown charts, table, CSV."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    parts = [f"<p><b>{esc(name)}</b>: {len(rows)} rows {_csv_link(rows, name)}</p>"]
    for column in BREAKDOWN_COLUMNS:
        values = [fmt(r[column]) for r in rows
                  if column in r and (_is_scalar(r[column]) or isinstance(r[column], list))]
        distinct = set(values)
        if values and 1 < len(distinct) <= 30 or (len(values) > 1 and len(distinct) == 1
                                                  and column in ("type", "modality")):
            counts: dict[str, float] = {}
            for v in values:
                counts[v] = counts.get(v, 0) + 1
            ordered = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
            parts.append(bar_chart({k: {"count": v} for k, v in ordered.items()},
                                   f"{name} by {column}"))
    table_rows = [[row.get(c) for c in columns] for row in rows]
    table = _table(columns, table_rows, cls="records")
    if len(rows) > 10:
        table = f"<details><summary>show the {len(rows)} rows</summary>{table}</details>"
    parts.append(table)
    return "".join(parts)


def _availability(name: str, value: dict[str, Any], events: list[dict[str, Any]]) -> str:
    parts = [f"<h4>{esc(name)}: availability</h4>"]
    share = value.get("inaccessible_share")
    if isinstance(share, dict):
        cards = []
        for node, figure in share.items():
            pct = "–" if _num(figure) is None else f"{figure * 100:.2f} %"
            cards.append(_card(f"inaccessible ({node})", pct, bad=bool(_num(figure))))
        parts.append(f'<div class="cards">{"".join(cards)}</div>')
    timeline = value.get("timeline")
    if _is_timeline(timeline):
        parts.append(status_strip(timeline, f"{name}: accessible over time (t in s)"))
        series: dict[str, list[tuple[float, float]]] = {}
        bad: dict[str, list[tuple[float, float]]] = {}
        for row in timeline:
            latency = _num(row[3]) if len(row) > 3 else None
            target = series if row[2] else bad
            target.setdefault(str(row[1]), []).append((float(row[0]), latency or 0.0))
        parts.append(line_chart(series, f"{name}: probe latency over time", "t (s)",
                                "latency (s)", events=events, bad_points=bad))
    rest = {k: v for k, v in value.items() if k not in ("inaccessible_share", "timeline")}
    parts.append(_render_value(f"{name} details", rest, events, depth=1))
    return "".join(parts)


def _card(label: str, value: str, bad: bool = False, note: str = "") -> str:
    cls = "card bad" if bad else "card"
    extra = f'<div class="cnote">{esc(note)}</div>' if note else ""
    return (f'<div class="{cls}"><div class="cval">{esc(value)}</div>'
            f'<div class="clabel">{esc(label)}</div>{extra}</div>')


def _render_value(name: str, value: Any, events: list[dict[str, Any]], depth: int = 0) -> str:
    """Render one metric by its shape; unknown shapes fall back to tables or JSON."""
    if _is_scalar(value):
        return _table(["metric", "value"], [[name, value]])
    if isinstance(value, dict) and ("timeline" in value or "inaccessible_share" in value):
        return _availability(name, value, events)
    if _is_events(value):
        rows = [[e.get("t"), e.get("what"), e.get("duration_s"),
                 ", ".join(f"{k}={fmt(v)}" for k, v in e.items()
                           if k not in ("t", "what", "duration_s"))] for e in value]
        return f"<h4>{esc(name)}: fault events</h4>" + _table(
            ["t (s)", "what", "duration (s)", "details"], rows)
    if _is_timeline(value):
        return _availability(name, {"timeline": value}, events)
    points = _points(value)
    if points is not None:
        return line_chart({name: points}, name, events=events)
    if _is_record_series(value):
        series: dict[str, list[tuple[float, float]]] = {}
        for row in value:
            for key, item in row.items():
                if key != "t" and _num(item) is not None:
                    series.setdefault(key, []).append((float(row["t"]), float(item)))
        return line_chart(series, f"{name} over time", "t (s)", events=events)
    if _is_percentiles(value):
        series = {}
        rows = []
        keys: list[str] = []
        for op, figures in value.items():
            if figures is None:
                continue
            keys += [k for k in figures if k not in keys]
            pts = [(_percentile_x(k), float(v)) for k, v in figures.items()]
            series[str(op)] = [(x, y) for x, y in pts if x is not None]
        for op, figures in value.items():
            rows.append([op, *[(figures or {}).get(k) for k in keys]])
        chart = line_chart({k: v for k, v in series.items() if v},
                           f"{name}: latency percentiles per operation", "percentile", "s")
        return chart + _table(["operation", *keys], rows)
    if _is_nested_counts(value):
        keys = []
        for inner in value.values():
            keys += [k for k in inner if k not in keys]
        rows = [[outer, *[inner.get(k) for k in keys]] for outer, inner in value.items()]
        chart = bar_chart({str(k): {s: float(n) for s, n in v.items()} for k, v in value.items()},
                          name)
        return chart + _table([name, *keys], rows)
    if _is_counts(value):
        rows = [[k, v] for k, v in value.items()]
        chart = ""
        if len(value) >= 2 and all((_num(v) or 0) >= 0 for v in value.values()):
            chart = bar_chart({str(k): {"count": float(v)} for k, v in value.items()}, name)
        table = _table([name, "value"], rows)
        return chart + (f"<details><summary>table</summary>{table}</details>" if chart else table)
    if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
        return _records_table(name, value)
    if isinstance(value, list) and all(_is_scalar(v) for v in value):
        return _table(["metric", "value"], [[name, ", ".join(fmt(v) for v in value) or "–"]])
    if isinstance(value, dict) and depth < 3:
        scalars = [[k, v] for k, v in value.items() if _is_scalar(v)]
        parts = [f"<h4>{esc(name)}</h4>"]
        if scalars:
            parts.append(_table(["metric", "value"], scalars))
        for key, item in value.items():
            if not _is_scalar(item):
                parts.append(_render_value(f"{name}.{key}", item, events, depth + 1))
        return f'<div class="nested">{"".join(parts)}</div>'
    return (f"<details><summary>{esc(name)}</summary><pre>"
            f"{esc(json.dumps(value, indent=1, default=str)[:20000])}</pre></details>")


def compatibility_matrix(accepted: dict[str, dict[str, list[str]]],
                         charsets: dict[str, list[str]] | None = None) -> str:
    """Which node accepts which SOP class in which transfer syntax, and character sets."""
    nodes = list(accepted)
    sop_classes: list[str] = []
    syntaxes: list[str] = []
    for table in accepted.values():
        for sop, ts_list in table.items():
            if sop not in sop_classes:
                sop_classes.append(sop)
            syntaxes += [ts for ts in ts_list if ts not in syntaxes]
    parts = ["<h4>Node compatibility matrix: SOP classes × transfer syntaxes</h4>",
             '<p class="note">✓ accepted, ✗ refused at association negotiation. '
             "Rows where the nodes differ are highlighted.</p>"]
    head = "<th>SOP class</th>" + "".join(
        f'<th class="rot">{esc(node)}<br>{esc(ts)}</th>' for node in nodes for ts in syntaxes
    )
    body = []
    for sop in sop_classes:
        per_node = [set(accepted[node].get(sop, [])) for node in nodes]
        differs = any(s != per_node[0] for s in per_node)
        cells = []
        for node, accepted_ts in zip(nodes, per_node, strict=True):
            for ts in syntaxes:
                ok = ts in accepted_ts
                cells.append(f'<td class="{"yes" if ok else "no"}" title="{esc(node)}: '
                             f'{esc(ts)}">{"✓" if ok else "✗"}</td>')
        body.append(f'<tr class="{"differs" if differs else ""}"><th class="rowh">'
                    f"{esc(sop)}</th>{''.join(cells)}</tr>")
    parts.append(f'<div class="scroll"><table class="matrix"><thead><tr>{head}</tr></thead>'
                 f"<tbody>{''.join(body)}</tbody></table></div>")
    summary = [[ts, *[sum(1 for sop in sop_classes if ts in accepted[n].get(sop, []))
                      for n in nodes]] for ts in syntaxes]
    parts.append(_table(["transfer syntax", *[f"{n}: SOP classes accepted" for n in nodes]],
                        summary))
    if charsets:
        rows = [[node, ", ".join(values)] for node, values in charsets.items()]
        parts.append("<h4>Character sets</h4>" + _table(["node", "character sets"], rows))
    return "".join(parts)


def render_metrics(metrics: dict[str, Any], thresholds: dict[str, Any] | None = None) -> str:
    """All of a scenario's metrics: key figures first, then recognised shapes, then the rest."""
    metrics = dict(metrics)
    events: list[dict[str, Any]] = []
    for key in list(metrics):
        if _is_events(metrics[key]) and key.split(".")[0] in (
            "faults", "fault_events", "events", "fault"
        ):
            events += metrics[key]
    thresholds = dict(thresholds or {})
    if isinstance(metrics.get("thresholds"), dict):
        thresholds.update(metrics.pop("thresholds"))
    parts: list[str] = []
    # key figures: plain scalars
    cards = []
    for key, value in metrics.items():
        if "." not in key and _num(value) is not None:
            limit = thresholds.get(key)
            note = f"threshold {fmt(limit)}" if _is_scalar(limit) and limit is not None else ""
            cards.append(_card(key, fmt(value), note=note))
    if cards:
        parts.append(f'<div class="cards">{"".join(cards)}</div>')
    if thresholds:
        rows = [[name, limit, metrics.get(name) if _is_scalar(metrics.get(name)) else None]
                for name, limit in thresholds.items()]
        parts.append("<h4>Thresholds</h4>" + _table(["figure", "threshold", "measured"], rows))
    # dotted scalars: a matrix of base × suffix (echo_ms.legacy, move_ms.a->b ...)
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        if "." in key and _is_scalar(value):
            base, suffix = key.split(".", 1)
            grouped.setdefault(base, {})[suffix] = value
    if grouped:
        suffixes: list[str] = []
        for values in grouped.values():
            suffixes += [s for s in values if s not in suffixes]
        rows = [[base, *[values.get(s) for s in suffixes]] for base, values in grouped.items()]
        parts.append("<h4>Figures per node</h4>" + _table(["figure", *suffixes], rows))
    # the compatibility matrix
    accepted = {k.split(".", 1)[1]: v for k, v in metrics.items()
                if k.startswith("accepted.") and isinstance(v, dict)}
    charsets = {k.split(".", 1)[1]: v for k, v in metrics.items()
                if k.split(".")[0] in ("charsets", "character_sets") and "." in k
                and isinstance(v, list)}
    if accepted:
        parts.append(compatibility_matrix(accepted, charsets))
    handled = {f"accepted.{n}" for n in accepted} | {f"charsets.{n}" for n in charsets}
    handled |= {f"character_sets.{n}" for n in charsets}
    for key, value in metrics.items():
        if key in handled or _is_scalar(value):
            continue
        if key == "sla" and isinstance(value, list):
            parts.append("<h4>SLA clauses</h4>" + _sla_table(value))
            continue
        parts.append(_render_value(key, value, events))
    for key, value in metrics.items():
        if not _is_scalar(value) or "." in key or _num(value) is not None:
            continue
        parts.append(_table(["metric", "value"], [[key, value]]))
    return "".join(parts)


def _sla_table(clauses: list[Any]) -> str:
    rows = []
    for clause in clauses:
        if not isinstance(clause, dict):
            rows.append([esc(fmt(clause)), "", "", ""])
            continue
        ok = clause.get("ok", clause.get("passed"))
        mark = _badge("passed" if ok else "failed") if ok is not None else ""
        rows.append([esc(fmt(clause.get("clause", clause.get("name", "")))),
                     esc(fmt(clause.get("measured"))),
                     esc(fmt(clause.get("threshold", clause.get("limit")))), mark])
    return _table(["clause", "measured", "threshold", ""], rows, raw=True)


# ---------------------------------------------------------------------------------------
# The page


def _log_tails(report_dir: Path) -> dict[str, str]:
    logs = {}
    log_dir = report_dir / "logs"
    if log_dir.is_dir():
        for path in sorted(log_dir.glob("*.log")):
            try:
                lines = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            logs[path.stem] = redact_text("\n".join(lines[-LOG_TAIL_LINES:]))
    return logs


def reproduce_command(report: dict[str, Any]) -> str:
    """The `pacs-harness run` line that repeats this run (topology, phase, seed)."""
    if report.get("command"):
        return str(report["command"])
    argv = ["pacs-harness", "run"]
    source = (report.get("topology") or {}).get("source")
    if source and source != "<default>":
        argv += ["--topology", str(source)]
    if report.get("phase"):
        argv += ["--phase", str(report["phase"])]
    for name in report.get("scenario_filter") or []:
        argv += ["--scenario", str(name)]
    return shlex.join(argv)


def _seed(report: dict[str, Any]) -> str:
    if report.get("seed") is not None:
        return str(report["seed"])
    seeds = sorted({
        f"{s.get('name')}: {v}" for s in report.get("scenarios", [])
        for k, v in (s.get("metrics") or {}).items() if k == "seed" or k.endswith(".seed")
    })
    if seeds:
        return "; ".join(seeds)
    return "fixed seeds in the scenarios (synthetic data is the same on every run)"


def _headline_phase(report: dict[str, Any]) -> str:
    """The phase asked for, else the latest phase any scenario of the run gates."""
    if report.get("phase") in PHASES:
        return str(report["phase"])
    marked = [s.get("phase") for s in report.get("scenarios", []) if s.get("phase") in PHASES]
    return max(marked, key=PHASES.index) if marked else PHASES[-1]


def _verdict_section(report: dict[str, Any], gate: GateResult) -> str:
    cls = "ready" if gate.ready else "notready"
    word = "READY" if gate.ready else "NOT READY"
    reasons = "".join(f"<li>{esc(r)}</li>" for r in gate.reasons)
    ladder = []
    for phase in PHASES:
        try:
            result = evaluate_gate(report, phase)
        except ConfigError:
            continue
        own = [s.get("name") for s in report.get("scenarios", []) if s.get("phase") == phase]
        tip = "; ".join(result.reasons)
        ladder.append(
            f'<li class="{"ready" if result.ready else "notready"}" title="{esc(tip)}">'
            f"<b>{esc(phase)}</b><span>{'ready' if result.ready else 'not ready'}</span>"
            f"<small>{esc(', '.join(map(str, own)) or 'no scenario of its own')}</small></li>"
        )
    counts = report.get("counts") or {}
    count_text = ", ".join(f"{fmt(v)} {k}" for k, v in counts.items())
    extra = ""
    if report.get("environment_error"):
        extra += f'<p class="enverr">Environment error: {esc(report["environment_error"])}</p>'
    if report.get("reason"):
        extra += f"<p>{esc(report['reason'])}</p>"
    asked = "phase asked" if report.get("phase") else "latest phase in this run"
    return (
        f'<section id="verdict" class="{cls}"><div class="big">{word} for '
        f"<span>{esc(gate.phase)}</span></div>"
        f'<p class="sub">{esc(asked)}; run verdict <b>{esc(report.get("verdict", "?"))}</b>; '
        f"tests: {esc(count_text)}</p><ul class=\"reasons\">{reasons}</ul>{extra}"
        f'<ol class="ladder">{"".join(ladder)}</ol></section>'
    )


def _scenario_overview(report: dict[str, Any]) -> str:
    rows = []
    for s in report.get("scenarios", []):
        tests = s.get("tests") or []
        failed = sum(1 for t in tests if t.get("outcome") in ("failed", "error"))
        rows.append([
            f'<a href="#scenario-{esc(s.get("name"))}">{esc(s.get("name"))}</a>',
            esc(s.get("phase") or "any"), _badge(str(s.get("outcome"))),
            esc(f"{len(tests) - failed}/{len(tests)}"), esc(fmt(s.get("duration_s"))),
        ])
    return _table(["scenario", "phase", "outcome", "tests ok", "duration (s)"], rows, raw=True)


def _nodes_named(text: str, nodes: list[str]) -> list[str]:
    return [n for n in nodes if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text)]


def _scenario_section(scenario: dict[str, Any], logs: dict[str, str]) -> str:
    name = str(scenario.get("name"))
    outcome = str(scenario.get("outcome"))
    tests = scenario.get("tests") or []
    parts = [
        f'<section class="scenario {esc(outcome)}" id="scenario-{esc(name)}">',
        f"<h3>{esc(name)} {_badge(outcome)}</h3>",
        f'<p class="sub">phase {esc(scenario.get("phase") or "any")} · '
        f"{len(tests)} tests · {esc(fmt(scenario.get('duration_s')))} s</p>",
    ]
    failing = [t for t in tests if t.get("outcome") in ("failed", "error")]
    if failing:
        parts.append('<div class="evidence"><h4>Why it failed</h4>')
        for test in failing:
            parts.append(f"<p><code>{esc(test.get('nodeid'))}</code> "
                         f"{_badge(str(test.get('outcome')))}</p>")
            if test.get("message"):
                parts.append(f'<pre class="message">{esc(test["message"])}</pre>')
        text = " ".join(str(t.get("nodeid", "")) + str(t.get("message", "")) for t in failing)
        named = _nodes_named(text, list(logs)) or list(logs)
        for node in named:
            parts.append(f"<details open><summary>log tail of node {esc(node)} (last "
                         f"{LOG_TAIL_LINES} lines)</summary><pre class=\"log\">"
                         f"{esc(logs[node])}</pre></details>")
        parts.append("</div>")
    metrics = scenario.get("metrics") or {}
    if metrics:
        parts.append("<h4>Key figures and evidence</h4>" + render_metrics(metrics))
    rows = [[esc(t.get("nodeid", "")).split("::")[-1], _badge(str(t.get("outcome"))),
             esc(fmt(t.get("duration_s"))),
             esc(_first_line(t.get("message")))] for t in tests]
    parts.append("<details><summary>tests</summary>"
                 + _table(["test", "outcome", "duration (s)", "message"], rows, raw=True)
                 + "</details>")
    parts.append("</section>")
    return "".join(parts)


def _first_line(text: str | None) -> str:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    errors = [line[2:].strip() for line in lines if line.startswith("E ")]
    return (errors[0] if errors else (lines[-1] if lines else ""))[:200]


def _run_section(report: dict[str, Any], report_dir: Path) -> str:
    topology = report.get("topology") or {}
    nodes = topology.get("nodes") or []
    rows = [[n.get("name"), n.get("kind"), n.get("version"), n.get("ae_title"), n.get("host"),
             n.get("dicom_port"), n.get("http_port"), n.get("disposable")] for n in nodes]
    links = []
    for rel, label in (("report.json", "report.json"), ("junit.xml", "JUnit XML"),
                       ("allure-report/index.html", "Allure report"),
                       ("allure-results", "Allure results")):
        if (report_dir / rel).exists():
            links.append(f'<a href="{esc(rel)}">{esc(label)}</a>')
    facts = [
        ["harness version", report.get("harness_version")],
        ["topology", f"{topology.get('name', '?')} ({topology.get('source', '?')})"],
        ["phase asked", report.get("phase") or "all phases"],
        ["started", report.get("started")], ["finished", report.get("finished")],
        ["seed", _seed(report)],
    ]
    return (
        '<section id="run"><h2>Run, topology and reproduction</h2>'
        f'<p>Reproduce: <code class="cmd">{esc(reproduce_command(report))}</code></p>'
        + _table(["", ""], facts)
        + "<h4>Nodes</h4>"
        + _table(["node", "kind", "version", "AE title", "host", "DICOM port", "HTTP port",
                  "disposable"], rows)
        + (f"<p>Other outputs: {' · '.join(links)}</p>" if links else "")
        + "</section>"
    )


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;
background:#f6f7f9}
main{max-width:1200px;margin:0 auto;padding:16px 24px}
h1{font-size:20px;margin:8px 0}h2{font-size:18px;margin:24px 0 8px}
h3{font-size:17px;margin:4px 0}h4{font-size:14px;margin:14px 0 6px}
section{background:#fff;border:1px solid #dde;border-radius:6px;padding:12px 16px;margin:12px 0}
#verdict.ready{border-left:10px solid #2e7d32}#verdict.notready{border-left:10px solid #c62828}
#verdict .big{font-size:30px;font-weight:700}
#verdict.ready .big{color:#2e7d32}#verdict.notready .big{color:#c62828}
.reasons li{margin:2px 0}.sub{color:#555;margin:2px 0 8px}
.ladder{display:flex;gap:6px;list-style:none;padding:0;flex-wrap:wrap}
.ladder li{flex:1;min-width:140px;padding:6px 8px;border-radius:4px;color:#fff}
.ladder li span,.ladder li small{display:block}.ladder li small{opacity:.85}
.ladder .ready{background:#2e7d32}.ladder .notready{background:#c62828}
.badge{display:inline-block;padding:0 7px;border-radius:9px;color:#fff;font-size:12px;
background:#777}
.badge.passed{background:#2e7d32}.badge.failed{background:#c62828}
.badge.error{background:#8e0000}.badge.skipped{background:#9e9e9e}
table{border-collapse:collapse;margin:4px 0 8px;font-size:13px}
th,td{border:1px solid #dde;padding:3px 7px;text-align:left;vertical-align:top}
thead th{background:#eef1f6}.scroll{overflow-x:auto;max-width:100%}
table.matrix td{text-align:center;min-width:22px}table.matrix td.yes{background:#e8f5e9;
color:#2e7d32}table.matrix td.no{background:#ffebee;color:#c62828}
table.matrix th.rot{font-size:11px;font-weight:400;max-width:90px}
table.matrix tr.differs th.rowh{background:#fff3cd}
.cards{display:flex;gap:10px;flex-wrap:wrap;margin:6px 0}
.card{border:1px solid #dde;border-radius:6px;padding:6px 12px;min-width:110px;
background:#fafbfd}.card.bad{border-color:#c62828;background:#ffebee}
.cval{font-size:20px;font-weight:600}.clabel{color:#555;font-size:12px}
.cnote{color:#777;font-size:11px}
.evidence{border-left:4px solid #c62828;padding:4px 12px;background:#fff8f8;margin:8px 0}
pre{background:#f3f4f6;padding:8px;overflow-x:auto;font-size:12px;max-height:420px;
white-space:pre-wrap;word-break:break-word}
code.cmd{background:#f3f4f6;padding:2px 6px;font-size:13px}
.note{color:#666;font-size:12px}.enverr{color:#8e0000;font-weight:600}
svg.chart{display:block;margin:6px 0;max-width:100%;height:auto;background:#fff}
svg .ctitle{font-size:13px;font-weight:600;fill:#222}svg .tick{font-size:11px;fill:#555}
svg .grid{stroke:#eee}svg .axis{stroke:#999}
svg .fault{fill:#e53935;fill-opacity:.15;stroke:#e53935;stroke-dasharray:3 2}
svg .faultlabel{font-size:11px;fill:#b71c1c}svg .badpoint{stroke:#c62828;stroke-width:2}
.nested{margin-left:6px}a.csv{margin-left:8px;font-size:12px}
footer{color:#777;font-size:12px;margin:20px 0}
@media print{details{display:block}section{break-inside:avoid}}
"""

SCRIPT = """
document.addEventListener('DOMContentLoaded', function () {
  var charts = document.querySelectorAll('svg.chart').length;
  document.body.setAttribute('data-charts', String(charts));
  var note = document.getElementById('chart-count');
  if (note) { note.textContent = charts + ' charts rendered'; }
});
"""


def render_html(report: dict[str, Any], logs: dict[str, str], report_dir: Path) -> str:
    """The whole page as a string (report and logs are redacted here, again, to be safe)."""
    report = redact(report)
    logs = {name: redact_text(text) for name, text in logs.items()}
    gate = evaluate_gate(report, _headline_phase(report))
    scenarios = report.get("scenarios") or []
    ordered = sorted(scenarios, key=lambda s: (s.get("outcome") == "passed",
                                               PHASES.index(s["phase"])
                                               if s.get("phase") in PHASES else -1))
    log_section = "".join(
        f"<details><summary>{esc(node)}</summary><pre class=\"log\">{esc(text)}</pre></details>"
        for node, text in logs.items()
    )
    title = f"PACS go-live readiness: {gate.phase} — {'ready' if gate.ready else 'not ready'}"
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>PACS go-live readiness report · topology "
        f"{esc((report.get('topology') or {}).get('name', '?'))} · "
        f"{esc(report.get('finished', ''))}</h1>"
        + _verdict_section(report, gate)
        + "<section id=\"overview\"><h2>Scenarios</h2>" + _scenario_overview(report)
        + "</section>"
        + "".join(_scenario_section(s, logs) for s in ordered)
        + _run_section(report, report_dir)
        + (f'<section id="logs"><h2>Node logs (last {LOG_TAIL_LINES} lines)</h2>'
           f"{log_section}</section>" if logs else "")
        + f"<footer>pacs-harness {esc(report.get('harness_version', ''))} · "
        "<span id=\"chart-count\"></span></footer>"
        f"</main><script>{SCRIPT}</script></body></html>"
    )


def load_report(report_dir: Path) -> dict[str, Any]:
    """The parsed report.json of a run directory, or a one-line ConfigError (exit 2)."""
    source = Path(report_dir) / "report.json"
    if not source.is_file():
        raise ConfigError(f"{source}: no report.json (is {report_dir} a pacs-harness run?)")
    try:
        report = json.loads(source.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{source}: not readable JSON ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("scenarios"), list):
        raise ConfigError(f"{source}: not a pacs-harness report (no 'scenarios' list)")
    return report


def write_html_report(report_dir: Path) -> Path:
    """Read report_dir/report.json and logs/, write report_dir/index.html, return its path."""
    report_dir = Path(report_dir)
    report = load_report(report_dir)
    page = render_html(report, _log_tails(report_dir), report_dir)
    target = report_dir / "index.html"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(target)
    return target
