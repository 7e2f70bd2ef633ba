"""The report's building blocks: what a metric looks like on the page, as plain data.

Why data and not HTML: the templates (templates/*.html.j2, autoescaped) turn these blocks
into markup, so no value from report.json is ever pasted into HTML by hand. A block is a
dict with a `kind` (heading, text, cards, table, chart, csv, fold, pre, group); table cells
are `Cell`s. Charts are SVG strings from harness.report.charts, the only markup inserted
as-is.

`value_blocks` renders one metric by its shape: availability summaries as a status strip
and a latency chart, percentiles as curves, counts as bars, lists of records as a table with
breakdowns and a CSV download, the rest as JSON (harness/report/generic.py builds whole
sections from it).
"""

from __future__ import annotations

import csv
import io
import json
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

from harness.report.charts import bar_chart, fmt, is_scalar, line_chart, num, status_strip

MAX_TABLE_ROWS = 200
BREAKDOWN_COLUMNS = ("type", "modality", "facility", "institution", "outcome", "level",
                     "transfer_syntax", "charset", "sop_class")
PERCENTILE_KEY = re.compile(r"^(p\d{1,2}(\.\d+)?|min|max|median|mean)$")
EVENT_KEYS = ("faults", "fault_events", "events", "fault")

#: metric keys as a person reads them (units in brackets); others: `label` makes one up
LABELS = {
    "rto_s": "Recovery time, RTO (s)", "rpo_instances": "Recovery point, RPO (instances)",
    "acknowledged_lost": "Acknowledged instances lost", "error_rate": "Error rate",
    "error_rate_during_outage": "Error rate during the outage",
    "acked": "Instances acknowledged", "acked_before_fault": "Acknowledged before the fault",
    "failback_s": "Failback time (s)", "setup": "HA setup",
    "echo_ms": "C-ECHO round trip (ms)", "store_find_get_ms": "Store, find and get (ms)",
    "move_ms": "C-MOVE of a study (ms)",
    "restore_time_s": "Restore time (s)", "backup_s": "Backup time (s)",
    "lost": "Instances lost", "altered": "Instances altered", "expected": "Instances backed up",
    "restored": "Instances restored", "runs": "Migration runs", "retries": "Retries used",
    "studies": "Studies", "instances": "Instances", "duplicates": "Duplicate instances",
    "target_instances": "Instances on the target", "fault_events": "Fault events",
    "fault_errors": "Faults that did not apply", "results": "Results per migration run",
    "missing": "Instances missing on target", "missing_on_target": "Instances missing on target",
    "extra": "Extra instances on target", "unretrievable": "Unretrievable instances",
    "inaccessible_share": "Share of failed probes", "latency_s": "Probe latency (s)",
    "findings": "Findings", "findings_by_type": "Findings by type", "throughput": "Throughput",
    "progress": "Progress", "latency_percentiles": "Latency percentiles",
    "sla": "SLA clauses", "thresholds": "Thresholds", "note": "Note", "seed": "Seed",
    "faults": "Fault events", "verdict": "Verdict", "method": "Method",
    "instances_per_s": "Instances/s", "mb_per_s": "MB/s", "count": "Requests",
    "errors": "Errors", "operations": "Operations", "bounded_by": "Bounded by",
    "cpu_cores": "Harness CPU (cores)", "cpu_s_total": "Harness CPU time (s)",
    "saturated": "Harness saturated", "cpu_count": "CPUs", "patients": "Patients",
    "series": "Series", "samples": "Probes", "interval_s": "Probe interval (s)",
    "duration_s": "Duration (s)", "studies_probed": "Studies probed", "probe": "Probe",
    "migrated": "Studies migrated", "studies_total": "Studies to migrate",
    "already_on_target": "Studies already on target", "instances_sent": "Instances sent",
    "retries_used": "Retries used", "elapsed_s": "Elapsed (s)", "failed": "Failed",
    "skipped_already_confirmed": "Studies confirmed earlier", "ok": "Completed",
    "source": "Source", "target": "Target", "objects": "Objects",
}
FINDING_LABELS = {
    "missing_patient": "Patient missing on target", "missing_study": "Study missing on target",
    "missing_series": "Series missing on target",
    "missing_instance": "Instance missing on target",
    "extra_patient": "Extra patient on target", "extra_study": "Extra study on target",
    "extra_series": "Extra series on target", "extra_instance": "Extra instance on target",
    "unretrievable": "Listed but not retrievable",
    "altered_attributes": "Attributes altered", "altered_pixels": "Pixel data altered",
    "recompressed_lossy": "Recompressed lossy", "duplicate_instance": "Duplicate instance",
    "patient_reassignment": "Moved to another patient",
    "study_reassignment": "Moved to another study",
}
_UNITS = (("_ms", " (ms)"), ("_s", " (s)"), ("_pct", " (%)"), ("_mb", " (MB)"))


