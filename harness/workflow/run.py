"""One workflow run on a topology: orders on a worklist, a modality performing them, checks.

The cases of IHE SWF the scenario covers (RAD TF-1 3.3-3.5): scheduled orders performed
once each, one discontinued step (equipment failure after the first image), one unscheduled
acquisition (a patient with no order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydicom import Dataset

from harness.dicom.peer import HARNESS_AE_TITLE
from harness.workflow.checks import DEFAULT_RULES, SiteRules, WorkflowOutcome, check_workflow
from harness.workflow.modality import Modality, Performed
from harness.workflow.orders import Order, make_order, schedule
from harness.workflow.providers import mpps_client, read_mpps, worklist_client

#: the modality calls as the harness (every launched node accepts it as a peer), and its
#: worklist items are scheduled for that station
STATION_AE_TITLE = HARNESS_AE_TITLE


@dataclass
class WorkflowRun:
    orders: list[Order]
    performed: list[Performed]
    outcome: WorkflowOutcome

    def metrics(self, topology: str, nodes: dict[str, str]) -> dict[str, Any]:
        """What pacs_metrics["workflow"] records (harness/report/workflow.py shows it)."""
        return {"topology": topology, "nodes": nodes, **self.outcome.as_dict()}


def unscheduled_patient(seed: int) -> Dataset:
    patient = Dataset()
    patient.PatientID = f"WFU{seed:06d}"
    patient.PatientName = "EMERGENCY^UNKNOWN^^^SYNTHETIC"
    patient.PatientBirthDate = ""
    patient.PatientSex = "O"
    return patient


def run_workflow(worklist_node: Any, mpps_node: Any, archive_node: Any, *, seed: int,
                 orders: int = 3, instances: int = 2, rules: SiteRules = DEFAULT_RULES,
                 commitment_report_port: int | None = None) -> WorkflowRun:
    """`orders` orders (the last discontinued) and one unscheduled acquisition.
    `commitment_report_port`: the harness's address the launched nodes know
    (Cluster.harness_port), where storage commitment reports may come."""
    scheduled = [make_order(seed + i, STATION_AE_TITLE) for i in range(orders)]
    schedule(scheduled, worklist_node)
    modality = Modality(STATION_AE_TITLE, worklist_client(worklist_node, STATION_AE_TITLE),
                        mpps_client(mpps_node, STATION_AE_TITLE),
                        archive_node.dimse(calling_ae=STATION_AE_TITLE),
                        commitment_report_port=commitment_report_port,
                        commitment=archive_node.dimse())  # a peer the archive knows
    performed = []
    for index, order in enumerate(scheduled):
        last = index == len(scheduled) - 1 and len(scheduled) > 1
        performed.append(modality.perform(order, seed=seed + index, instances=instances,
                                          discontinue_after=1 if last else None))
    performed.append(modality.perform(None, seed=seed + orders, instances=instances,
                                      patient=unscheduled_patient(seed)))
    outcome = check_workflow(scheduled, performed, archive_node.dimse(), read_mpps(mpps_node),
                             rules)
    return WorkflowRun(scheduled, performed, outcome)
