"""HL7 v2 patient updates (ADT^A08): the embedded PACS's MLLP listener and Orthanc through its
REST API, checked over DICOM (C-FIND, a C-GET'd instance) and against the stored files read
with pydicom and Orthanc's own REST answers; the MLLP client's deadlines and framing errors
against small misbehaving listeners."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from harness.fixtures import pacs_cluster_factory
from harness.hl7.checks import check_update, studies_of
from harness.hl7.deliver import send_update
from harness.hl7.messages import (
    PatientIdentity,
    build_a08,
    parse_ack,
    pn_to_xpn,
    synthetic_identity,
)
from harness.hl7.mllp import MllpError, frame, send_message
from harness.hl7.orthanc_apply import MEANS
from synthetic_data.samples import sample_study

cluster = pacs_cluster_factory(
    "name: hl7\nnodes:\n  pacs: {kind: embedded}\n  orthanc: {kind: orthanc}\n",
    scope="module", requires=("Orthanc",),
)


def stored_patient(node, seed: int, studies: int = 2) -> tuple[str, set[str]]:
    """A patient of `studies` two-instance studies stored on the node: (PatientID, study UIDs)."""
    patient_id = f"HL7T{seed}"
    uids = set()
    for offset in range(studies):
        study = sample_study(seed=seed * 10 + offset, instances=2)
        for ds in study:
            ds.PatientID, ds.PatientName = patient_id, "OLDNAME^ANNA"
            ds.PatientBirthDate, ds.PatientSex = "19500101", "F"
        assert node.dimse().store(study).ok
        uids.add(study[0].StudyInstanceUID)
    return patient_id, uids


def stored_files(node, patient_id: str) -> list[Path]:
    """The embedded PACS's files of the patient, found by reading every stored file."""
    found = []
    for path in sorted((node.storage_dir / "files").rglob("*.dcm")):
        if dcmread(path, stop_before_pixels=True).PatientID == patient_id:
            found.append(path)
    return found


# -- the embedded PACS over MLLP ---------------------------------------------------------


def test_a08_updates_every_study_in_index_and_files(cluster):
    node = cluster.node("pacs")
    patient_id, uids = stored_patient(node, seed=1)
    new = PatientIdentity(patient_id, "NEWNAME^BERTA^^DR", "19610203", "M")

    delivery = send_update(node, new)
    assert delivery.applied, delivery.detail
    assert delivery.means == f"HL7 MLLP {node.host}:{node.hl7_port}"

    result = check_update(node, new, uids, delivery)
    assert result["verified"], result["observed"]
    assert result["studies"] == 2
    files = stored_files(node, patient_id)
    assert len(files) == 4  # two studies of two instances, every file rewritten
    for path in files:
        ds = dcmread(path)
        assert (str(ds.PatientName), ds.PatientBirthDate, ds.PatientSex) == (
            "NEWNAME^BERTA^^DR", "19610203", "M")
        assert ds.StudyInstanceUID in uids  # UIDs unchanged


def test_a08_not_applied_names_the_study_that_keeps_the_old_name(cluster):
    node = cluster.node("pacs")
    patient_id, uids = stored_patient(node, seed=2, studies=1)
    new = PatientIdentity(patient_id, "RENAMED^CARL", "19500101", "F")

    result = check_update(node, new, uids)  # no message sent

    (study,) = uids
    assert not result["verified"]
    assert result["observed"] == [
        f"study {study} still has PatientName 'OLDNAME^ANNA' at C-FIND "
        "(expected 'RENAMED^CARL')",
        f"study {study}: the C-GET instance has PatientName 'OLDNAME^ANNA' "
        "(expected 'RENAMED^CARL')",
    ]


def test_unknown_patient_is_answered_ae_with_the_reason(cluster):
    node = cluster.node("pacs")
    delivery = send_update(node, synthetic_identity(7, "NOSUCHPATIENT"))
    assert not delivery.applied
    assert delivery.detail == ("ACK AE: unknown patient 'NOSUCHPATIENT': no stored instance "
                               "has this PatientID")


