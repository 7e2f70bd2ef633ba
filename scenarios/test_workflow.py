"""Scheduled workflow (phase pilot): IHE SWF from the order to the report, per worklist node.

Every node of the topology that serves a Modality Worklist gets orders on it; a simulated
modality (harness/workflow/modality.py) picks each from the worklist, reports the procedure
step to the topology's MPPS node (IN PROGRESS, then COMPLETED, or DISCONTINUED for the last
order), stores the images into the worklist node and a report by accession; one patient is
acquired unscheduled. Then, read back independently of the modality (the archive's C-FIND
and the MPPS node's own record): each scheduled step performed exactly once, each study as
ordered (patient, accession, procedure), each MPPS step listing exactly what was stored.
Unscheduled and discontinued cases are judged by `settings.workflow` (the site's rules).

Where the topology has no MPPS node (Orthanc and dcmqrscp have none), the harness launches an
embedded PACS as the department's MPPS manager (the RIS's part, PS3.4 F.7), and says so in
the metrics. Settings (`settings.workflow`): orders (3), instances (2), unscheduled_allowed
(true), discontinued_allowed (true), report_required (true). A topology with no disposable
worklist node skips; only disposable nodes are written to.
"""

from __future__ import annotations

import pytest

from harness.workflow.checks import SiteRules
from harness.workflow.run import run_workflow

pytestmark = [pytest.mark.phase("pilot"), pytest.mark.scenario("workflow")]

COUNTS = ("orders", "worklist", "mpps", "stored", "committed", "reported", "completed",
          "discontinued", "unscheduled")


def test_scheduled_workflow(pacs_cluster, pacs_nodes, pacs_topology, pacs_janitor, pacs_launch,
                            pacs_metrics):
    settings = pacs_topology.settings.get("workflow", {}) or {}
    rules = SiteRules(
        unscheduled_allowed=bool(settings.get("unscheduled_allowed", True)),
        discontinued_allowed=bool(settings.get("discontinued_allowed", True)),
        report_required=bool(settings.get("report_required", True)),
    )
    usable = [n for n in pacs_nodes if n.disposable]
    providers = [n for n in usable if n.capabilities.worklist]
    mpps = next((n for n in usable if n.capabilities.mpps), None)
    if not providers:
        pytest.skip("the topology has no disposable node with a Modality Worklist SCP "
                    "(orthanc, dcmqrscp and embedded nodes serve one)")
    if mpps is None:  # the RIS's MPPS manager, stood in for by an embedded PACS
        mpps = pacs_launch("name: mpps-manager\nnodes:\n  mpps-manager: {kind: embedded}\n"
                           ).node("mpps-manager")
    runs = []
    for index, node in enumerate(providers):
        run = run_workflow(node, mpps, node, seed=9000 + 100 * index,
                           orders=int(settings.get("orders", 3)),
                           instances=int(settings.get("instances", 2)), rules=rules,
                           commitment_report_port=pacs_cluster.harness_port)
        runs.append(run.metrics(pacs_topology.name, {
            "worklist": node.name, "mpps": mpps.name, "archive": node.name}))
    totals = {key: sum(r["counts"][key] for r in runs) for key in COUNTS}
    breaks = [f"{r['nodes']['worklist']}: {b}" for r in runs for b in r["breaks"]]
    pacs_metrics["workflow"] = {"counts": totals, "breaks": breaks, "runs": runs}
    assert not breaks, f"{len(breaks)} break(s) in the chain: {breaks[:5]}"
