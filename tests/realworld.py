"""The real-world corpus: DICOM files that nobody in this project wrote.

pydicom and pynetdicom ship the files their own tests use: vendor quirks, every transfer
syntax pydicom handles, odd lengths, big endian, deflate, SR/RT/ECG classes, files without or
with mislabelled file meta, truncated files. The harness's verdicts must hold on them, so the
tests store, retrieve, migrate and verify these as well as synthetic studies.

Classification is done with pydicom alone (an independent reader, not the harness's own file
handling), so a test can say what a file *is* before checking what the harness did with it.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pydicom.data
import pynetdicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import get_expected_length


def corpus_dirs() -> list[Path]:
    """The folders of test files shipped with the installed pydicom and pynetdicom."""
    pydicom_dir = Path(pydicom.data.__file__).parent / "test_files"
    pynetdicom_dir = Path(pynetdicom.__file__).parent / "tests" / "dicom_files"
    return [d for d in (pydicom_dir, pynetdicom_dir) if d.is_dir()]


@dataclass(frozen=True)
class CorpusFile:
    """One shipped file and what an independent read says about it."""

    path: Path
    valid: bool  # a complete Part 10 file whose data set pydicom reads to the end
    reason: str  # why it is not valid ("" when valid)
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_uid: str = ""
    transfer_syntax_uid: str = ""

    @property
    def name(self) -> str:
        for base in corpus_dirs():
            if base in self.path.parents:
                package = "pydicom" if "pydicom" in base.parts else "pynetdicom"
                return f"{package}/{self.path.relative_to(base)}"
        return str(self.path)


def _classify(path: Path) -> CorpusFile:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=False)
        except InvalidDicomError as exc:
            return CorpusFile(path, False, f"not Part 10: {exc}")
        except Exception as exc:  # noqa: BLE001 - any reader failure classifies the file
            return CorpusFile(path, False, f"unreadable: {type(exc).__name__}: {exc}")
        meta = getattr(ds, "file_meta", None)
        syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
        if not syntax:
            return CorpusFile(path, False, "file meta without TransferSyntaxUID")
        try:
            for elem in ds.iterall():  # forces every element (and sequence item) to decode
                _ = elem.value
        except Exception as exc:  # noqa: BLE001
            return CorpusFile(path, False, f"data set does not parse: {exc}")
        sop_instance = str(ds.get("SOPInstanceUID", "") or "")
        sop_class = str(ds.get("SOPClassUID", "") or "")
        study = str(ds.get("StudyInstanceUID", "") or "")
        if not (sop_instance and sop_class and study):
            return CorpusFile(path, False, "no SOP Class, SOP Instance or Study Instance UID")
        if "PixelData" in ds and not ds.file_meta.TransferSyntaxUID.is_compressed:
            try:  # pydicom's own rule (PS3.5 8.1.1; 4:2:2 holds two samples a pixel)
                expected = int(get_expected_length(ds))
            except (AttributeError, TypeError, ValueError, KeyError) as exc:
                return CorpusFile(path, False, f"pixel data without usable image attributes: {exc}")
            if len(ds.PixelData) < expected:
                return CorpusFile(path, False, f"pixel data {len(ds.PixelData)} < {expected} bytes")
    return CorpusFile(path, True, "", sop_class, sop_instance, study, syntax)


@functools.cache
def corpus() -> tuple[CorpusFile, ...]:
    """Every shipped .dcm file, classified, in a stable order."""
    files = sorted(p for d in corpus_dirs() for p in d.rglob("*.dcm"))
    return tuple(_classify(p) for p in files)


@functools.cache
def valid_files() -> tuple[CorpusFile, ...]:
    """The valid Part 10 files, one per SOP Instance UID (the first by name wins)."""
    seen: set[str] = set()
    chosen = []
    for item in corpus():
        if item.valid and item.sop_instance_uid not in seen:
            seen.add(item.sop_instance_uid)
            chosen.append(item)
    return tuple(chosen)


def invalid_files() -> tuple[CorpusFile, ...]:
    """Files an honest sender must refuse or repair: truncated, without meta, unparsable."""
    return tuple(item for item in corpus() if not item.valid)


if __name__ == "__main__":  # python -m tests.realworld: what the corpus holds
    for item in corpus():
        flag = "ok " if item.valid else "BAD"
        print(f"{flag} {item.name:60} {item.transfer_syntax_uid or item.reason}")
    print(f"{len(valid_files())} valid unique instances, {len(invalid_files())} invalid files")
