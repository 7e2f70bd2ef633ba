"""The embedded PACS against hostile input: wildcard patterns built to backtrack, and raw-socket
peers that announce huge PDUs, drip, stall or send junk, while honest peers keep being served.

Servers are real subprocesses on 127.0.0.1 (started by tests/test_embedded_server.py's
``start_node``), always stopped by a finalizer.
"""

from __future__ import annotations

import fnmatch
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind, Verification

from harness.dicom.pdu import associate_rq, pdata_header
from harness.embedded_pacs.matching import wildcard_match
from tests.test_embedded_server import (
    HOST,
    Node,
    client,
    make_image,
    start_node,
    store,
    write_peers,
)

# ---------------------------------------------------------------------------------------------
# Wildcard matching (PS3.4 C.2.2.2.4)
# ---------------------------------------------------------------------------------------------


def reference_match(pattern: str, value: str, ignore_case: bool) -> bool:
    """fnmatch's semantics restricted to ``*`` and ``?`` (``[`` escaped): an independent means."""
    if ignore_case:
        pattern, value = pattern.lower(), value.lower()
    return fnmatch.fnmatchcase(value, pattern.replace("[", "[[]"))


@settings(max_examples=600, deadline=None)
@given(
    pattern=st.text(alphabet="ab*?[A", max_size=8),
    value=st.text(alphabet="abAB[", max_size=10),
    ignore_case=st.booleans(),
)
def test_wildcard_match_agrees_with_fnmatch(pattern: str, value: str, ignore_case: bool) -> None:
    assert wildcard_match(pattern, value, ignore_case) == reference_match(
        pattern, value, ignore_case
    )


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("*", "", True),
        ("?", "", False),
        ("DOE^*", "DOE^JOHN", True),
        ("*^J?HN", "DOE^JOHN", True),
        ("*A*A*", "A", False),
        ("A*A", "A", False),
        ("A*A", "AA", True),
    ],
)
def test_wildcard_examples(pattern: str, value: str, expected: bool) -> None:
    assert wildcard_match(pattern, value) is expected


@pytest.mark.timeout(60)
def test_pathological_pattern_completes() -> None:
    """A backtracking matcher takes ~10x longer per ``*A``; this one finishes (the test timeout
    bounds it, no timing assert)."""
    value = "A" * 5000
    assert not wildcard_match("*A" * 40 + "*B", value)
    assert wildcard_match("*A" * 40 + "*", value)
    assert not wildcard_match("*a*a*a*a*a*a*a*a*b", value, ignore_case=True)


# ---------------------------------------------------------------------------------------------
# Hostile peers on the wire
# ---------------------------------------------------------------------------------------------

TIMEOUT_S = 2  # the node's --timeout: ARTIM and per-PDU deadline, so tests see reaping soon
RSS_LIMIT_KB = 400 * 1024


@pytest.fixture
def guarded(tmp_path: Path, request: pytest.FixtureRequest) -> Node:
    peers = tmp_path / "peers.json"
    write_peers(peers, {})
    return start_node(
        "GUARD",
        tmp_path / "guard",
        request.addfinalizer,
        peers=peers,
        extra_args=("--timeout", str(TIMEOUT_S)),
    )


def rss_kb(node: Node) -> int:
    """Resident memory of the server process, from the kernel (/proc/PID/status)."""
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")


def echo_ok(node: Node) -> bool:
    assoc = client("ECHOSCU", (Verification, [ExplicitVRLittleEndian])).associate(
        HOST, node.port, ae_title=node.ae_title
    )
    if not assoc.is_established:
        return False
    try:
        return int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()


def store_ok(node: Node, number: int) -> bool:
    image = make_image(
        sop_class=CTImageStorage,
        patient=("Hostile^Test", "PAT-H"),
        study=generate_uid(),
        series=generate_uid(),
        modality="CT",
        study_date="20240101",
        number=number,
        ts=ExplicitVRLittleEndian,
    )
    return store(node, [image]) == [0]


