"""The section of a scenario no purpose-built section knows: its metrics laid out by shape.

Key figures as cards (with their thresholds), dotted per-node figures as a table, accepted
SOP classes and syntaxes as the compatibility matrix, every other metric by
`blocks.value_blocks`; also what a purpose-built section leaves over.
"""

from __future__ import annotations

from typing import Any

from harness.report.blocks import (
    card,
    cards,
    events_of,
    heading,
    label,
    sla_table,
    table,
    value_blocks,
)
from harness.report.charts import fmt, is_scalar, num
from harness.report.compat import compatibility_blocks


def metric_blocks(metrics: dict[str, Any], events: list[dict[str, Any]] | None = None) -> list:
    """Metrics by shape: key figures first, then per-node figures, then every other shape."""
    metrics = dict(metrics)
    events = events if events is not None else events_of(metrics)
    thresholds = metrics.pop("thresholds") if isinstance(metrics.get("thresholds"), dict) else {}
    blocks: list[Any] = []
    figures = [card(label(k), v, note=f"threshold {fmt(thresholds[k])}"
                    if is_scalar(thresholds.get(k)) and thresholds.get(k) is not None else "")
               for k, v in metrics.items() if "." not in k and num(v) is not None]
    if figures:
        blocks.append(cards(figures))
    if thresholds:
        blocks += [heading("Thresholds"), table(["Figure", "Threshold", "Measured"], [
            [label(k), limit, metrics.get(k) if is_scalar(metrics.get(k)) else None]
            for k, limit in thresholds.items()])]
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        if "." in key and is_scalar(value):
            base, suffix = key.split(".", 1)
            grouped.setdefault(base, {})[suffix] = value
    if grouped:
        suffixes: list[str] = []
        for values in grouped.values():
            suffixes += [s for s in values if s not in suffixes]
        blocks += [heading("Figures per node"), table(["Figure", *suffixes], [
            [label(base), *[values.get(s) for s in suffixes]] for base, values in grouped.items()])]
    accepted = {k.split(".", 1)[1]: v for k, v in metrics.items()
                if k.startswith("accepted.") and isinstance(v, dict)}
    charsets = {k.split(".", 1)[1]: v for k, v in metrics.items()
                if k.split(".")[0] in ("charsets", "character_sets") and "." in k
                and isinstance(v, list)}
    if accepted:
        blocks += compatibility_blocks(accepted, charsets)
    handled = {f"{p}.{n}" for n in accepted for p in ("accepted",)}
    handled |= {f"{p}.{n}" for n in charsets for p in ("charsets", "character_sets")}
    for key, value in metrics.items():
        if key in handled or is_scalar(value):
            continue
        if key == "sla" and isinstance(value, list):
            blocks += [heading("SLA clauses"), sla_table(value)]
        else:
            blocks += value_blocks(key, value, events)
    texts = [[label(k), v] for k, v in metrics.items()
             if is_scalar(v) and "." not in k and num(v) is None]
    if texts:
        blocks.append(table(["Figure", "Value"], texts))
    return [b for b in blocks if b]
