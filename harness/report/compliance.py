"""The readiness report's compliance section: the `security` scenario's checks as matrices.

Why a matrix per area: a go-live board asks "which node fails which rule", and a site's
engineer asks "what do I change"; one row per node and one column per check answers the
first at a glance (the cell's tooltip holds what was seen and the remedy), and the table of
failed checks under it answers the second. Reads `security.<area>.<node>` (lists of
harness/security/checks.py `Check.as_dict()`) and `security.audit_coverage.<node>`
(operations audited / performed) as scenarios/test_security.py records them.
"""

from __future__ import annotations

from typing import Any

from harness.report.blocks import Cell, card, cards, fold, heading, table, text
from harness.report.charts import num

Built = tuple[list[Any], set[str]]

#: area -> (title, what its checks prove), in the order the section shows them
AREAS = {
    "tls": ("Encryption in transit: DICOM TLS", "plaintext and unauthenticated clients "
            "refused, no TLS 1.0/1.1, a BCP 195 protocol and cipher, a valid certificate "
            "naming the node (PS3.15 B.1, B.9-B.11)"),
    "access": ("Access control: AE titles", "unknown calling AEs, unknown C-MOVE destinations "
               "and a wrong called AE refused per service"),
    "rest": ("REST and DICOMweb authentication", "anonymous, default and wrong credentials "
             "refused; HTTPS where declared"),
    "audit": ("Audit trail (IHE ATNA)", "every operation the harness performed is audited "
              "with the right outcome (PS3.15 A.5)"),
    "phi": ("Patient data: canary identities", "planted identities found nowhere they do not "
            "belong"),
}
BADGES = {"pass": "passed", "fail": "failed", "skip": "skipped"}
PREFIX = "security."
COVERAGE = "audit_coverage"


def _checks(value: Any) -> list[dict[str, Any]]:
    return [c for c in value if isinstance(c, dict) and "name" in c] if isinstance(
        value, list) else []


def _tooltip(check: dict[str, Any]) -> str:
    lines = [str(check.get("observed") or "")]
    if check.get("remedy") and check.get("outcome") == "fail":
        lines.append(f"Remedy: {check['remedy']}")
    if check.get("reference"):
        lines.append(f"Reference: {check['reference']}")
    return "\n".join(line for line in lines if line)


def _matrix(nodes: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Nodes x checks; a cell is the outcome's badge, its tooltip what was seen."""
    columns: list[str] = []
    for checks in nodes.values():
        columns += [str(c["name"]) for c in checks if str(c["name"]) not in columns]
    rows, row_classes = [], []
    for node, checks in nodes.items():
        by_name = {str(c["name"]): c for c in checks}
        row: list[Any] = [Cell(node, header=True, cls="rowh")]
        for column in columns:
            check = by_name.get(column)
            outcome = str((check or {}).get("outcome", ""))
            row.append(Cell("–") if check is None else Cell(
                outcome, badge=BADGES.get(outcome, outcome), title=_tooltip(check)))
        rows.append(row)
        row_classes.append("differs" if any(c.get("outcome") == "fail" for c in checks) else "")
    return table(["Node", *columns], rows, cls="matrix compliance", row_classes=row_classes)


def _findings(nodes: dict[str, list[dict[str, Any]]]) -> list[Any]:
    failed = [[node, c.get("name"), c.get("observed"), c.get("remedy"), c.get("reference")]
              for node, checks in nodes.items() for c in checks if c.get("outcome") == "fail"]
    if not failed:
        return [text("No check failed.", "good")]
    return [table(["Node", "Failed check", "Observed", "Remedy", "Reference"], failed,
                  cls="findings")]


def _coverage_blocks(coverage: dict[str, dict[str, Any]]) -> list[Any]:
    rows = []
    for node, figures in coverage.items():
        audited, performed = num(figures.get("audited")), num(figures.get("performed"))
        share = f"{audited:g} / {performed:g}" if None not in (audited, performed) else "–"
        rows.append([node, share, figures.get("messages"), figures.get("invalid")])
    return [heading("Audit coverage: operations audited / performed"),
            table(["Node", "Audited / performed", "Audit messages received",
                   "Invalid messages"], rows,
                  row_classes=["differs" if r[1] != "–" and r[1].split(" / ")[0]
                               != r[1].split(" / ")[1] else "" for r in rows])]


def compliance(metrics: dict[str, Any], scenario: dict[str, Any]) -> Built:
    """The compliance section of scenario `security` (registered in sections.BUILDERS)."""
    areas: dict[str, dict[str, list[dict[str, Any]]]] = {}
    coverage: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    for key, value in metrics.items():
        if not key.startswith(PREFIX) or key.count(".") < 2:
            continue
        area, node = key[len(PREFIX):].split(".", 1)
        if area == COVERAGE and isinstance(value, dict):
            coverage[node] = value
            used.add(key)
        elif _checks(value):
            areas.setdefault(area, {})[node] = _checks(value)
            used.add(key)
    if not areas and not coverage:
        return [], set()
    every = [c for nodes in areas.values() for checks in nodes.values() for c in checks]
    counts = {o: sum(1 for c in every if c.get("outcome") == o) for o in BADGES}
    blocks: list[Any] = [cards([
        card("Checks failed", counts["fail"], state="bad" if counts["fail"] else "good"),
        card("Checks passed", counts["pass"]),
        card("Checks not applicable (skipped)", counts["skip"]),
        card("Nodes checked", len({n for nodes in areas.values() for n in nodes})),
    ]), text("The infrastructure phase is not ready while any check fails. Hover a cell for "
             "what was observed, the remedy and the reference; failed checks are listed "
             "under each matrix.", "note")]
    ordered = [a for a in AREAS if a in areas] + [a for a in areas if a not in AREAS]
    for area in ordered:
        title, proves = AREAS.get(area, (area, ""))
        nodes = areas[area]
        blocks += [heading(title), text(proves, "note") if proves else None, _matrix(nodes),
                   *_findings(nodes)]
        if area == "audit" and coverage:
            blocks += _coverage_blocks(coverage)
        blocks.append(fold(f"every {area} check with what was observed", [table(
            ["Node", "Check", "Outcome", "Observed", "Reference"],
            [[node, c.get("name"), Cell(str(c.get("outcome")), badge=BADGES.get(
                str(c.get("outcome")), str(c.get("outcome")))), c.get("observed"),
              c.get("reference")] for node, checks in nodes.items() for c in checks])]))
    if coverage and "audit" not in areas:
        blocks += _coverage_blocks(coverage)
    return [b for b in blocks if b], used
