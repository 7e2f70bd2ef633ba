"""The harness's own C-STORE and C-GET (harness/dicom/wire.py) against real DICOM peers.

The peers are pynetdicom acceptors in this process (an independent DICOM implementation,
configured per test: small PDUs, refused AE titles, failure statuses, aborts, refused
sub-operations) and a socket that accepts and never answers. Orthanc, DCMTK and the
embedded PACS store and retrieve through the same code in every other test.
"""

from __future__ import annotations

import re
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
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
from pynetdicom import pdu as pdu_classes
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from harness.dicom.client import DimseClient
from harness.dicom.dimse import NO_DATASET, encode_command
from harness.dicom.part10 import read_file_meta
from harness.dicom.peer import DimseConnectionError
from harness.dicom.status import NO_STATUS
from harness.dicom.wire import AssociationFailed, TransferFailed, WireAssociation
from harness.launch.ports import free_port
from harness.resilience.proxy import FaultProxy
from synthetic_data.templates import clone_study, template_instance
from tests.helpers import run_cli

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
    template = template_instance(scale, "CT")
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

    ds = next(iter(clone_study(template_instance("small", "CT"), 1)))
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
    mr = next(iter(clone_study(template_instance("small", "MR"), 1)))
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
    template = template_instance("small", "CT")
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


# -- hostile peers -----------------------------------------------------------------------
# A raw socket in the test plays the peer (it is the peer, not a PACS under test): it answers
# with PDUs that are short, garbled, late or never sent, and records what the harness does.


class RawPeer:
    """Accepts one connection on 127.0.0.1, runs `script(conn, peer)`, then records every
    PDU the harness still sends until it closes the connection (`eof` is then set)."""

    def __init__(self, script: Callable[[socket.socket, RawPeer], None]) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(60)
        self.port = self.listener.getsockname()[1]
        self.after_script: list[bytes] = []
        self.eof = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(120)
            try:
                self.script(conn, self)
                while (received := recv_pdu(conn)) is not None:
                    self.after_script.append(received)
                self.eof.set()
            except (ConnectionResetError, BrokenPipeError):
                self.eof.set()
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        self.thread.join(timeout=60)


@contextmanager
def raw_peer(script: Callable[[socket.socket, RawPeer], None]) -> Iterator[RawPeer]:
    peer = RawPeer(script)
    try:
        yield peer
    finally:
        peer.close()


def recv_pdu(conn: socket.socket) -> bytes | None:
    """One whole PDU (header and body), or None when the other side closed."""
    data = b""
    wanted = 6
    while len(data) < wanted:
        chunk = conn.recv(wanted - len(data))
        if not chunk:
            return None
        data += chunk
        if len(data) == 6:
            wanted = 6 + struct.unpack(">I", data[2:6])[0]
    return data


def pynetdicom_ac(rq: bytes) -> bytes:
    """pynetdicom's A-ASSOCIATE-AC accepting every proposed context with its first syntax."""
    request = pdu_classes.A_ASSOCIATE_RQ()
    request.decode(rq)
    primitive = A_ASSOCIATE()
    primitive.application_context_name = request.application_context_name
    primitive.called_ae_title = request.called_ae_title
    primitive.calling_ae_title = request.calling_ae_title
    results = []
    for proposed in request.presentation_context:
        context = PresentationContext()
        context.context_id = proposed.context_id
        context.add_transfer_syntax(proposed.transfer_syntax[0])
        context.result = 0
        results.append(context)
    primitive.presentation_context_definition_results_list = results
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = "1.2.3.4"
    primitive.user_information = [maximum, class_uid]
    primitive.result = 0
    return pdu_classes.A_ASSOCIATE_AC(primitive).encode()


def accept_then(script: Callable[[socket.socket, RawPeer], None]) -> Callable:
    """A peer script: read the A-ASSOCIATE-RQ, accept it (pynetdicom's AC), then `script`."""

    def run(conn: socket.socket, peer: RawPeer) -> None:
        conn.sendall(pynetdicom_ac(recv_pdu(conn) or b""))
        script(conn, peer)

    return run