def test_malformed_and_unsupported_messages_are_rejected(cluster):
    node = cluster.node("pacs")
    patient_id, uids = stored_patient(node, seed=3, studies=1)
    message, control = build_a08(PatientIdentity(patient_id, "SHOULD^NOTAPPLY"))

    unsupported = message.replace("ADT^A08^ADT_A01", "ORU^R01^ORU_R01")
    answer = send_message(node.host, node.hl7_port, unsupported, control).ack
    assert (answer.code, answer.text) == (
        "AR", "unsupported message type 'ORU^R01^ORU_R01' (this receiver takes ADT^A08 and "
              "ADT^A40)")

    no_id = message.replace(f"PID|||{patient_id}|", "PID||||")
    answer = send_message(node.host, node.hl7_port, no_id, control).ack
    assert (answer.code, answer.text) == ("AE", "PID-3 (patient identifier) is empty")

    with socket.create_connection((node.host, node.hl7_port), timeout=10) as raw:
        raw.sendall(frame("this is no HL7 message"))
        reply = raw.recv(4096)
    assert b"MSA|AR||no MSH segment: not an HL7 v2 message" in reply

    found = studies_of(node, patient_id)
    assert [str(m.PatientName) for m in found.values()] == ["OLDNAME^ANNA"]


def test_the_listener_drops_unframed_and_oversized_data_and_keeps_serving(cluster):
    node = cluster.node("pacs")
    with socket.create_connection((node.host, node.hl7_port), timeout=10) as raw:
        raw.sendall(b"MSH|^~\\&|no start block\x1c\x0d")
        assert raw.recv(4096) == b""  # closed without an answer
    with socket.create_connection((node.host, node.hl7_port), timeout=30) as raw:
        try:
            raw.sendall(b"\x0b" + b"x" * (1024 * 1024 + 70_000))
        except OSError:
            pass  # closed while we were still sending: as good
        with contextlib.suppress(ConnectionResetError):
            assert raw.recv(4096) == b""
    patient_id, uids = stored_patient(node, seed=5, studies=1)
    new = PatientIdentity(patient_id, "STILL^SERVING", "19500101", "F")
    assert send_update(node, new).applied
    assert check_update(node, new, uids)["verified"]


def test_the_listener_is_off_by_default(tmp_path):
    """Without --hl7-port the embedded PACS opens no other port than its DICOM one."""
    from harness.embedded_pacs.__main__ import parse_args

    args = parse_args(["--ae-title", "X", "--port", "0", "--storage", str(tmp_path)])
    assert args.hl7_port is None


# -- Orthanc through REST ----------------------------------------------------------------


def test_orthanc_a08_through_rest_keeps_uids_and_says_so(cluster):
    node = cluster.node("orthanc")
    patient_id, uids = stored_patient(node, seed=4)
    rest = node.rest()
    instances_before = rest.statistics()["CountInstances"]
    new = PatientIdentity(patient_id, "NEWNAME^DORA", "19700707", "F")

    delivery = send_update(node, new)

    assert delivery.applied and delivery.means == MEANS
    assert "not HL7" in delivery.means
    result = check_update(node, new, uids, delivery)
    assert result["verified"], result["observed"]
    assert rest.statistics()["CountInstances"] == instances_before  # rewritten, not copied
    patient = rest.post_json("/tools/find", {"Level": "Patient", "Expand": True,
                                             "Query": {"PatientID": patient_id}})
    assert [p["MainDicomTags"]["PatientName"] for p in patient] == ["NEWNAME^DORA"]
    studies = {rest.get_json(f"/studies/{s}")["MainDicomTags"]["StudyInstanceUID"]
               for s in patient[0]["Studies"]}
    assert studies == uids


# -- the MLLP client against misbehaving listeners ---------------------------------------


@pytest.fixture
def listener() -> Iterator[Callable[[Callable[[socket.socket], None]], int]]:
    """A loopback listener running `behave(connection)` for each connection; its port."""
    servers: list[socket.socket] = []
    done = threading.Event()

    def start(behave: Callable[[socket.socket], None]) -> int:
        server = socket.create_server(("127.0.0.1", 0))
        servers.append(server)

        def run() -> None:
            while not done.is_set():
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn:
                    behave(conn)

        threading.Thread(target=run, daemon=True).start()
        return server.getsockname()[1]

    yield start
    done.set()
    for server in servers:
        server.close()


