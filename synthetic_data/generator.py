"""Turn options into a deterministic stream of DICOM datasets with their ground truth.

Everything is derived from the seed and the position of an object in the archive (record,
study, series, instance), never from the clock: the same options give the same bytes.
Objects are built lazily, one at a time, from a per-series template, so memory stays flat.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import random
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000
from pydicom.valuerep import PersonName

from synthetic_data import documents, quirks
from synthetic_data.charsets import NameParts, make_name, specific_character_set
from synthetic_data.demographics import (
    PatientRecord,
    make_facilities,
    make_population,
)
from synthetic_data.encodings import SYNTAXES, Syntax, encode_pixels, stored_photometric
from synthetic_data.modalities import MODALITIES, Anatomy, Modality, SeriesLayout, code
from synthetic_data.options import GeneratorOptions
from synthetic_data.pixels import BytesCache, frame_plan, pixel_sha256, render
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
    """One object and the manifest facts known before it is written.

    The object is kept as its series template plus its own few elements; the pydicom
    Dataset is only assembled when asked for (`dataset`), so the writer, which encodes
    template + elements directly, never pays for it.
    """

    path: str  # relative path inside the archive
    record: dict
    template: Dataset  # shared by the series: never modify
    meta_template: FileMetaDataset  # shared by the series: never modify
    elements: list[DataElement]  # this instance's own elements (SOP Instance UID first)
    _dataset: Dataset | None = None

    @property
    def sop_instance_uid(self) -> str:
        return self.record["sop_instance_uid"]

    def file_meta_elements(self) -> list[DataElement]:
        return [DataElement(0x00020003, "UI", self.sop_instance_uid)]

    @property
    def dataset(self) -> Dataset:
        """The full pydicom Dataset with file_meta (assembled on first use).

        Its elements are its own copies, so a caller may change them freely; the shared
        template stays untouched.
        """
        if self._dataset is None:
            items = _own_items(self.template)
            for elem in self.elements:
                items[elem.tag] = elem
            ds = Dataset(items)
            meta_items = _own_items(self.meta_template)
            for elem in self.file_meta_elements():
                meta_items[elem.tag] = elem
            ds.file_meta = FileMetaDataset(meta_items)
            self._dataset = ds
        return self._dataset


_IMMUTABLE = (str, int, float, bytes, PersonName, type(None))
_SPLIT_CACHE: dict[int, tuple[Dataset, list, list]] = {}


def _own_items(template: Dataset) -> dict:
    """Copies of a template's elements, keyed by tag, for one caller-owned Dataset."""
    cached = _SPLIT_CACHE.get(id(template))
    if cached is None or cached[0] is not template:
        if len(_SPLIT_CACHE) > 64:
            _SPLIT_CACHE.clear()
        pairs = list(template.items())
        plain = [(t, e) for t, e in pairs if isinstance(e.value, _IMMUTABLE)]
        other = [(t, e) for t, e in pairs if not isinstance(e.value, _IMMUTABLE)]
        cached = _SPLIT_CACHE[id(template)] = (template, plain, other)
    new = DataElement.__new__
    items = {}
    for tag, elem in cached[1]:  # immutable values: a shallow copy (copy.copy, but faster)
        copied = new(DataElement)
        copied.__dict__.update(elem.__dict__)
        items[tag] = copied
    for tag, elem in cached[2]:
        items[tag] = _own(elem)
    return items


def _own(elem: DataElement) -> DataElement:
    """A copy of an element that shares no mutable value with the original."""
    value = elem.value
    if value is None or isinstance(value, str | int | float | bytes | PersonName):
        # immutable value: a shallow copy is independent (this is copy.copy, 4x faster)
        new = DataElement.__new__(DataElement)
        new.__dict__.update(elem.__dict__)
        return new
    with _trusted_values():  # the values were valid when first set
        if elem.VR == "SQ":
            items = [Dataset({t: _own(e) for t, e in item.items()}) for item in value]
            return DataElement(elem.tag, "SQ", Sequence(items))
        if isinstance(value, MultiValue | list):
            return DataElement(elem.tag, elem.VR, list(value))
    return copy.deepcopy(elem)


class _Elements(list):
    """Per-instance elements, collected with the Dataset.add_new signature."""

    def add_new(self, tag: int, VR: str, value: object) -> None:  # pydicom's signature
        self.append(DataElement(tag, VR, value))


def _da(d: dt.date) -> str:
    return d.strftime("%Y%m%d")