def read_c_store(conn: socket.socket) -> None:
    """Read P-DATA-TF PDUs up to the last dataset fragment (one PDV per PDU, as we send)."""
    while (received := recv_pdu(conn)) is not None:
        if received[0] == 0x04 and received[11] & 0x03 == 0x02:
            return


def hand_pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def hand_item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def hand_ac(items: bytes) -> bytes:
    """An A-ASSOCIATE-AC written by hand (PS3.8 9.3.3) around `items`."""
    fixed = struct.pack(">HH", 1, 0) + b"PEER".ljust(16) + b"HARNESS".ljust(16) + bytes(32)
    return hand_pdu(0x02, fixed + hand_item(0x10, b"1.2.840.10008.3.1.1.1") + items)


MAX_LENGTH = hand_item(0x50, hand_item(0x51, struct.pack(">I", 16384)))
PROVIDER_ABORT_INVALID = hand_pdu(0x07, bytes([0, 0, 2, 6]))  # source 2, reason 6
CT_PAIR = (CTImageStorage, ExplicitVRLittleEndian)
GROUP_LENGTH_TOO_LONG = struct.pack("<HHI", 0, 0, 0xFFFF) + bytes(4)  # (0000,0000), 65535 bytes


def associate(port: int, **options) -> WireAssociation:
    options.setdefault("timeout_s", 30)
    return WireAssociation("127.0.0.1", port, "PEER", "HARNESS", [CT_PAIR], **options)


def sockets_to(port: int) -> list:
    """This process's sockets still connected to `port` (the harness's end, not the peer's)."""
    return [c for c in psutil.Process().net_connections("tcp") if c.raddr and c.raddr[1] == port]


def rq_then_send(answer: bytes) -> Callable:
    def run(conn: socket.socket, peer: RawPeer) -> None:
        recv_pdu(conn)
        conn.sendall(answer)

    return run


@pytest.mark.parametrize("length", [0, 2])
def test_a_short_associate_rj_is_a_clear_failure_and_the_socket_is_closed(length: int) -> None:
    with raw_peer(rq_then_send(hand_pdu(0x03, bytes(length)))) as peer:
        with pytest.raises(AssociationFailed) as caught:
            associate(peer.port)
        assert f"A-ASSOCIATE-RJ of {length} bytes, 4 expected" in str(caught.value)
        assert peer.eof.wait(60), "the harness kept the connection open"
        assert sockets_to(peer.port) == []  # checked while the exception (and its frames) live
        assert peer.after_script == [PROVIDER_ABORT_INVALID]


def test_a_user_sees_the_malformed_answer_named_with_the_peer(tmp_path: Path) -> None:
    with raw_peer(rq_then_send(hand_pdu(0x03, b""))) as peer:
        with pytest.raises(DimseConnectionError) as caught:
            DimseClient("127.0.0.1", peer.port, "PEER").store(ct_files(tmp_path, 1))
    message = str(caught.value)
    assert f"PEER@127.0.0.1:{peer.port}" in message
    assert "malformed PDU from the peer: A-ASSOCIATE-RJ of 0 bytes, 4 expected" in message


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (
            hand_item(0x21, bytes(4))[:2] + b"\x00\x40" + bytes(4),
            "item 0x21 at offset 99 announces 64 bytes, only 4 left",
        ),
        (MAX_LENGTH + b"\x50\x00\x00", "3 stray bytes at offset 111"),
        (
            hand_item(0x50, hand_item(0x51, b"\x00\x40\x00")),
            "user information: maximum length sub-item of 3 bytes, 4 expected",
        ),
        (
            hand_item(0x50, hand_item(0x54, b"\x00\x20" + b"1.2.840.10008.5.1.4.1.1.2\x00\x01")),
            "role selection sub-item of 29 bytes with a UID of 32 bytes",
        ),
        (
            hand_item(0x21, b"\x01\x00\x00\x00") + MAX_LENGTH,
            "presentation context 1: accepted with 0 transfer syntaxes",
        ),
    ],
    ids=["context-too-long", "stray-bytes", "max-length-3", "role-uid-length", "no-syntax"],
)
def test_an_associate_ac_with_garbage_items_is_refused_naming_the_item(
    items: bytes, expected: str
) -> None:
    with raw_peer(rq_then_send(hand_ac(items))) as peer:
        with pytest.raises(AssociationFailed) as caught:
            associate(peer.port)
        assert "malformed PDU from the peer: A-ASSOCIATE-AC" in str(caught.value)
        assert expected in str(caught.value)
        assert peer.eof.wait(60)
        assert peer.after_script == [PROVIDER_ABORT_INVALID]
        assert sockets_to(peer.port) == []