def connect(node: Node) -> socket.socket:
    sock = socket.create_connection((HOST, node.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def closed_by_server(sock: socket.socket, timeout_s: float = 30) -> bool:
    """Wait (bounded) for the server to close: EOF or reset; any PDU it sends first is read."""
    sock.settimeout(timeout_s)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def read_pdu(sock: socket.socket) -> bytes:
    header = recv_exactly(sock, 6)
    return header + recv_exactly(sock, int.from_bytes(header[2:6], "big"))


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, f"connection closed after {len(data)} of {count} bytes"
        data += chunk
    return data


def rq(node: Node, calling: str = "ECHOSCU", called: str | None = None) -> bytes:
    pairs = [(Verification, ImplicitVRLittleEndian)]
    return associate_rq(called or node.ae_title, calling, pairs, max_pdu=16384)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


@pytest.mark.timeout(180)
def test_oversized_pdu_announcement_is_dropped_before_its_body(
    guarded: Node, sockets: list[socket.socket]
) -> None:
    sock = connect(guarded)
    sockets.append(sock)
    sock.sendall(b"\x01\x00\xff\xff\xff\xff")
    chunk = b"\x00" * 65536
    refused = False
    for _ in range(4096):  # 256 MiB at most; the server hangs up long before
        try:
            sock.sendall(chunk)
        except OSError:
            refused = True
            break
    assert refused, "256 MiB accepted into a PDU announcing 4 GiB"
    assert rss_kb(guarded) < RSS_LIMIT_KB
    assert echo_ok(guarded)
    assert "dropped: PDU of 4294967295 bytes announced" in "".join(guarded.log)


@pytest.mark.timeout(180)
def test_truncated_and_dripping_association_requests_are_dropped(
    guarded: Node, sockets: list[socket.socket]
) -> None:
    request = rq(guarded)
    truncated = connect(guarded)
    sockets.append(truncated)
    truncated.sendall(request[: len(request) // 2])
    truncated.shutdown(socket.SHUT_WR)
    assert closed_by_server(truncated)

    dripping = connect(guarded)
    sockets.append(dripping)
    dripping.settimeout(0.2)
    sent = 0
    for byte in request:  # one byte each 0.2 s: the whole RQ would take longer than TIMEOUT_S
        try:
            dripping.sendall(bytes([byte]))
            sent += 1
            if dripping.recv(1) == b"":
                break
        except TimeoutError:
            continue
        except OSError:
            break
    assert sent < len(request), "the server waited for a dripped A-ASSOCIATE-RQ to complete"
    assert echo_ok(guarded)  # dropped by the reader's deadline or by ARTIM, whichever fires


@pytest.mark.timeout(300)
def test_stalled_transfers_neither_lock_others_out_nor_stay(
    guarded: Node, sockets: list[socket.socket]
) -> None:
    """32 peers associate, start a P-DATA-TF and stall; others are still served, and the
    stalled connections are reaped by the per-PDU deadline."""
    for _ in range(32):
        sock = connect(guarded)
        sockets.append(sock)
        sock.sendall(rq(guarded))
        assert read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
        sock.sendall(pdata_header(1, 0x03, 1000) + b"\x00" * 10)  # 10 of 1000 bytes
    assert echo_ok(guarded)
    assert store_ok(guarded, 1)
    assert all(closed_by_server(sock) for sock in sockets)
    assert echo_ok(guarded)
    assert rss_kb(guarded) < RSS_LIMIT_KB


@pytest.mark.timeout(300)
def test_junk_connections_are_dropped_at_once(guarded: Node, sockets: list[socket.socket]) -> None:
    for round_number in range(3):
        batch = []
        for _ in range(32):
            sock = connect(guarded)
            sockets.append(sock)
            batch.append(sock)
            sock.sendall(b"GET / HTTP")  # 10 bytes, not a PDU
        assert echo_ok(guarded)
        assert store_ok(guarded, round_number + 2)
        # dropped well before the ARTIM deadline (bounded wait, no timing assert)
        assert all(closed_by_server(sock) for sock in batch)
    assert "dropped: not DICOM (first byte 0x47)" in "".join(guarded.log)


@pytest.mark.timeout(300)
def test_silent_connections_do_not_count_against_the_association_limit(
    tmp_path: Path, request: pytest.FixtureRequest, sockets: list[socket.socket]
) -> None:
    """More silent connections than the association limit (128), held within ARTIM (30 s
    here): an honest peer still associates, stores and echoes."""
    peers = tmp_path / "peers.json"
    write_peers(peers, {})
    node = start_node("PATIENT", tmp_path / "patient", request.addfinalizer, peers=peers)
    for _ in range(150):
        sockets.append(connect(node))
    assert echo_ok(node)
    assert store_ok(node, 1)
    assert rss_kb(node) < RSS_LIMIT_KB


def rejection(node: Node, calling: str, called: str) -> tuple[int, int, int]:
    """(result, source, reason) of the A-ASSOCIATE-RJ the node answers (PS3.8 9.3.4)."""
    with connect(node) as sock:
        sock.sendall(rq(node, calling=calling, called=called))
        answer = read_pdu(sock)
    assert answer[0] == 0x03, f"PDU type 0x{answer[0]:02X}, expected A-ASSOCIATE-RJ"
    return answer[7], answer[8], answer[9]


def test_unknown_calling_and_wrong_called_ae_titles_are_refused(guarded: Node) -> None:
    assert rejection(guarded, "STRANGER", "GUARD") == (1, 1, 3)
    assert rejection(guarded, "ECHOSCU", "SOMEONE") == (1, 1, 7)
    assert echo_ok(guarded)


@pytest.mark.timeout(180)
def test_sigterm_ends_the_process_during_a_pathological_find(guarded: Node) -> None:
    long_name = "A" * 60
    image = make_image(
        sop_class=CTImageStorage,
        patient=(long_name, "PAT-LONG"),
        study=generate_uid(),
        series=generate_uid(),
        modality="CT",
        study_date="20240101",
        number=1,
        ts=ExplicitVRLittleEndian,
    )
    assert store(guarded, [image]) == [0]
    associated = threading.Event()
    finished = threading.Event()
    model = PatientRootQueryRetrieveInformationModelFind
    query = Dataset()
    query.QueryRetrieveLevel = "PATIENT"
    query.PatientName = "*A" * 30 + "*B"
    query.PatientID = ""

    def pathological_find() -> None:
        assoc = client("FINDSCU", (model, [ExplicitVRLittleEndian])).associate(
            HOST, guarded.port, ae_title=guarded.ae_title
        )
        associated.set()
        try:
            if assoc.is_established:
                for _ in assoc.send_c_find(query, model):
                    pass
        except Exception:  # the server goes away mid-query: that is the point
            pass
        finally:
            assoc.abort()
            finished.set()

    threading.Thread(target=pathological_find, daemon=True).start()
    assert associated.wait(60)
    guarded.proc.send_signal(signal.SIGTERM)
    assert guarded.proc.wait(timeout=60) == 0
    assert finished.wait(60)
