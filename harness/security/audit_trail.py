"""Audit-trail check (IHE ATNA; PS3.15 A.5): is every access the harness makes audited?

The check listens with a syslog receiver where the node sends its audit messages, performs a
few operations itself (stores a synthetic study when the node is writable, C-FINDs it,
C-GETs it), journals each (journal.py) and joins them with the messages received:

- an operation with no message of its event (C-STORE: 110104 action C; C-FIND: 110112;
  C-GET/C-MOVE: 110104 action R), its study, its calling AE as requestor, within the clock
  window: "unaudited C-FIND of study ...";
- a matching message whose outcome contradicts the operation's: "wrong outcome";
- a message that is not a valid DICOM audit message: "invalid audit message" with the error
  (it is counted as the audit of one unaudited operation, so one fault is one finding);
- nothing received at all: one finding "no audit trail", not one per operation.

It waits for the messages as they arrive (until each operation has a candidate, or
``deadline_s``), never a fixed sleep.

Run-wide ("every access is audited", issue 15): a pytest session whose cluster has audited
nodes calls `start_run_audit` once the cluster is up: one receiver per audited node and a
RunJournal (journal.py) of every operation the harness's own process performs on them, both
until the session ends. The check then uses that receiver and joins ALL the run's operations
on the node (its own ones included) with ALL the messages received. Messages without a
journal entry (operations of CLI subprocesses, Locust workers, a C-GET's own look-up) are
not findings.

``audit: {transport: tls}``: the receiver speaks RFC 5425 and authenticates both sides (IHE
ITI-20): it presents the harness's certificate (a launched node's run CA issued it; for an
external node the topology's tls.certificate/key) and takes only senders whose client
certificate the same CA signed (the run's CA, or the topology's tls.ca).
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from harness.errors import HarnessError
from harness.security.atna import (
    DICOM_INSTANCES_TRANSFERRED,
    OUTCOMES,
    QUERY,
    AuditEvent,
    check_audit_message,
)
from harness.security.checks import Check
from harness.security.journal import JournalEntry, OperationJournal, RunJournal, now
from harness.security.syslog import SyslogMessage, SyslogReceiver

if TYPE_CHECKING:
    from harness.nodes.base import Node

AREA = "audit"
REFERENCE = "PS3.15 A.5; IHE ITI TF-1 9 (ATNA)"
DEADLINE_S = 10.0
MAX_FINDINGS = 100  # unaudited operations named one by one; the rest are counted
CLOCK_SKEW_S = 60.0  # the node's clock against the harness's (both NTP in a hospital)

EXPECTED_EVENT = {
    "C-STORE": (DICOM_INSTANCES_TRANSFERRED, "C"),
    "C-FIND": (QUERY, "E"),
    "C-GET": (DICOM_INSTANCES_TRANSFERRED, "R"),
    "C-MOVE": (DICOM_INSTANCES_TRANSFERRED, "R"),
}
REMEDY = (
    "configure the node's IHE ATNA audit (Audit Record Repository = the harness's syslog "
    "receiver) so that every DICOM operation sends a PS3.15 A.5 audit message"
)


@dataclass(frozen=True)
class AuditCoverage:
    """Operations audited / performed, and what the trail held (for the readiness report)."""

    performed: int
    audited: int
    messages: int
    invalid: int

    def text(self) -> str:
        return (
            f"{self.audited} of {self.performed} operations audited; {self.messages} audit "
            f"messages received, {self.invalid} invalid"
        )

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class AuditTrailResult:
    checks: list[Check]
    coverage: AuditCoverage | None  # None: the node declares no audit trail
    transport: str = ""  # "udp" or "tls" when a receiver listened
    tls_sessions: int = 0  # TLS: authenticated sessions the receiver accepted


@dataclass(frozen=True)
class _Received:
    message: SyslogMessage
    event: AuditEvent | None
    error: str


def _read(messages: list[SyslogMessage]) -> list[_Received]:
    read = []
    for message in messages:
        event, error = check_audit_message(message.body)
        read.append(_Received(message, event, error))
    return read


def matches(entry: JournalEntry, event: AuditEvent) -> bool:
    """Is `event` the audit of `entry` (whatever its outcome)?"""
    event_id, action = EXPECTED_EVENT[entry.operation]
    if event.event_id != event_id or (event.action and event.action != action):
        return False
    if entry.study_uid and entry.study_uid not in event.study_uids():
        return False
    if entry.calling_ae not in event.requestor_ae_titles:
        return False
    skew = dt.timedelta(seconds=CLOCK_SKEW_S)
    return entry.started - skew <= event.event_time <= entry.ended + skew


class _EventIndex:
    """Valid audit events by study (and by event for operations on no single study), so a
    run's join stays linear in operations and messages."""

    def __init__(self) -> None:
        self.by_study: dict[str, list[AuditEvent]] = {}
        self.by_event: dict[Any, list[AuditEvent]] = {}

    def add(self, event: AuditEvent) -> None:
        self.by_event.setdefault(event.event_id, []).append(event)
        for study_uid in set(event.study_uids()):
            self.by_study.setdefault(study_uid, []).append(event)

    def candidates(self, entry: JournalEntry) -> list[AuditEvent]:
        pool = (self.by_study.get(entry.study_uid, []) if entry.study_uid
                else self.by_event.get(EXPECTED_EVENT[entry.operation][0], []))
        return [event for event in pool if matches(entry, event)]