def test_an_associate_ac_too_short_for_its_fixed_fields_is_refused() -> None:
    with raw_peer(rq_then_send(hand_pdu(0x02, bytes(10)))) as peer:
        with pytest.raises(AssociationFailed, match="A-ASSOCIATE-AC of 10 bytes, at least 68"):
            associate(peer.port)


def test_a_transfer_syntax_that_is_not_ascii_only_leaves_its_context_out() -> None:
    context = hand_item(0x21, b"\x01\x00\x00\x00" + hand_item(0x40, b"1.2.840.10008.1.2.1\xff"))

    def answer_then_release(conn: socket.socket, peer: RawPeer) -> None:
        recv_pdu(conn)
        conn.sendall(hand_ac(context + MAX_LENGTH))
        if (recv_pdu(conn) or b"")[:1] == b"\x05":
            conn.sendall(hand_pdu(0x06, bytes(4)))

    with raw_peer(answer_then_release) as peer:
        assoc = associate(peer.port)
        assert assoc.accepted == {} and assoc.peer_max_pdu == 16384
        assert len(sockets_to(peer.port)) == 1  # what the other tests see gone
        assoc.release()
        assert not assoc.is_open
        assert peer.eof.wait(60) and peer.after_script == []  # released, not aborted


def test_an_abort_during_negotiation_says_its_source_and_reason() -> None:
    with raw_peer(rq_then_send(PROVIDER_ABORT_INVALID)) as peer:
        with pytest.raises(AssociationFailed) as caught:
            associate(peer.port)
    assert str(caught.value) == (
        "aborted by the peer during negotiation "
        "(source 2 (service-provider), reason 6 (invalid PDU parameter value))"
    )


def test_an_abort_during_a_store_says_its_source_and_reason() -> None:
    def abort_the_store(conn: socket.socket, peer: RawPeer) -> None:
        read_c_store(conn)
        conn.sendall(hand_pdu(0x07, bytes([0, 0, 2, 2])))

    with raw_peer(accept_then(abort_the_store)) as peer:
        assoc = associate(peer.port)
        with pytest.raises(TransferFailed) as caught:
            assoc.store(assoc.accepted[CT_PAIR], CTImageStorage, "1.2.3", b"\0" * 100)
        assert not assoc.is_open
        assert peer.eof.wait(60)
    assert str(caught.value) == (
        "association aborted by the peer (source 2 (service-provider), reason 2 (unexpected PDU))"
    )


def never_answer(conn: socket.socket, peer: RawPeer) -> None:
    recv_pdu(conn)  # the A-ASSOCIATE-RQ; then only wait for the harness to close


def trickle(conn: socket.socket, peer: RawPeer) -> None:
    """Read the request, then an A-ASSOCIATE-AC header announcing 1000 bytes and a byte of
    them every 0.2 s, forever: each read returns something, so only a deadline for the whole
    answer ends the wait."""
    recv_pdu(conn)
    conn.sendall(b"\x02\x00" + struct.pack(">I", 1000))
    while not peer.stop.wait(0.2):
        conn.sendall(b"\x00")