def label(key: Any) -> str:
    """`missing_on_target` -> 'Instances missing on target'; unknown keys are made readable."""
    key = str(key)
    if key in LABELS:
        return LABELS[key]
    if key in FINDING_LABELS:
        return FINDING_LABELS[key]
    base, unit = key, ""
    for suffix, text in _UNITS:
        if key.endswith(suffix) and len(key) > len(suffix):
            base, unit = key[: -len(suffix)], text
            break
    words = base.replace("_", " ").strip()
    return words[:1].upper() + words[1:] + unit


@dataclass
class Cell:
    """A table cell: text, or a badge (an outcome), a link, code; optional class and title."""

    text: str = ""
    badge: str = ""
    href: str = ""
    code: bool = False
    cls: str = ""
    title: str = ""
    header: bool = False


def cell(value: Any) -> Cell:
    return value if isinstance(value, Cell) else Cell(fmt(value))


def badge(outcome: Any) -> Cell:
    return Cell(text=str(outcome), badge=str(outcome))


def heading(text: str) -> dict[str, Any]:
    return {"kind": "heading", "text": text}


def text(value: str, cls: str = "") -> dict[str, Any]:
    return {"kind": "text", "text": value, "cls": cls}


def card(label_text: str, value: Any, note: str = "", state: str = "") -> dict[str, Any]:
    """One key figure; state 'bad' (red) or 'good' (green) when judged against a limit."""
    return {"label": label_text, "value": value if isinstance(value, str) else fmt(value),
            "note": note, "state": state}


def cards(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"kind": "cards", "cards": items}


def table(headers: list[str], rows: list[list[Any]], cls: str = "",
          row_classes: list[str] | None = None) -> dict[str, Any]:
    """At most MAX_TABLE_ROWS rows; cells formatted with `fmt` unless they are Cells."""
    shown = rows[:MAX_TABLE_ROWS]
    return {"kind": "table", "headers": headers, "cls": cls,
            "rows": [[cell(v) for v in row] for row in shown],
            "row_classes": (row_classes or [""] * len(shown))[: len(shown)],
            "more": len(rows) - len(shown)}


def chart(svg: str) -> dict[str, Any] | None:
    return {"kind": "chart", "svg": svg} if svg else None


def fold(summary: str, blocks: list[Any], opened: bool = False) -> dict[str, Any]:
    return {"kind": "fold", "summary": summary, "blocks": [b for b in blocks if b],
            "open": opened}


def pre(value: str, cls: str = "") -> dict[str, Any]:
    return {"kind": "pre", "text": value, "cls": cls}


def group(blocks: list[Any], cls: str = "nested", block_id: str = "") -> dict[str, Any]:
    return {"kind": "group", "blocks": [b for b in blocks if b], "cls": cls, "id": block_id}


def raw_json(summary: str, value: Any, limit: int = 100_000) -> dict[str, Any]:
    """The data as recorded, folded away (for the engineer who wants every field)."""
    dumped = json.dumps(value, indent=1, default=str)
    if len(dumped) > limit:
        dumped = dumped[:limit] + f"\n… {len(dumped) - limit} more characters in report.json"
    return fold(summary, [pre(dumped, "raw")])


def percent(share: Any) -> str:
    return "–" if num(share) is None else f"{share * 100:.2f} %"


# ---------------------------------------------------------------------------------------
# Shapes


def points_of(value: Any) -> list[tuple[float, float]] | None:
    """[[x, y], ...] with numbers (extra columns ignored), else None."""
    if not isinstance(value, list) or len(value) < 2:
        return None
    out = []
    for item in value:
        if not isinstance(item, list | tuple) or len(item) < 2:
            return None
        x, y = num(item[0]), num(item[1])
        if x is None or y is None:
            return None
        out.append((x, y))
    return out