def _tm(seconds: int) -> str:
    seconds %= 86400
    return f"{seconds // 3600:02d}{seconds % 3600 // 60:02d}{seconds % 60:02d}"


def _age(birth: dt.date, on: dt.date) -> str:
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return f"{max(years, 0):03d}Y"


@contextmanager
def _trusted_values() -> Iterator[None]:
    """Skip pydicom's per-value validation while building our own (known-valid) values.

    Validity is checked where it matters, by dciodvfy in the tests; validation is a third
    of the build time. Never held across a `yield`, so callers' code is unaffected.
    """
    settings = config.settings
    modes = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = modes


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
        self._static_cache: dict[tuple, Dataset] = {}
        self._staff_cache: dict[tuple, NameParts] = {}
        self._meta_cache: dict[tuple, FileMetaDataset] = {}
        self._pixel_cache = BytesCache()
        self._patient_cache: tuple[PatientRecord, Dataset] | None = None
        self._study_cache: tuple[_Study, Dataset] | None = None

    # ---- plan ---------------------------------------------------------------------------
    def layouts(self, index: int) -> tuple[Modality, Anatomy, list[SeriesLayout], random.Random]:
        """Modality, anatomy and series layout of study `index` (cheap: used to estimate)."""
        opts = self.opts
        mod = MODALITIES[opts.modality_list[index % len(opts.modality_list)]]
        rng = random.Random(f"study|{opts.seed}|{index}")
        anatomy = mod.anatomies[rng.randrange(len(mod.anatomies))]
        return mod, anatomy, mod.layout(opts.scale, anatomy, rng), rng

    def studies(self) -> Iterator[_Study]:
        opts = self.opts
        index = 0
        for rec in self.records:
            for _ in range(opts.studies_per_patient):
                mod, anatomy, layouts, rng = self.layouts(index)
                date = _BASE_DATE + dt.timedelta(days=rng.randrange(6 * 365))
                seconds = 7 * 3600 + rng.randrange(12 * 3600)
                charset = rec.person.charset
                fac = rec.facility
                referring = self._staff(fac.index, charset, "referring", rng.randrange(12))
                reader = self._staff(fac.index, charset, "radiologist", rng.randrange(4))
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

    def _staff(self, facility: int, charset: str, role: str, slot: int) -> NameParts:
        """A facility's roster of referring physicians and radiologists (names in charset)."""
        key = (facility, charset, role, slot)
        name = self._staff_cache.get(key)
        if name is None:
            seed = zlib.crc32(f"{self.opts.seed}|{facility}|{charset}|{role}|{slot}".encode())
            name = make_name(charset, "F" if seed % 2 else "M", seed)
            self._staff_cache[key] = name
        return name

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
        with _trusted_values():
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
        meta = self._file_meta(layout, syntax, study)
        content_time = study.seconds + 60 * (s_index + 1)
        for i in range(layout.count):
            with _trusted_values():
                sop_uid = self.uids.uid("instance", study.index, s_index, i)
                elements = _Elements()
                elements.add_new(0x00080018, "UI", sop_uid)
                elements.add_new(0x00200013, "IS", str(i + 1))
                elements.add_new(0x00080033, "TM", _tm(content_time + i))
                study.modality.instance_attrs(elements, layout, i)
                pix_hash = None
                if layout.pixels is not None:
                    elem, pix_hash = self._pixel_element(layout, syntax, i,
                                                         (study.rng_seed + i) % 997)
                    elements.append(elem)
            record = dict(base_record)
            record["instance_number"] = i + 1
            record["sop_instance_uid"] = sop_uid
            record["pixel_sha256"] = pix_hash
            yield GeneratedInstance(f"{folder}/{i + 1:05d}.dcm", record, template, meta,
                                    elements)

    def _file_meta(self, layout: SeriesLayout, syntax: Syntax, study: _Study
                   ) -> FileMetaDataset:
        aes = study.record.facility.ae_titles
        key = (layout.sop_class, syntax.uid, aes[study.index % len(aes)])
        cached = self._meta_cache.get(key)
        if cached is None:
            cached = self._meta_cache[key] = self._new_file_meta(layout, syntax, study)
        return cached

    def _new_file_meta(self, layout: SeriesLayout, syntax: Syntax, study: _Study
                       ) -> FileMetaDataset:
        meta = FileMetaDataset()
        meta.FileMetaInformationVersion = b"\x00\x01"
        meta.MediaStorageSOPClassUID = layout.sop_class
        meta.TransferSyntaxUID = syntax.uid
        meta.ImplementationClassUID = self.impl_uid
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        aes = study.record.facility.ae_titles
        meta.SourceApplicationEntityTitle = aes[study.index % len(aes)]
        return meta

    def _pixel_element(self, layout: SeriesLayout, syntax: Syntax, position: int,
                       noise_index: int) -> tuple[DataElement, str]:
        """Pixel Data of one object and the SHA-256 of its native pixels (cached)."""
        pix = layout.pixels
        assert pix is not None
        key = (pix, layout.count, frame_plan(pix, position, layout.count, noise_index),
               syntax.name)
        hit = self._pixel_cache.get(key)
        if hit is None:
            arr = render(pix, position, layout.count, noise_index, self.opts.seed)
            if syntax.compressed:
                data = encode_pixels(
                    arr, syntax, frames=pix.frames, rows=pix.rows, columns=pix.columns,
                    samples=pix.samples, bits_allocated=pix.bits_allocated,
                    bits_stored=pix.bits_stored, signed=pix.signed, photometric=pix.photometric)
            else:
                data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
                if len(data) % 2:
                    data += b"\x00"
            hit = (data, pixel_sha256(arr))
            self._pixel_cache.put(key, hit)
        data, digest = hit
        if syntax.compressed:
            return DataElement(0x7FE00010, "OB", data, is_undefined_length=True), digest
        return DataElement(0x7FE00010, "OW" if pix.bits_allocated > 8 else "OB", data), digest

    # ---- templates, built from cached layers so that elements are shared ---------------
    #
    # An object is: static layer (modality, pixel module, vendor; shared by every series
    # with the same layout) + patient layer (per record) + study layer + series layer +
    # per-instance elements. Layers are merged as dicts of the same DataElement objects, so
    # the writer encodes each shared element once. Elements are never mutated after
    # creation (quirks replace them), which is what makes the sharing safe.

    def _series_template(self, study: _Study, s_index: int, layout: SeriesLayout,
                         series_uid: str, syntax: Syntax, rng: random.Random) -> Dataset:
        mod = study.modality
        layers = [self._static_layer(mod, layout, study.anatomy, syntax),
                  self._patient_layer(study.record), self._study_layer(study)]
        ds = Dataset()
        series_time = _tm(study.seconds + 60 * (s_index + 1))
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = str(s_index + 1)
        ds.SeriesTime = series_time
        if mod.has_pixels:
            ds.AcquisitionTime = series_time
            if rng.random() < 0.3:
                findings, _ = documents.report_text(study.rng_seed, long=True)
                ds.ImageComments = findings[:10240]
        else:
            ds.InstanceNumber = "1"
        ds.add_new(0x00091003, "DS", f"{s_index + 0.5:.1f}")
        merged: dict = {}
        for layer in (*layers, ds):
            merged.update(layer.items())
        return Dataset(merged)

    def _static_layer(self, mod: Modality, layout: SeriesLayout, anatomy: Anatomy,
                      syntax: Syntax) -> Dataset:
        key = (mod.name, layout.description, layout.sop_class, layout.pixels,
               tuple(sorted(layout.params.items())), anatomy, syntax.name)
        cached = self._static_cache.get(key)
        if cached is not None:
            return cached
        ds = Dataset()
        ds.SOPClassUID = layout.sop_class
        ds.Modality = mod.dicom
        ds.SeriesDescription = layout.description
        vendor, model = _VENDORS[mod.name]
        ds.Manufacturer = vendor
        ds.ManufacturerModelName = model
        ds.SoftwareVersions = "1.0.0"
        if mod.has_pixels:
            ds.BodyPartExamined = anatomy.body_part
            if layout.sop_class in ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"):
                ds.PatientPosition = "HFS"
            ds.OperatorsName = "Tech^A"
            ds.ProtocolName = layout.description
            ds.AcquisitionNumber = "1"
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
        # private tags of two made-up vendors; creators reserve block 0x10 of each group
        ds.add_new(0x00090010, "LO", _PRIVATE_CREATOR)
        ds.add_new(0x00091001, "LO", "synthetic; not a real patient")
        ds.add_new(0x00091010, "SQ", Sequence([code("PROTO7", "99ACME", "Vendor protocol 7")]))
        ds.add_new(0x00290010, "LO", _PRIVATE_CREATOR_2)
        ds.add_new(0x00291002, "UT", "Vendor protocol dump: " + "kV=120;mAs=250;" * 20)
        if len(self._static_cache) > 256:
            self._static_cache.clear()
        self._static_cache[key] = ds
        return ds

    def _patient_layer(self, rec: PatientRecord) -> Dataset:
        if self._patient_cache is not None and self._patient_cache[0] is rec:
            return self._patient_cache[1]
        ds = Dataset()
        charset = specific_character_set(rec.person.charset)
        if charset is not None:
            ds.SpecificCharacterSet = charset
        ds.PatientName = rec.name.dicom()
        ds.PatientID = rec.patient_id
        ds.IssuerOfPatientID = rec.facility.issuer
        ds.PatientBirthDate = _da(rec.birth_date)
        ds.PatientSex = rec.sex
        ds.InstitutionName = rec.facility.name
        self._patient_cache = (rec, ds)
        return ds

    def _study_layer(self, study: _Study) -> Dataset:
        if self._study_cache is not None and self._study_cache[0] is study:
            return self._study_cache[1]
        rec, mod, anatomy, fac = study.record, study.modality, study.anatomy, study.record.facility
        rng = random.Random(study.rng_seed)
        date = _da(study.date)
        ds = Dataset()
        ds.StudyInstanceUID = study.uid
        ds.StudyDate = date
        ds.StudyTime = _tm(study.seconds)
        ds.SeriesDate = date
        ds.ContentDate = date
        ds.ReferringPhysicianName = study.referring
        ds.StudyID = study.study_id
        ds.AccessionNumber = study.accession
        ds.StudyDescription = anatomy.study_description
        ds.ProcedureCodeSequence = Sequence([code(*anatomy.procedure)])
        ds.PatientAge = _age(rec.birth_date, study.date)
        ds.PatientWeight = str(50 + rng.randrange(50))
        ds.StationName = fac.ae_titles[study.index % len(fac.ae_titles)]
        ds.DeviceSerialNumber = f"SN{fac.index + 1:02d}{study.index % 7:04d}"
        if mod.has_pixels:
            ds.AcquisitionDate = date
            if anatomy.paired and mod.name not in ("DX", "MG"):
                ds.Laterality = "R" if rng.random() < 0.5 else "L"
            req = Dataset()
            req.RequestedProcedureID = study.accession
            req.ScheduledProcedureStepID = f"{study.accession}-1"
            req.RequestedProcedureDescription = anatomy.study_description
            ds.RequestAttributesSequence = Sequence([req])
        if mod.frame_of_reference:
            ds.FrameOfReferenceUID = study.frame_of_reference
            ds.PositionReferenceIndicator = ""
        if mod.name == "SR":
            findings, impression = documents.report_text(study.rng_seed,
                                                         long=rng.random() < 0.5)
            documents.add_basic_text_sr(ds, findings, impression, study.reader, date,
                                        _tm(study.seconds + 3600))
        elif mod.name == "DOC":
            findings, impression = documents.report_text(study.rng_seed)
            pdf = documents.tiny_pdf(anatomy.study_description,
                                     [f"Accession {study.accession}", findings, impression])
            documents.add_encapsulated_pdf(ds, pdf, "Radiology Report")
            ds.AcquisitionDateTime = f"{date}{_tm(study.seconds + 60)}"
        ds.add_new(0x00091002, "SL", study.index)
        ds.add_new(0x00291001, "OB", hashlib.sha256(study.uid.encode()).digest()[:16])
        self._study_cache = (study, ds)
        return ds


