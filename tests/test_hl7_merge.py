"""HL7 v2 merges (ADT^A40): the embedded PACS over MLLP and Orthanc through its REST API,
checked by study counts over C-FIND and the stored files read with pydicom; the late image
rule; and a later migration's reconciliation with and without the merge declared."""

from __future__ import annotations

import pytest
from pydicom import Dataset, dcmread

from harness.fixtures import pacs_cluster_factory
from harness.hl7.checks import check_late_image, check_merge, studies_of
from harness.hl7.deliver import send_merge
from harness.hl7.messages import PatientIdentity
from harness.hl7.orthanc_apply import MEANS
from harness.migration.identity import merged_patients
from harness.migration.rules import parse_rules
from synthetic_data.samples import sample_study
from tests.test_reconcile import changed, pair, read_back_archive, two_study_patient

cluster = pacs_cluster_factory(
    "name: hl7merge\nnodes:\n  pacs: {kind: embedded}\n  orthanc: {kind: orthanc}\n",
    scope="module", requires=("Orthanc",),
)


def store_study(node, seed: int, patient_id: str, name: str) -> list[Dataset]:
    study = sample_study(seed=seed, instances=2)
    for ds in study:
        ds.PatientID, ds.PatientName = patient_id, name
    assert node.dimse().store(study).ok
    return study


def two_patients(node, base: int) -> tuple[str, PatientIdentity, dict[str, set[str]]]:
    """A prior patient with two studies and a survivor with one; study UIDs of each."""
    prior, survivor = f"PRIOR{base}", PatientIdentity(f"SURV{base}", "KEPT^NAME", "19800303", "M")
    for offset in range(2):
        store_study(node, base * 10 + offset, prior, "DUPLICATE^NAME")
    store_study(node, base * 10 + 5, survivor.patient_id, survivor.name)
    before = {pid: set(studies_of(node, pid)) for pid in (prior, survivor.patient_id)}
    assert [len(v) for v in before.values()] == [2, 1]
    return prior, survivor, before


def test_a40_moves_every_study_of_the_prior_patient_to_the_survivor(cluster):
    node = cluster.node("pacs")
    prior, survivor, before = two_patients(node, 1)

    delivery = send_merge(node, survivor, prior)

    assert delivery.applied, delivery.detail
    result = check_merge(node, prior, survivor, before, delivery)
    assert result["verified"], result["observed"]
    assert result["studies_after"] == {"prior": 0, "survivor": 3}
    moved = before[prior]
    files = [dcmread(p, stop_before_pixels=True)
             for p in (node.storage_dir / "files").rglob("*.dcm")]
    merged = [ds for ds in files if ds.StudyInstanceUID in moved]
    assert len(merged) == 4 and {(ds.PatientID, str(ds.PatientName)) for ds in merged} == {
        (survivor.patient_id, "KEPT^NAME")}
    assert not [ds for ds in files if ds.PatientID == prior]


def test_a_study_left_on_the_old_id_is_named(cluster):
    node = cluster.node("pacs")
    prior, survivor, before = two_patients(node, 2)
    assert send_merge(node, survivor, prior).applied
    left = store_study(node, 29, prior, "DUPLICATE^NAME")[0].StudyInstanceUID

    result = check_merge(node, prior, survivor, before)

    assert not result["verified"]
    assert result["observed"] == [f"study {left} still under the prior PatientID {prior!r}"]


def test_a40_for_an_unknown_prior_patient_is_answered_ae(cluster):
    node = cluster.node("pacs")
    delivery = send_merge(node, PatientIdentity("SURVX", "A^B"), "NEVERSTORED")
    assert not delivery.applied
    assert delivery.detail == ("ACK AE: unknown patient 'NEVERSTORED': no stored instance has "
                               "this PatientID")