def _outcome_agrees(entry: JournalEntry, event: AuditEvent) -> bool:
    return (event.outcome == 0) == entry.ok


def audit_coverage(entries: list[JournalEntry], messages: list[SyslogMessage]) -> AuditCoverage:
    """The coverage figures of a join (operations audited / performed)."""
    return join("", entries, messages)[1]


def join(
    node_name: str, entries: list[JournalEntry], messages: list[SyslogMessage],
    transport_note: str = "",
) -> tuple[list[Check], AuditCoverage]:
    """Checks and coverage of the journal against the messages (module docstring);
    `transport_note` (how they came) ends each observation."""
    received = _read(messages)
    invalid = [r for r in received if r.event is None]
    index = _EventIndex()
    for r in received:
        if r.event is not None:
            index.add(r.event)
    unmatched: list[JournalEntry] = []
    wrong: list[tuple[JournalEntry, AuditEvent]] = []
    audited: list[JournalEntry] = []
    for entry in entries:
        candidates = index.candidates(entry)
        if not candidates:
            unmatched.append(entry)
        elif not any(_outcome_agrees(entry, e) for e in candidates):
            wrong.append((entry, candidates[0]))
        else:
            audited.append(entry)
    coverage = AuditCoverage(len(entries), len(audited), len(messages), len(invalid))
    figures = f"coverage: {coverage.text()}" + (f"; {transport_note}" if transport_note else "")
    if not messages and entries:
        return [Check(
            node_name, AREA, "no audit trail", "fail",
            f"no audit message received for {len(entries)} operations; {figures}",
            REMEDY, REFERENCE,
        )], coverage
    checks: list[Check] = []
    for operation in dict.fromkeys(e.operation for e in audited):  # one pass per operation
        done = [e for e in audited if e.operation == operation]
        said = (done[0].describe() if len(done) == 1
                else f"{len(done)} {operation} operations (last: {done[-1].describe()})")
        checks.append(Check(node_name, AREA, f"audited: {operation}", "pass",
                            f"{said} audited; {figures}", "", REFERENCE))
    for entry, event in wrong:
        checks.append(Check(
            node_name, AREA, f"wrong outcome: {entry.operation}", "fail",
            f"{entry.describe()} {'succeeded' if entry.ok else 'failed'} ({entry.detail}) but "
            f"its audit message says outcome {event.outcome} "
            f"({OUTCOMES.get(event.outcome, '?')}); {figures}",
            "the node must report the operation's real outcome (EventOutcomeIndicator)",
            "PS3.15 A.5.1",
        ))
    for number, bad in enumerate(invalid):
        maybe = f" (perhaps the audit of the {unmatched[number].describe()})" if number < len(
            unmatched) else ""
        checks.append(Check(
            node_name, AREA, "invalid audit message", "fail",
            f"message from {bad.message.peer or '?'}{maybe}: {bad.error}; {figures}",
            "the node's audit messages must follow the DICOM audit message schema",
            "PS3.15 A.5.1",
        ))
    unaudited = unmatched[len(invalid):]
    for entry in unaudited[:MAX_FINDINGS]:
        checks.append(Check(
            node_name, AREA, f"unaudited {entry.operation}", "fail",
            f"unaudited {entry.describe()}; {figures}", REMEDY, REFERENCE,
        ))
    if len(unaudited) > MAX_FINDINGS:  # a long run's report stays readable
        checks.append(Check(
            node_name, AREA, "unaudited operations", "fail",
            f"{len(unaudited) - MAX_FINDINGS} more unaudited operations; {figures}",
            REMEDY, REFERENCE,
        ))
    return checks, coverage