@pytest.mark.parametrize("script", [never_answer, trickle], ids=["silent", "trickle"])
def test_a_peer_that_never_answers_the_request_is_left_when_artim_expires(script) -> None:
    with raw_peer(script) as peer:
        with pytest.raises(AssociationFailed) as caught:
            associate(peer.port, timeout_s=3600, artim_s=1)  # the DIMSE timeout is no bound
        assert str(caught.value) == (
            "no answer within 1 s to the A-ASSOCIATE-RQ (ARTIM timer, PS3.8 9.1.5)"
        )
        assert peer.eof.wait(60)
        assert sockets_to(peer.port) == []


def silent_release(conn: socket.socket, peer: RawPeer) -> None:
    conn.sendall(pynetdicom_ac(recv_pdu(conn) or b""))
    assert (recv_pdu(conn) or b"")[:1] == b"\x05"  # the A-RELEASE-RQ, never answered


def chatty_release(conn: socket.socket, peer: RawPeer) -> None:
    """Answer the A-RELEASE-RQ with P-DATA-TF every 0.2 s instead of an A-RELEASE-RP."""
    silent_release(conn, peer)
    while not peer.stop.wait(0.2):
        conn.sendall(hand_pdu(0x04, struct.pack(">IBB", 6, 1, 0) + bytes(4)))


@pytest.mark.parametrize("script", [silent_release, chatty_release], ids=["silent", "chatty"])
def test_a_peer_that_never_answers_the_release_is_aborted_when_artim_expires(script) -> None:
    with raw_peer(script) as peer:
        assoc = associate(peer.port, timeout_s=3600, artim_s=1)
        assoc.release()  # returns: neither the DIMSE timeout nor the peer holds it
        assert not assoc.is_open
        assert peer.eof.wait(60)
        if script is silent_release:
            assert peer.after_script == [hand_pdu(0x07, bytes(4))]  # A-ABORT, service-user
        assert sockets_to(peer.port) == []


@pytest.mark.parametrize(
    ("answer", "expected", "abort"),
    [
        (
            hand_pdu(0x04, struct.pack(">IBB", 1000, 1, 3) + bytes(4)),
            "malformed PDU from the peer: P-DATA-TF: PDV at offset 6 announces 1000 bytes, "
            "only 6 left in the PDU",
            PROVIDER_ABORT_INVALID,
        ),
        (
            hand_pdu(0x04, struct.pack(">IBB", 14, 1, 3) + GROUP_LENGTH_TOO_LONG),
            "malformed DIMSE message from the peer: command set: element (0000,0000) "
            "announces 65535 bytes, only 4 left",
            hand_pdu(0x07, bytes(4)),
        ),
        (
            hand_pdu(0x04, struct.pack(">IBB", 6, 99, 3) + bytes(4)),
            "PDV on presentation context 99, which was not accepted",
            PROVIDER_ABORT_INVALID,
        ),
        (
            b"\x04\x00\xff\xff\xff\xff",
            "peer sent a PDU of 4294967295 bytes (P-DATA-TF), more than the 16777216 we read",
            PROVIDER_ABORT_INVALID,
        ),
        (
            hand_pdu(0x09, bytes(4)),
            "malformed PDU from the peer: unknown PDU type 0x09",
            hand_pdu(0x07, bytes([0, 0, 2, 1])),
        ),
        (
            hand_pdu(0x04, struct.pack(">IBB", 2, 1, 0) * 65537),  # empty PDVs: memory
            "malformed PDU from the peer: P-DATA-TF: more than 65536 PDVs at offset 393222",
            PROVIDER_ABORT_INVALID,
        ),
    ],
    ids=["pdv-beyond-pdu", "command-element-beyond", "unknown-context", "huge-pdu", "type-9",
         "too-many-pdvs"],
)
def test_a_malformed_response_ends_the_store_with_a_clear_error(
    answer: bytes, expected: str, abort: bytes
) -> None:
    def answer_the_store(conn: socket.socket, peer: RawPeer) -> None:
        read_c_store(conn)
        conn.sendall(answer)

    with raw_peer(accept_then(answer_the_store)) as peer:
        assoc = associate(peer.port)
        with pytest.raises(TransferFailed) as caught:
            assoc.store(assoc.accepted[CT_PAIR], CTImageStorage, "1.2.3", b"\0" * 100)
        assert str(caught.value).startswith(expected)
        assert not assoc.is_open
        assert peer.eof.wait(60)
        assert peer.after_script == [abort]