@pytest.mark.parametrize("rule", ["accept", "flag"])
def test_a_late_image_with_the_old_id_is_reported_per_the_site_rule(cluster, rule):
    node = cluster.node("pacs")
    base = 3 if rule == "accept" else 4
    prior, survivor, _ = two_patients(node, base)
    assert send_merge(node, survivor, prior).applied
    late = sample_study(seed=base * 10 + 8)[0]
    late.PatientID, late.PatientName = prior, "DUPLICATE^NAME"

    result = check_late_image(node, prior, survivor.patient_id, late, rule)

    assert result["applied"] and result["filed_under"] == prior  # filed as received
    assert set(studies_of(node, prior)) == {late.StudyInstanceUID}
    assert result["verified"] is (rule == "accept")
    assert result["flagged"] is (rule == "flag")
    expected = ("accepted by the site rule" if rule == "accept"
                else "flagged for reconciliation (late_image_rule: flag)")
    assert result["observed"][0].endswith(expected)


def test_orthanc_a40_through_rest_deletes_the_originals_it_keeps(cluster):
    node = cluster.node("orthanc")
    rest = node.rest()
    prior, survivor, before = two_patients(node, 5)
    instances = rest.statistics()["CountInstances"]

    delivery = send_merge(node, survivor, prior)

    assert delivery.applied and delivery.means == MEANS
    # measured on 1.10.1: the modify made 4 copies beside the 4 originals, then deleted
    assert "made 4 copies beside the originals; 4 originals deleted" in delivery.detail
    result = check_merge(node, prior, survivor, before, delivery)
    assert result["verified"], result["observed"]
    assert rest.statistics()["CountInstances"] == instances
    patients = rest.post_json("/tools/find", {"Level": "Patient", "Expand": True,
                                              "Query": {"PatientID": survivor.patient_id}})
    assert len(patients) == 1 and len(patients[0]["Studies"]) == 3
    assert rest.post_json("/tools/find", {"Level": "Patient", "Query": {"PatientID": prior}}) == []


# -- a later migration's identity reconciliation -----------------------------------------


def _merged_archive(tmp_path):
    """Source: the synthetic archive; target: the same after an A40 merged one patient of two
    studies into another (the survivor's identity on every moved instance)."""
    archive = read_back_archive()
    prior = two_study_patient(archive)
    into = next(ds for ds in archive if ds.PatientID != prior)

    def merge(items):
        for ds in items:
            if ds.PatientID == prior:
                for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                                "IssuerOfPatientID"):
                    setattr(ds, keyword, into.get(keyword))
        return items

    return archive, changed(archive, merge), prior, into.PatientID


def test_a_declared_merge_is_not_a_study_moved_to_another_patient(tmp_path):
    source, target, prior, survivor = _merged_archive(tmp_path)
    rules = f"patient_merges:\n  - {{prior: '{prior}', survivor: '{survivor}'}}\n"

    findings = pair(tmp_path, source, target, rules)

    assert findings.findings == [], findings.summary_text()
    assert findings.rules["patient_merges"] == [{"prior": prior, "survivor": survivor}]
    assert merged_patients(tmp_path / "source.sqlite", tmp_path / "target.sqlite",
                           parse_rules(rules, "rules.yaml")) == []


def test_an_undeclared_reassignment_is_still_a_finding(tmp_path):
    source, target, prior, survivor = _merged_archive(tmp_path)
    # a merge declared for another patient does not cover this one
    rules = f"patient_merges:\n  - {{prior: 'SOMEONE-ELSE', survivor: '{survivor}'}}\n"

    findings = pair(tmp_path, source, target, rules)

    assert [(f.type, f.patient_id) for f in findings.findings] == [
        ("patient_reassignment", prior)]
    assert findings.findings[0].related["to_patient"]["patient_id"] == survivor
    wrong = merged_patients(tmp_path / "source.sqlite", tmp_path / "target.sqlite",
                            parse_rules(rules, "rules.yaml"))
    assert [m["target_patient"]["patient_id"] for m in wrong] == [survivor]
