"""Turn options into a deterministic stream of DICOM datasets with their ground truth.

Everything is derived from the seed and the position of an object in the archive (record,
study, series, instance), never from the clock: the same options give the same bytes.
Objects are built lazily, one at a time, from a per-series template, so memory stays flat.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000

from synthetic_data import documents, quirks
from synthetic_data.charsets import make_name, specific_character_set
from synthetic_data.demographics import (
    Facility,
    PatientRecord,
    make_facilities,
    make_population,
)
from synthetic_data.encodings import SYNTAXES, Syntax, encode_pixels, stored_photometric
from synthetic_data.modalities import MODALITIES, Anatomy, Modality, SeriesLayout, code
from synthetic_data.options import GeneratorOptions
from synthetic_data.pixels import pixel_sha256, render
from synthetic_data.uids import IMPLEMENTATION_VERSION_NAME, UIDFactory

_VENDORS = {
    "CT": ("ACME Medical Systems", "Quantum CT 128"), "MR": ("Zyx Imaging", "Magna 1.5T"),
    "CR": ("Nimbus Radiography", "PlateReader 9"), "DX": ("ACME Medical Systems", "FlatView DR"),
    "MG": ("Zyx Imaging", "MammoStar"), "US": ("Sonora Labs", "EchoWave 7"),
    "NM": ("Nimbus Nuclear", "GammaDuo"), "PT": ("ACME Medical Systems", "Quantum PET/CT"),
    "XA": ("Zyx Imaging", "AngioArc"), "SC": ("Nimbus Software", "ScreenGrabber"),
    "SR": ("Nimbus Software", "ReportWriter"), "DOC": ("Nimbus Software", "ScanStation"),
}
_PRIVATE_CREATOR = "ACME SYNTHETIC 1.0"
_PRIVATE_CREATOR_2 = "ZYX MEDICAL PRIVATE"
_BASE_DATE = dt.date(2019, 1, 1)


@dataclass
class GeneratedInstance:
    """One object and the manifest facts known before it is written."""

    dataset: Dataset
    path: str  # relative path inside the archive
    record: dict


def _da(d: dt.date) -> str:
    return d.strftime("%Y%m%d")


def _tm(seconds: int) -> str:
    seconds %= 86400
    return f"{seconds // 3600:02d}{seconds % 3600 // 60:02d}{seconds % 60:02d}"


def _age(birth: dt.date, on: dt.date) -> str:
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return f"{max(years, 0):03d}Y"


@dataclass
class _Study:
    index: int
    record: PatientRecord
    modality: Modality
    anatomy: Anatomy
    uid: str
    frame_of_reference: str
    date: dt.date
    seconds: int
    accession: str
    study_id: str
    referring: str
    reader: str
    layouts: list[SeriesLayout]
    rng_seed: int


class _Builder:
    def __init__(self, opts: GeneratorOptions) -> None:
        self.opts = opts
        self.uids = UIDFactory(opts.root, opts.seed)
        self.facilities = make_facilities(opts.facilities, opts.seed)
        self.records = make_population(opts.patients, self.facilities, opts.charset_list,
                                       opts.trap_rate, opts.seed)
        self.impl_uid = self.uids.implementation_class_uid()
        self.series_counter = 0

    # ---- plan ---------------------------------------------------------------------------
    def studies(self) -> Iterator[_Study]:
        opts = self.opts
        index = 0
        for rec in self.records:
            for _ in range(opts.studies_per_patient):
                name = opts.modality_list[index % len(opts.modality_list)]
                mod = MODALITIES[name]
                rng = random.Random(f"study|{opts.seed}|{index}")
                anatomy = mod.anatomies[rng.randrange(len(mod.anatomies))]
                layouts = mod.layout(opts.scale, anatomy, rng)
                date = _BASE_DATE + dt.timedelta(days=rng.randrange(6 * 365))
                seconds = 7 * 3600 + rng.randrange(12 * 3600)
                charset = rec.person.charset
                referring = make_name(charset, "M" if rng.random() < 0.5 else "F",
                                      rng.randrange(2**31))
                reader = make_name(charset, "F" if rng.random() < 0.5 else "M",
                                   rng.randrange(2**31))
                fac = rec.facility
                yield _Study(
                    index=index, record=rec, modality=mod, anatomy=anatomy,
                    uid=self.uids.uid("study", index),
                    frame_of_reference=self.uids.uid("for", index),
                    date=date, seconds=seconds,
                    accession=f"{fac.accession_prefix}{rng.randrange(10**8):08d}",
                    study_id=str(1000 + rng.randrange(9000)),
                    referring=referring.dicom(), reader=reader.dicom(), layouts=layouts,
                    rng_seed=rng.randrange(2**31),
                )
                index += 1

    # ---- objects -------------------------------------------------------------------------
    def instances(self) -> Iterator[GeneratedInstance]:
        for study in self.studies():
            for s_index, layout in enumerate(study.layouts):
                yield from self._series(study, s_index, layout)

    def _syntax_for(self, layout: SeriesLayout) -> Syntax:
        names = self.opts.syntax_list
        syntax = SYNTAXES[names[self.series_counter % len(names)]]
        if layout.pixels is None and syntax.compressed:
            native = [n for n in names if not SYNTAXES[n].compressed]
            syntax = SYNTAXES[native[0] if native else "explicit"]
        return syntax

    def _series(self, study: _Study, s_index: int, layout: SeriesLayout
                ) -> Iterator[GeneratedInstance]:
        syntax = self._syntax_for(layout)
        self.series_counter += 1
        series_uid = self.uids.uid("series", study.index, s_index)
        rng = random.Random(f"series|{self.opts.seed}|{study.index}|{s_index}")
        applied = quirks.choose(rng, syntax.name == "deflated") if self.opts.quirks else []
        template = self._series_template(study, s_index, layout, series_uid, syntax, rng)
        if applied:
            quirks.apply_series(template, applied, rng)
        rec = study.record
        base_record = {
            "facility": {"code": rec.facility.code, "name": rec.facility.name,
                         "issuer": rec.facility.issuer},
            "patient": {"record_id": rec.record_id, "person_id": rec.person.person_id,
                        "patient_id": rec.patient_id, "issuer": rec.facility.issuer,
                        "name": rec.name.dicom(), "true_name": rec.person.name.dicom(),
                        "birth_date": _da(rec.birth_date),
                        "true_birth_date": _da(rec.person.birth_date), "sex": rec.sex},
            "study": {"uid": study.uid, "accession": study.accession, "date": _da(study.date),
                      "description": study.anatomy.study_description,
                      "modality": study.modality.name},
            "series": {"uid": series_uid, "number": s_index + 1, "modality":
                       study.modality.dicom, "description": layout.description,
                       "count": layout.count},
            "sop_class_uid": layout.sop_class,
            "transfer_syntax": syntax.uid,
            "transfer_syntax_name": syntax.name,
            "character_set": rec.person.charset,
            "traps": rec.traps,
            "quirks": applied,
        }
        folder = (f"{rec.facility.code}/{rec.record_id}/study{study.index + 1:05d}/"
                  f"series{s_index + 1:03d}")
        for i in range(layout.count):
            ds = Dataset(dict(template.items()))
            ds.file_meta = self._file_meta(layout, syntax, study, "")
            sop_uid = self.uids.uid("instance", study.index, s_index, i)
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.add_new(0x00080018, "UI", sop_uid)
            ds.add_new(0x00200013, "IS", str(i + 1))
            ds.add_new(0x00080033, "TM", _tm(study.seconds + 60 * (s_index + 1) + i))
            study.modality.instance_attrs(ds, layout, i)
            pix_hash = None
            if layout.pixels is not None:
                arr = render(layout.pixels, i, layout.count, (study.rng_seed + i) % 997,
                             self.opts.seed)
                pix_hash = pixel_sha256(arr)
                self._set_pixels(ds, arr, layout, syntax)
            record = dict(base_record)
            record["instance_number"] = i + 1
            record["sop_instance_uid"] = sop_uid
            record["pixel_sha256"] = pix_hash
            yield GeneratedInstance(ds, f"{folder}/{i + 1:05d}.dcm", record)

    def _file_meta(self, layout: SeriesLayout, syntax: Syntax, study: _Study,
                   sop_uid: str) -> FileMetaDataset:
        meta = FileMetaDataset()
        meta.FileMetaInformationVersion = b"\x00\x01"
        meta.MediaStorageSOPClassUID = layout.sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = syntax.uid
        meta.ImplementationClassUID = self.impl_uid
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        aes = study.record.facility.ae_titles
        meta.SourceApplicationEntityTitle = aes[study.index % len(aes)]
        return meta

    def _set_pixels(self, ds: Dataset, arr: np.ndarray, layout: SeriesLayout,
                    syntax: Syntax) -> None:
        pix = layout.pixels
        assert pix is not None
        if syntax.compressed:
            data = encode_pixels(arr, syntax, frames=pix.frames, rows=pix.rows,
                                 columns=pix.columns, samples=pix.samples,
                                 bits_allocated=pix.bits_allocated, bits_stored=pix.bits_stored,
                                 signed=pix.signed, photometric=pix.photometric)
            elem = DataElement(0x7FE00010, "OB", data, is_undefined_length=True)
        else:
            data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            if len(data) % 2:
                data += b"\x00"
            elem = DataElement(0x7FE00010, "OW" if pix.bits_allocated > 8 else "OB", data)
        ds[0x7FE00010] = elem

    def _series_template(self, study: _Study, s_index: int, layout: SeriesLayout,
                         series_uid: str, syntax: Syntax, rng: random.Random) -> Dataset:
        rec, mod, anatomy = study.record, study.modality, study.anatomy
        fac: Facility = rec.facility
        ds = Dataset()
        charset = specific_character_set(rec.person.charset)
        if charset is not None:
            ds.SpecificCharacterSet = charset
        ds.SOPClassUID = layout.sop_class
        date = _da(study.date)
        series_time = _tm(study.seconds + 60 * (s_index + 1))
        # Patient
        ds.PatientName = rec.name.dicom()
        ds.PatientID = rec.patient_id
        ds.IssuerOfPatientID = fac.issuer
        ds.PatientBirthDate = _da(rec.birth_date)
        ds.PatientSex = rec.sex
        # General Study / Patient Study
        ds.StudyInstanceUID = study.uid
        ds.StudyDate = date
        ds.StudyTime = _tm(study.seconds)
        ds.ReferringPhysicianName = study.referring
        ds.StudyID = study.study_id
        ds.AccessionNumber = study.accession
        ds.StudyDescription = study.anatomy.study_description
        ds.ProcedureCodeSequence = Sequence([code(*anatomy.procedure)])
        ds.PatientAge = _age(rec.birth_date, study.date)
        ds.PatientWeight = str(50 + rng.randrange(50))
        # Series
        ds.Modality = mod.dicom
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = str(s_index + 1)
        ds.SeriesDate = date
        ds.SeriesTime = series_time
        ds.SeriesDescription = layout.description
        if mod.has_pixels:
            ds.BodyPartExamined = anatomy.body_part
            if anatomy.paired and mod.name not in ("DX", "MG"):
                ds.Laterality = "R" if rng.random() < 0.5 else "L"
            if layout.sop_class in ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"):
                ds.PatientPosition = "HFS"
            ds.OperatorsName = "Tech^A"
            ds.ProtocolName = layout.description
            req = Dataset()
            req.RequestedProcedureID = study.accession
            req.ScheduledProcedureStepID = f"{study.accession}-1"
            req.RequestedProcedureDescription = anatomy.study_description
            ds.RequestAttributesSequence = Sequence([req])
        elif mod.name == "SR":
            pass
        if mod.frame_of_reference:
            ds.FrameOfReferenceUID = study.frame_of_reference
            ds.PositionReferenceIndicator = ""
        # Equipment
        vendor, model = _VENDORS[mod.name]
        ds.Manufacturer = vendor
        ds.InstitutionName = fac.name
        ds.StationName = fac.ae_titles[study.index % len(fac.ae_titles)]
        ds.ManufacturerModelName = model
        ds.DeviceSerialNumber = f"SN{fac.index + 1:02d}{len(vendor):04d}"
        ds.SoftwareVersions = "1.0.0"
        # General Image / document general
        ds.ContentDate = date
        if mod.has_pixels:
            ds.AcquisitionNumber = "1"
            ds.AcquisitionDate = date
            ds.AcquisitionTime = series_time
            if rng.random() < 0.3:
                findings, _ = documents.report_text(study.rng_seed, long=True)
                ds.ImageComments = findings[:10240]
            pix = layout.pixels
            assert pix is not None
            ds.SamplesPerPixel = pix.samples
            ds.PhotometricInterpretation = stored_photometric(syntax, pix.photometric,
                                                              pix.samples)
            if pix.samples > 1:
                ds.PlanarConfiguration = 0
            if pix.frames > 1:
                ds.NumberOfFrames = str(pix.frames)
            ds.Rows = pix.rows
            ds.Columns = pix.columns
            ds.BitsAllocated = pix.bits_allocated
            ds.BitsStored = pix.bits_stored
            ds.HighBit = pix.high_bit
            ds.PixelRepresentation = int(pix.signed)
            mod.series_attrs(ds, layout, anatomy)
            if syntax.lossy:
                ds.LossyImageCompression = "01"
                ds.LossyImageCompressionRatio = "15"
                ds.LossyImageCompressionMethod = "ISO_15444_1" if syntax.uid == JPEG2000 else ""
        elif mod.name == "SR":
            findings, impression = documents.report_text(study.rng_seed,
                                                         long=rng.random() < 0.5)
            ds.InstanceNumber = "1"
            documents.add_basic_text_sr(ds, findings, impression, study.reader, date,
                                        _tm(study.seconds + 3600))
        else:
            findings, impression = documents.report_text(study.rng_seed)
            pdf = documents.tiny_pdf(study.anatomy.study_description,
                                     [f"Accession {study.accession}", findings, impression])
            documents.add_encapsulated_pdf(ds, pdf, "Radiology Report")
            ds.AcquisitionDateTime = f"{date}{series_time}"
        self._add_private(ds, study, s_index)
        return ds

    def _add_private(self, ds: Dataset, study: _Study, s_index: int) -> None:
        """Private tags from two made-up vendors, with their private creators."""
        block = ds.private_block(0x0009, _PRIVATE_CREATOR, create=True)
        block.add_new(0x01, "LO", "synthetic; not a real patient")
        block.add_new(0x02, "SL", study.index)
        block.add_new(0x03, "DS", f"{s_index + 0.5:.1f}")
        block.add_new(0x10, "SQ", Sequence([code("PROTO7", "99ACME", "Vendor protocol 7")]))
        block2 = ds.private_block(0x0029, _PRIVATE_CREATOR_2, create=True)
        block2.add_new(0x01, "OB", hashlib.sha256(study.uid.encode()).digest()[:16])
        block2.add_new(0x02, "UT", "Vendor protocol dump: " + "kV=120;mAs=250;" * 20)


def iter_instances(opts: GeneratorOptions) -> Iterator[GeneratedInstance]:
    """Objects with manifest facts, in a fixed order (used by the writer)."""
    return _Builder(opts).instances()


def generate(opts: GeneratorOptions) -> Iterator[Dataset]:
    """Yield datasets with file_meta set, ready for dcmwrite or C-STORE."""
    for inst in iter_instances(opts):
        yield inst.dataset


def estimate(opts: GeneratorOptions) -> tuple[int, int]:
    """(instances, bytes) an archive will have, computed from the plan without pixels.

    Bytes are an upper bound (uncompressed pixels plus a generous header allowance).
    """
    instances = size = 0
    for study in _Builder(opts).studies():
        for layout in study.layouts:
            instances += layout.count
            pixels = layout.pixels.nbytes if layout.pixels is not None else 0
            size += layout.count * (pixels + 16384)
    return instances, size
