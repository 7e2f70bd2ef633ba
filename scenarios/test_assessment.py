"""Assessment (phase planning): know what every archive holds before anything moves.

Each node is inventoried through its query services and the result is held against a count
made without them (Orthanc's REST statistics, the embedded PACS's SQLite index, the files in
dcmqrscp's storage area: `Node.held_statistics`): studies the PACS stores but
does not answer for are studies a migration would silently leave behind. A mismatch found
twice in a row is a finding (a first one alone is recorded); a node with no independent
means is inventoried and the comparison skipped. The identity report lists colliding
patient IDs and likely duplicates, the decisions a merger must take before the pilot.

A site's own archive (external, not disposable) is assessed as it is; a disposable node is
first filled with a small synthetic archive with identity traps, so the check has substance.
"""

from __future__ import annotations

import pytest

from harness.migration.identity import identity_report
from harness.migration.inventory import crawl
from harness.migration.rules import load_rules
from harness.report.identities import for_report
from synthetic_data import GeneratorOptions, generate

pytestmark = [pytest.mark.phase("planning"), pytest.mark.scenario("assessment")]


def test_inventory_matches_what_the_node_holds(pacs_node, pacs_node_name, pacs_topology,
                                               pacs_janitor, pacs_metrics, tmp_path):
    node = pacs_node(pacs_node_name)
    if node.disposable:
        archive = list(generate(GeneratorOptions(
            patients=6, studies_per_patient=1, modalities=["CT", "MR", "SR"], facilities=2,
            seed=303, scale="tiny", trap_rate=0.6, transfer_syntaxes=["explicit"],
        )))
        assert node.dimse().store(archive, associations=2).ok
    ledger = tmp_path / f"{pacs_node_name}.ledger.sqlite"
    held = node.held_statistics()
    answered = crawl(node, ledger).counts
    findings = [] if held is None else held.disagreements(pacs_node_name, answered)
    first_reading = None
    if findings:  # one disagreeing reading is no finding yet (a live archive, a lost answer)
        first_reading = {"held": held.as_dict(), "answered": answered, "findings": findings}
        held = node.held_statistics()
        answered = crawl(node, tmp_path / f"{pacs_node_name}.again.sqlite").counts
        findings = held.disagreements(pacs_node_name, answered)
    rules = load_rules(pacs_topology.settings.get("migration", {}).get("rules"))
    identities = identity_report(ledger, rules)
    pacs_metrics[f"inventory.{pacs_node_name}"] = {
        "held": held.as_dict() if held else None,
        "answered": answered,
        "findings": findings,
        "first_reading_disagreed": first_reading,
        "identity": for_report(identities.as_dict(), node),  # a site's patients: tokens
    }
    if held is None:
        pytest.skip(f"{pacs_node_name} ({node.kind}) offers no count independent of its query "
                    "service (Orthanc REST, an index or a storage folder); inventory recorded")
    assert not findings, "; ".join(findings)
