"""The generator API, determinism, the manifest, identity traps and character sets."""

from __future__ import annotations

import hashlib
import json
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

from synthetic_data import GeneratorOptions, generate, write_archive
from synthetic_data.charsets import DEFAULT, JAPANESE, KOREAN, LATIN1, UTF8
from synthetic_data.manifest import read_manifest


def _bytes(ds: Dataset) -> bytes:
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def test_generate_ct_mr_tiny_yields_writable_datasets():
    opts = GeneratorOptions(patients=2, studies_per_patient=1, modalities=["CT", "MR"],
                            facilities=2, seed=0, scale="tiny", quirks=False, charsets=None,
                            transfer_syntaxes=None, uid_root=None, trap_rate=0.2)
    datasets = list(generate(opts))
    assert {ds.Modality for ds in datasets} == {"CT", "MR"}
    for ds in datasets:
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        back = pydicom.dcmread(BytesIO(_bytes(ds)))
        assert back.pixel_array.shape == (ds.Rows, ds.Columns)
        assert back.SOPInstanceUID.startswith("2.25.")


def test_uid_root_is_used_and_valid():
    opts = GeneratorOptions(patients=1, modalities=["CT"], uid_root="1.2.826.0.1.3680043.10.1234")
    for ds in generate(opts):
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                    ds.FrameOfReferenceUID, ds.file_meta.ImplementationClassUID):
            assert uid.startswith("1.2.826.0.1.3680043.10.1234.")
            assert len(uid) <= 64 and uid.is_valid


def _archive_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_archives(tmp_path):
    kwargs = dict(patients=4, modalities="CT,MR,US,MG,SR,DOC", facilities=2, seed=42,
                  quirks=True, charsets="default,latin1,japanese",
                  transfer_syntaxes="explicit,rle,jpeg-lossless,deflated", trap_rate=0.5)
    write_archive(GeneratorOptions(**kwargs), tmp_path / "a")
    write_archive(GeneratorOptions(**kwargs), tmp_path / "b")
    first, second = _archive_digest(tmp_path / "a"), _archive_digest(tmp_path / "b")
    assert len(first) > 10
    assert first == second
    kwargs["seed"] = 43
    write_archive(GeneratorOptions(**kwargs), tmp_path / "c")
    assert _archive_digest(tmp_path / "c") != first