def _all_candidates(entries: list[JournalEntry]) -> Any:
    """The receiver's wait condition: each operation has a matching message, or the
    unmatched ones are no more than the invalid messages received (which may be theirs)."""

    read: list[_Received] = []  # the receiver only appends: each message is read once
    index = _EventIndex()
    waiting = list(entries)

    def ready(messages: list[SyslogMessage]) -> bool:
        new = _read(messages[len(read):])
        read.extend(new)
        for r in new:
            if r.event is not None:
                index.add(r.event)
        waiting[:] = [e for e in waiting if not index.candidates(e)]
        return len(waiting) <= sum(r.event is None for r in read)

    return ready


def perform_operations(node: Node, journal: OperationJournal) -> str | None:
    """Store (writable nodes), C-FIND and C-GET one study as the harness, journalled; the
    study's UID (None: a read-only node without studies, nothing to do)."""
    from synthetic_data.samples import sample_study

    client = node.dimse()
    journal_entry = _journaller(node, journal, client.calling_ae)
    sop_classes: list[str] | None = None
    if node.writable:
        study = sample_study(seed=int(time.time() * 1000) % 1_000_000, instances=2)
        study_uid = str(study[0].StudyInstanceUID)
        sop_classes = sorted({str(ds.SOPClassUID) for ds in study})
        started = now()
        report = client.store(study)
        failed = report.failed
        journal_entry(started, "C-STORE", study_uid, not failed,
                      f"{len(report.succeeded)} stored, {len(failed)} failed")
    else:
        study_uid = client.any_study_uid()
        if study_uid is None:
            return None
    started = now()
    found = client.find("STUDY", {"StudyInstanceUID": study_uid})
    journal_entry(started, "C-FIND", study_uid, found.ok, f"status {found.status}")
    if "C-GET" in node.capabilities.retrieve_methods:
        started = now()
        got = client.get("STUDY", {"StudyInstanceUID": study_uid}, sop_classes=sop_classes,
                         keep=False)
        journal_entry(started, "C-GET", study_uid, got.ok,
                      f"status {got.status}, {got.completed} completed, {got.failed} failed")
    return study_uid


def _journaller(node: Node, journal: OperationJournal, calling_ae: str) -> Any:
    def entry(started: dt.datetime, operation: str, study_uid: str, ok: bool,
              detail: str) -> None:
        journal.record(started, node.name, node.ae_title, calling_ae, operation,  # type: ignore[arg-type]
                       study_uid, ok, detail)

    return entry


