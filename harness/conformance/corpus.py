"""The probe corpus: a few synthetic studies whose right answers to C-FIND are known.

Each matching rule of PS3.4 C.2.2.2 needs data where the rule makes a difference: names in
mixed case and with several components (C.2.2.2.1.1), names in ISO_IR 100, ISO_IR 192 and
ISO 2022 IR 87 (PS3.5 6.1, H.3), an empty name (universal matching, C.2.2.2.3), dates and
times spread so that each kind of range selects a known subset (C.2.2.2.5), a code sequence
(C.2.2.2.6), and one patient with two studies (hierarchical levels, C.4.1.3.1).

UIDs are derived from a fixed seed under 2.25 (synthetic_data/uids.py), so storing the
corpus again overwrites it instead of adding copies. Every Patient ID starts with
CORPUS_PREFIX: probes restrict their queries with it and count only the corpus's own UIDs,
whatever else the node holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from harness.conformance.model import ProbeNotApplicable
from harness.errors import EnvironmentProblem
from synthetic_data.uids import UIDFactory

CORPUS_PREFIX = "CONFPROBE-"
_UIDS = UIDFactory(None, seed=16016)  # fixed: a re-run stores the same UIDs
LATIN1, UTF8, JIS = "ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 87"


@dataclass(frozen=True)
class CorpusStudy:
    """One study of the corpus (one series, one instance) and what a query should see."""

    key: str  # short name the probes use: "alpha-1", "beta", ...
    patient_id: str
    patient_name: str  # as text (decoded)
    charset: str | None  # Specific Character Set term of the instance (None: default)
    study_date: str  # DA
    study_time: str  # TM
    accession: str
    modality: str
    procedure_code: str | None = None  # CodeValue of ProcedureCodeSequence's one item

    @property
    def study_uid(self) -> str:
        return _UIDS.uid("conformance-study", self.key)

    @property
    def series_uid(self) -> str:
        return _UIDS.uid("conformance-series", self.key)

    @property
    def sop_uid(self) -> str:
        return _UIDS.uid("conformance-instance", self.key)

    def dataset(self) -> Dataset:
        """The study's one instance: a tiny Secondary Capture image (PS3.3 A.8.1)."""
        ds = Dataset()
        if self.charset == JIS:
            ds.SpecificCharacterSet = ["", JIS]  # "\ISO 2022 IR 87": ASCII first (PS3.5 H.3)
        elif self.charset:
            ds.SpecificCharacterSet = self.charset
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = self.sop_uid
        ds.StudyDate, ds.StudyTime = self.study_date, self.study_time
        ds.AccessionNumber = self.accession
        ds.Modality = self.modality
        ds.ConversionType = "WSD"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "conformance probe corpus"
        ds.PatientName = self.patient_name
        ds.PatientID = self.patient_id
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = self.study_uid, self.series_uid
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
        if self.procedure_code:
            item = Dataset()
            item.CodeValue = self.procedure_code
            item.CodingSchemeDesignator = "99CONFPROBE"
            item.CodeMeaning = f"probe procedure {self.procedure_code}"
            ds.ProcedureCodeSequence = Sequence([item])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = 4
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = bytes(range(16))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        return ds


def _study(key: str, number: int, name: str, date: str, time: str, accession: str,
           modality: str, charset: str | None = None, code: str | None = None) -> CorpusStudy:
    return CorpusStudy(key, f"{CORPUS_PREFIX}{number:02d}", name, charset, date, time,
                       accession, modality, code)


