"""Storage Commitment Push Model SCU (PS3.4 J): does the node take responsibility for these
instances? The gate before a migration's source is retired.

One transaction per batch of instances: an N-ACTION-RQ (Action Type 1, PS3.4 J.3.2) on the
well-known SOP Instance carries a fresh Transaction UID and the Referenced SOP Sequence; the
node answers the N-ACTION-RSP at once and reports later with an N-EVENT-REPORT-RQ (Event Type
1: all committed, 2: failures exist, with the Failed SOP Sequence and a Failure Reason per
instance, PS3.4 J.3.3). The report may come on the N-ACTION's association, if it is still
open, or on a new association the node opens to the requester (PS3.4 J.3.3, the node finds
the requester by AE title in its own configuration): so the harness keeps the association
open and, when given an address (the harness's own, which launched nodes know as a peer:
Cluster.harness_peer), listens there for the whole request.

Every wait has a deadline: no report within `timeout_s` of the N-ACTION-RSP leaves that
transaction's instances "no answer" with "no report within N s"; never a hang. A node that
refuses the SOP class in association negotiation is "storage commitment not supported",
never a pass.

Batches: PS3.4 J sets no limit on a transaction's size, but the request and its report each
travel as one DIMSE message that both ends hold whole in memory (pynetdicom reassembles a
message before handing it over), and an SCP checks a whole transaction before answering.
Batches of `DEFAULT_BATCH` references (about 115 KB per message with 64-character UIDs)
keep each message and each wait bounded; one association per transaction, so a late report
of one transaction can never arrive in the middle of the next N-ACTION.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import Verification

from harness.dicom.peer import HARNESS_AE_TITLE, DimsePeer
from harness.dicom.tcp import on_connection_open
from harness.dicom.watchdog import Watchdog
from harness.errors import EnvironmentProblem

LOG = logging.getLogger(__name__)

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model SOP Class
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP Instance (PS3.4 J.3.1)
REQUEST_COMMITMENT = 1  # N-ACTION Action Type ID (PS3.4 J.3.2.1)
ALL_COMMITTED, FAILURES_EXIST = 1, 2  # N-EVENT-REPORT Event Type IDs (PS3.4 J.3.3.1)
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]

#: Failure Reason (0008,1197) values PS3.4 J.3.3.1 lists, with the words the report uses
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class/instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}

NOT_SUPPORTED = "storage commitment not supported"
COMMITTED, FAILED, NO_ANSWER = "committed", "failed", "no answer"
DEFAULT_BATCH = 1000  # references per N-ACTION (module docstring)
DEFAULT_TIMEOUT_S = 60.0


def failure_words(code: int) -> str:
    """'0x0112 no such object instance' for a Failure Reason."""
    return f"0x{code:04X} {FAILURE_REASONS.get(code, 'unknown failure reason')}"


@dataclass(frozen=True)
class InstanceOutcome:
    """What the node said about one instance."""

    sop_class_uid: str
    sop_instance_uid: str
    state: str  # COMMITTED, FAILED or NO_ANSWER
    reason: str = ""  # why, for FAILED and NO_ANSWER
    failure_reason: int | None = None  # (0008,1197) as reported

    def line(self) -> str:
        return f"{self.sop_instance_uid} ({self.sop_class_uid}): {self.state}" + (
            f": {self.reason}" if self.reason else "")


@dataclass
class Transaction:
    """One N-ACTION and the report it got (or not)."""

    transaction_uid: str
    references: list[tuple[str, str]]  # (SOP class, SOP instance) as requested
    action_status: str = ""  # the N-ACTION-RSP status, or why there was none
    report_via: str = ""  # which association the report came on ('' : none)
    event_type: int | None = None
    _report: Dataset | None = field(default=None, repr=False)
    _arrived: threading.Event = field(default_factory=threading.Event, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"transaction_uid": self.transaction_uid, "instances": len(self.references),
                "action_status": self.action_status, "report_via": self.report_via or None,
                "event_type": self.event_type}


@dataclass
class CommitmentResult:
    """Per instance committed / failed (reason) / no answer, and the transactions."""

    node: str
    supported: bool
    outcomes: list[InstanceOutcome]
    transactions: list[Transaction]
    timeout_s: float
    batch_size: int
    unexpected: list[str] = field(default_factory=list)  # instances reported, not requested
    late_reports: list[str] = field(default_factory=list)  # transactions not (or no longer) awaited

    def _in(self, state: str) -> list[InstanceOutcome]:
        return [o for o in self.outcomes if o.state == state]

    @property
    def committed(self) -> list[InstanceOutcome]:
        return self._in(COMMITTED)

    @property
    def failed(self) -> list[InstanceOutcome]:
        return self._in(FAILED)

    @property
    def unanswered(self) -> list[InstanceOutcome]:
        return self._in(NO_ANSWER)

    @property
    def ok(self) -> bool:
        """The gate: supported, and every instance asked for committed."""
        return self.supported and len(self.committed) == len(self.outcomes)

    def summary(self) -> str:
        if not self.supported:
            return f"{self.node}: {NOT_SUPPORTED}"
        return (f"{self.node}: storage commitment of {len(self.outcomes)} instance(s) in "
                f"{len(self.transactions)} transaction(s): {len(self.committed)} committed, "
                f"{len(self.failed)} failed, {len(self.unanswered)} no answer")

    def problems(self) -> list[str]:
        """One line per instance not committed (the findings of the gate)."""
        if not self.supported:
            return [f"{self.node}: {NOT_SUPPORTED}"]
        return ([o.line() for o in self.outcomes if o.state != COMMITTED]
                + [f"reported but never requested: {uid}" for uid in self.unexpected]
                + [f"report for transaction {uid}, not (or no longer) awaited"
                   for uid in self.late_reports])

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "supported": self.supported, "ok": self.ok,
                "committed": len(self.committed), "failed": [asdict(o) for o in self.failed],
                "no_answer": [asdict(o) for o in self.unanswered],
                "transactions": [t.as_dict() for t in self.transactions],
                "timeout_s": self.timeout_s, "batch_size": self.batch_size,
                "unexpected": self.unexpected, "late_reports": self.late_reports}


class _Transactions:
    """The transactions awaiting a report, found by Transaction UID from any association."""

    def __init__(self) -> None:
        self._open: dict[str, Transaction] = {}
        self._lock = threading.Lock()
        self.unknown: list[str] = []  # Transaction UIDs reported that we did not ask for

    def expect(self, references: list[tuple[str, str]]) -> Transaction:
        transaction = Transaction(str(generate_uid()), references)
        with self._lock:
            self._open[transaction.transaction_uid] = transaction
        return transaction

    def forget(self, transaction: Transaction) -> None:
        with self._lock:
            self._open.pop(transaction.transaction_uid, None)

    def on_report(self, event: Any, via: str) -> tuple[int, None]:
        """EVT_N_EVENT_REPORT: take the report of an open transaction (PS3.4 J.3.3)."""
        if str(event.request.AffectedSOPClassUID) != STORAGE_COMMITMENT:
            return 0x0118, None  # no such SOP class
        if event.event_type not in (ALL_COMMITTED, FAILURES_EXIST):
            return 0x0113, None  # no such event type
        try:
            report = event.event_information
            uid = str(report.TransactionUID)
        except Exception as exc:  # noqa: BLE001 - a peer's undecodable data set
            LOG.warning("storage commitment report %s unreadable: %s", via, exc)
            return 0x0110, None  # processing failure
        with self._lock:
            transaction = self._open.get(uid)
            if transaction is None or transaction._arrived.is_set():
                self.unknown.append(uid)
                LOG.warning("storage commitment report for transaction %s %s: not awaited",
                            uid, via)
                return 0x0000, None  # received all the same; nothing to do with it
            transaction._report, transaction.event_type = report, event.event_type
            transaction.report_via = via
            transaction._arrived.set()
        return 0x0000, None


def _referenced(items: Iterable[Dataset] | None) -> dict[str, Dataset]:
    return {str(item.get("ReferencedSOPInstanceUID", "")): item for item in items or []}


def outcomes_of(transaction: Transaction, timeout_s: float) -> tuple[list[InstanceOutcome],
                                                                      list[str]]:
    """Each requested instance's outcome from the transaction's report (or its absence),
    and the instances the report names that were not requested."""
    report = transaction._report
    if report is None:
        why = transaction.action_status if transaction.action_status != "0x0000" else (
            f"no report within {timeout_s:g} s")
        state = FAILED if why.startswith("N-ACTION refused") else NO_ANSWER
        return [InstanceOutcome(c, i, state, why) for c, i in transaction.references], []
    try:
        done = _referenced(report.get("ReferencedSOPSequence"))
        failed = _referenced(report.get("FailedSOPSequence"))
    except Exception as exc:  # noqa: BLE001 - a peer's malformed sequences
        why = f"report unreadable ({type(exc).__name__})"
        return [InstanceOutcome(c, i, NO_ANSWER, why) for c, i in transaction.references], []
    outcomes = []
    for sop_class, uid in transaction.references:
        if uid in failed:
            code = failed[uid].get("FailureReason")
            code = int(code) if code is not None else None
            words = failure_words(code) if code is not None else "no failure reason given"
            outcomes.append(InstanceOutcome(sop_class, uid, FAILED, words, code))
        elif uid in done:
            reported_class = str(done[uid].get("ReferencedSOPClassUID", ""))
            if reported_class and reported_class != sop_class:
                outcomes.append(InstanceOutcome(
                    sop_class, uid, FAILED, f"committed as SOP class {reported_class}"))
            else:
                outcomes.append(InstanceOutcome(sop_class, uid, COMMITTED))
        else:
            outcomes.append(InstanceOutcome(sop_class, uid, NO_ANSWER,
                                            "the report does not mention it"))
    requested = {uid for _, uid in transaction.references}
    return outcomes, sorted((set(done) | set(failed)) - requested)


class ReportListener:
    """The harness as the requester's SCP for reports on a new association (PS3.4 J.3.3):
    a pynetdicom AE on (host, port) taking N-EVENT-REPORTs of Storage Commitment, with the
    SCP role the node proposes by SCP/SCU Role Selection (PS3.7 D.3.3.4)."""

    def __init__(self, host: str, port: int, transactions: _Transactions,
                 ae_title: str = HARNESS_AE_TITLE, timeout_s: float = 30.0) -> None:
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(STORAGE_COMMITMENT, SYNTAXES, scu_role=True, scp_role=True)
        ae.add_supported_context(Verification)
        ae.require_called_aet = True
        ae.maximum_associations = 8
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
        ae.maximum_pdu_size = 65536

        def on_report(event: Any) -> tuple[int, None]:
            calling = str(event.assoc.requestor.ae_title).strip()
            return transactions.on_report(event, f"on a new association from {calling}")

        try:
            self.server = ae.start_server(
                (host, port), block=False,
                evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report),
                              (evt.EVT_CONN_OPEN, on_connection_open)])
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot listen on {host}:{port} for storage commitment reports "
                f"({exc.strerror or exc}): something else holds the harness's address"
            ) from None

    def close(self) -> None:
        self.server.shutdown()


def _batches(references: Sequence[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    for start in range(0, len(references), size):
        yield list(references[start:start + size])


def _action_information(transaction: Transaction) -> Dataset:
    """The N-ACTION's Action Information (PS3.4 J.3.2.1.1)."""
    info = Dataset()
    info.TransactionUID = transaction.transaction_uid
    items = []
    for sop_class, uid in transaction.references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = uid
        items.append(item)
    info.ReferencedSOPSequence = items
    return info