@pytest.mark.parametrize(
    ("ct_roles", "expected_granted"),
    [
        ({"scu_role": False, "scp_role": False}, {MRImageStorage}),  # refused outright
        ({}, {MRImageStorage}),  # no role selection reply: default roles, we are SCU only
        ({"scu_role": False, "scp_role": True}, {CTImageStorage, MRImageStorage}),
    ],
    ids=["refused", "no-reply", "granted"],
)
def test_scp_roles_the_peer_does_not_grant_are_visible(ct_roles, expected_granted) -> None:
    """PS3.7 D.3.3.4, answered by pynetdicom: a C-GET caller can see which storage classes
    it may not receive."""
    ae = AE(ae_title="QR")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet, SYNTAXES[:2])
    ae.add_supported_context(CTImageStorage, SYNTAXES, **ct_roles)
    ae.add_supported_context(MRImageStorage, SYNTAXES, scu_role=False, scp_role=True)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        pairs = [
            (StudyRootQueryRetrieveInformationModelGet, ExplicitVRLittleEndian),
            (CTImageStorage, ExplicitVRLittleEndian),
            (MRImageStorage, ExplicitVRLittleEndian),
        ]
        assoc = WireAssociation(
            "127.0.0.1",
            port,
            "QR",
            "HARNESS",
            pairs,
            timeout_s=30,
            scp_roles=[CTImageStorage, MRImageStorage],
        )
        assoc.release()
    finally:
        server.shutdown()
    assert assoc.scp_roles_granted == expected_granted
    assert assoc.scp_roles_refused == {CTImageStorage, MRImageStorage} - expected_granted


# -- operation deadlines and caps (docs/safety.md): each script below ends by itself after a
# while with a proper answer, so a client without the bound fails the test instead of hanging


def dimse_pdu(fields: dict[int, int | str], context_id: int = 1) -> bytes:
    """One DIMSE command set, whole, in one P-DATA-TF (PS3.8 9.3.5, PS3.7 6.3)."""
    command = encode_command(fields)
    return hand_pdu(0x04, struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command)


def store_rsp(status: int) -> bytes:
    """The C-STORE-RSP (PS3.7 9.3.1.2) to the harness's first C-STORE-RQ."""
    return dimse_pdu({0x00000002: CTImageStorage, 0x00000100: 0x8001, 0x00000120: 1,
                      0x00000800: NO_DATASET, 0x00000900: status, 0x00001000: "1.2.3"})


def harness_spoke(conn: socket.socket, wait_s: float) -> bool:
    """Whether the harness sent something (its A-ABORT) or closed within `wait_s`."""
    return bool(select.select([conn], [], [], wait_s)[0])


def drip(conn: socket.socket, data: bytes, interval_s: float) -> None:
    """`data` a byte every `interval_s`, until the harness speaks or closes."""
    for byte in data:
        if harness_spoke(conn, interval_s):
            return
        conn.sendall(bytes([byte]))


def store_over(peer: RawPeer, timeout_s: float) -> str:
    """One C-STORE to `peer`; the TransferFailed message it ends with."""
    assoc = associate(peer.port, timeout_s=timeout_s)
    with pytest.raises(TransferFailed) as caught:
        assoc.store(assoc.accepted[CT_PAIR], CTImageStorage, "1.2.3", b"\0" * 100)
    assert not assoc.is_open
    return str(caught.value)


