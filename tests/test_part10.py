"""What gets sent (harness/dicom/part10.py): file meta, checks, framing, on real files.

Independent means: pydicom reads of the same bytes, DCMTK's /usr/bin/dcmdump on cut files,
a pynetdicom Storage SCP that receives what the harness sends.
"""

from __future__ import annotations

import os
import subprocess
import warnings
import zlib
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt

from harness.dicom.client import DimseClient
from harness.dicom.names import sop_class_name, transfer_syntax_name
from harness.dicom.part10 import BadFile, NotDicom, parse_part10, read_file_meta, read_part10
from harness.launch.ports import free_port
from tests import realworld

DCMDUMP = "/usr/bin/dcmdump"


def _corpus(name: str) -> Path:
    return next(i.path for i in realworld.corpus() if i.path.name == name)


def test_meta_with_a_ur_element_is_framed_right(tmp_path: Path) -> None:
    """(0002,0026) Source Presentation Address is UR: a 4-byte length (PS3.5 7.1.2)."""
    ds = pydicom.dcmread(_corpus("CT_small.dcm"))
    ds.file_meta.SourcePresentationAddress = "dicom://127.0.0.1:104/" + "x" * 300
    path = tmp_path / "ur.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    meta = read_file_meta(raw)
    assert meta is not None and meta.transfer_syntax_uid == ExplicitVRLittleEndian
    after_meta = pydicom.dcmread(BytesIO(raw[meta.dataset_offset :]), force=True)
    assert after_meta.SOPInstanceUID == ds.SOPInstanceUID
    assert read_part10(path).sop_instance_uid == ds.SOPInstanceUID


@pytest.mark.skipif(not os.path.exists(DCMDUMP), reason="dcmdump not installed (dcmtk)")
@pytest.mark.parametrize("name", ["CT_small.dcm", "reportsi.dcm", "JPEG2000.dcm", "rtplan.dcm"])
def test_cut_files_are_refused_where_dcmdump_fails_too(tmp_path: Path, name: str) -> None:
    raw = _corpus(name).read_bytes()
    meta = read_file_meta(raw)
    assert meta is not None
    refused = 0
    for fraction in (0.3, 0.5, 0.7, 0.9, 0.99):
        cut = meta.dataset_offset + int((len(raw) - meta.dataset_offset) * fraction)
        path = tmp_path / f"cut{cut}.dcm"
        path.write_bytes(raw[:cut])
        dcmdump = subprocess.run([DCMDUMP, str(path)], capture_output=True, timeout=60)
        try:
            read_part10(path)
        except BadFile as exc:
            assert "truncated" in str(exc)
            refused += 1
            continue
        # accepted: then DCMTK reads it as a complete data set too
        assert dcmdump.returncode == 0, f"{name} cut at {cut}: DCMTK fails, the harness sends"
    assert refused >= 3


def test_bare_data_sets_are_read_with_an_inferred_syntax() -> None:
    expected = {
        "ExplVR_BigEndNoMeta.dcm": "1.2.840.10008.1.2.2",
        "ExplVR_LitEndNoMeta.dcm": "1.2.840.10008.1.2.1",
        "rtstruct.dcm": "1.2.840.10008.1.2",
    }
    for name, syntax in expected.items():
        path = _corpus(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            independent = pydicom.dcmread(path, force=True)
        part = read_part10(path)
        assert part.transfer_syntax_uid == syntax, name
        assert part.sop_instance_uid == independent.SOPInstanceUID
        assert any("no file meta" in quirk for quirk in part.quirks)
    with pytest.raises(NotDicom):
        parse_part10(b"just some notes, not DICOM at all\n" * 4, "notes.txt")
    with pytest.raises(BadFile, match="no SOP Class UID"):
        read_part10(_corpus("priv_SQ.dcm"))


def test_deflated_odd_stream_is_padded_and_arrives_whole() -> None:
    path = _corpus("SCImageStorage_Deflated.dcm")
    raw = path.read_bytes()
    meta = read_file_meta(raw)
    assert meta is not None and (len(raw) - meta.dataset_offset) % 2 == 1  # odd on disk
    received = {}

    def on_store(event) -> int:
        received["raw"] = event.request.DataSet.getvalue()
        received["syntax"] = str(event.context.transfer_syntax)
        return 0x0000

    ae = AE(ae_title="DEFLATE")
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, [DeflatedExplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        report = DimseClient("127.0.0.1", port, "DEFLATE", timeout_s=10).store([path])
    finally:
        server.shutdown()
    assert report.ok, [r.error for r in report.failed]
    assert received["syntax"] == DeflatedExplicitVRLittleEndian
    sent = received["raw"]
    assert len(sent) % 2 == 0 and sent[:-1] == raw[meta.dataset_offset :] and sent[-1:] == b"\0"
    inflated = zlib.decompressobj(-zlib.MAX_WBITS).decompress(sent)
    independent = pydicom.dcmread(path)
    arrived = pydicom.dcmread(BytesIO(inflated), force=True)
    assert arrived.SOPInstanceUID == independent.SOPInstanceUID
    assert arrived.PixelData == independent.PixelData


def test_names_come_from_the_registry() -> None:
    assert sop_class_name("1.2.840.10008.5.1.4.1.1.2") == "CT Image Storage"
    assert transfer_syntax_name("1.2.840.10008.1.2.2") == "Explicit VR Big Endian"
    assert sop_class_name("1.2.3.4.5") == "1.2.3.4.5"


def test_odd_length_data_sets_go_out_even() -> None:
    """PS3.5 7.1: values have even length. A file with an odd one, or a stray byte after
    the last element, is re-encoded even; pydicom reads the result back the same."""
    raw = _corpus("MR_small.dcm").read_bytes()
    meta = read_file_meta(raw)
    assert meta is not None
    odd_element = b"\xe1\x7f\x10\x00LO\x03\x00ABC"  # (7FE1,0010) LO "ABC": 3 bytes
    for extra, quirk in ((odd_element, "odd-length"), (b"\x00", "stray zero bytes")):
        part = parse_part10(raw + extra, "odd.dcm")
        assert any(quirk in q for q in part.quirks), part.quirks
        framed = bytes(part.framed())
        assert len(framed) % 2 == 0
        original = pydicom.dcmread(BytesIO(raw))
        sent = pydicom.dcmread(BytesIO(framed), force=True)
        assert sent.SOPInstanceUID == original.SOPInstanceUID
        assert sent.PixelData == original.PixelData
        if extra == odd_element:
            assert sent[0x7FE10010].value == "ABC"


def test_a_dicomdir_is_skipped_not_refused() -> None:
    with pytest.raises(NotDicom, match="DICOMDIR"):
        read_part10(_corpus("DICOMDIR-empty.dcm"))
