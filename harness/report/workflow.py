"""The readiness report's workflow section: IHE Scheduled Workflow from order to report.

Why a funnel: a go-live board asks "does every order come out as one study with a report",
and the count at each link (orders -> worklist -> MPPS -> stored -> committed -> reported)
shows where the chain breaks; each break is listed with its order. Reads `workflow`
(scenarios/test_workflow.py: counts, breaks, one run per worklist node with its rows) and
`workflow.hl7` (the HL7 ADT checks, per node: a list of {node, message, patient, applied,
verified, observed}), either alone; the HL7 rows are gathered from every test of the scenario.
"""

from __future__ import annotations

from typing import Any

from harness.report.blocks import Cell, card, cards, fold, heading, table, text

Built = tuple[list[Any], set[str]]
HL7_KEY = "workflow.hl7"

#: the chain's links, in order, with what each count means
CHAIN = (
    ("orders", "Orders", "orders written to a worklist"),
    ("worklist", "On the worklist", "found by the modality's worklist query (PS3.4 K)"),
    ("mpps", "MPPS", "procedure steps the MPPS SCP holds (PS3.4 F.7)"),
    ("stored", "Stored", "studies the archive answers for with their images"),
    ("committed", "Committed", "studies the archive committed to keep (PS3.4 J)"),
    ("reported", "Reported", "studies with a report linked by accession number"),
)
OUTCOMES = ("completed", "discontinued", "unscheduled")
ROW_FIELDS = ("label", "outcome", "patient_id", "on_worklist", "mpps", "listed", "stored",
              "committed", "reported")


def _yes(value: Any) -> str:
    return {True: "yes", False: "no", None: "–"}.get(value, str(value))


def _run_blocks(run: dict[str, Any]) -> list[Any]:
    nodes = run.get("nodes") or {}
    title = (f"Worklist {nodes.get('worklist', '?')}, MPPS {nodes.get('mpps', '?')}, "
             f"archive {nodes.get('archive', '?')}")
    counts = run.get("counts") or {}
    rows = [[Cell(r.get("label", ""), header=True, cls="rowh"), r.get("outcome"),
             r.get("patient_id"), _yes(r.get("on_worklist")), r.get("mpps") or "–",
             r.get("listed"), r.get("stored"), _yes(r.get("committed")),
             _yes(r.get("reported"))] for r in run.get("rows") or []]
    classes = ["differs" if r.get("breaks") else "" for r in run.get("rows") or []]
    blocks: list[Any] = [
        heading(title),
        table([label for _key, label, _means in CHAIN],
              [[counts.get(key) for key, _label, _means in CHAIN]]),
        table(["Order", "Outcome", "Patient", "On worklist", "MPPS", "Listed by MPPS",
               "Stored", "Committed", "Reported"], rows, row_classes=classes),
        text(f"MPPS steps read from {run.get('mpps_source', '?')}. "
             + (str(run.get("commitment")) + "." if run.get("commitment") else ""), "note"),
    ]
    return blocks


def _observed(value: Any) -> str:
    return "; ".join(str(v) for v in value) if isinstance(value, list) else str(value or "")


def _hl7_checks(metrics: dict[str, Any], scenario: dict[str, Any]) -> list[dict[str, Any]]:
    """`workflow.hl7` of every test of the scenario (one per node: the scenario's merged
    metrics keep only the last), else the merged one."""
    found: list[dict[str, Any]] = []
    for test in scenario.get("tests") or []:
        value = (test.get("metrics") or {}).get(HL7_KEY) if isinstance(test, dict) else None
        found += [c for c in value if isinstance(c, dict)] if isinstance(value, list) else []
    if not found and isinstance(metrics.get(HL7_KEY), list):
        found = [c for c in metrics[HL7_KEY] if isinstance(c, dict)]
    return found


def _hl7_blocks(checks: list[dict[str, Any]]) -> list[Any]:
    if not checks:
        return []
    rows = [[c.get("node", "–"), c.get("message"), c.get("patient"), _yes(c.get("applied")),
             _yes(c.get("verified")), _observed(c.get("observed"))] for c in checks]
    failed = sum(1 for c in checks if not c.get("verified"))
    return [heading("Patient updates and merges (HL7 ADT)"),
            cards([card("Messages", len(rows)),
                   card("Not verified", failed, state="bad" if failed else "good")]),
            table(["Node", "Message", "Patient", "Applied", "Verified", "Observed"], rows,
                  row_classes=["" if r[4] == "yes" else "differs" for r in rows])]


def workflow(metrics: dict[str, Any], scenario: dict[str, Any]) -> Built:
    """The workflow section (registered in sections.BUILDERS)."""
    used: set[str] = set()
    blocks: list[Any] = []
    chain = metrics.get("workflow")
    if isinstance(chain, dict):
        used.add("workflow")
        counts = chain.get("counts") or {}
        breaks = [str(b) for b in chain.get("breaks") or []]
        blocks += [
            cards([card(label, counts.get(key), note=means) for key, label, means in CHAIN]
                  + [card(key.capitalize(), counts.get(key)) for key in OUTCOMES]
                  + [card("Breaks", len(breaks), state="bad" if breaks else "good")]),
            text("Each scheduled step must be performed exactly once, its study must match "
                 "its order (patient, accession, procedure) and its MPPS must list exactly "
                 "what the archive stored (IHE RAD TF-1 3; PS3.4 K, F.7).", "note"),
            table(["Break"], [[b] for b in breaks]) if breaks
            else text("No break in the chain.", "good"),
        ]
        for run in chain.get("runs") or []:
            if isinstance(run, dict):
                blocks += _run_blocks(run)
                if any(r.get("breaks") for r in run.get("rows") or []):
                    blocks.append(fold("breaks per order", [table(
                        ["Order", "Break"], [[r.get("label"), b] for r in run["rows"]
                                             for b in r.get("breaks") or []])]))
    if HL7_KEY in metrics or any(HL7_KEY in (t.get("metrics") or {})
                                 for t in scenario.get("tests") or [] if isinstance(t, dict)):
        used.add(HL7_KEY)
        blocks += _hl7_blocks(_hl7_checks(metrics, scenario))
    return [b for b in blocks if b], used