DEADLINE = re.compile(
    r"C-STORE-RSP not complete within the operation deadline of 2\.0 s "
    r"\(2 s \+ \d+ bytes at 64 KiB/s\)"
)
ABORT = hand_pdu(0x07, bytes(4))  # A-ABORT, source service-user


def test_a_peer_dripping_its_answer_is_cut_off_at_the_operation_deadline() -> None:
    def drip_the_answer(conn: socket.socket, peer: RawPeer) -> None:
        read_c_store(conn)
        drip(conn, store_rsp(0x0000), 0.2)  # ~100 bytes: 20 s, each read well within 2 s

    with raw_peer(accept_then(drip_the_answer)) as peer:
        message = store_over(peer, timeout_s=2)
        assert peer.eof.wait(60)
        assert peer.after_script == [ABORT]
    assert DEADLINE.fullmatch(message), message


@pytest.mark.parametrize(
    ("interval_s", "expected"),
    [(0.2, DEADLINE), (0.0, re.compile(r"more than 1000 pending C-STORE-RSPs in a row"))],
    ids=["trickled", "flood"],
)
def test_a_peer_answering_pending_forever_is_cut_off(interval_s: float, expected) -> None:
    def pending_then_success(conn: socket.socket, peer: RawPeer) -> None:
        read_c_store(conn)
        for _ in range(1200 if interval_s == 0 else 200):  # 40 s when trickled
            if interval_s and harness_spoke(conn, interval_s):
                return
            conn.sendall(store_rsp(0xFF00))
        conn.sendall(store_rsp(0x0000))

    with raw_peer(accept_then(pending_then_success)) as peer:
        message = store_over(peer, timeout_s=2)
        assert peer.eof.wait(60)
    assert expected.fullmatch(message), message


