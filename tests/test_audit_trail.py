"""Audit trails (IHE ATNA, PS3.15 A.5): the syslog receiver, the audit message validation,
and the join of the harness's journal with a real embedded PACS's audit messages.

The embedded PACS is launched with `audit: true` and sends one RFC 5424 message per operation
it serves; the complete trail passes. A UDP relay in the test between the node and the
receiver then drops, breaks or flips exactly one message, and the check must report exactly
that one fault.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from harness.embedded_pacs.audit import (
    AuditSender,
    AuditSyslogError,
    TlsChannel,
    parse_target,
)
from harness.embedded_pacs.connection import client_tls_context
from harness.fixtures import pacs_cluster_factory
from harness.launch.ports import free_port
from harness.security.atna import (
    QUERY,
    SECURITY_ALERT,
    AuditMessageError,
    check_audit_message,
    parse_audit_message,
)
from harness.security.audit_trail import audit_checks, audit_receiver, audit_trail, join
from harness.security.certificates import CertificateAuthority
from harness.security.journal import OperationJournal, now
from harness.security.syslog import (
    SyslogFormatError,
    SyslogReceiver,
    octet_frames,
    parse_syslog,
)
from tests.helpers import processes_mentioning, run_cli

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
    assert parse_target("udp://127.0.0.1:514") == ("udp", "127.0.0.1", 514)
    assert parse_target("tls://localhost:6514") == ("tls", "localhost", 6514)
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


# -- run-wide: every operation of the session, not only the check's own ----------------------

@pytest.fixture
def run_audit():
    """start_run_audit, as the session fixture calls it (harness/fixtures.py), stopped after."""
    from harness.security.audit_trail import start_run_audit, stop_run_audit

    yield start_run_audit
    stop_run_audit()


def _session_operations(node) -> tuple[str, str]:
    """What a session does before the check: two studies stored, a C-FIND, a C-GET, a C-MOVE
    to PLAIN (the studies' UIDs)."""
    from synthetic_data.samples import sample_study

    seed = uuid.uuid4().int % 1_000_000
    first, second = sample_study(seed=seed, instances=1), sample_study(seed=seed + 1, instances=1)
    uids = str(first[0].StudyInstanceUID), str(second[0].StudyInstanceUID)
    client = node.dimse()
    assert not client.store([*first, *second]).failed
    assert client.find("STUDY", {"StudyInstanceUID": uids[0]}).ok
    assert client.get("STUDY", {"StudyInstanceUID": uids[0]}, keep=False).ok
    assert client.move("PLAIN", "STUDY", {"StudyInstanceUID": uids[1]}).ok
    return uids


def _served(node, response: str) -> int:
    """How many `response`s the node's own log shows it answered the harness."""
    return node.log_path.read_text().count(f"{response} calling=PACSHARNESS")


def test_run_wide_trail_counts_every_operation_of_the_session(cluster, run_audit) -> None:
    node, plain = cluster.node("audited"), cluster.node("plain")
    served_before = {r: _served(node, r) for r in ("C-FIND-RSP", "C-GET-RSP", "C-MOVE-RSP")}
    run = run_audit(list(cluster.nodes.values()))
    assert set(run.receivers) == {"audited"}
    assert node.dimse().echo().status.ok  # no access to patient data: not journalled
    assert plain.dimse().find("STUDY", {"StudyInstanceUID": None}).ok  # a node without audit
    uids = _session_operations(node)
    before = run.journal.entries()
    assert {e.node for e in before} == {"audited"}
    assert {e.operation for e in before} == {"C-STORE", "C-FIND", "C-GET", "C-MOVE"}
    assert sorted(e.study_uid for e in before if e.operation == "C-STORE") == sorted(uids)

    result = audit_trail(node, deadline_s=PATIENT_S)
    assert _failures(result.checks) == [], [c.line() for c in result.checks]
    coverage = result.coverage
    assert coverage.performed == len(before) + 3 >= 8  # the check's own three too
    assert coverage.audited == coverage.performed
    # the node's own log (independent of the journal) served as many as were journalled
    entries = run.journal.entries("audited")
    for response, operation in (("C-FIND-RSP", "C-FIND"), ("C-GET-RSP", "C-GET"),
                                ("C-MOVE-RSP", "C-MOVE")):
        journalled = sum(e.operation == operation for e in entries)
        assert _served(node, response) - served_before[response] == journalled, operation


def test_run_wide_dropped_message_of_an_earlier_operation_is_one_finding(
        cluster, run_audit) -> None:
    node = cluster.node("audited")
    receiver_port = free_port()
    with Relay(node.audit_port, receiver_port, lambda d: b'EventActionCode="R"' in d,
               lambda d: None) as relay:
        run_audit(list(cluster.nodes.values()), listen_ports={"audited": receiver_port})
        uids = _session_operations(node)  # its C-GET's message is the first "R": dropped
        result = audit_trail(node, deadline_s=20)
    assert relay.faulted == 1
    assert _failures(result.checks) == ["unaudited C-GET"], [c.line() for c in result.checks]
    finding = next(c for c in result.checks if c.failed)
    assert f"unaudited C-GET of study {uids[0]}" in finding.observed
    assert result.coverage.audited == result.coverage.performed - 1 >= 7


def test_journal_names_the_study_of_stored_files_and_a_failing_observer_breaks_nothing(
        cluster, run_audit, tmp_path) -> None:
    from pydicom import dcmread

    from harness.dicom.peer import add_operation_observer, remove_operation_observer
    from synthetic_data.samples import sample_study

    def broken(done) -> None:
        raise RuntimeError("observer bug")

    node = cluster.node("audited")
    run = run_audit(list(cluster.nodes.values()))
    study = sample_study(seed=uuid.uuid4().int % 1_000_000, instances=2)
    for number, ds in enumerate(study):
        ds.save_as(tmp_path / f"{number}.dcm", enforce_file_format=True)
    add_operation_observer(broken)
    try:
        report = node.dimse().store([tmp_path])
    finally:
        remove_operation_observer(broken)
    assert len(report.succeeded) == 2
    [entry] = run.journal.entries("audited")
    assert (entry.operation, entry.ok) == ("C-STORE", True)
    assert entry.study_uid == str(dcmread(tmp_path / "0.dcm").StudyInstanceUID)


RUN_WIDE = """name: @NAME@
nodes:
  pocket: {kind: embedded, ae_title: POCKET, audit: true}
  spare: {kind: embedded, ae_title: SPARE}
"""


@pytest.mark.timeout(900)
def test_pacs_harness_run_audits_the_connectivity_operations_too(tmp_path) -> None:
    name = f"run-audit-{uuid.uuid4().hex[:8]}"
    topology = tmp_path / "topology.yaml"
    topology.write_text(RUN_WIDE.replace("@NAME@", name))
    report_dir = tmp_path / "report"
    proc = run_cli("run", "--topology", str(topology), "--phase", "infrastructure", "-q",
                   "--scenario", "security", "--scenario", "connectivity",
                   "--report-dir", str(report_dir), timeout=900)
    report = json.loads((report_dir / "report.json").read_text())
    [security] = [s for s in report["scenarios"] if s["name"] == "security"]
    coverage = security["metrics"]["security.audit_coverage.pocket"]
    assert coverage["performed"] > 3, coverage  # the check's own 3 and connectivity's
    assert coverage["audited"] == coverage["performed"], (coverage, proc.stdout[-3000:])
    audit = {row["name"]: row["outcome"] for row in security["metrics"]["security.audit.pocket"]}
    assert set(audit.values()) == {"pass"}, audit
    assert processes_mentioning(f"pacs-harness-{name}-") == []


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


def test_embedded_node_refuses_audit_over_tls_without_tls() -> None:
    from harness.config import parse_topology
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match=r"<test>:3: nodes.a.audit: audit over TLS sends with "
                                          r"the node's own certificate: declare tls: "
                                          r"\{generate: true\} too"):
        parse_topology("name: t\nnodes:\n  a: {kind: embedded, audit: {transport: tls}}\n",
                       "<test>")


