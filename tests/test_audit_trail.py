"""Audit trails (IHE ATNA, PS3.15 A.5): the syslog receiver, the audit message validation,
and the join of the harness's journal with a real embedded PACS's audit messages.

The embedded PACS is launched with `audit: true` and sends one RFC 5424 message per operation
it serves; the complete trail passes. A UDP relay in the test between the node and the
receiver then drops, breaks or flips exactly one message, and the check must report exactly
that one fault.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from harness.embedded_pacs.audit import AuditSender, AuditSyslogError, parse_target
from harness.fixtures import pacs_cluster_factory
from harness.launch.ports import free_port
from harness.security.atna import (
    QUERY,
    SECURITY_ALERT,
    AuditMessageError,
    check_audit_message,
    parse_audit_message,
)
from harness.security.audit_trail import audit_checks, audit_trail, join
from harness.security.certificates import CertificateAuthority
from harness.security.journal import OperationJournal, now
from harness.security.syslog import (
    SyslogFormatError,
    SyslogReceiver,
    octet_frames,
    parse_syslog,
)

# The wait ends as soon as every operation has its candidate message, so a long deadline
# costs nothing on the paths that complete; a dropped message waits for all of it.
PATIENT_S = 60.0

cluster = pacs_cluster_factory(
    "name: audit\nnodes:\n"
    "  audited: {kind: embedded, ae_title: AUDITED, audit: true}\n"
    "  plain: {kind: embedded, ae_title: PLAIN}\n",
    scope="module",
)

# -- RFC 5424 / 3164 parsing and RFC 5425 framing -------------------------------------------


def test_rfc5424_message_with_structured_data_and_bom() -> None:
    data = (b'<85>1 2026-12-02T03:00:00.123Z pacs.example app 42 IHE+RFC-3881 '
            b'[origin ip="127.0.0.1" note="a \\"q\\" \\] b"][meta x="1"] '
            b'\xef\xbb\xbf<AuditMessage/>')
    message = parse_syslog(data, "127.0.0.1:5000")
    assert (message.priority, message.facility, message.severity) == (85, 10, 5)
    assert message.timestamp == "2026-12-02T03:00:00.123Z"
    assert (message.hostname, message.app_name, message.procid, message.msgid) == (
        "pacs.example", "app", "42", "IHE+RFC-3881")
    assert message.structured_data == {
        "origin": {"ip": "127.0.0.1", "note": 'a "q" ] b'}, "meta": {"x": "1"}}
    assert message.text() == "<AuditMessage/>"
    assert message.format == "rfc5424"


def test_rfc5424_nil_values_and_no_body() -> None:
    message = parse_syslog(b"<13>1 - - - - - -")
    assert message.timestamp is None
    assert (message.hostname, message.app_name, message.msgid, message.body) == ("", "", "", b"")
    assert message.structured_data == {}


def test_rfc3164_is_tolerated() -> None:
    message = parse_syslog(b"<38>Dec  2 03:04:05 oldpacs auditd[77]: user login failed")
    assert message.format == "rfc3164"
    assert (message.priority, message.timestamp, message.hostname, message.app_name) == (
        38, "Dec  2 03:04:05", "oldpacs", "auditd")
    assert message.text() == "user login failed"
    assert parse_syslog(b"no header at all").text() == "no header at all"


@pytest.mark.parametrize("data", [
    b"<13>1 - - - - - [unclosed x=\"1\"",  # element never closed
    b"<13>1 - - - -",  # header too short
    b"<13>1 - - - - - [id x=1] body",  # value not quoted
])
def test_malformed_rfc5424_is_refused_with_a_reason(data: bytes) -> None:
    with pytest.raises(SyslogFormatError):
        parse_syslog(data)


def test_octet_counting_frames() -> None:
    buffer = bytearray(b"5 hello11 hello world3 ab")
    assert octet_frames(buffer) == [b"hello", b"hello world"]
    assert buffer == bytearray(b"3 ab")  # the partial frame waits for its last byte
    buffer += b"c"
    assert octet_frames(buffer) == [b"abc"] and not buffer
    with pytest.raises(SyslogFormatError, match="MSG-LEN"):
        octet_frames(bytearray(b"x5 hello"))
    with pytest.raises(SyslogFormatError, match="limit"):
        octet_frames(bytearray(b"70000 "), max_bytes=65536)


# -- the receiver: UDP bounds, TLS with octet counting -----------------------------------


def _udp_send(port: int, *datagrams: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for data in datagrams:
            sock.sendto(data, ("127.0.0.1", port))


def test_udp_receiver_bounds_and_prompt_stop() -> None:
    receiver = SyslogReceiver(max_message_bytes=1000, max_messages=2).start()
    try:
        _udp_send(receiver.port, b"<13>1 - - - - - - " + b"x" * 2000,
                  b"<13>1 - h a - m - one", b"<13>1 - h a - m - two", b"<13>1 - h a - m - three")
        assert receiver.wait_for(lambda _: receiver.dropped == 1, 30)
        assert [m.text() for m in receiver.messages()] == ["one", "two"]
        assert receiver.oversize == 1
    finally:
        receiver.stop()
    assert not any(thread.is_alive() for thread in receiver._threads)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", receiver.port))  # the port is free again


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory: pytest.TempPathFactory):
    authority = CertificateAuthority.create(tmp_path_factory.mktemp("ca"), "audit test CA")
    server = authority.issue("syslog", "syslog receiver", names=("127.0.0.1", "localhost"))
    client = authority.issue("sender", "audit source", names=("localhost",))
    return server, client


def _tls_client(port: int, ca: Path, certificate: Path | None, key: Path | None) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(ca))
    if certificate:
        context.load_cert_chain(str(certificate), str(key))
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


def test_tls_receiver_reads_octet_counted_frames(tls_material) -> None:
    server, client = tls_material
    with SyslogReceiver(transport="tls", certificate_file=server.certificate_file,
                        key_file=server.key_file, ca_file=server.ca_file) as receiver:
        first, second = b"<85>1 - h app - m - first", "<85>1 - h app - m - zweite \u00e4".encode()
        with _tls_client(receiver.port, client.ca_file, client.certificate_file,
                         client.key_file) as tls:
            tls.sendall(b"%d %s%d " % (len(first), first, len(second)))  # one frame and a half
            tls.sendall(second)
            assert receiver.wait_for(lambda m: len(m) == 2, 30)
        assert [m.text() for m in receiver.messages()] == ["first", "zweite \u00e4"]
        # RFC 5425 5.2: a sender without a certificate from the CA is not heard
        with pytest.raises((ssl.SSLError, OSError)), _tls_client(
                receiver.port, client.ca_file, None, None) as anonymous:
            anonymous.sendall(b"11 <13>1 - - -")
            anonymous.recv(1)  # TLS 1.3 reports the refused certificate on the next read
    assert len(receiver.messages()) == 2


def test_tls_receiver_closes_a_stream_with_an_oversize_frame(tls_material) -> None:
    server, client = tls_material
    with SyslogReceiver(transport="tls", certificate_file=server.certificate_file,
                        key_file=server.key_file, max_message_bytes=100) as receiver:
        with _tls_client(receiver.port, client.ca_file, None, None) as tls:
            tls.sendall(b"500 " + b"x" * 500)
            assert tls.recv(1) == b""  # the receiver hung up
        assert receiver.oversize == 1 and not receiver.messages()


def test_tls_receiver_stops_with_a_silent_sender_connected(tls_material) -> None:
    server, _ = tls_material
    receiver = SyslogReceiver(transport="tls", certificate_file=server.certificate_file,
                              key_file=server.key_file).start()
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=30) as silent:
        silent.sendall(b"\x16")  # a handshake that never completes
        receiver.stop()
        assert not any(thread.is_alive() for thread in receiver._threads)


# -- audit messages (PS3.15 A.5.1) --------------------------------------------------------

VALID = (
    '<AuditMessage><EventIdentification EventActionCode="E" '
    'EventDateTime="2026-12-02T03:00:00Z" EventOutcomeIndicator="0">'
    '<EventID csd-code="110112" codeSystemName="DCM" originalText="Query"/>'
    '</EventIdentification>'
    '<ActiveParticipant UserID="1234" AlternativeUserID="AETITLES=ASKER" UserIsRequestor="true"/>'
    '<ActiveParticipant UserID="PACS" UserIsRequestor="false"/>'
    '<AuditSourceIdentification AuditSourceID="PACS"/>'
    '<ParticipantObjectIdentification ParticipantObjectID="1.2.3" ParticipantObjectTypeCode="2">'
    '<ParticipantObjectIDTypeCode csd-code="110180" codeSystemName="DCM" '
    'originalText="Study Instance UID"/></ParticipantObjectIdentification>'
    '</AuditMessage>'
)


def test_valid_audit_message_fields() -> None:
    event = parse_audit_message(VALID)
    assert (event.event_id, event.action, event.outcome, event.source_id) == (
        QUERY, "E", 0, "PACS")
    assert event.requestor_ae_titles == {"1234", "ASKER"}
    assert event.study_uids() == {"1.2.3"}


@pytest.mark.parametrize(("broken", "named"), [
    (VALID.replace('<AuditSourceIdentification AuditSourceID="PACS"/>', ""),
     "AuditSourceIdentification"),
    (VALID.replace('EventOutcomeIndicator="0"', 'EventOutcomeIndicator="3"'),
     "EventOutcomeIndicator"),
    (VALID.replace('<EventID csd-code="110112" codeSystemName="DCM" originalText="Query"/>', ""),
     "EventID"),
    (VALID[:-20], "not well-formed"),
    ("", "empty"),
    ('<!DOCTYPE a [<!ENTITY e "x">]>' + VALID.replace('"1.2.3"', '"&e;"'), "DOCTYPE"),
])
def test_invalid_audit_message_named_never_raised(broken: str, named: str) -> None:
    event, error = check_audit_message(broken)
    assert event is None and error
    assert named in error
    with pytest.raises(AuditMessageError):
        parse_audit_message(broken)


def test_audit_syslog_target_is_checked() -> None:
    assert parse_target("udp://127.0.0.1:514") == ("127.0.0.1", 514)
    for wrong in ("tcp://127.0.0.1:514", "udp://127.0.0.1", "127.0.0.1:514"):
        with pytest.raises(AuditSyslogError, match="udp://HOST:PORT|port"):
            parse_target(wrong)


# -- against a real embedded PACS ---------------------------------------------------------


class Relay:
    """Forwards the node's audit datagrams to the receiver, passing the first one that
    `chosen` picks through `fault` (None: dropped)."""

    def __init__(self, listen_port: int, target_port: int, chosen: Callable[[bytes], bool],
                 fault: Callable[[bytes], bytes | None]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", listen_port))
        self.sock.settimeout(0.2)
        self.target = ("127.0.0.1", target_port)
        self.chosen, self.fault = chosen, fault
        self.faulted = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not self.faulted and self.chosen(data):
                self.faulted += 1
                data = self.fault(data)
            if data is not None:
                self.sock.sendto(data, self.target)

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join()
        self.sock.close()


def _failures(checks) -> list[str]:
    return [c.name for c in checks if c.failed]


def test_complete_trail_passes(cluster) -> None:
    node = cluster.node("audited")
    result = audit_trail(node, deadline_s=PATIENT_S)
    assert _failures(result.checks) == [], [c.line() for c in result.checks]
    assert sorted(c.name for c in result.checks) == [
        "audited: C-FIND", "audited: C-GET", "audited: C-STORE"]
    assert (result.coverage.performed, result.coverage.audited, result.coverage.invalid) == (
        3, 3, 0)
    assert "3 of 3 operations audited" in result.checks[0].observed
    # the node's own log (an independent record) shows the three requests it served
    log = node.log_path.read_text()
    assert re.search(r"C-FIND-RSP calling=PACSHARNESS", log)
    assert re.search(r"C-GET-RSP calling=PACSHARNESS", log)


def _with_relay(node, chosen, fault, deadline_s: float = PATIENT_S) -> tuple[list, Relay]:
    receiver_port = free_port()
    with Relay(node.audit_port, receiver_port, chosen, fault) as relay:
        checks = audit_checks(node, listen_port=receiver_port, deadline_s=deadline_s)
    assert relay.faulted == 1
    return checks, relay


def test_one_dropped_message_is_one_unaudited_finding(cluster) -> None:
    checks, _ = _with_relay(cluster.node("audited"), lambda d: b'csd-code="110112"' in d,
                            lambda d: None, deadline_s=20)
    assert _failures(checks) == ["unaudited C-FIND"], [c.line() for c in checks]
    finding = next(c for c in checks if c.failed)
    assert "unaudited C-FIND of study" in finding.observed and finding.remedy


def test_one_malformed_message_is_one_validation_finding(cluster) -> None:
    def remove_source(data: bytes) -> bytes:
        return re.sub(rb"<AuditSourceIdentification .*?</AuditSourceIdentification>", b"", data)

    checks, _ = _with_relay(cluster.node("audited"), lambda d: b'EventActionCode="C"' in d,
                            remove_source)
    assert _failures(checks) == ["invalid audit message"], [c.line() for c in checks]
    finding = next(c for c in checks if c.failed)
    assert "AuditSourceIdentification" in finding.observed


def test_one_broken_xml_is_one_validation_finding(cluster) -> None:
    checks, _ = _with_relay(cluster.node("audited"), lambda d: b'EventActionCode="R"' in d,
                            lambda d: d[:-30])
    assert _failures(checks) == ["invalid audit message"], [c.line() for c in checks]
    assert "not well-formed" in next(c for c in checks if c.failed).observed


def test_one_flipped_outcome_is_one_wrong_outcome_finding(cluster) -> None:
    checks, _ = _with_relay(
        cluster.node("audited"), lambda d: b'EventActionCode="R"' in d,
        lambda d: d.replace(b'EventOutcomeIndicator="0"', b'EventOutcomeIndicator="8"'))
    assert _failures(checks) == ["wrong outcome: C-GET"], [c.line() for c in checks]
    assert "outcome 8 (serious failure)" in next(c for c in checks if c.failed).observed


def test_declared_but_silent_node_is_one_no_audit_trail_finding(cluster) -> None:
    checks = audit_checks(cluster.node("audited"), listen_port=free_port(), deadline_s=3)
    assert [(c.name, c.outcome) for c in checks] == [("no audit trail", "fail")]
    assert "no audit message received for 3 operations" in checks[0].observed


def test_node_without_audit_is_skipped(cluster) -> None:
    checks = audit_checks(cluster.node("plain"))
    assert [(c.name, c.outcome) for c in checks] == [("audit trail", "skip")]
    assert "--audit-syslog" not in cluster.node("plain").command()


def test_c_move_as_source_is_audited(cluster) -> None:
    from synthetic_data.samples import sample_study

    node = cluster.node("audited")
    study = sample_study(seed=4242)
    study_uid = str(study[0].StudyInstanceUID)
    client = node.dimse()
    assert not client.store(study).failed
    journal = OperationJournal()
    with SyslogReceiver(port=node.audit_port) as receiver:
        started = now()
        moved = client.move("PLAIN", "STUDY", {"StudyInstanceUID": study_uid})
        entry = journal.record(started, node.name, node.ae_title, client.calling_ae, "C-MOVE",
                               study_uid, moved.ok, str(moved.status))
        assert receiver.wait_for(lambda m: any(b'"R"' in x.body for x in m), 30)
        checks, coverage = join(node.name, [entry], receiver.messages())
    assert moved.ok and [c.outcome for c in checks] == ["pass"], [c.line() for c in checks]
    assert coverage.audited == 1
    event = parse_audit_message(next(m for m in receiver.messages() if b'"R"' in m.body).body)
    roles = {p.user_id: p.role_codes for p in event.participants}
    assert roles["AUDITED"] == ("110153",) and roles["PLAIN"] == ("110152",)


def test_unknown_calling_ae_raises_a_security_alert(cluster) -> None:
    node = cluster.node("audited")
    with SyslogReceiver(port=node.audit_port) as receiver:
        intruder = AE(ae_title="INTRUDER")
        intruder.add_requested_context(Verification)
        assoc = intruder.associate(node.host, node.dicom_port, ae_title=node.ae_title)
        assert assoc.is_rejected
        assert receiver.wait_for(lambda m: len(m) >= 1, 30)
        event = parse_audit_message(receiver.messages()[0].body)
    assert (event.event_id, event.event_types, event.outcome) == (
        SECURITY_ALERT, ("110126",), 4)
    assert event.requestor_ae_titles == {"INTRUDER"}


def test_sender_frame_is_rfc5424_with_a_valid_body() -> None:
    sender = AuditSender("udp://127.0.0.1:9", "NODE")
    try:
        root = sender._message(("110104", "DICOM Instances Transferred"), "C", 0)
        sender._participant(root, "CALLER", True, "127.0.0.1", None)
        sender._study_objects(root, "1.2.3", "")
        frame = sender.frame(root)
    finally:
        sender.close()
    assert re.match(rb"<85>1 \d{4}-\d\d-\d\dT[\d:.]+Z \S+ pacs-harness-embedded \d+ "
                    rb"IHE\+RFC-3881 - \xef\xbb\xbf<AuditMessage>", frame)
    assert parse_audit_message(parse_syslog(frame).body).study_uids() == {"1.2.3"}


def test_embedded_node_refuses_audit_over_tls(tmp_path: Path) -> None:
    from harness.config import parse_topology
    from harness.errors import ConfigError
    from harness.nodes import make_node

    topology = parse_topology(
        "name: t\nnodes:\n  a: {kind: embedded, audit: {transport: tls}}\n", "<test>")
    node = make_node(topology.node("a"), tmp_path)
    with pytest.raises(ConfigError, match="over UDP only"):
        node.prepare([])
