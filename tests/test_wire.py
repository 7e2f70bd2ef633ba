"""The harness's own C-STORE and C-GET (harness/dicom/wire.py) against real DICOM peers.

The peers are pynetdicom acceptors in this process (an independent DICOM implementation,
configured per test: small PDUs, refused AE titles, failure statuses, aborts, refused
sub-operations) and a socket that accepts and never answers. Orthanc, DCMTK and the
embedded PACS store and retrieve through the same code in every other test.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from harness.cluster import free_port
from harness.dicom.dimse import DimseClient, DimseConnectionError
from harness.dicom.wire import read_file_meta
from harness.load import DatasetSpec, clone_study, template_instance

SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]


@contextmanager
def storage_scp(
    on_store: Callable, *, classes=(CTImageStorage,), max_pdu: int = 16384, **options
) -> Iterator[int]:
    """A pynetdicom Storage SCP on 127.0.0.1; yields its port, always shut down."""
    ae = AE(ae_title="SCP")
    ae.maximum_pdu_size = max_pdu
    for name, value in options.items():
        setattr(ae, name, value)
    for sop_class in classes:
        ae.add_supported_context(sop_class, SYNTAXES)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        yield port
    finally:
        server.shutdown()


def ct_files(folder: Path, count: int, scale: str = "small") -> list[Path]:
    template = template_instance(DatasetSpec(scale=scale, modality="CT"))
    paths = []
    for number, ds in enumerate(clone_study(template, count)):
        path = folder / f"ct{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_files_arrive_byte_for_byte_through_small_pdus(tmp_path: Path) -> None:
    received: dict[str, bytes] = {}

    def on_store(event) -> int:
        received[event.request.AffectedSOPInstanceUID] = event.request.DataSet.getvalue()
        return 0x0000

    files = ct_files(tmp_path, 3, scale="realistic")  # ~0.5 MB each: ~130 PDUs of 4 KB
    with storage_scp(on_store, max_pdu=4096) as port:
        report = DimseClient("127.0.0.1", port, "SCP").store(files)
    assert report.ok and len(report.succeeded) == 3
    for path in files:
        raw = path.read_bytes()
        meta = read_file_meta(raw)
        assert meta is not None
        assert received[meta.sop_instance_uid] == raw[meta.dataset_offset :]


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_datasets_are_encoded_in_their_transfer_syntax(syntax: str) -> None:
    got = []

    def on_store(event) -> int:
        got.append((str(event.context.transfer_syntax), event.dataset))
        return 0x0000

    ds = next(iter(clone_study(template_instance(DatasetSpec(scale="small", modality="CT")), 1)))
    ds.file_meta.TransferSyntaxUID = syntax
    with storage_scp(on_store) as port:
        report = DimseClient("127.0.0.1", port, "SCP").store([ds])
    assert report.ok, report.failed and report.failed[0].error
    ((transfer_syntax, arrived),) = got
    assert transfer_syntax == syntax
    assert arrived.SOPInstanceUID == ds.SOPInstanceUID
    assert arrived.PatientName == ds.PatientName
    assert arrived.PixelData == ds.PixelData


def test_a_class_the_peer_refuses_fails_alone_with_the_reason(tmp_path: Path) -> None:
    mr = next(iter(clone_study(template_instance(DatasetSpec(scale="small", modality="MR")), 1)))
    mr.save_as(tmp_path / "mr.dcm", enforce_file_format=True)
    ct_files(tmp_path, 2)  # two CT beside the MR
    (tmp_path / "notes.txt").write_text("not DICOM")
    with storage_scp(lambda event: 0x0000) as port:
        report = DimseClient("127.0.0.1", port, "SCP").store([tmp_path])
    assert len(report.succeeded) == 2
    (failed,) = report.failed
    assert failed.sop_class_uid == MRImageStorage
    assert "did not accept SOP class" in failed.error
    assert report.skipped == [str(tmp_path / "notes.txt")]


def test_failure_status_is_reported_with_the_peer_comment(tmp_path: Path) -> None:
    def on_store(event) -> int:
        return 0xA700  # "out of resources"

    with storage_scp(on_store) as port:
        report = DimseClient("127.0.0.1", port, "SCP").store(ct_files(tmp_path, 2))
    assert [r.status.code for r in report.results] == [0xA700, 0xA700]
    assert all("0xA700 (failure)" in r.error for r in report.failed)


def test_called_ae_refused_names_the_peer_and_reason(tmp_path: Path) -> None:
    with storage_scp(lambda event: 0x0000, require_called_aet=True) as port:
        client = DimseClient("127.0.0.1", port, "NOT-SCP")
        with pytest.raises(DimseConnectionError) as caught:
            client.store(ct_files(tmp_path, 1))
    message = str(caught.value)
    assert f"NOT-SCP@127.0.0.1:{port}" in message
    assert "rejected permanently: called AE title not recognized" in message


def test_peer_abort_fails_that_instance_and_the_rest_go_on_a_new_association(
    tmp_path: Path,
) -> None:
    calls = []

    def on_store(event) -> int:
        calls.append(event.request.AffectedSOPInstanceUID)
        if len(calls) == 2:
            event.assoc.abort()
        return 0x0000

    files = ct_files(tmp_path, 4)
    with storage_scp(on_store) as port:
        report = DimseClient("127.0.0.1", port, "SCP", timeout_s=10).store(files)
    assert len(report.results) == 4
    (failed,) = report.failed
    assert "no C-STORE response" in failed.error
    assert len(report.succeeded) == 3


def test_a_peer_that_never_answers_times_out_naming_it(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted = []

    def accept() -> None:
        conn, _ = listener.accept()
        accepted.append(conn)  # hold it open, say nothing

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        client = DimseClient("127.0.0.1", port, "SILENT", timeout_s=1.5)
        with pytest.raises(DimseConnectionError) as caught:
            client.store(ct_files(tmp_path, 1))
        assert f"SILENT@127.0.0.1:{port}" in str(caught.value)
        assert "no answer within 1.5 s" in str(caught.value)
    finally:
        for conn in accepted:
            conn.close()
        listener.close()


def test_file_meta_reader_handles_files_pydicom_wrote(tmp_path: Path) -> None:
    (path,) = ct_files(tmp_path, 1)
    raw = path.read_bytes()
    meta = read_file_meta(raw)
    ds = dcmread(path)
    assert meta is not None
    assert meta.sop_class_uid == ds.SOPClassUID == CTImageStorage
    assert meta.sop_instance_uid == ds.SOPInstanceUID
    assert meta.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    assert read_file_meta(b"\0" * 200) is None  # no DICM prefix
    assert read_file_meta(raw[:140]) is None  # meta cut short
    without_uids = read_file_meta(raw[:132] + b"\x08\x00\x05\x00CS\x00\x00")
    assert without_uids is not None and without_uids.sop_instance_uid == ""


# -- C-GET -------------------------------------------------------------------------------


@contextmanager
def get_scp(datasets: list, *, abort_after: int | None = None) -> Iterator[int]:
    """A pynetdicom Q/R SCP answering any C-GET with `datasets` (optionally aborting)."""
    ae = AE(ae_title="QR")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet, SYNTAXES[:2])
    for sop_class in (CTImageStorage, MRImageStorage):
        ae.add_supported_context(sop_class, SYNTAXES, scu_role=False, scp_role=True)

    def on_get(event):
        yield len(datasets)
        for number, ds in enumerate(datasets):
            if abort_after is not None and number == abort_after:
                event.assoc.abort()
                return
            yield 0xFF00, ds

    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_GET, on_get)]
    )
    try:
        yield port
    finally:
        server.shutdown()


def _study(count: int) -> list:
    template = template_instance(DatasetSpec(scale="small", modality="CT"))
    return list(clone_study(template, count))


def test_c_get_receives_every_instance_as_sent_and_reports_refusals() -> None:
    study = _study(4)
    refused = str(study[2].SOPInstanceUID)
    seen = []

    def on_instance(instance) -> None:
        if instance.sop_instance_uid == refused:
            raise RuntimeError("cannot keep this one")  # answered 0xC211
        seen.append(instance)

    with get_scp(study) as port:
        client = DimseClient("127.0.0.1", port, "QR")
        result = client.get(
            "STUDY",
            {"StudyInstanceUID": study[0].StudyInstanceUID},
            on_instance=on_instance,
            keep=False,
        )
    assert (result.completed, result.failed) == (3, 1)
    assert result.failed_sop_instance_uids == [refused]
    assert not result.ok and result.instances == []  # keep=False: nothing held
    by_uid = {str(ds.SOPInstanceUID): ds for ds in study}
    for instance in seen:
        original = by_uid[instance.sop_instance_uid]
        assert instance.sop_class_uid == CTImageStorage
        assert instance.dataset.PixelData == original.PixelData
        assert instance.dataset.PatientName == original.PatientName


def test_c_get_broken_off_by_the_peer_is_a_result_not_a_hang() -> None:
    study = _study(5)
    with get_scp(study, abort_after=2) as port:
        client = DimseClient("127.0.0.1", port, "QR", timeout_s=10)
        result = client.get("STUDY", {"StudyInstanceUID": study[0].StudyInstanceUID})
    assert result.status.category == "failure" and not result.ok  # no final status
    assert result.completed == 2 and len(result.instances) == 2
