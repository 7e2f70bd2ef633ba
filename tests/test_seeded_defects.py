"""Seeded defects: migrate a small archive with a plain C-MOVE, damage the target on purpose
through Orthanc's own REST API, and check that verification reports exactly that defect.

Source: dcmqrscp (the legacy archive; the embedded PACS where DCMTK is missing). Target:
Orthanc. The source is crawled once at full depth; each test re-migrates into an empty target,
checks the clean copy gives no finding, damages it, crawls it again and reconciles.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid

from harness.fixtures import pacs_cluster_factory
from harness.launch.tools import find_binary
from harness.migration.findings import Findings
from harness.migration.inventory import crawl
from harness.migration.reconcile import reconcile
from harness.migration.rules import parse_rules
from harness.nodes.base import Node
from synthetic_data import GeneratorOptions, generate

pytestmark = pytest.mark.skipif(
    not find_binary("Orthanc"), reason="Orthanc not installed (apt-get install orthanc)"
)

ARCHIVE = GeneratorOptions(
    patients=3, studies_per_patient=2, modalities=["CT", "MR"], seed=7, scale="tiny",
    transfer_syntaxes=["implicit", "explicit"], charsets=["latin1", "utf8"],
)
MIGRATION_RULES = """
prefix:
  by_issuer: {NGH01.MRN: "NGH-", SAMC02.MRN: "SAMC-"}
  default: "X-"
  required: true