def _read_until_end(conn: socket.socket) -> None:
    data = b""
    while not data.endswith(b"\x1c\x0d"):
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk


def _silent(conn: socket.socket) -> None:
    _read_until_end(conn)
    conn.recv(1)  # holds the connection until the client gives up


MESSAGE, CONTROL = build_a08(PatientIdentity("P1", "DOE^JANE"))


@pytest.mark.parametrize(
    ("behave", "expected"),
    [
        (_silent, "no ACK before the deadline (received nothing)"),
        (lambda c: (_read_until_end(c), c.sendall(b"\x0bMSH|^~\\&|X"), c.recv(1)),
         "no ACK before the deadline (received 11 bytes without 0x1C 0x0D)"),
        (lambda c: (_read_until_end(c), c.sendall(b"MSA|AA|x\x1c\x0d")), "not MLLP framing"),
        (lambda c: (_read_until_end(c), c.sendall(b"\x0bnonsense\x1c\x0d")), "is no ACK"),
        (lambda c: _read_until_end(c), "closed the connection before a complete ACK"),
    ],
    ids=["silent", "unterminated", "unframed", "not-hl7", "closed"],
)
def test_framing_errors_and_silence_end_at_the_deadline_naming_the_peer(listener, behave,
                                                                        expected):
    port = listener(behave)
    with pytest.raises(MllpError) as caught:
        send_message("127.0.0.1", port, MESSAGE, CONTROL, timeout_s=1.5)
    text = str(caught.value)
    assert text.startswith(f"HL7 peer 127.0.0.1:{port}: ")
    assert expected in text and "\n" not in text


def test_an_endless_answer_is_cut_at_the_buffer_bound(listener):
    def flood(conn: socket.socket) -> None:
        _read_until_end(conn)
        try:
            conn.sendall(b"\x0b" + b"x" * 200_000)
        except OSError:
            pass

    port = listener(flood)
    with pytest.raises(MllpError, match=r"more than 65536 bytes without an end of block"):
        send_message("127.0.0.1", port, MESSAGE, CONTROL, timeout_s=10)


def test_nobody_listening_is_one_line_naming_the_peer():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(MllpError, match=rf"^HL7 peer 127\.0\.0\.1:{port}: cannot connect"):
        send_message("127.0.0.1", port, MESSAGE, CONTROL, timeout_s=2)


def test_an_ack_for_another_message_is_refused(listener):
    def other(conn: socket.socket) -> None:
        _read_until_end(conn)
        conn.sendall(frame("MSH|^~\\&|P|S|H|H|20260101||ACK^A08^ACK|9|P|2.5\rMSA|AA|OTHER"))

    port = listener(other)
    with pytest.raises(MllpError, match=rf"ACK for message 'OTHER', sent '{CONTROL}'"):
        send_message("127.0.0.1", port, MESSAGE, CONTROL, timeout_s=5)


# -- message building --------------------------------------------------------------------


def test_names_swap_prefix_and_suffix_between_dicom_and_hl7():
    assert pn_to_xpn("DOE^JOHN^Q^DR^JR") == "DOE^JOHN^Q^JR^DR"  # PS3.5 6.2 / HL7 2.A.89


def test_a08_structure_as_a_receiver_parses_it():
    message, control = build_a08(PatientIdentity("ID^7", "O'NEIL^ANN", "20000229", "F"))
    segments = dict(line.split("|", 1) for line in message.split("\r"))
    assert segments["PID"].split("|")[2] == "ID\\S\\7"  # the ^ escaped (HL7 2.7.4)
    assert segments["PID"].split("|")[6:8] == ["20000229", "F"]
    assert segments["MSH"].split("|")[7:11] == ["ADT^A08^ADT_A01", control, "P", "2.5"]
    ack = parse_ack(f"MSH|^~\\&|A|B|C|D|1||ACK|2|P|2.5\rMSA|AA|{control}".encode(), "peer")
    assert ack.accepted and ack.control_id == control