def _close(assoc: Any) -> None:
    if assoc.is_established:
        assoc.release()


def request_commitment(
    peer: DimsePeer,
    instances: Iterable[tuple[str, str]],
    *,
    report_address: tuple[str, int] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    batch_size: int = DEFAULT_BATCH,
    release_after_request: bool = False,
    node_name: str = "",
) -> CommitmentResult:
    """Ask `peer` to commit `instances` ((SOP Class UID, SOP Instance UID) pairs) and wait
    for its reports (module docstring). `report_address`: where the harness listens for a
    report on a new association (None: only on the N-ACTION's). `release_after_request`:
    release each association right after its N-ACTION-RSP, so the report can only come on a
    new one. DimseConnectionError (exit 3) when the peer cannot be associated at all."""
    if release_after_request and report_address is None:
        raise ValueError("release_after_request needs a report_address to listen on")
    references = list(dict.fromkeys((str(c), str(i)) for c, i in instances))
    name = node_name or repr(peer)
    transactions = _Transactions()
    result = CommitmentResult(name, True, [], [], timeout_s, batch_size)
    with contextlib.ExitStack() as stack:
        if report_address is not None:
            listener = ReportListener(*report_address, transactions,
                                      ae_title=peer.calling_ae, timeout_s=peer.timeout_s)
            stack.callback(listener.close)
        if not references:  # nothing to commit: whether it could is still the question
            result.supported = _accepts(peer)
        for batch in _batches(references, batch_size):
            transaction = transactions.expect(batch)
            if not _run_transaction(peer, transaction, transactions, timeout_s,
                                    release_after_request):
                result.supported = False
                result.outcomes = []
                return result
            result.transactions.append(transaction)
            outcomes, unexpected = outcomes_of(transaction, timeout_s)
            result.outcomes.extend(outcomes)
            result.unexpected.extend(unexpected)
            transactions.forget(transaction)
    result.late_reports.extend(transactions.unknown)
    return result