def audit_trail(
    node: Node,
    *,
    listen_port: int | None = None,
    deadline_s: float = DEADLINE_S,
    journal: OperationJournal | None = None,
) -> AuditTrailResult:
    """Run the audit-trail check on `node` (module docstring); `listen_port` overrides where
    the receiver listens (the node's audit port by default)."""
    audit = node.spec.audit
    if audit is None:
        return AuditTrailResult([Check(
            node.name, AREA, "audit trail", "skip",
            "the node declares no audit trail (topology: audit:)", "", REFERENCE,
        )], None)
    port = listen_port or getattr(node, "audit_port", None) or audit.port
    run = _RUN[0] if _RUN else None
    if run is not None and run.nodes.get(node.name) is node and (
            listen_port in (None, run.ports.get(node.name))):
        return _run_wide(node, run, deadline_s)  # its port is the run receiver's already
    if not port:
        return AuditTrailResult([Check(
            node.name, AREA, "audit trail", "fail",
            "no port for its audit messages: set audit: {port: N} in the topology",
            "declare where the node sends its syslog audit messages", REFERENCE,
        )], None)
    receiver = audit_receiver(node, port)
    if isinstance(receiver, Check):
        return AuditTrailResult([receiver], None)
    journal = journal or OperationJournal()
    try:
        receiver.start()
    except OSError as exc:  # ssl.SSLError too
        return AuditTrailResult([Check(
            node.name, AREA, "audit trail", "fail",
            f"the syslog receiver cannot listen on 127.0.0.1:{port} ({audit.transport}): {exc}",
            "free that port, or give readable PEM files in the node's tls:", REFERENCE,
        )], None)
    try:
        heard = _listen_while_performing(node, receiver, journal, deadline_s)
    finally:
        receiver.stop()
    if isinstance(heard, AuditTrailResult):
        return heard
    entries, messages = heard
    checks, coverage = join(node.name, entries, messages, _transport_note(receiver))
    return AuditTrailResult(checks, coverage, receiver.transport, receiver.tls_sessions)


def _listen_while_performing(
    node: Node, receiver: SyslogReceiver, journal: OperationJournal, deadline_s: float,
    joined: OperationJournal | None = None,
) -> tuple[list[JournalEntry], list[SyslogMessage]] | AuditTrailResult:
    """The operations performed and the messages heard meanwhile (a result: nothing to join);
    `joined`: the journal whose entries are joined (default: `journal`)."""
    try:
        study_uid = perform_operations(node, journal)
    except HarnessError as exc:
        return AuditTrailResult([Check(
            node.name, AREA, "audit trail", "fail",
            f"the operations to audit could not be performed: {exc}",
            "make the node reachable by the harness (C-STORE, C-FIND, C-GET)", REFERENCE,
        )], None)
    if study_uid is None:
        return AuditTrailResult([Check(
            node.name, AREA, "audit trail", "skip",
            "read-only node without any study: no operation to audit", "", REFERENCE,
        )], None)
    entries = (joined or journal).entries(node.name)
    receiver.wait_for(_all_candidates(entries), deadline_s)
    return entries, receiver.messages()


def audit_receiver(node: Node, port: int) -> SyslogReceiver | Check:
    """The (unstarted) receiver for `node`'s trail on `port`; over TLS with the harness's
    certificate and the CA that must sign the sender's (RFC 5425 5.2), or a skip Check that
    says what to declare when those files are not there."""
    audit = node.spec.audit
    assert audit is not None
    if audit.transport == "udp":
        return SyslogReceiver("127.0.0.1", port, "udp")
    tls = node.spec.tls
    if tls is not None and tls.generate:
        material = node.harness_tls_material
        files = (material.certificate_file, material.key_file, material.ca_file) if (
            material) else (None, None, None)
        wanted = ("the run's certificates: launch the node with the topology (pacs-harness "
                  "up, run or pytest)")
    elif node.capabilities.launched:
        files, wanted = (None, None, None), "declare tls: {generate: true} on the node"
    else:
        files = (tls.certificate_file, tls.key_file, tls.ca_file) if tls else (None,) * 3
        wanted = ("declare tls: {ca: FILE, certificate: FILE, key: FILE} on the node (the "
                  "harness's certificate for its syslog receiver, and the CA that signs the "
                  "node's client certificate)")
    if not all(files):
        return Check(node.name, AREA, "audit trail", "skip",
                     f"audit: {{transport: tls}} needs {wanted}", "", "RFC 5425 5.2")
    certificate, key, ca = files
    return SyslogReceiver("127.0.0.1", port, "tls", certificate_file=certificate,
                          key_file=key, ca_file=ca)