@pytest.mark.parametrize("fragment_size", [0, 1000], ids=["empty", "1000-bytes"])
def test_a_command_set_that_never_ends_is_refused_at_the_cap(fragment_size: int) -> None:
    """Non-last command fragments (PS3.8 E.2) without end: refused at 1 MiB, counting each
    PDV's 6 header bytes, so empty fragments do not go on for ever either."""

    def endless_command(conn: socket.socket, peer: RawPeer) -> None:
        read_c_store(conn)
        pdv = struct.pack(">IBB", fragment_size + 2, 1, 0x01) + b"\0" * fragment_size
        pdu = hand_pdu(0x04, pdv * (6000 // len(pdv)))
        for _ in range(2 * (1 << 20) // len(pdu)):  # 2 MiB of PDVs, then silence
            if harness_spoke(conn, 0):
                return
            conn.sendall(pdu)

    with raw_peer(accept_then(endless_command)) as peer:
        message = store_over(peer, timeout_s=30)
        assert peer.eof.wait(60)
    assert message == "command set longer than 1048576 bytes"


def endless_sub_operation(context_id: int) -> Callable:
    """A peer script: a C-GET answered by a C-STORE-RQ whose data set never ends (2 MiB of
    non-last fragments on presentation context `context_id`, then silence)."""

    def run(conn: socket.socket, peer: RawPeer) -> None:
        read_c_store(conn)  # the C-GET-RQ and its identifier
        conn.sendall(dimse_pdu({0x00000002: CTImageStorage, 0x00000100: 0x0001,
                                0x00000110: 7, 0x00000700: 0, 0x00000800: 0x0001,
                                0x00001000: "1.2.3.4"}, context_id=context_id))
        fragment = hand_pdu(0x04, struct.pack(">IBB", 16002, context_id, 0x00) + bytes(16000))
        for _ in range(128):
            if harness_spoke(conn, 0):
                return
            conn.sendall(fragment)

    return accept_then(run)


def test_a_c_get_sub_operation_that_never_ends_is_refused_at_the_cap() -> None:
    get_pair = (StudyRootQueryRetrieveInformationModelGet, ExplicitVRLittleEndian)
    with raw_peer(endless_sub_operation(3)) as peer:
        assoc = WireAssociation("127.0.0.1", peer.port, "PEER", "HARNESS", [get_pair, CT_PAIR],
                                timeout_s=30, scp_roles=[CTImageStorage],
                                max_dataset_bytes=1 << 20)
        stored = []
        with pytest.raises(TransferFailed) as caught:
            assoc.get(assoc.accepted[get_pair], b"", lambda *sub: stored.append(sub) or 0)
        assert peer.eof.wait(60)
    assert str(caught.value) == "dataset longer than 1048576 bytes, unfinished"
    assert stored == []

    # through the client: a connection error naming the peer (exit 3 in the CLI)
    with raw_peer(endless_sub_operation(5)) as peer:  # 1, 3: C-GET; 5: CT, explicit VR LE
        client = DimseClient("127.0.0.1", peer.port, "PEER", max_dataset_bytes=1 << 20)
        with pytest.raises(DimseConnectionError) as caught:
            client.get("STUDY", {"StudyInstanceUID": "1.2.3"}, sop_classes=[CTImageStorage])
        assert peer.eof.wait(60)
    assert str(caught.value) == (f"peer PEER@127.0.0.1:{peer.port}: C-GET broken off: "
                                 "dataset longer than 1048576 bytes, unfinished")


def test_a_slow_but_honest_link_is_not_cut_off(tmp_path: Path) -> None:
    """Through a link of 2 Mbit/s each instance (~0.5 MB) takes ~2 s, twice timeout_s: the
    deadline grows with the bytes moved, so C-STORE and C-GET both succeed."""
    received: dict[str, bytes] = {}

    def on_store(event) -> int:
        received[event.request.AffectedSOPInstanceUID] = event.request.DataSet.getvalue()
        return 0x0000

    files = ct_files(tmp_path, 3, scale="realistic")
    with storage_scp(on_store) as port, FaultProxy(target_port=port, name="slow") as link:
        link.bandwidth_bps = 2e6
        report = DimseClient("127.0.0.1", link.port, "SCP", timeout_s=1).store(files)
    assert report.ok, [r.error for r in report.failed]
    for path in files:
        raw = path.read_bytes()
        meta = read_file_meta(raw)
        assert meta is not None
        assert received[meta.sop_instance_uid] == raw[meta.dataset_offset :]
    assert report.elapsed_s > 3 * 1  # longer than timeout_s for each instance

    study = list(clone_study(template_instance("realistic", "CT"), 3))
    with get_scp(study) as port, FaultProxy(target_port=port, name="slow") as link:
        link.bandwidth_bps = 2e6
        client = DimseClient("127.0.0.1", link.port, "QR", timeout_s=1)
        got = client.get("STUDY", {"StudyInstanceUID": study[0].StudyInstanceUID},
                         sop_classes=[CTImageStorage])
    assert got.ok and got.completed == 3
    assert sorted(i.dataset.PixelData for i in got.instances) == sorted(
        ds.PixelData for ds in study)
    assert got.elapsed_s > 3 * 1


def test_a_c_move_answered_with_pending_forever_is_aborted() -> None:
    """pynetdicom's dimse_timeout bounds each message, not the C-MOVE: the harness's
    watchdog aborts when no sub-operation completes within timeout_s."""
    pending = dimse_pdu({0x00000002: StudyRootQueryRetrieveInformationModelMove,
                         0x00000100: 0x8021, 0x00000120: 1, 0x00000800: NO_DATASET,
                         0x00000900: 0xFF00, 0x00001020: 5, 0x00001021: 0,
                         0x00001022: 0, 0x00001023: 0})
    final = dimse_pdu({0x00000002: StudyRootQueryRetrieveInformationModelMove,
                       0x00000100: 0x8021, 0x00000120: 1, 0x00000800: NO_DATASET,
                       0x00000900: 0x0000, 0x00001021: 5, 0x00001022: 0, 0x00001023: 0})

    def pending_then_success(conn: socket.socket, peer: RawPeer) -> None:
        read_c_store(conn)  # the C-MOVE-RQ and its identifier
        for _ in range(200):  # 60 s of pending, each within the DIMSE timeout
            if harness_spoke(conn, 0.3):
                return
            conn.sendall(pending)
        conn.sendall(final)

    with raw_peer(accept_then(pending_then_success)) as peer:
        result = DimseClient("127.0.0.1", peer.port, "PEER", timeout_s=2).move(
            "ELSEWHERE", "STUDY", {"StudyInstanceUID": "1.2.3"})
        assert peer.eof.wait(60)
        assert peer.after_script == [ABORT]
    assert result.status == NO_STATUS and not result.ok


def test_pynetdicom_operations_end_however_a_peer_drips() -> None:
    """pynetdicom reads a PDU to its announced end before it looks at any timer: a dripped
    A-ASSOCIATE-AC or C-ECHO-RSP would hold C-ECHO for as long as the drip lasts."""
    echo_rsp = dimse_pdu({0x00000002: "1.2.840.10008.1.1", 0x00000100: 0x8030,
                          0x00000120: 1, 0x00000800: NO_DATASET, 0x00000900: 0x0000})

    def drip_the_ac(conn: socket.socket, peer: RawPeer) -> None:
        drip(conn, pynetdicom_ac(recv_pdu(conn) or b""), 0.3)  # ~45 s

    def drip_the_echo_rsp(conn: socket.socket, peer: RawPeer) -> None:
        recv_pdu(conn)  # the C-ECHO-RQ: a command alone, one PDU
        drip(conn, echo_rsp, 0.3)  # ~25 s

    with raw_peer(drip_the_ac) as peer:
        with pytest.raises(DimseConnectionError) as caught:
            DimseClient("127.0.0.1", peer.port, "PEER", timeout_s=2).echo()
        assert peer.eof.wait(60)
    assert "association not established within 2 s" in str(caught.value)
    assert f"PEER@127.0.0.1:{peer.port}" in str(caught.value)

    with raw_peer(accept_then(drip_the_echo_rsp)) as peer:
        echoed = DimseClient("127.0.0.1", peer.port, "PEER", timeout_s=2).echo()
        assert peer.eof.wait(60)
        assert peer.after_script == [ABORT]
    assert echoed.status == NO_STATUS


def test_store_to_a_dripping_peer_is_one_line_and_exit_3(tmp_path: Path) -> None:
    """`pacs-harness store` with its default timeout (30 s): a peer dripping its answer a
    byte a second would hold it ~2 minutes without the operation deadline."""

    def drip_the_answer(conn: socket.socket, peer: RawPeer) -> None:
        read_c_store(conn)
        drip(conn, store_rsp(0x0000), 1.0)

    (path,) = ct_files(tmp_path, 1)
    with raw_peer(accept_then(drip_the_answer)) as peer:
        topology = tmp_path / "t.yaml"
        topology.write_text(
            "name: drip\nnodes:\n  dripper: {kind: external, ae_title: PEER, "
            f"host: 127.0.0.1, dicom_port: {peer.port}, writable: true}}\n")
        proc = run_cli("store", "--topology", str(topology), "--to", "dripper", str(path))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output
    assert "Traceback" not in output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert re.fullmatch(
        rf"error: peer PEER@127\.0\.0\.1:{peer.port}: C-STORE of {re.escape(str(path))} "
        r"broken off: C-STORE-RSP not complete within the operation deadline of 30\.\d s "
        r"\(30 s \+ \d+ bytes at 64 KiB/s\)",
        errors[0],
    ), errors[0]
