"""Workflow (phase pilot): HL7 v2 patient updates and merges, as the site's ADT feed sends them.

Per node that can take them: an ADT^A08 renames a patient of two studies, an ADT^A40 merges
that patient into another, then a late image arrives with the merged-away ID. A node taking
HL7 gets the messages over MLLP (the embedded PACS); an Orthanc gets the same changes through
its REST API, as a site's integration engine would (said in each result). Each result
(harness/hl7/checks.py) goes to pacs_metrics["workflow.hl7"]; an update or merge not applied
or not verified fails, the late image is reported per LATE_IMAGE_RULE.
"""

from __future__ import annotations

import uuid

import pytest

from harness.hl7.checks import check_late_image, check_merge, check_update, studies_of
from harness.hl7.deliver import send_merge, send_update, takes_hl7
from harness.hl7.messages import synthetic_identity
from synthetic_data.samples import sample_study

pytestmark = [pytest.mark.phase("pilot"), pytest.mark.scenario("workflow")]

#: the site's rule for an image arriving with a merged-away PatientID (checks.py)
LATE_IMAGE_RULE = "accept"


def _store(node, seed: int, patient_id: str, name: str) -> str:
    study = sample_study(seed=seed, instances=2)
    for ds in study:
        ds.PatientID, ds.PatientName = patient_id, name
    stored = node.dimse().store(study)
    assert stored.ok, [r.error for r in stored.failed]
    return study[0].StudyInstanceUID


def test_hl7_update_and_merge(pacs_node, pacs_node_name, pacs_janitor, pacs_metrics):
    node = pacs_node(pacs_node_name)
    if not node.disposable:
        pytest.skip(f"{pacs_node_name} is not disposable: the harness does not write to it")
    if not takes_hl7(node) and node.rest() is None:
        pytest.skip(f"{pacs_node_name} ({node.kind}) takes no HL7 and has no Orthanc REST API: "
                    "patient updates and merges not tested")
    run = uuid.uuid4().hex[:8].upper()
    prior = synthetic_identity(71, f"MRG{run}")
    survivor = synthetic_identity(72, f"SRV{run}")
    for seed in (7101, 7102):
        _store(node, seed, prior.patient_id, "BEFORE^UPDATE")
    _store(node, 7201, survivor.patient_id, survivor.name)
    before = {pid: set(studies_of(node, pid)) for pid in (prior.patient_id, survivor.patient_id)}

    results = [check_update(node, prior, before[prior.patient_id], send_update(node, prior))]
    results.append(check_merge(node, prior.patient_id, survivor, before,
                               send_merge(node, survivor, prior.patient_id)))
    late = sample_study(seed=7301)[0]
    late.PatientID, late.PatientName = prior.patient_id, prior.name
    results.append(check_late_image(node, prior.patient_id, survivor.patient_id, late,
                                    LATE_IMAGE_RULE))
    for result in results:
        result["node"] = pacs_node_name
    pacs_metrics["workflow.hl7"] = results

    failed = [f"{r['message']} {r['patient']}: applied={r['applied']} ({r['detail']}); "
              + "; ".join(r["observed"]) for r in results[:2]
              if not (r["applied"] and r["verified"])]
    assert not failed, f"{pacs_node_name}: " + " | ".join(failed)