def is_timeline(value: Any) -> bool:
    """Availability rows [t, node, ok, latency]."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(r, list | tuple) and len(r) >= 3 and num(r[0]) is not None
        and isinstance(r[1], str) and isinstance(r[2], bool | int) for r in value)


def is_events(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(e, dict) and "t" in e and "what" in e for e in value)


def is_percentiles(value: Any) -> bool:
    """{op: {p50: x, p95: y, ...}} (None allowed for an operation with no figures)."""
    if not isinstance(value, dict) or not value:
        return False
    inner = [v for v in value.values() if v is not None]
    return bool(inner) and all(
        isinstance(v, dict) and v and all(PERCENTILE_KEY.match(str(k)) for k in v)
        and all(num(x) is not None for x in v.values()) for v in inner)


def percentile_x(key: str) -> float | None:
    if key.startswith("p"):
        try:
            return float(key[1:])
        except ValueError:
            return None
    return {"min": 0.0, "median": 50.0, "max": 100.0}.get(key)


def is_counts(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        num(v) is not None for v in value.values())


def is_record_series(value: Any) -> bool:
    """[{t: ..., metric: number, ...}, ...]: a throughput or progress timeline."""
    return (isinstance(value, list) and len(value) >= 2
            and all(isinstance(r, dict) and num(r.get("t")) is not None for r in value)
            and any(num(v) is not None for k, v in value[0].items() if k != "t"))


def events_of(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for key, value in metrics.items()
            if key.split(".")[0] in EVENT_KEYS and is_events(value) for e in value]


# ---------------------------------------------------------------------------------------
# Shape renderers


def csv_href(rows: list[dict[str, Any]]) -> str:
    """The rows as a data: URI CSV (one column per key seen), for a download link."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([
            json.dumps(row.get(c), default=str) if isinstance(row.get(c), dict | list)
            else ("" if row.get(c) is None else row.get(c)) for c in columns])
    return "data:text/csv;charset=utf-8," + urllib.parse.quote(buffer.getvalue())


def records_blocks(name: str, rows: list[dict[str, Any]], title: str = "") -> list[Any]:
    """A list of dicts (findings, objects not kept...): breakdowns, a table, a CSV."""
    title = title or label(name)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    filename = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".csv"
    blocks: list[Any] = [{"kind": "csv", "title": title, "count": len(rows),
                          "href": csv_href(rows), "filename": filename}]
    for column in BREAKDOWN_COLUMNS:
        values = [fmt(r[column]) for r in rows
                  if column in r and (is_scalar(r[column]) or isinstance(r[column], list))]
        distinct = set(values)
        if values and 1 < len(distinct) <= 30 or (len(values) > 1 and len(distinct) == 1
                                                  and column in ("type", "modality")):
            counts: dict[str, float] = {}
            for v in values:
                counts[v] = counts.get(v, 0) + 1
            ordered = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
            blocks.append(chart(bar_chart({k: {"count": v} for k, v in ordered.items()},
                                          f"{title} by {column.replace('_', ' ')}")))
    rows_table = table([label(c) for c in columns], [[row.get(c) for c in columns]
                                                     for row in rows], cls="records")
    blocks.append(fold(f"show the {len(rows)} rows", [rows_table]) if len(rows) > 10
                  else rows_table)
    return blocks


AVAILABILITY_KEYS = ("inaccessible_share", "timeline", "nodes", "probes", "latency_s",
                     "errors", "samples", "probe", "interval_s", "duration_s", "studies_probed")


def availability_blocks(name: str, value: dict[str, Any], events: list[dict[str, Any]],
                        title: str = "") -> list[Any]:
    """The availability monitor's summary (harness/monitor.py): failed-probe share per side,
    a status strip and the probe latency over time, probes and latency per side."""
    nodes = value.get("nodes") if isinstance(value.get("nodes"), dict) else {}
    blocks: list[Any] = [heading(title or f"{label(name)}: availability")]
    title = title or label(name)
    if value.get("probe"):
        blocks.append(text(
            f"Probe: {value['probe']}, every {fmt(value.get('interval_s'))} s; "
            f"{fmt(value.get('samples'))} probes over {fmt(value.get('duration_s'))} s on "
            f"{fmt(value.get('studies_probed'))} studies.", "note"))
    share = value.get("inaccessible_share")
    if isinstance(share, dict):
        blocks.append(cards([
            card(f"Probes failed on {role}" + (f" ({nodes[role]})" if nodes.get(role) else ""),
                 percent(figure), state="bad" if num(figure) else "good")
            for role, figure in share.items()]))
    timeline = value.get("timeline")
    if is_timeline(timeline):
        blocks.append(chart(status_strip(timeline, f"{title}: accessible over time (t in s)")))
        series: dict[str, list[tuple[float, float]]] = {}
        bad: dict[str, list[tuple[float, float]]] = {}
        for row in timeline:
            latency = num(row[3]) if len(row) > 3 else None
            (series if row[2] else bad).setdefault(str(row[1]), []).append(
                (float(row[0]), latency or 0.0))
        blocks.append(chart(line_chart(series, f"{title}: probe latency over time", "t (s)",
                                       "s", events=events, bad_points=bad)))
    probes, latency = value.get("probes"), value.get("latency_s")
    if isinstance(probes, dict) or isinstance(latency, dict):
        sides = list(dict.fromkeys([*(probes or {}), *(latency or {})]))
        errors = value.get("errors") if isinstance(value.get("errors"), dict) else {}
        blocks.append(table(
            ["Side", "Node", "Probes", "Failed", "Latency p50 (s)", "p95 (s)", "max (s)",
             "Most frequent errors"],
            [[side, nodes.get(side), ((probes or {}).get(side) or {}).get("total"),
              ((probes or {}).get(side) or {}).get("failed"),
              *[((latency or {}).get(side) or {}).get(p) for p in ("p50", "p95", "max")],
              "; ".join(f"{e} ({n})" for e, n in (errors.get(side) or {}).items())]
             for side in sides]))
    rest = {k: v for k, v in value.items() if k not in AVAILABILITY_KEYS}
    if rest:
        blocks += value_blocks(f"{name} details", rest, events, depth=1)
    return blocks