def _associate(peer: DimsePeer, handlers: list) -> Any:
    """An association offering Storage Commitment, and Verification so that a node refusing
    the former still accepts it and the refusal reads as what it is (PS3.8 9.3.3.2, result
    3: abstract syntax not supported)."""
    return peer.associate([build_context(STORAGE_COMMITMENT, SYNTAXES),
                           build_context(Verification)], evt_handlers=handlers)


def _offered(assoc: Any) -> bool:
    return any(cx.abstract_syntax == STORAGE_COMMITMENT and cx.as_scu
               for cx in assoc.accepted_contexts)


def _accepts(peer: DimsePeer) -> bool:
    """Does the peer accept the Storage Commitment SOP class as SCP?"""
    assoc = _associate(peer, [])
    try:
        return _offered(assoc)
    finally:
        _close(assoc)


def _run_transaction(peer: DimsePeer, transaction: Transaction, transactions: _Transactions,
                     timeout_s: float, release_after_request: bool) -> bool:
    """One N-ACTION and the wait for its report; False when the node refuses the SOP class."""
    same = [(evt.EVT_N_EVENT_REPORT,
             lambda event: transactions.on_report(event, "on the N-ACTION's association"))]
    assoc = _associate(peer, same)
    try:
        if not _offered(assoc):
            return False
        # idle while the report is awaited: pynetdicom must not abort for the network timeout
        assoc.network_timeout = timeout_s + peer.timeout_s
        watchdog = Watchdog(lambda: assoc, peer.timeout_s)
        try:
            status, _reply = assoc.send_n_action(
                _action_information(transaction), REQUEST_COMMITMENT, STORAGE_COMMITMENT,
                WELL_KNOWN_INSTANCE)
        finally:
            watchdog.stop()
        code = status.get("Status") if status is not None else None
        if code is None or watchdog.expired:
            transaction.action_status = f"no N-ACTION-RSP within {peer.timeout_s:g} s"
            return True
        transaction.action_status = f"0x{int(code):04X}"
        if int(code) != 0x0000:
            transaction.action_status = f"N-ACTION refused with 0x{int(code):04X}"
            return True
        if release_after_request:
            _close(assoc)
        transaction._arrived.wait(timeout_s)
        return True
    finally:
        _close(assoc)


def commit_on_node(node: Any, instances: Iterable[tuple[str, str]], *,
                   report_port: int | None, timeout_s: float = DEFAULT_TIMEOUT_S,
                   batch_size: int = DEFAULT_BATCH, release_after_request: bool = False
                   ) -> CommitmentResult:
    """`request_commitment` on a Node, listening for reports on a new association at the
    harness's own address (127.0.0.1:`report_port`, Cluster.harness_peer) when given."""
    address = ("127.0.0.1", report_port) if report_port else None
    started = time.monotonic()
    result = request_commitment(node.dimse(), instances, report_address=address,
                                timeout_s=timeout_s, batch_size=batch_size,
                                release_after_request=release_after_request,
                                node_name=node.name)
    LOG.info("%s in %.1f s", result.summary(), time.monotonic() - started)
    return result
