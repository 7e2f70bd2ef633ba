"""Reconciliation on ledgers built from synthetic datasets (no server needed): rollups,
duplicates, reassignments, rules, outputs and errors."""

from __future__ import annotations

import copy
import csv
import json
import sqlite3
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import JPEGBaseline8Bit, RLELossless, generate_uid

from harness.errors import ConfigError
from harness.migration import reconcile as reconcile_module
from harness.migration.ledger import Ledger
from harness.migration.normalise import (
    IDENTITY_COLUMNS,
    KEY_ATTRS,
    SeriesRow,
    StudyRow,
    normalise,
    row_from_dataset,
    row_from_keys,
)
from harness.migration.reconcile import reconcile, sample_bound
from harness.migration.rules import load_rules, parse_rules
from harness.migration.writers import write_findings
from synthetic_data import GeneratorOptions, generate

OPTIONS = GeneratorOptions(patients=2, studies_per_patient=2, modalities=["CT", "MR"], seed=11,
                           scale="tiny", transfer_syntaxes=["explicit"])


def read_back_archive() -> list[Dataset]:
    """The synthetic archive of OPTIONS, each object written and read back as a PACS sends it."""
    files = []
    for ds in generate(OPTIONS):
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        files.append(dcmread(BytesIO(buffer.getvalue())))
    return files


@pytest.fixture(scope="module")
def archive() -> list[Dataset]:
    return read_back_archive()


def build(path: Path, datasets: list[Dataset], depth: str = "full") -> Path:
    """A finished ledger holding `datasets`, as a crawl at `depth` would write it."""
    ledger = Ledger.create(path, {"node": path.stem, "kind": "test", "ae_title": "TEST",
                                  "depth": depth, "sample": "", "via": "test",
                                  "transfer_syntax": "stored"})
    by_study: dict[str, list[Dataset]] = {}
    for ds in datasets:
        by_study.setdefault(ds.StudyInstanceUID, []).append(ds)
    studies = []
    for uid, items in by_study.items():
        attrs = normalise(items[0])
        studies.append(StudyRow(uid, **{col: str(attrs.get(kw) or "")
                                        for kw, col in IDENTITY_COLUMNS.items()},
                                keys={k: attrs.get(k) for k in KEY_ATTRS}))
    ledger.add_studies(studies)
    for uid, items in by_study.items():
        if depth == "full":
            rows = [row_from_dataset(ds) for ds in items]
        else:
            wanted = (*KEY_ATTRS, *IDENTITY_COLUMNS, "SOPInstanceUID", "SOPClassUID")
            rows = [row_from_keys({k: normalise(ds).get(k) for k in wanted}) for ds in items]
        series = {r.series_uid: SeriesRow(r.series_uid, uid) for r in rows}
        ledger.commit_study(uid, series.values(), rows)
    ledger.finish()
    ledger.close()
    return path


def changed(archive: list[Dataset], change: Callable[[list[Dataset]], list[Dataset]]
            ) -> list[Dataset]:
    return change([copy.deepcopy(ds) for ds in archive])


def pair(tmp_path: Path, source: list[Dataset], target: list[Dataset], rules: str | None = None,
         depth: str = "full"):
    return reconcile(build(tmp_path / "source.sqlite", source, depth),
                     build(tmp_path / "target.sqlite", target, depth),
                     parse_rules(rules, "rules.yaml") if rules else None)


def only(findings):
    assert len(findings.findings) == 1, findings.summary_text()
    return findings.findings[0]


def patients(archive: list[Dataset]) -> dict[str, list[Dataset]]:
    out: dict[str, list[Dataset]] = {}
    for ds in archive:
        out.setdefault(ds.PatientID, []).append(ds)
    return out


def two_study_patient(archive: list[Dataset]) -> str:
    return next(p for p, items in sorted(patients(archive).items())
                if len({ds.StudyInstanceUID for ds in items}) >= 2)


def multi_series_study(archive: list[Dataset]) -> str:
    series: dict[str, set[str]] = {}
    for ds in archive:
        series.setdefault(ds.StudyInstanceUID, set()).add(ds.SeriesInstanceUID)
    return next(st for st, s in sorted(series.items()) if len(s) >= 2)


# -- equal ledgers and the outputs -------------------------------------------------------


