"""Node capability sections: the connectivity and ingest scenarios' compatibility matrices.

Why a matrix: a migration plan needs, per node, which SOP classes and transfer syntaxes it
accepts at association negotiation (PS3.7 D.3.3.5, PS3.8 9.3.2.2) and what it does with
each syntax it stored (kept, coerced, altered, rejected, lost), side by side.
"""

from __future__ import annotations

from typing import Any

from harness.report.blocks import Cell, chart, fold, heading, records_blocks, table, text
from harness.report.charts import bar_chart, fmt

Built = tuple[list[Any], set[str]]
OUTCOME_ORDER = ("lost", "altered", "rejected", "coerced", "kept")


def compatibility_blocks(accepted: dict[str, dict[str, list[str]]],
                         charsets: dict[str, list[str]] | None = None) -> list[Any]:
    """Which node accepts which SOP class in which transfer syntax, and character sets."""
    nodes = list(accepted)
    sop_classes: list[str] = []
    syntaxes: list[str] = []
    for per_sop in accepted.values():
        for sop, ts_list in per_sop.items():
            sop_classes += [sop] if sop not in sop_classes else []
            syntaxes += [ts for ts in ts_list if ts not in syntaxes]
    rows, row_classes = [], []
    for sop in sop_classes:
        per_node = [set(accepted[node].get(sop, [])) for node in nodes]
        row_classes.append("differs" if any(s != per_node[0] for s in per_node) else "")
        rows.append([Cell(sop, header=True, cls="rowh")] + [
            Cell("✓" if ts in ok else "✗", cls="yes" if ts in ok else "no",
                 title=f"{node}: {ts}")
            for node, ok in zip(nodes, per_node, strict=True) for ts in syntaxes])
    blocks: list[Any] = [
        heading("Node compatibility matrix: SOP classes × transfer syntaxes"),
        text("✓ accepted, ✗ refused at association negotiation. Rows where the nodes differ "
             "are highlighted.", "note"),
        table(["SOP class", *[f"{node} · {ts}" for node in nodes for ts in syntaxes]], rows,
              cls="matrix", row_classes=row_classes),
        table(["Transfer syntax", *[f"{n}: SOP classes accepted" for n in nodes]],
              [[ts, *[sum(1 for sop in sop_classes if ts in accepted[n].get(sop, []))
                      for n in nodes]] for ts in syntaxes]),
    ]
    if charsets:
        blocks += [heading("Character sets"), table(
            ["Node", "Character sets"], [[n, ", ".join(v)] for n, v in charsets.items()])]
    return blocks





def ingest(metrics: dict[str, Any], scenario: dict[str, Any]) -> Built:
    nodes = {k.split(".", 1)[1]: v for k, v in metrics.items()
             if k.startswith("ingest.") and isinstance(v, dict)}
    if not nodes:
        return [], set()
    syntaxes: list[str] = []
    for node in nodes.values():
        syntaxes += [ts for ts in node.get("by_transfer_syntax") or {} if ts not in syntaxes]
    rows = []
    for ts in syntaxes:
        row: list[Any] = [Cell(ts, header=True, cls="rowh")]
        for name, node in nodes.items():
            outcomes = (node.get("by_transfer_syntax") or {}).get(ts) or {}
            worst = next((o for o in OUTCOME_ORDER if outcomes.get(o)), "")
            row.append(Cell(", ".join(f"{fmt(n)} {o}" for o, n in outcomes.items()) or "–",
                            cls=f"o-{worst}", title=f"{name}: {ts}"))
        rows.append(row)
    blocks: list[Any] = [
        heading("Ingest compatibility matrix: transfer syntax × node"),
        text("kept: returned exactly; coerced: only the encoding changed, pixels and "
             "attributes equal; rejected: refused (a documented capability); altered, lost: "
             "content changed or acknowledged and not returned (these fail).", "note"),
        table(["Transfer syntax", *nodes], rows, cls="matrix ingest"),
        table(["Node", "Objects", *[o.capitalize() for o in reversed(OUTCOME_ORDER)]],
              [[name, n.get("objects"), *[(n.get("outcomes") or {}).get(o, 0)
                                          for o in reversed(OUTCOME_ORDER)]]
               for name, n in nodes.items()]),
        chart(bar_chart({name: {o: float(c) for o, c in (n.get("outcomes") or {}).items()}
                         for name, n in nodes.items()}, "Ingest outcomes per node")),
    ]
    for name, node in nodes.items():
        if node.get("objects_not_kept"):
            blocks.append(fold(f"objects not kept by {name} ({len(node['objects_not_kept'])})",
                               records_blocks(f"not-kept-{name}", node["objects_not_kept"],
                                              f"Objects not kept by {name}")))
    return blocks, {f"ingest.{n}" for n in nodes}


def connectivity(metrics: dict[str, Any], scenario: dict[str, Any]) -> Built:
    per_node: dict[str, dict[str, Any]] = {}
    moves = []
    used = set()
    for key, value in metrics.items():
        base, _, node = key.partition(".")
        if base in ("echo_ms", "store_find_get_ms") and node:
            per_node.setdefault(node, {})[base] = value
            used.add(key)
        elif base == "move_ms" and "->" in node:
            moves.append([*node.split("->", 1), value])
            used.add(key)
        elif base == "accepted" and isinstance(value, dict):
            per_node.setdefault(node, {})["accepted"] = sum(1 for v in value.values() if v)
    blocks: list[Any] = []
    if per_node:
        blocks.append(table(["Node", "C-ECHO round trip (ms)", "Store, find and get (ms)",
                             "Storage SOP classes accepted"],
                            [[n, v.get("echo_ms"), v.get("store_find_get_ms"),
                              v.get("accepted")] for n, v in per_node.items()]))
    if moves:
        blocks += [heading("C-MOVE of a study between nodes"),
                   table(["From", "To", "Time (ms)"], moves)]
    accepted = {k.split(".", 1)[1]: v for k, v in metrics.items()
                if k.startswith("accepted.") and isinstance(v, dict)}
    charsets = {k.split(".", 1)[1]: v for k, v in metrics.items()
                if k.startswith(("charsets.", "character_sets.")) and isinstance(v, list)}
    if accepted:
        blocks += compatibility_blocks(accepted, charsets)
        used |= {f"accepted.{n}" for n in accepted} | {k for k in metrics if k.startswith(
            ("charsets.", "character_sets.")) and isinstance(metrics[k], list)}
    return blocks, used