def iter_instances(opts: GeneratorOptions) -> Iterator[GeneratedInstance]:
    """Objects with manifest facts, in a fixed order (used by the writer)."""
    return _Builder(opts).instances()


def plan(opts: GeneratorOptions) -> tuple[int, int, Iterator[GeneratedInstance]]:
    """(instances, estimated bytes, the instances) with the population built only once."""
    builder = _Builder(opts)
    count, size = estimate(opts, builder)
    return count, size, builder.instances()


def generate(opts: GeneratorOptions) -> Iterator[Dataset]:
    """Yield datasets with file_meta set, ready for dcmwrite or C-STORE."""
    for inst in iter_instances(opts):
        yield inst.dataset


def estimate(opts: GeneratorOptions, builder: _Builder | None = None) -> tuple[int, int]:
    """(instances, bytes) an archive will have, computed from the plan without pixels.

    Bytes are an upper bound (uncompressed pixels plus a generous header allowance).
    """
    instances = size = 0
    builder = builder or _Builder(opts)
    for index in range(len(builder.records) * opts.studies_per_patient):
        for layout in builder.layouts(index)[2]:
            instances += layout.count
            pixels = layout.pixels.nbytes if layout.pixels is not None else 0
            size += layout.count * (pixels + 16384)
    return instances, size