def test_equal_ledgers_pass_and_every_output_is_written(archive, tmp_path):
    findings = pair(tmp_path, archive, archive)
    assert findings.verdict == "pass" and findings.exit_code == 0
    assert findings.counts["source"] == findings.counts["target"]
    assert findings.counts["source"]["instances"] == len(archive)
    paths = write_findings(findings, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert {k: data[k] for k in ("verdict", "missing", "extra", "altered")} == {
        "verdict": "pass", "missing": 0, "extra": 0, "altered": 0}
    assert data["findings"] == []
    assert paths["summary"].read_text().startswith("verdict: PASS (0 findings)")
    with open(paths["csv"], newline="") as handle:
        assert next(csv.reader(handle))[:3] == ["finding", "type", "level"]


def test_findings_csv_has_one_row_per_attribute(archive, tmp_path):
    study = archive[0].StudyInstanceUID

    def damage(items: list[Dataset]) -> list[Dataset]:
        for ds in items:
            if ds.StudyInstanceUID == study:
                ds.StudyDate, ds.AccessionNumber = "20000101", "CHANGED"
        return items

    findings = pair(tmp_path, archive, changed(archive, damage))
    finding = only(findings)
    assert finding.level == "study" and set(finding.attributes) == {"StudyDate",
                                                                   "AccessionNumber"}
    paths = write_findings(findings, tmp_path / "out")
    with open(paths["csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["attribute"], r["after"]) for r in rows} == {("StudyDate", "20000101"),
                                                           ("AccessionNumber", "CHANGED")}
    assert {r["finding"] for r in rows} == {"1"}
    assert findings.exit_code == 1
    assert "altered_attributes 1" in paths["summary"].read_text()


# -- missing and extra rollups -----------------------------------------------------------


def _remove(archive: list[Dataset], level: str) -> tuple[list[Dataset], set[str]]:
    """The archive without one patient / study / series / instance, and the removed UIDs."""
    if level == "patient":
        gone = lambda ds: ds.PatientID == sorted(patients(archive))[0]  # noqa: E731
    elif level == "study":
        pid = two_study_patient(archive)
        study = sorted(ds.StudyInstanceUID for ds in archive if ds.PatientID == pid)[0]
        gone = lambda ds: ds.StudyInstanceUID == study  # noqa: E731
    elif level == "series":
        study = multi_series_study(archive)
        series = sorted(ds.SeriesInstanceUID for ds in archive if ds.StudyInstanceUID == study)
        gone = lambda ds: ds.SeriesInstanceUID == series[0]  # noqa: E731
    else:
        sizes: dict[str, int] = {}
        for ds in archive:
            sizes[ds.SeriesInstanceUID] = sizes.get(ds.SeriesInstanceUID, 0) + 1
        victim = next(ds for ds in archive if sizes[ds.SeriesInstanceUID] > 1).SOPInstanceUID
        gone = lambda ds: ds.SOPInstanceUID == victim  # noqa: E731
    return ([ds for ds in archive if not gone(ds)],
            {ds.SOPInstanceUID for ds in archive if gone(ds)})


@pytest.mark.parametrize("level", ["patient", "study", "series", "instance"])
def test_missing_and_extra_roll_up_to_one_finding(archive, tmp_path, level):
    smaller, removed = _remove(archive, level)
    missing = pair(tmp_path / "m", archive, smaller)
    finding = only(missing)
    assert (finding.type, finding.level) == (f"missing_{level}", level)
    assert set(finding.sop_uids) == removed and finding.instances == len(removed)
    assert missing.missing == len(removed) and missing.extra == 0

    extra = pair(tmp_path / "e", smaller, archive)
    finding = only(extra)
    assert (finding.type, set(finding.sop_uids)) == (f"extra_{level}", removed)
    assert extra.extra == len(removed) and extra.missing == 0


def test_duplicate_under_new_uid_is_one_finding(archive, tmp_path):
    original = archive[5]
    copy_ = copy.deepcopy(original)
    copy_.SOPInstanceUID = generate_uid()
    findings = pair(tmp_path, archive, [*archive, copy_])
    finding = only(findings)
    assert (finding.type, finding.sop_uid, finding.related) == (
        "duplicate_instance", copy_.SOPInstanceUID, {"duplicate_of": original.SOPInstanceUID})


# -- reassignments and altered rollups ---------------------------------------------------


def test_every_study_of_a_patient_moved_is_one_patient_reassignment(archive, tmp_path):
    moved = two_study_patient(archive)
    into = next(ds for ds in archive if ds.PatientID != moved)

    def merge(items: list[Dataset]) -> list[Dataset]:
        for ds in items:
            if ds.PatientID == moved:
                for kw in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                           "IssuerOfPatientID"):
                    setattr(ds, kw, into.get(kw))
        return items

    finding = only(pair(tmp_path, archive, changed(archive, merge)))
    assert (finding.type, finding.patient_id) == ("patient_reassignment", moved)
    assert finding.related["to_patient"]["patient_id"] == into.PatientID
    assert len(finding.related["studies"]) >= 2


@pytest.mark.parametrize(
    ("what", "level"),
    [("one instance's StudyDate", "instance"), ("a series' SeriesDescription", "series"),
     ("an attribute added to a whole patient", "patient")],
)
def test_a_shared_change_is_reported_once_at_the_level_it_covers(archive, tmp_path, what,
                                                                  level):
    study = multi_series_study(archive)
    series = next(ds.SeriesInstanceUID for ds in archive if ds.StudyInstanceUID == study)
    pid = two_study_patient(archive)

    def damage(items: list[Dataset]) -> list[Dataset]:
        if level == "instance":
            next(ds for ds in items if ds.StudyInstanceUID == study).StudyDate = "20000101"
        for ds in items:
            if level == "series" and ds.SeriesInstanceUID == series:
                ds.SeriesDescription = "RENAMED"
            if level == "patient" and ds.PatientID == pid:
                ds.BurnedInAnnotation = "NO"
        return items

    finding = only(pair(tmp_path, archive, changed(archive, damage)))
    assert (finding.type, finding.level) == ("altered_attributes", level)
    if level == "patient":
        assert finding.patient_id == pid
        assert finding.attributes == {"BurnedInAnnotation": {"before": None, "after": "NO"}}
        assert finding.instances == len(patients(archive)[pid])


# -- rules -------------------------------------------------------------------------------


def _prefixed(items: list[Dataset], prefixes: dict[str, str]) -> list[Dataset]:
    for ds in items:
        ds.PatientID = prefixes.get(ds.IssuerOfPatientID, "") + ds.PatientID
    return items


def test_prefix_rule(archive, tmp_path):
    issuers = sorted({ds.IssuerOfPatientID for ds in archive})
    prefixes = {issuer: f"F{n}-" for n, issuer in enumerate(issuers)}
    rules = "prefix:\n  by_issuer:\n" + "".join(f"    {i}: {p}\n" for i, p in prefixes.items())
    target = changed(archive, lambda items: _prefixed(items, prefixes))
    assert pair(tmp_path / "a", archive, target, rules).verdict == "pass"

    strict = pair(tmp_path / "b", archive, target)
    assert {f.type for f in strict.findings} == {"altered_attributes"}
    assert {f.level for f in strict.findings} == {"patient"}
    assert len(strict.findings) == len(patients(archive))

    required = rules + "  required: true\n"
    unchanged = pair(tmp_path / "c", archive, archive, required)
    assert {name for f in unchanged.findings for name in f.attributes} == {"PatientID"}
    assert pair(tmp_path / "d", archive, archive, rules).verdict == "pass"  # not required

    wrong = changed(archive, lambda items: _prefixed(items, dict.fromkeys(issuers, "ZZ-")))
    assert pair(tmp_path / "e", archive, wrong, rules).verdict == "fail"


def test_series_sums_and_a_full_row_comparison_find_the_same(archive, tmp_path, monkeypatch):
    """Reconcile reads the rows of the series whose sums differ, or every row when most
    differ (reconcile._DESCEND_SHARE): both ways must give the same findings."""
    issuers = sorted({ds.IssuerOfPatientID for ds in archive})
    prefixes = {issuer: f"F{n}-" for n, issuer in enumerate(issuers)}
    rules = "prefix:\n  by_issuer:\n" + "".join(f"    {i}: {p}\n" for i, p in prefixes.items())

    def damage(items: list[Dataset]) -> list[Dataset]:
        items = _prefixed(items, prefixes)
        items[3].StationName = "EDITED"
        duplicate = copy.deepcopy(items[6])
        duplicate.SOPInstanceUID = duplicate.SOPInstanceUID + ".9"
        return [*items[:1], *items[2:], duplicate]

    source = build(tmp_path / "source.sqlite", archive)
    target = build(tmp_path / "target.sqlite", changed(archive, damage))
    results = []
    for share in (0.0, 1.0):
        monkeypatch.setattr(reconcile_module, "_DESCEND_SHARE", share)
        found = reconcile(source, target, parse_rules(rules, "rules.yaml")).as_dict()
        results.append({k: v for k, v in found.items() if k != "elapsed_s"})
    assert results[0] == results[1]
    assert results[0]["by_type"] == {"missing_instance": 1, "altered_attributes": 1,
                                     "duplicate_instance": 1}


def test_added_ignore_and_charset_rules(archive, tmp_path):
    def no_issuer(items: list[Dataset]) -> list[Dataset]:
        for ds in items:
            del ds.IssuerOfPatientID
        return items

    def restyled(items: list[Dataset]) -> list[Dataset]:
        for ds in items:
            ds.StationName = "NEWSTATION"
            ds.SpecificCharacterSet = "ISO_IR 192"
        return items

    source = changed(archive, no_issuer)
    assert pair(tmp_path / "a", source, archive, "added: [IssuerOfPatientID]\n").verdict == "pass"
    assert only_types(pair(tmp_path / "b", source, archive)) == {"altered_attributes"}

    target = changed(archive, restyled)
    rules = "ignore: [StationName]\ncharset_conversion: true\n"
    assert pair(tmp_path / "c", archive, target, rules).verdict == "pass"
    strict = pair(tmp_path / "d", archive, target)
    assert {n for f in strict.findings for n in f.attributes} == {"StationName",
                                                                 "SpecificCharacterSet"}


def only_types(findings) -> set[str]:
    return {f.type for f in findings.findings}


def _set_rows(ledger: Path, sql: str, *params: object) -> None:
    """Edit a finished ledger the way a crawl of another node would have written it."""
    with sqlite3.connect(ledger) as conn:
        assert conn.execute(sql, params).rowcount == 1


def test_transfer_syntax_is_never_a_finding_but_lossy_recompression_is(archive, tmp_path):
    def recompressed(plus_one: bool) -> Callable[[list[Dataset]], list[Dataset]]:
        def change(items: list[Dataset]) -> list[Dataset]:
            for ds in items:
                if plus_one and ds is items[0]:
                    pixels = ds.pixel_array.copy()
                    pixels.flat[0] += 1
                    ds.PixelData = pixels.tobytes()
                ds.compress(RLELossless, generate_instance_uid=False)
            return items
        return change

    lossless = changed(archive, recompressed(False))
    assert pair(tmp_path / "a", archive, lossless).verdict == "pass"
    old_rule = "lossless_transfer_syntax_change: false\n"  # still accepted, no effect
    assert pair(tmp_path / "b", archive, lossless, old_rule).verdict == "pass"

    plus_one = pair(tmp_path / "c", archive, changed(archive, recompressed(True)))
    finding = only(plus_one)  # RLE is lossless: a changed value is an alteration
    assert (finding.type, finding.sop_uid) == ("altered_pixels", archive[0].SOPInstanceUID)
    assert finding.related["transfer_syntax"][0]["after"] == RLELossless

    # lossy on the target only, pixels differ: recompressed_lossy, not altered_pixels
    findings = pair(tmp_path / "d", archive, changed(archive, recompressed(True)))
    _set_rows(Path(findings.target),
              "UPDATE instance_rows SET transfer_syntax = ? WHERE sop_uid = ?",
              JPEGBaseline8Bit, archive[0].SOPInstanceUID)
    finding = only(reconcile(findings.source, findings.target))
    assert (finding.type, finding.sop_uid, finding.attributes) == (
        "recompressed_lossy", archive[0].SOPInstanceUID, {})

    # lossy syntax but every decoded value kept: nothing was lost
    findings = pair(tmp_path / "e", archive, lossless)
    _set_rows(Path(findings.target),
              "UPDATE instance_rows SET transfer_syntax = ? WHERE sop_uid = ?",
              JPEGBaseline8Bit, archive[0].SOPInstanceUID)
    assert reconcile(findings.source, findings.target).verdict == "pass"

    # LossyImageCompression set on the target (PS3.3 C.7.6.1.1.5): one finding of its own type
    def marked_lossy(items: list[Dataset]) -> list[Dataset]:
        items[1].LossyImageCompression = "01"
        items[1].LossyImageCompressionRatio = 10
        pixels = items[1].pixel_array.copy()
        pixels.flat[0] += 1
        items[1].PixelData = pixels.tobytes()
        return items

    finding = only(pair(tmp_path / "f", archive, changed(archive, marked_lossy)))
    assert (finding.type, finding.sop_uid, finding.attributes) == (
        "recompressed_lossy", archive[1].SOPInstanceUID, {})
    assert "LossyImageCompression" in finding.detail


def test_an_unretrievable_instance_is_one_finding_on_its_side(archive, tmp_path):
    findings = pair(tmp_path, archive, archive)
    victim = archive[2].SOPInstanceUID
    _set_rows(Path(findings.target), "UPDATE instance_rows SET retrieved = 0, attrs_digest = NULL, "
              "pixel_digest = NULL, retrieval_error = 'C-GET failed (0xA702)' WHERE sop_uid = ?",
              victim)
    result = reconcile(findings.source, findings.target)
    finding = only(result)
    assert (finding.type, finding.sop_uid, finding.related) == (
        "unretrievable", victim, {"side": "target", "error": "C-GET failed (0xA702)"})
    assert (result.missing, result.extra, result.altered, result.unretrievable) == (0, 0, 0, 1)


def test_attributes_depth_compares_key_attributes_only(archive, tmp_path):
    def damage(items: list[Dataset]) -> list[Dataset]:
        items[0].StationName = "NOT A KEY"
        items[1].StudyDate = "20000101"
        return items

    findings = pair(tmp_path, archive, changed(archive, damage), depth="attributes")
    finding = only(findings)
    assert (finding.sop_uid, finding.attributes) == (
        archive[1].SOPInstanceUID, {"StudyDate": {"before": archive[1].StudyDate,
                                                  "after": "20000101"}})


# -- errors and sampling -------------------------------------------------------------------


def test_unfinished_or_missing_ledgers_and_bad_rules_are_config_errors(archive, tmp_path):
    good = build(tmp_path / "good.sqlite", archive)
    unfinished = Ledger.create(tmp_path / "half.sqlite", {"depth": "full"})
    unfinished.close()
    with pytest.raises(ConfigError, match="half.sqlite: the crawl of this ledger did not finish"):
        reconcile(good, tmp_path / "half.sqlite")
    with pytest.raises(ConfigError, match="nope.sqlite: no such ledger file"):
        reconcile(good, tmp_path / "nope.sqlite")
    bad = tmp_path / "rules.yaml"
    bad.write_text("charset_conversion: true\nprefix:\n  by_issuer: {A: 1}\n")
    with pytest.raises(ConfigError, match=r"rules.yaml:3: prefix.by_issuer.A: must be a "):
        reconcile(good, good, bad)
    bad.write_text("added: [IssuerOfPatientID]\nignore:\n  - StationName\n  - NoSuchThing\n")
    with pytest.raises(ConfigError, match=r"rules.yaml:4: ignore.1: unknown attribute"):
        load_rules(bad)
    with pytest.raises(ConfigError, match="rules.yaml:1: lossless: unknown rule"):
        parse_rules("lossless: true\n", "rules.yaml")


def test_a_ledger_of_the_previous_schema_is_refused_in_one_line(archive, tmp_path):
    """Schema 3 (compact instance_rows) cannot read a schema-2 ledger: crawl again."""
    good = build(tmp_path / "good.sqlite", archive)
    old = build(tmp_path / "old.sqlite", archive)
    with sqlite3.connect(old) as conn:
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    message = r"old.sqlite: ledger: schema version 2 unknown \(this harness reads 3\)$"
    with pytest.raises(ConfigError, match=message):
        Ledger.open(old)
    with pytest.raises(ConfigError, match=message):
        reconcile(good, old)


def test_sample_bound():
    assert sample_bound(100, 100) == 0.0
    assert sample_bound(0, 100) == 1.0
    bound = sample_bound(100, 1_000_000)
    assert 0.0285 < bound < 0.0305  # the rule of three: about 3/n
    assert sample_bound(1000, 10_000) < sample_bound(100, 10_000)