def test_manifest_records_every_instance(tmp_path):
    opts = GeneratorOptions(patients=3, modalities="CT,CR,SR", facilities=2, seed=5)
    counts = write_archive(opts, tmp_path / "m")
    records = read_manifest(tmp_path / "m")
    summary = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert summary["seed"] == 5 and summary["counts"]["instances"] == len(records)
    assert counts["instances"] == len(records) == len(list((tmp_path / "m").rglob("*.dcm")))
    for rec in records:
        data = (tmp_path / "m" / rec["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == rec["sha256"]
        ds = pydicom.dcmread(BytesIO(data))
        assert ds.SOPInstanceUID == rec["sop_instance_uid"]
        assert ds.SOPClassUID == rec["sop_class_uid"]
        assert ds.file_meta.TransferSyntaxUID == rec["transfer_syntax"]
        assert ds.PatientID == rec["patient"]["patient_id"]
        assert ds.IssuerOfPatientID == rec["facility"]["issuer"]
        if rec["pixel_sha256"]:
            assert hashlib.sha256(ds.pixel_array.tobytes()).hexdigest() == rec["pixel_sha256"]
        for key in ("facility", "patient", "study", "series", "traps", "quirks",
                    "character_set"):
            assert key in rec


def test_identity_traps_in_manifest_and_data(tmp_path):
    opts = GeneratorOptions(patients=6, modalities=["CR"], facilities=3, seed=0, trap_rate=1.0)
    write_archive(opts, tmp_path / "t")
    records = read_manifest(tmp_path / "t")
    by_record: dict[str, Dataset] = {}
    for rec in records:
        by_record.setdefault(rec["patient"]["record_id"],
                             pydicom.dcmread(tmp_path / "t" / rec["path"]))
    traps = {t["group"]: t for rec in records for t in rec["traps"]}
    kinds = {t["kind"] for t in traps.values()}
    assert kinds == {"mrn_collision", "mrn_split", "demographic_variant"}
    for trap in traps.values():
        a, b = (by_record[r] for r in trap["records"])
        if trap["kind"] == "mrn_collision":  # same MRN, different people and issuers
            assert a.PatientID == b.PatientID
            assert a.IssuerOfPatientID != b.IssuerOfPatientID
            assert str(a.PatientName) != str(b.PatientName)
            assert trap["persons"][0] != trap["persons"][1]
        elif trap["kind"] == "mrn_split":  # same person, two MRNs
            assert a.PatientID != b.PatientID
            assert str(a.PatientName) == str(b.PatientName)
            assert a.PatientBirthDate == b.PatientBirthDate
        else:  # same person, spelling and/or birth date variant
            assert a.PatientID != b.PatientID
            assert (str(a.PatientName) != str(b.PatientName)
                    or a.PatientBirthDate != b.PatientBirthDate)
    persons = {}
    for rec in records:
        persons.setdefault(rec["patient"]["person_id"], set()).add(rec["patient"]["record_id"])
    assert any(len(v) > 1 for v in persons.values())


def test_trap_rate_zero_gives_no_traps():
    opts = GeneratorOptions(patients=5, modalities=["SR"], trap_rate=0.0)
    assert len({ds.PatientID for ds in generate(opts)}) == 5


@pytest.mark.parametrize("charset,escape", [
    (DEFAULT, None), (LATIN1, None), (UTF8, None),
    (JAPANESE, b"\x1b$B"), (KOREAN, b"\x1b$)C"),
])
def test_charsets_round_trip(charset, escape):
    opts = GeneratorOptions(patients=3, modalities=["CT", "SR", "DOC"], charsets=[charset],
                            seed=7, trap_rate=0.0)
    names = set()
    for ds in generate(opts):
        intended = str(ds.PatientName)
        raw = _bytes(ds)
        back = pydicom.dcmread(BytesIO(raw))
        assert str(back.PatientName) == intended
        assert str(back.ReferringPhysicianName) == str(ds.ReferringPhysicianName)
        if charset == DEFAULT:
            assert "SpecificCharacterSet" not in back
            assert intended.isascii()
        elif charset in (JAPANESE, KOREAN):
            assert back.SpecificCharacterSet == ["", charset]
            assert b"\\" + charset.encode() in raw
            assert escape in raw
            assert "=" in intended  # ideographic / phonetic groups present
        else:
            assert back.SpecificCharacterSet == charset
        names.add(intended)
    if charset == LATIN1:
        assert all(n.encode("latin-1") for n in names)
    if charset in (LATIN1, UTF8):
        assert any(not n.isascii() for n in names)


def test_latin1_and_utf8_names_fit_their_charset():
    from synthetic_data.charsets import fits, make_name

    for seed in range(40):
        assert fits(LATIN1, make_name(LATIN1, "F", seed).dicom())
    utf8 = [make_name(UTF8, "M", s).dicom() for s in range(40)]
    assert any(not fits(LATIN1, n) for n in utf8)  # e.g. Dvořák needs UTF-8


def test_private_tags_sequences_and_long_text():
    opts = GeneratorOptions(patients=10, modalities=["CT", "SR"], seed=2)
    datasets = list(generate(opts))
    ds = datasets[0]
    block = ds.private_block(0x0009, "ACME SYNTHETIC 1.0")
    assert block[0x01].value.startswith("synthetic")
    assert ds[0x00290010].value == "ZYX MEDICAL PRIVATE"
    assert len(ds.ProcedureCodeSequence) == 1
    longest = max(len(str(getattr(d, "ImageComments", ""))) for d in datasets)
    sr_text = max(len(d.ContentSequence[0].ContentSequence[0].TextValue)
                  for d in datasets if d.Modality == "SR")
    assert max(longest, sr_text) > 2000


def test_archive_files_equal_dcmwrite_of_generated_datasets(tmp_path):
    """The writer's fast encoder gives exactly pydicom's bytes for every generated object."""
    from synthetic_data.charsets import CHARSET_NAMES
    from synthetic_data.options import MODALITIES
    from synthetic_data.strategies import available_syntaxes

    opts = GeneratorOptions(patients=len(MODALITIES), modalities=list(MODALITIES), seed=8,
                            charsets=list(CHARSET_NAMES), transfer_syntaxes=available_syntaxes(),
                            facilities=2)
    write_archive(opts, tmp_path / "w")
    records = read_manifest(tmp_path / "w")
    datasets = list(generate(opts))
    assert len(records) == len(datasets)
    for rec, ds in zip(records, datasets, strict=True):
        assert (tmp_path / "w" / rec["path"]).read_bytes() == _bytes(ds), rec["path"]


def test_yielded_datasets_do_not_share_mutable_state():
    opts = GeneratorOptions(patients=1, modalities=["CT"], seed=1, trap_rate=0.0)
    first, second = list(generate(opts))[:2]
    first.PatientName = "Changed^Name"
    first.ImageType[0] = "DERIVED"
    first.ProcedureCodeSequence[0].CodeValue = "X"
    assert str(second.PatientName) != "Changed^Name"
    assert second.ImageType[0] == "ORIGINAL"
    assert second.ProcedureCodeSequence[0].CodeValue != "X"
    again = list(generate(opts))[0]
    assert again.PatientName == second.PatientName
