"""Identity reconciliation on real crawls: collisions, likely duplicates, merged patients."""

from __future__ import annotations

import copy

import pytest

from harness.fixtures import pacs_cluster_factory
from harness.migration.identity import identity_report, merged_patients
from harness.migration.inventory import crawl
from harness.migration.rules import parse_rules
from synthetic_data import GeneratorOptions, generate
from synthetic_data.manifest import colliding_patient_ids

launched = pacs_cluster_factory(
    "name: ids\nnodes:\n  src: {kind: embedded}\n  dst: {kind: embedded}\n", scope="module")


@pytest.fixture(scope="module")
def two_nodes(launched):
    return launched.node("src"), launched.node("dst")


@pytest.fixture(scope="module")
def trapped_archive():
    return list(generate(GeneratorOptions(
        patients=12, studies_per_patient=1, modalities=["CT"], facilities=2, seed=5,
        scale="tiny", trap_rate=0.6,
    )))


def test_collisions_and_duplicates_are_reported(two_nodes, trapped_archive, tmp_path):
    source, _ = two_nodes
    source.wipe()
    assert source.dimse().store(trapped_archive).ok
    crawl(source, tmp_path / "src.sqlite")
    report = identity_report(tmp_path / "src.sqlite")
    expected = colliding_patient_ids(trapped_archive)
    assert expected, "seed 5 with trap_rate 0.6 must contain an MRN collision"
    assert {c["patient_id"] for c in report.collisions} == expected
    assert all(not c["resolved_by_rules"] for c in report.collisions)
    assert report.likely_duplicates, "mrn_split / variant traps must show as likely duplicates"

    prefixed = parse_rules(
        "prefix:\n  by_issuer:\n    NGH01.MRN: 'NGH-'\n    SAMC02.MRN: 'SAMC-'\n", "r.yaml")
    resolved = identity_report(tmp_path / "src.sqlite", prefixed)
    assert all(c["resolved_by_rules"] for c in resolved.collisions)


def test_two_patients_merged_into_one_are_found(two_nodes, trapped_archive, tmp_path):
    source, target = two_nodes
    source.wipe()
    target.wipe()
    first, second = trapped_archive[0], next(
        ds for ds in trapped_archive if ds.PatientID != trapped_archive[0].PatientID)
    assert source.dimse().store([first, second]).ok
    merged_copy = copy.deepcopy(second)
    merged_copy.PatientID = first.PatientID
    merged_copy.IssuerOfPatientID = first.get("IssuerOfPatientID", "")
    merged_copy.PatientName = first.PatientName
    assert target.dimse().store([first, merged_copy]).ok
    crawl(source, tmp_path / "s.sqlite")
    crawl(target, tmp_path / "t.sqlite")
    merged = merged_patients(tmp_path / "s.sqlite", tmp_path / "t.sqlite")
    assert len(merged) == 1
    assert merged[0]["target_patient"]["patient_id"] == first.PatientID
    assert {p["patient_id"] for p in merged[0]["source_patients"]} == {
        first.PatientID, second.PatientID}

    crawl(source, tmp_path / "s2.sqlite")
    assert merged_patients(tmp_path / "s.sqlite", tmp_path / "s2.sqlite") == []
