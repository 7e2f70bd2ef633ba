"""The interoperability page: the conformance probes' answers side by side, risks on top.

Why this layout: the people planning a migration ask first "what breaks between my source
and my target, and what do we do about it" (the risks per source/target pair, with their
remedies), then "where does each node differ" (a matrix, one row per probe, one column per
node, coloured by outcome), and an engineer asks "show me" (each cell links to the exact
requests and responses of its probe on that node, further down the same page).

Reads ConformanceRun.as_dict() (harness/conformance/runner.py): {"nodes", "probes",
"results", "risks"}. The same blocks make a section of the readiness report (a scenario
that recorded metrics["conformance"]) and a page of their own (`render_interop_page`).
Everything goes through the autoescaping templates; nothing is pasted into HTML here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.report.blocks import Cell, card, cards, group, heading, table, text

Built = tuple[list[Any], set[str]]
KEY = "conformance"
OUTCOMES = ("conforms", "differs", "not supported", "not tested")
#: what a cell's colour means, for the legend
MEANING = {
    "conforms": "did what the reference says",
    "differs": "did something else (may break a migration)",
    "not supported": "does not offer what the probe needs",
    "not tested": "could not be measured here (why: in the evidence)",
}


def is_conformance(value: Any) -> bool:
    """Does `value` look like ConformanceRun.as_dict()?"""
    return isinstance(value, dict) and isinstance(value.get("results"), list)


def _css(outcome: str) -> str:
    return "o-" + outcome.replace(" ", "-") if outcome in OUTCOMES else ""


def _anchor(node_index: int, probe_index: int) -> str:
    """The id of a cell's evidence: positions, so no node or probe name gets into an id."""
    return f"interop-{node_index}-{probe_index}"