def _transport_note(receiver: SyslogReceiver) -> str:
    """How the trail came (for a TLS trail: sessions made, senders refused and why)."""
    if receiver.transport != "tls":
        return "over UDP"
    note = f"over TLS, {receiver.tls_sessions} authenticated sessions"
    if receiver.tls_refused:
        note += f", {receiver.tls_refused} senders refused (last: {receiver.tls_error})"
    return note


def audit_checks(node: Node, **options: Any) -> list[Check]:
    """The audit-trail checks of `node` (area "audit"); options as for `audit_trail`."""
    return audit_trail(node, **options).checks


# -- run-wide: one receiver per audited node and the journal, for a whole session ----------
class RunAudit:
    """The session's started receivers (node name -> receiver, its port, its node) and the
    journal of the run's operations."""

    def __init__(self, nodes: list[Node]) -> None:
        self.journal = RunJournal(nodes)
        self.nodes: dict[str, Node] = {}  # those with a started receiver
        self.receivers: dict[str, SyslogReceiver] = {}
        self.ports: dict[str, int] = {}
        self.started = now()

    def stop(self) -> None:
        self.journal.stop()
        for receiver in self.receivers.values():
            receiver.stop()


_RUN: list[RunAudit] = []  # the session's, if any (at most one)


def start_run_audit(
    nodes: list[Node], listen_ports: dict[str, int] | None = None
) -> RunAudit | None:
    """Listen for the audit trail of every node that declares `audit:` and journal every
    operation on them, until stop_run_audit (None: no audited node). A receiver that cannot
    start is left to the check, which reports why. `listen_ports` (node name -> port)
    overrides where a receiver listens (the node's audit port by default)."""
    stop_run_audit()
    audited = [n for n in nodes if n.spec.audit is not None]
    if not audited:
        return None
    run = RunAudit(audited)
    for node in audited:
        port = (listen_ports or {}).get(node.name) or getattr(
            node, "audit_port", None) or node.spec.audit.port  # type: ignore[union-attr]
        if not port:
            continue
        receiver = audit_receiver(node, port)
        if isinstance(receiver, Check):
            continue
        try:
            receiver.start()
        except OSError:  # the check tries again, and says why it cannot
            continue
        run.receivers[node.name], run.ports[node.name] = receiver, port
        run.nodes[node.name] = node
    run.journal.start()
    _RUN.append(run)
    return run


def stop_run_audit() -> None:
    """Stop the session's receivers and journal (idempotent: finalizers and unconfigure)."""
    while _RUN:
        _RUN.pop().stop()


def _run_wide(node: Node, run: RunAudit, deadline_s: float) -> AuditTrailResult:
    """The check's own operations (the run journal records them too), then the join of all
    the run's operations on `node` with all the messages its receiver heard."""
    receiver = run.receivers[node.name]
    heard = _listen_while_performing(node, receiver, OperationJournal(), deadline_s,
                                     run.journal)
    if isinstance(heard, AuditTrailResult):
        return heard
    entries, messages = heard
    note = _transport_note(receiver) + ", the whole run"
    if run.journal.dropped:
        note += f" ({run.journal.dropped} operations beyond the journal's capacity not counted)"
    checks, coverage = join(node.name, entries, messages, note)
    return AuditTrailResult(checks, coverage, receiver.transport, receiver.tls_sessions)