charset_conversion: true
lossless_transfer_syntax_change: true
"""


@dataclass
class Migration:
    source: Node
    target: Node
    workdir: Path
    source_ledger: Path
    archive: list[Dataset]
    runs: int = 0

    def study_uids(self) -> list[str]:
        return sorted({ds.StudyInstanceUID for ds in self.archive})

    def copy_all(self) -> None:
        """An empty target, then every study C-MOVEd from the source (a plain migration)."""
        self.target.wipe()
        for uid in self.study_uids():
            moved = self.source.dimse().move(self.target.ae_title, "STUDY",
                                             {"StudyInstanceUID": uid})
            assert moved.ok and moved.failed == 0, moved
        assert self.target.statistics().instances == len(self.archive)

    def verify(self, rules: str | None = None) -> Findings:
        self.runs += 1
        ledger = self.workdir / f"target-{self.runs}.sqlite"
        crawl(self.target, ledger, depth="full", resume=False)
        return reconcile(self.source_ledger, ledger,
                         parse_rules(rules, "rules.yaml") if rules else None)


SOURCE_KIND = "dcmqrscp" if find_binary("dcmqrscp") else "embedded"
launched = pacs_cluster_factory(
    "name: seeded\nnodes:\n"
    f"  legacy: {{kind: {SOURCE_KIND}, ae_title: LEGACY}}\n"
    "  central: {kind: orthanc, ae_title: CENTRAL}\n",
    scope="module",
)


@pytest.fixture(scope="module")
def migration(launched, tmp_path_factory):
    archive = [copy.deepcopy(ds) for ds in generate(ARCHIVE)]
    source = launched.node("legacy")
    stored = source.dimse().store(archive)
    assert stored.ok, [r.error for r in stored.failed]
    workdir = tmp_path_factory.mktemp("seeded")
    ledger = workdir / "source.sqlite"
    summary = crawl(source, ledger, depth="full")
    assert summary.counts["instances"] == len(archive)
    return Migration(source, launched.node("central"), workdir, ledger, archive)


@pytest.fixture
def migrated(migration):
    """A clean copy on the target, already shown to give no finding."""
    migration.copy_all()
    clean = migration.verify()
    assert clean.findings == [], clean.summary_text()
    return migration


# -- damaging the target through Orthanc's REST API --------------------------------------


def _orthanc_id(node: Node, uid: str, kind: str) -> str:
    (match,) = [m for m in node.rest().lookup(uid) if m["Type"] == kind]
    return match["ID"]


def _download(node: Node, instance_id: str) -> Dataset:
    rest = node.rest()
    rsp = rest.session.get(f"{rest.base_url}/instances/{instance_id}/file", timeout=30)
    rsp.raise_for_status()
    return dcmread(BytesIO(rsp.content))


def _upload(node: Node, ds: Dataset) -> None:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    node.rest().upload(buffer.getvalue())


def _rewrite(node: Node, level: str, uid: str, change) -> list[str]:
    """Download every instance of a patient/study/instance, delete it, re-store it changed."""
    rest = node.rest()
    orthanc_id = _orthanc_id(node, uid, level.capitalize())
    resource = {"patient": "patients", "study": "studies", "instance": "instances"}[level]
    if level == "instance":
        ids = [orthanc_id]
    else:
        ids = [i["ID"] for i in rest.get_json(f"/{resource}/{orthanc_id}/instances")]
    datasets = [_download(node, i) for i in ids]
    rest.delete(f"/{resource}/{orthanc_id}")
    for ds in datasets:
        change(ds)
        _upload(node, ds)
    return sorted(ds.SOPInstanceUID for ds in datasets)


def _patient_with_two_studies(archive: list[Dataset]) -> Dataset:
    studies: dict[str, set[str]] = {}
    for ds in archive:
        studies.setdefault(ds.PatientID, set()).add(ds.StudyInstanceUID)
    pid = sorted(p for p, s in studies.items() if len(s) >= 2)[0]
    return next(ds for ds in archive if ds.PatientID == pid)


def _series_sizes(archive: list[Dataset]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for ds in archive:
        sizes[ds.SeriesInstanceUID] = sizes.get(ds.SeriesInstanceUID, 0) + 1
    return sizes


def _only(findings: Findings):
    assert len(findings.findings) == 1, findings.summary_text()
    assert findings.verdict == "fail"
    return findings.findings[0]


# -- the defects --------------------------------------------------------------------------


def test_missing_instance(migrated):
    sizes = _series_sizes(migrated.archive)
    victim = next(ds for ds in migrated.archive if sizes[ds.SeriesInstanceUID] >= 2)
    migrated.target.rest().delete(
        f"/instances/{_orthanc_id(migrated.target, victim.SOPInstanceUID, 'Instance')}")
    finding = _only(migrated.verify())
    assert (finding.type, finding.level, finding.sop_uid) == (
        "missing_instance", "instance", victim.SOPInstanceUID)
    assert finding.series_uid == victim.SeriesInstanceUID
    assert migrated.verify().missing == 1


def test_missing_series(migrated):
    per_study: dict[str, set[str]] = {}
    for ds in migrated.archive:
        per_study.setdefault(ds.StudyInstanceUID, set()).add(ds.SeriesInstanceUID)
    study = next(s for s, series in sorted(per_study.items()) if len(series) >= 2)
    series = sorted(per_study[study])[0]
    expected = sorted(ds.SOPInstanceUID for ds in migrated.archive
                      if ds.SeriesInstanceUID == series)
    migrated.target.rest().delete(f"/series/{_orthanc_id(migrated.target, series, 'Series')}")
    findings = migrated.verify()
    finding = _only(findings)
    assert (finding.type, finding.series_uid, finding.study_uid) == (
        "missing_series", series, study)
    assert finding.sop_uids == expected and finding.instances == len(expected)
    assert findings.missing == len(expected)


def test_pixel_value_changed_by_one(migrated):
    victim = migrated.archive[0]

    def plus_one(ds: Dataset) -> None:
        pixels = ds.pixel_array.copy()
        pixels.flat[0] += 1
        ds.PixelData = pixels.tobytes()

    _rewrite(migrated.target, "instance", victim.SOPInstanceUID, plus_one)
    finding = _only(migrated.verify())
    assert (finding.type, finding.level, finding.sop_uid) == (
        "altered_pixels", "instance", victim.SOPInstanceUID)
    assert finding.attributes == {}


def test_patient_id_changed(migrated):
    patient = _patient_with_two_studies(migrated.archive)

    def new_id(ds: Dataset) -> None:
        ds.PatientID = "RENUMBERED-1"

    sops = _rewrite(migrated.target, "patient", patient.PatientID, new_id)
    finding = _only(migrated.verify())
    assert (finding.type, finding.level, finding.patient_id) == (
        "altered_attributes", "patient", patient.PatientID)
    assert finding.attributes == {"PatientID": {"before": patient.PatientID,
                                                "after": "RENUMBERED-1"}}
    assert finding.sop_uids == sops


def test_patient_name_changed(migrated):
    patient = _patient_with_two_studies(migrated.archive)

    def new_name(ds: Dataset) -> None:
        ds.PatientName = "Changed^Name"

    sops = _rewrite(migrated.target, "patient", patient.PatientID, new_name)
    finding = _only(migrated.verify())
    assert (finding.type, finding.level, finding.patient_id) == (
        "altered_attributes", "patient", patient.PatientID)
    assert finding.attributes == {"PatientName": {"before": str(patient.PatientName),
                                                  "after": "Changed^Name"}}
    assert finding.sop_uids == sops


def test_study_date_changed(migrated):
    study = migrated.archive[-1]

    def new_date(ds: Dataset) -> None:
        ds.StudyDate = "19991231"

    sops = _rewrite(migrated.target, "study", study.StudyInstanceUID, new_date)
    finding = _only(migrated.verify())
    assert (finding.type, finding.level, finding.study_uid) == (
        "altered_attributes", "study", study.StudyInstanceUID)
    assert finding.attributes == {"StudyDate": {"before": study.StudyDate, "after": "19991231"}}
    assert finding.sop_uids == sops


def test_instance_stored_twice_under_new_uid(migrated):
    original = migrated.archive[3]
    ds = _download(migrated.target,
                   _orthanc_id(migrated.target, original.SOPInstanceUID, "Instance"))
    new_uid = generate_uid()
    ds.SOPInstanceUID = new_uid
    ds.file_meta.MediaStorageSOPInstanceUID = new_uid
    _upload(migrated.target, ds)
    findings = migrated.verify()
    finding = _only(findings)
    assert (finding.type, finding.sop_uid, finding.related) == (
        "duplicate_instance", new_uid, {"duplicate_of": original.SOPInstanceUID})
    assert findings.extra == 1


def test_study_moved_to_another_patient(migrated):
    moved_from = _patient_with_two_studies(migrated.archive)
    moved_to = next(ds for ds in migrated.archive if ds.PatientID != moved_from.PatientID)
    study = moved_from.StudyInstanceUID

    def reassign(ds: Dataset) -> None:
        for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                        "IssuerOfPatientID"):
            setattr(ds, keyword, moved_to.get(keyword))

    sops = _rewrite(migrated.target, "study", study, reassign)
    finding = _only(migrated.verify())
    assert (finding.type, finding.level, finding.study_uid) == (
        "study_reassignment", "study", study)
    assert finding.related["from_patient"]["patient_id"] == moved_from.PatientID
    assert finding.related["to_patient"] == {"patient_id": moved_to.PatientID,
                                             "issuer": moved_to.IssuerOfPatientID}
    assert finding.sop_uids == sops


# -- the clean migration with allowed changes --------------------------------------------


def test_lossless_syntax_change_charset_conversion_and_prefix_give_no_finding(migration):
    """Implicit -> explicit VR, explicit -> RLE Lossless, latin1 -> UTF-8 and the facility
    prefix on PatientID, all allowed by the rules: zero findings; without rules: findings."""
    migration.target.wipe()
    rules = parse_rules(MIGRATION_RULES, "rules.yaml")
    converted = []
    for original in migration.archive:  # as stored in the source: implicit or explicit VR
        buffer = BytesIO()
        original.save_as(buffer, enforce_file_format=True)
        ds = dcmread(BytesIO(buffer.getvalue()))
        ds.decode()  # text to str with the old charset, re-encoded as UTF-8 on writing
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientID = rules.patient_id_prefix(ds.IssuerOfPatientID) + ds.PatientID
        if ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        else:
            ds.compress(RLELossless, generate_instance_uid=False)
        converted.append(ds)
    stored = migration.target.dimse().store(converted)
    assert stored.ok, [r.error for r in stored.failed]
    syntaxes = {r.transfer_syntax_uid for r in stored.results}
    assert syntaxes == {ExplicitVRLittleEndian, RLELossless}

    allowed = migration.verify(MIGRATION_RULES)
    assert allowed.findings == [] and allowed.verdict == "pass", allowed.summary_text()
    assert allowed.counts["target"]["instances"] == len(migration.archive)

    strict = reconcile(migration.source_ledger,
                       migration.workdir / f"target-{migration.runs}.sqlite")
    changed = {name for f in strict.findings for name in f.attributes}
    assert {"PatientID", "SpecificCharacterSet"} <= changed
    assert "TransferSyntaxUID" not in changed  # an encoding, never content (verification.md)
    assert strict.verdict == "fail"