def percentile_blocks(name: str, value: dict[str, Any], unit: str = "s") -> list[Any]:
    series: dict[str, list[tuple[float, float]]] = {}
    keys: list[str] = []
    for op, figures in value.items():
        if figures is None:
            continue
        keys += [k for k in figures if k not in keys]
        pts = [(percentile_x(k), float(v)) for k, v in figures.items()]
        series[str(op)] = [(x, y) for x, y in pts if x is not None]
    rows = [[op, *[(figures or {}).get(k) for k in keys]] for op, figures in value.items()]
    svg = line_chart({k: v for k, v in series.items() if v},
                     f"{label(name)}: latency percentiles per operation", "percentile", unit)
    return [chart(svg), table(["Operation", *keys], rows)]


def value_blocks(name: str, value: Any, events: list[dict[str, Any]],
                 depth: int = 0) -> list[Any]:
    """One metric by its shape; unknown shapes fall back to tables or JSON."""
    title = label(name)
    if is_scalar(value):
        return [table(["Figure", "Value"], [[title, value]])]
    if isinstance(value, dict) and ("timeline" in value or "inaccessible_share" in value):
        return availability_blocks(name, value, events)
    if is_events(value):
        return [heading(f"{title}: fault events"), events_table(value)]
    if is_timeline(value):
        return availability_blocks(name, {"timeline": value}, events)
    points = points_of(value)
    if points is not None:
        return [chart(line_chart({title: points}, title, events=events))]
    if is_record_series(value):
        series: dict[str, list[tuple[float, float]]] = {}
        for row in value:
            for key, item in row.items():
                if key != "t" and num(item) is not None:
                    series.setdefault(label(key), []).append((float(row["t"]), float(item)))
        return [chart(line_chart(series, f"{title} over time", "t (s)", events=events))]
    if is_percentiles(value):
        return percentile_blocks(name, value)
    if isinstance(value, dict) and value and all(is_counts(v) for v in value.values()):
        keys: list[str] = []
        for inner in value.values():
            keys += [k for k in inner if k not in keys]
        svg = bar_chart({str(k): {s: float(n) for s, n in v.items()} for k, v in value.items()},
                        title)
        return [chart(svg), table([title, *map(label, keys)],
                                  [[k, *[v.get(s) for s in keys]] for k, v in value.items()])]
    if is_counts(value):
        svg = ""
        if len(value) >= 2 and all((num(v) or 0) >= 0 for v in value.values()):
            svg = bar_chart({label(k): {"count": float(v)} for k, v in value.items()}, title)
        counts = table([title, "Value"], [[label(k), v] for k, v in value.items()])
        return [chart(svg), fold("table", [counts])] if svg else [counts]
    if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
        return records_blocks(name, value, title)
    if isinstance(value, list) and all(is_scalar(v) for v in value):
        return [table(["Figure", "Value"], [[title, ", ".join(fmt(v) for v in value) or "–"]])]
    if isinstance(value, dict) and depth < 3:
        scalars = [[label(k), v] for k, v in value.items() if is_scalar(v)]
        inner: list[Any] = [heading(title)]
        if scalars:
            inner.append(table(["Figure", "Value"], scalars))
        for key, item in value.items():
            if not is_scalar(item):
                inner += value_blocks(f"{title} › {label(key)}", item, events, depth + 1)
        return [group(inner)]
    return [raw_json(title, value)]


def events_table(events: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [[e.get("t"), e.get("what"), e.get("target", ""), e.get("duration_s"),
             ", ".join(f"{k}={fmt(v)}" for k, v in e.items()
                       if k not in ("t", "what", "target", "duration_s"))] for e in events]
    return table(["t (s)", "What", "On", "Duration (s)", "Details"], rows)


def sla_table(clauses: list[Any]) -> dict[str, Any]:
    rows = []
    for clause in clauses:
        if not isinstance(clause, dict):
            rows.append([clause, "", "", ""])
            continue
        ok = clause.get("ok", clause.get("passed"))
        rows.append([clause.get("clause", clause.get("name", "")), clause.get("measured"),
                     clause.get("threshold", clause.get("limit")),
                     badge("passed" if ok else "failed") if ok is not None else ""])
    return table(["Clause", "Measured", "Threshold", "Verdict"], rows)