#: the studies; names and values chosen so that each rule has one right answer
STUDIES: tuple[CorpusStudy, ...] = (
    _study("alpha-1", 1, "CONFPROBE^Alpha", "20100115", "083000", "CPA001", "CT", code="CPX-HEAD"),
    _study("alpha-2", 1, "CONFPROBE^Alpha", "20150620", "141500", "CPA002", "MR"),
    _study("beta", 2, "confprobe^beta", "20180301", "101010", "CPB001", "CT", code="CPX-CHEST"),
    _study("gamma", 3, "CONFPROBE^Gamma^Middle", "20200229", "235959", "CPG001", "US"),
    _study("latin1", 4, "CONFPROBE^Müller^Jürgen", "20210704", "120000", "CPL001", "DX",
           LATIN1),
    _study("utf8", 5, "CONFPROBE^Dvořák^Łucja", "20221111", "093000", "CPU001", "MR", UTF8),
    # PS3.5 H.3.1: alphabetic, ideographic and phonetic groups, JIS X 0208 by escapes
    _study("jis", 6, "Yamada^Tarou=山田^太郎=やまだ^たろう", "20230505", "170000", "CPJ001",
           "CT", JIS),
    _study("empty-name", 7, "", "19991231", "000000", "CPE001", "OT"),
    _study("delta", 8, "CONFPROBE^Delta", "20240101", "110000", "CPD001", "CT"),
)


class CorpusGap(ProbeNotApplicable):
    """A probe asked for a corpus study the node refused to store."""


@dataclass(frozen=True)
class Corpus:
    """What store_corpus stored: the studies and their facts, for the probes to compare."""

    studies: tuple[CorpusStudy, ...]
    node: str = ""
    #: studies the node refused to store, by key, with its answer: a probe that needs one
    #: of them is "not tested" (CorpusGap), every other probe runs on what was stored
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def study_uids(self) -> frozenset[str]:
        return frozenset(s.study_uid for s in self.studies)

    @property
    def patient_ids(self) -> frozenset[str]:
        return frozenset(s.patient_id for s in self.studies)

    @property
    def prefix(self) -> str:
        return CORPUS_PREFIX

    def study(self, key: str) -> CorpusStudy:
        for study in self.studies:
            if study.key == key:
                return study
        if key in self.refused:
            raise CorpusGap(f"{self.node} refused to store corpus study {key!r} "
                            f"({self.refused[key]})")
        raise KeyError(f"no corpus study {key!r}")

    def uids(self, *keys: str) -> frozenset[str]:
        """The Study Instance UIDs of the studies named."""
        return frozenset(self.study(k).study_uid for k in keys)

    def where(self, test: Callable[[CorpusStudy], bool]) -> frozenset[str]:
        """The Study Instance UIDs of the studies for which `test` is true."""
        return frozenset(s.study_uid for s in self.studies if test(s))

    def key_of(self, study_uid: str) -> str:
        """The short name of a corpus study ("?" for a UID outside the corpus)."""
        return next((s.key for s in self.studies if s.study_uid == study_uid), "?")

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "studies": [s.key for s in self.studies],
                "study_uids": sorted(self.study_uids), "refused": dict(self.refused)}


def corpus_datasets() -> list[Dataset]:
    """The corpus's instances, one per study (fresh objects each call)."""
    return [study.dataset() for study in STUDIES]


def store_corpus(node: Any) -> Corpus:
    """Store the corpus into a writable node (C-STORE through node.dimse(), which keeps to
    the kind's association limits).

    A node that refuses some studies (CTN answers 0xA700 to some character sets) keeps the
    others: the probes that need a refused study say so ("not tested"), the rest run on what
    was stored. EnvironmentProblem naming the node when it stored none at all."""
    report = node.dimse().store(corpus_datasets())
    refused = {}
    for failed in report.failed:
        key = next((s.key for s in STUDIES if s.sop_uid == failed.sop_instance_uid), None)
        if key is not None:
            refused[key] = failed.error or str(failed.status)
    if len(refused) == len(STUDIES) or (report.failed and not refused):
        failed = report.failed[0]
        raise EnvironmentProblem(
            f"node {node.name} did not store the conformance corpus: {len(report.failed)} of "
            f"{len(report.results)} instances refused (first: {failed.sop_instance_uid}: "
            f"{failed.error or failed.status})"
        )
    stored = tuple(s for s in STUDIES if s.key not in refused)
    return Corpus(stored, node.name, refused)