def _names(conformance: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """Nodes and probes in the run's order, with any that only the results name appended."""
    nodes = [str(n.get("name")) for n in conformance.get("nodes") or [] if isinstance(n, dict)]
    probes = [p for p in conformance.get("probes") or [] if isinstance(p, dict) and p.get("id")]
    known = {str(p["id"]) for p in probes}
    for row in _rows(conformance):
        if str(row.get("node")) not in nodes:
            nodes.append(str(row.get("node")))
        if str(row.get("probe")) not in known:
            known.add(str(row.get("probe")))
            probes.append({"id": str(row.get("probe")), "title": str(row.get("probe"))})
    return nodes, probes


def _rows(conformance: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in conformance.get("results") or [] if isinstance(r, dict)]


def _risk_blocks(risks: list[dict[str, Any]]) -> list[Any]:
    blocks: list[Any] = [heading("Migration risks per source → target pair")]
    if not risks:
        return [*blocks, text("No probe outcome puts a migration between these nodes at "
                              "risk (probes not tested are not counted).", "good")]
    ordered = sorted(risks, key=lambda r: (str(r.get("source")), str(r.get("target"))))
    rows = [[Cell(f"{r.get('source')} → {r.get('target')}", header=True, cls="rowh"),
             Cell(str(r.get("probe", "")), code=True), r.get("risk"), r.get("remedy"),
             Cell(str(r.get("remedy_id", "")), code=True)] for r in ordered]
    return [*blocks, table(["Source → target", "Probe", "Why it breaks a migration",
                            "Remedy", "Remedy id"], rows, cls="risks")]


def _matrix(nodes: list[str], probes: list[dict[str, Any]],
            by_cell: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    """One row per probe, one column per node; a cell is the outcome, coloured, linking to
    its evidence; its tooltip is what was observed."""
    rows = []
    for p_index, info in enumerate(probes):
        probe_id = str(info["id"])
        row: list[Any] = [Cell(str(info.get("title") or probe_id), header=True, cls="rowh",
                               title=f"{probe_id}: {info.get('expected', '')}"),
                          Cell(str(info.get("reference", "")))]
        for n_index, node in enumerate(nodes):
            result = by_cell.get((node, probe_id))
            if result is None:
                row.append(Cell("–", title="not run on this node"))
                continue
            outcome = str(result.get("outcome"))
            row.append(Cell(outcome, href=f"#{_anchor(n_index, p_index)}", cls=_css(outcome),
                            title=str(result.get("observed", ""))))
        rows.append(row)
    return table(["Probe", "Reference", *nodes], rows, cls="matrix interop")


def _evidence(nodes: list[str], probes: list[dict[str, Any]],
              by_cell: dict[tuple[str, str], dict[str, Any]]) -> list[Any]:
    """Each cell's requests and responses, under the id its matrix cell links to."""
    blocks: list[Any] = [heading("Evidence: what each probe sent and what came back")]
    for p_index, info in enumerate(probes):
        for n_index, node in enumerate(nodes):
            result = by_cell.get((node, str(info["id"])))
            if result is None:
                continue
            exchanges = [e for e in result.get("evidence") or [] if isinstance(e, dict)]
            facts = result.get("facts") or {}
            blocks.append(group([
                text(f"{node} · {info['id']} ({info.get('reference', '')}): "
                     f"{result.get('outcome')} — {result.get('observed', '')}"),
                table(["Request", "Response"], [[e.get("request"), e.get("response")]
                                                 for e in exchanges], cls="exchanges")
                if exchanges else text("no exchange recorded", "note"),
                text("facts: " + json.dumps(facts, default=str, sort_keys=True), "note")
                if facts else None,
            ], cls="probe-evidence", block_id=_anchor(n_index, p_index)))
    return blocks


def interop_blocks(conformance: dict[str, Any]) -> list[Any]:
    """The page's blocks: the risks, key counts, the legend, the matrix, the evidence."""
    nodes, probes = _names(conformance)
    by_cell = {(str(r.get("node")), str(r.get("probe"))): r for r in _rows(conformance)}
    counts = {o: sum(1 for r in by_cell.values() if r.get("outcome") == o) for o in OUTCOMES}
    risks = [r for r in conformance.get("risks") or [] if isinstance(r, dict)]
    pairs = {(r.get("source"), r.get("target")) for r in risks}
    figures = cards([
        card("Migration risks", len(risks), note=f"{len(pairs)} source → target pairs",
             state="bad" if risks else "good"),
        card("Nodes", len(nodes)), card("Probes", len(probes)),
        *[card(f"Cells {outcome}", counts[outcome]) for outcome in OUTCOMES],
    ])
    legend = table(["Outcome", "Meaning"], [[Cell(o, cls=_css(o)), MEANING[o]]
                                            for o in OUTCOMES], cls="legend")
    return [
        *_risk_blocks(risks), figures,
        heading("Nodes × probes"),
        text("Each cell links to the requests and responses behind it; hover it for what "
             "was observed. A probe the node could not run is 'not tested', never counted "
             "as conforming.", "note"),
        legend, _matrix(nodes, probes, by_cell),
        *_evidence(nodes, probes, by_cell),
    ]


def interop_section(metrics: dict[str, Any], scenario: dict[str, Any]) -> Built:
    """The readiness report's section for a scenario that recorded metrics["conformance"]
    (registered in harness/report/sections.py)."""
    value = metrics.get(KEY)
    if not is_conformance(value):
        return [], set()
    return interop_blocks(value), {KEY}


def render_interop_page(conformance: dict[str, Any], path: str | Path) -> Path:
    """Write the interoperability page on its own (self-contained HTML) to `path`."""
    from harness.report.html import _environment, redact

    conformance = redact(conformance)
    nodes = ", ".join(f"{n.get('name')} ({n.get('kind')} {n.get('version') or ''})".strip()
                      for n in conformance.get("nodes") or [] if isinstance(n, dict))
    page = _environment().get_template("interop.html.j2").render(
        title="PACS interoperability: conformance probes", nodes=nodes,
        blocks=interop_blocks(conformance),
    )
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(target)
    return target