# -- audit over TLS (RFC 5425, IHE ITI-20: both sides authenticated) -------------------------

tls_cluster = pacs_cluster_factory(
    "name: audit-tls\nnodes:\n"
    "  secure: {kind: embedded, ae_title: SECURE, tls: {generate: true}, "
    "audit: {transport: tls}}\n",
    scope="module",
)


class TlsRelay:
    """Terminates the node's RFC 5425 connection (the harness's certificate presented, the
    node's required) and forwards each frame over its own TLS connection to the receiver,
    presenting `client`; drops the first frame `chosen` picks."""

    def __init__(self, listen_port: int, target_port: int, server, client,
                 chosen: Callable[[bytes], bool] = lambda _: False) -> None:
        self.inbound = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.inbound.load_cert_chain(server.certificate_file, server.key_file)
        self.inbound.load_verify_locations(server.ca_file)
        self.inbound.verify_mode = ssl.CERT_REQUIRED
        self.outbound = ssl.create_default_context(cafile=str(server.ca_file))
        self.outbound.load_cert_chain(client.certificate_file, client.key_file)
        self.target_port, self.chosen = target_port, chosen
        self.dropped = self.forwarded = self.nodes_connected = 0
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", listen_port))
        self.listener.listen(4)
        self.listener.settimeout(0.2)
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._relay, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _relay(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        upstream: ssl.SSLSocket | None = None
        try:
            with self.inbound.wrap_socket(conn, server_side=True) as node:
                self.nodes_connected += 1
                node.settimeout(0.2)
                buffer = bytearray()
                while not self.stopping.is_set():
                    try:
                        chunk = node.recv(65536)
                    except TimeoutError:
                        continue
                    if not chunk:
                        return
                    buffer += chunk
                    for frame in octet_frames(buffer):
                        if not self.dropped and self.chosen(frame):
                            self.dropped += 1
                            continue
                        try:
                            if upstream is None:
                                upstream = self.outbound.wrap_socket(socket.create_connection(
                                    ("127.0.0.1", self.target_port), timeout=30),
                                    server_hostname="127.0.0.1")
                            upstream.sendall(b"%d %s" % (len(frame), frame))
                            self.forwarded += 1
                        except OSError:  # refused by the receiver: tried again next frame
                            upstream = None
        except OSError:
            return
        finally:
            if upstream is not None:
                upstream.close()

    def __enter__(self) -> TlsRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()
        self.listener.close()


def test_complete_trail_passes_over_tls(tls_cluster) -> None:
    node = tls_cluster.node("secure")
    assert f"tls://127.0.0.1:{node.audit_port}" in node.command()
    result = audit_trail(node, deadline_s=PATIENT_S)
    assert _failures(result.checks) == [], [c.line() for c in result.checks]
    assert sorted(c.name for c in result.checks) == [
        "audited: C-FIND", "audited: C-GET", "audited: C-STORE"]
    assert result.transport == "tls" and result.tls_sessions >= 1
    assert "over TLS" in result.checks[0].observed


def test_one_dropped_message_over_tls_is_one_unaudited_finding(tls_cluster) -> None:
    node = tls_cluster.node("secure")
    harness = node.harness_tls_material
    receiver_port = free_port()
    with TlsRelay(node.audit_port, receiver_port, harness, harness,
                  lambda d: b'csd-code="110112"' in d) as relay:
        result = audit_trail(node, listen_port=receiver_port, deadline_s=20)
    assert relay.dropped == 1 and relay.forwarded == 2 and relay.nodes_connected >= 1
    assert _failures(result.checks) == ["unaudited C-FIND"], [c.line() for c in result.checks]
    assert result.tls_sessions >= 1


def test_sender_with_an_untrusted_certificate_is_no_audit_trail(tls_cluster, tmp_path) -> None:
    node = tls_cluster.node("secure")
    stranger = CertificateAuthority.create(tmp_path, "another CA").issue("stranger", "STRANGER")
    receiver_port = free_port()
    with TlsRelay(node.audit_port, receiver_port, node.harness_tls_material,
                  stranger) as relay:
        result = audit_trail(node, listen_port=receiver_port, deadline_s=10)
    assert relay.nodes_connected >= 1  # the node spoke, the receiver refused the relay
    assert [(c.name, c.outcome) for c in result.checks] == [("no audit trail", "fail")]
    assert "senders refused" in result.checks[0].observed, result.checks[0].observed
    assert result.tls_sessions == 0


def _s_client(port: int, ca: Path, *options: str) -> subprocess.Popen:
    """OpenSSL's client sending one octet-counted frame; it stays until the server closes."""
    client = subprocess.Popen(
        ["/usr/bin/openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(ca),
         "-verify_return_error", "-ign_eof", "-quiet", *options],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    client.stdin.write(b"25 <85>1 - h app - m - hello")
    client.stdin.close()
    return client


def test_openssl_without_a_client_certificate_is_refused(tls_cluster) -> None:
    """An independent client (OpenSSL): no certificate, no message heard; with the run's
    harness certificate the same frame is."""
    node = tls_cluster.node("secure")
    harness = node.harness_tls_material
    receiver = audit_receiver(node, free_port())
    assert isinstance(receiver, SyslogReceiver)
    clients = []
    try:
        with receiver:
            for version in ("-tls1_2", "-tls1_3"):
                clients.append(_s_client(receiver.port, harness.ca_file, version))
            assert receiver.wait_for(lambda _: receiver.tls_refused == 2, 30)
            assert not receiver.messages()
            clients.append(_s_client(receiver.port, harness.ca_file, "-cert",
                                     str(harness.certificate_file), "-key",
                                     str(harness.key_file)))
            assert receiver.wait_for(lambda m: len(m) == 1, 30)
    finally:
        for client in clients:
            client.kill()
            client.wait()
    assert receiver.messages()[0].text() == "hello" and receiver.tls_sessions == 1
    assert "certificate" in receiver.tls_error


def test_openssl_server_hears_the_node_over_mutual_tls(tls_cluster) -> None:
    """An independent receiver (OpenSSL's s_server, a client certificate required) gets the
    node's audit of a C-FIND as an RFC 5425 frame."""
    node = tls_cluster.node("secure")
    harness = node.harness_tls_material
    server = subprocess.Popen(
        ["/usr/bin/openssl", "s_server", "-accept", f"127.0.0.1:{node.audit_port}",
         "-cert", str(harness.certificate_file), "-key", str(harness.key_file),
         "-CAfile", str(harness.ca_file), "-Verify", "1", "-verify_return_error", "-quiet"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    heard = bytearray()
    queries: list[bytes] = []
    complete = threading.Event()

    def read() -> None:  # until a whole octet-counted frame holding a Query (110112) is in
        while chunk := server.stdout.read1(65536):
            heard.extend(chunk)
            first = re.search(rb"\d+ <85>1 ", heard)
            frames = octet_frames(bytearray(heard[first.start():])) if first else []
            queries[:] = [f for f in frames if b'csd-code="110112"' in f]
            if queries:
                complete.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        found = node.dimse().find("STUDY", {"StudyInstanceUID": None})
        assert found.ok
        assert complete.wait(60), bytes(heard[:300])
    finally:
        server.kill()
        server.wait()
        reader.join()
    event = parse_audit_message(parse_syslog(queries[0]).body)
    assert event.event_id == QUERY and event.requestor_ae_titles & {"PACSHARNESS"}


def test_tls_trail_without_certificates_is_one_skip_naming_the_fields(tmp_path) -> None:
    from harness.config import parse_topology
    from harness.nodes import make_node

    topology = parse_topology(
        "name: t\nnodes:\n  site: {kind: external, host: 127.0.0.1, dicom_port: 104, "
        "tls: {ca: ca.pem}, audit: {port: 6514, transport: tls}}\n", "<test>")
    checks = audit_checks(make_node(topology.node("site"), tmp_path))
    assert [(c.name, c.outcome) for c in checks] == [("audit trail", "skip")]
    assert "tls: {ca: FILE, certificate: FILE, key: FILE}" in checks[0].observed


def test_unreadable_receiver_certificate_is_one_failure_not_a_traceback(tmp_path) -> None:
    from harness.config import parse_topology
    from harness.nodes import make_node

    topology = parse_topology(
        "name: t\nnodes:\n  site: {kind: external, host: 127.0.0.1, dicom_port: 104, "
        f"tls: {{ca: {tmp_path}/ca.pem, certificate: {tmp_path}/h.pem, key: {tmp_path}/h.key}}, "
        f"audit: {{port: {free_port()}, transport: tls}}}}\n", "<test>")
    checks = audit_checks(make_node(topology.node("site"), tmp_path))
    assert [(c.name, c.outcome) for c in checks] == [("audit trail", "fail")]
    assert "the syslog receiver cannot listen on 127.0.0.1:" in checks[0].observed


def test_audit_over_tls_needs_the_node_certificate_usage_error(capsys) -> None:
    from harness.embedded_pacs.__main__ import parse_args

    with pytest.raises(SystemExit) as exited:
        parse_args(["--ae-title", "A", "--port", "0", "--storage", "/tmp/x",
                    "--audit-syslog", "tls://127.0.0.1:6514"])
    assert exited.value.code == 2
    assert "needs --tls-certificate, --tls-key and --tls-ca" in capsys.readouterr().err


def test_tls_sender_never_blocks_counts_drops_and_reconnects(tls_material) -> None:
    server, client = tls_material
    context = client_tls_context(str(client.certificate_file), str(client.key_file),
                                 str(client.ca_file))
    channel = TlsChannel("127.0.0.1", free_port(), context, queue_size=2)
    try:  # nobody listens: beyond the bound, dropped and counted at once
        for number in range(5):
            channel.send(b"<85>1 - - - - - - %d" % number)
        assert channel.dropped == 3
    finally:
        channel.close()
    port = free_port()
    channel = TlsChannel("127.0.0.1", port, context)
    try:
        channel.send(b"<85>1 - - - - - - early")  # retried with backoff until a receiver is up
        for text in ("early", "after a restart"):
            with SyslogReceiver(port=port, transport="tls",
                                certificate_file=server.certificate_file,
                                key_file=server.key_file, ca_file=server.ca_file) as receiver:
                if text != "early":
                    channel.send(b"<85>1 - - - - - - " + text.encode())
                assert receiver.wait_for(lambda m: len(m) == 1, 60)
                assert receiver.messages()[0].text() == text and receiver.tls_sessions == 1
    finally:
        channel.close()
    assert channel.connections == 2 and channel.dropped == channel.expired == 0
