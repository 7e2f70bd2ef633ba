"""Access control over DICOM: who may associate, and to whom a node sends on C-MOVE.

A PACS on a hospital network must answer only the peers it was configured for. Each probe
opens its own association with pynetdicom (over TLS when the node declares it), every step
bounded by a timeout and a watchdog (harness/dicom/watchdog.py), and records what the node
answered, as one `Check` (area "access") per service:

- an unknown calling AE title proposing one service at a time (Verification, Study Root
  FIND, CT Image Storage, Study Root MOVE): the node must refuse it, ideally with an
  A-ASSOCIATE-RJ (PS3.8 9.3.4, reason "calling AE title not recognised"). When it accepts,
  the probe shows what the intruder could do, trying only what cannot harm: C-ECHO and C-FIND
  always; C-STORE of one synthetic instance only into a node declared writable (docs/safety.md,
  Permissions); C-MOVE of a made-up study, to the harness's own AE title only. An accepted
  association whose request is then refused (an abort, a failure status) passes with a note;
  a request served, or a C-STORE that may not be tried, is a finding;
- a wrong called AE title from the harness's own (known) AE title: refused (PS3.8 9.3.4,
  reason "called AE title not recognised");
- a C-MOVE from the harness to an unknown destination AE: refused with 0xA801 "Move
  Destination unknown" (PS3.4 C.4.2.1.4.1), tried on an existing study where there is one;
  another failure status passes with a note (Orthanc 1.10 answers 0xC000).

First the harness's own C-ECHO, as the control: a node that answers nobody would pass
every refusal, so then every check is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from harness.dicom.peer import HARNESS_AE_TITLE
from harness.dicom.watchdog import Watchdog, shut_down
from harness.errors import EnvironmentProblem
from harness.nodes.base import Node
from harness.security.checks import Check

AREA = "access"
UNKNOWN_CALLING_AE = "PHPROBE-UNKNOWN"
WRONG_CALLED_AE = "PHPROBE-WRONG"
UNKNOWN_DESTINATION = "NOWHERE"
#: a made-up study (a UID from the harness's own generator: no node holds it)
MADE_UP_STUDY = generate_uid(entropy_srcs=["pacs-harness access-control probe"])
TIMEOUT_S = 15.0
#: the synthetic instance an accepted stranger stores (into a writable node only)
INTRUDER_SEED = 7717
PROBE_STUDY_SEED = 7718  # the study moved to an unknown destination, when none is there
MOVE_DESTINATION_UNKNOWN = 0xA801  # PS3.4 C.4.2.1.4.1
REJECT_REF = "PS3.8 9.3.4 (A-ASSOCIATE-RJ)"
MOVE_REF = "PS3.4 C.4.2.1.4.1 (C-MOVE status A801: Move Destination unknown)"
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
SERVICES = ("C-ECHO", "C-FIND", "C-STORE", "C-MOVE")
#: the rows of the access-control matrix, in order
CHECK_NAMES = (*(f"unknown calling AE: {s}" for s in SERVICES), "wrong called AE",
               "C-MOVE to unknown destination")


@dataclass
class Attempt:
    """How the node answered one association request (and the operation, if any)."""

    outcome: str  # "rejected", "context refused", "aborted", "no answer", "established"
    detail: str = ""  # rejection result/source/reason, or the error
    operation: str = ""  # what the operation did on an established association
    status: int | None = None  # the operation's last DIMSE status (None: none came)

    @property
    def associated(self) -> bool:
        return self.outcome == "established"

    def words(self) -> str:
        text = f"association {self.outcome}" + (f" ({self.detail})" if self.detail else "")
        return f"{text}; {self.operation}" if self.operation else text


#: what an operation gives back: its last DIMSE status (None: no response) and its words
Operation = Callable[[Any], tuple[int | None, str]]


def _tls_args(node: Node) -> tuple[Any, str | None] | None:
    tls = node.tls_client()
    return tls.tls_args() if tls else None


def _associate(node: Node, calling_ae: str, called_ae: str, abstract_syntax: str,
               operation: Operation | None) -> Attempt:
    """One association proposing one service; `operation(assoc)` runs only if accepted."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    ae.connection_timeout = min(TIMEOUT_S, 10.0)
    ae.add_requested_context(abstract_syntax, SYNTAXES)
    answers: list[Any] = []  # the A-ASSOCIATE-AC/RJ or A-ABORT primitive the node sent
    opened: list[Any] = []
    handlers = [
        (evt.EVT_CONN_OPEN, lambda event: opened.append(event.assoc)),
        (evt.EVT_ACSE_RECV, lambda event: answers.append(event.primitive)),
    ]
    kwargs: dict[str, Any] = {"ae_title": called_ae, "evt_handlers": handlers}
    tls_args = _tls_args(node)
    if tls_args:
        kwargs["tls_args"] = tls_args
    watchdog = Watchdog(lambda: opened[0] if opened else None, 3 * TIMEOUT_S)
    try:
        try:
            assoc = ae.associate(node.host, node.dicom_port, **kwargs)
        except OSError as exc:  # TLS handshake refused, connection reset
            return Attempt("no answer", f"{exc.__class__.__name__}: {exc}")
        if assoc.is_rejected:
            rj = answers[-1] if answers else None
            detail = (f"{rj.result_str}, source {rj.source_str}, reason {rj.reason_str}"
                      if rj is not None else "")
            return Attempt("rejected", detail)
        if not assoc.is_established:
            shut_down(assoc)
            accepted = any(type(a).__name__ == "A_ASSOCIATE" and a.result == 0 for a in answers)
            if accepted:  # A-ASSOCIATE-AC without the one context: pynetdicom aborts
                return Attempt("context refused", "A-ASSOCIATE-AC with the presentation "
                               "context rejected")
            if watchdog.expired:
                return Attempt("no answer", f"none within {3 * TIMEOUT_S:g} s")
            if assoc.is_aborted:
                return Attempt("aborted", "A-ABORT or the connection closed instead of an "
                               "A-ASSOCIATE-AC")
            return Attempt("no answer", "connection closed or refused")
        attempt = Attempt("established")
        try:
            if operation is not None:
                attempt.status, attempt.operation = operation(assoc)
        finally:
            if assoc.is_established:
                assoc.release()
        return attempt
    finally:
        watchdog.stop()


def _status_words(status: int | None) -> str:
    return "no response (abort or timeout)" if status is None else f"status 0x{status:04X}"


def _last_status(response: Any) -> int | None:
    return int(response.Status) if response is not None and "Status" in response else None


def _echo(assoc: Any) -> tuple[int | None, str]:
    status = _last_status(assoc.send_c_echo())
    return status, f"C-ECHO answered {_status_words(status)}"


def _find(assoc: Any) -> tuple[int | None, str]:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    matches, final = 0, None
    for response, identifier in assoc.send_c_find(query,
                                                  StudyRootQueryRetrieveInformationModelFind):
        final = _last_status(response)
        if final in (0xFF00, 0xFF01) and identifier is not None:
            matches += 1
    return final, f"C-FIND answered {_status_words(final)} with {matches} studies"


def _store_synthetic(assoc: Any) -> tuple[int | None, str]:
    from synthetic_data.samples import sample_study

    instance = sample_study(seed=INTRUDER_SEED)[0]
    status = _last_status(assoc.send_c_store(instance))
    return status, (f"C-STORE of synthetic instance {instance.SOPInstanceUID} answered "
                    f"{_status_words(status)}")


def _move(study_uid: str, destination: str) -> Operation:
    def move(assoc: Any) -> tuple[int | None, str]:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        final: int | None = None
        for response, _ in assoc.send_c_move(query, destination,
                                              StudyRootQueryRetrieveInformationModelMove):
            final = _last_status(response) if response is not None else final
        return final, f"C-MOVE to {destination} answered {_status_words(final)}"
    return move


#: statuses saying the request itself was refused (PS3.7 C.1.4, C.5.1: 0x0122 "SOP class
#: not supported", 0x0124 "not authorized"), as opposed to a request processed and failed
REFUSAL_STATUSES = {0x0122, 0x0124}


def _success(status: int | None) -> bool:
    """Success, pending or warning (PS3.7 C.1, C.4): the node did what was asked."""
    return status is not None and (
        status == 0x0000 or status in (0xFF00, 0xFF01) or (status & 0xF000) == 0xB000)


def _intruder_served(service: str, status: int | None) -> bool:
    """The unknown caller's request was served: for C-ECHO, C-FIND and C-STORE a success
    (any failure means it got nothing); for C-MOVE any answer but a refusal or none, since
    a failure (0xA801, 0xC000, 0xA702) still says the node set about moving the study."""
    if service == "C-MOVE":
        return status is not None and status not in REFUSAL_STATUSES
    return _success(status)


# -- remedies by kind -------------------------------------------------------------------


def _is_orthanc(node: Node) -> bool:
    return node.kind == "orthanc" or bool(node.spec.orthanc_rest)


def _calling_remedy(node: Node) -> str:
    if _is_orthanc(node):
        return ("Orthanc: set DicomAlwaysAllowEcho, DicomAlwaysAllowFind, DicomAlwaysAllowStore, "
                "DicomAlwaysAllowMove and DicomAlwaysAllowGet false and list each peer (AE title "
                "and host) in DicomModalities, with DicomCheckModalityHost true")
    if node.kind == "dcmqrscp":
        return ("dcmqrscp: give the AE in dcmqrscp.cfg's AETable a HostTable group of the known "
                "peers, never ANY")
    if node.kind == "embedded":
        return "embedded PACS: start it with --peers listing the known peers"
    return ("restrict calling AE titles (and their hosts) to the known peers in the PACS's "
            "AE title / peer whitelist")


def _called_remedy(node: Node) -> str:
    if _is_orthanc(node):
        return "Orthanc: set DicomCheckCalledAet true"
    return "make the PACS refuse associations addressed to another AE title than its own"


def _move_remedy(node: Node) -> str:
    if _is_orthanc(node):
        return ("Orthanc: C-MOVE destinations come from DicomModalities only; remove any "
                "catch-all destination and update Orthanc if it moves to unknown AE titles")
    return ("send C-MOVE only to destinations configured on the PACS and answer 0xA801 "
            "for any other AE title")


# -- the checks ---------------------------------------------------------------------------


def _unknown_calling_checks(node: Node, move_destination: str) -> list[Check]:
    """PS3.8 9.3.4: an unknown calling AE title gets an A-ASSOCIATE-RJ, per service."""
    services: list[tuple[str, str, Operation | None]] = [
        ("C-ECHO", Verification, _echo),
        ("C-FIND", StudyRootQueryRetrieveInformationModelFind, _find),
        ("C-STORE", CTImageStorage, _store_synthetic if node.writable else None),
        ("C-MOVE", StudyRootQueryRetrieveInformationModelMove,
         _move(MADE_UP_STUDY, move_destination)),
    ]
    checks = []
    for service, abstract_syntax, operation in services:
        attempt = _associate(node, UNKNOWN_CALLING_AE, node.ae_title, abstract_syntax, operation)
        checks.append(_unknown_calling_check(node, service, attempt, operation is not None))
    return checks


def _unknown_calling_check(node: Node, service: str, attempt: Attempt, tried: bool) -> Check:
    """Pass when the association or the request was refused; fail when the request was
    served, or (C-STORE into a node the harness may not write) when it could not be tried."""
    name = f"unknown calling AE: {service}"
    observed = f"calling AE {UNKNOWN_CALLING_AE}: {attempt.words()}"
    if service == "C-MOVE" and attempt.associated:
        observed += f" (a made-up study {MADE_UP_STUDY})"
    if not attempt.associated:
        return Check(node.name, AREA, name, "pass", observed, reference=REJECT_REF)
    if not tried:
        observed += f"; {service} not attempted: node not writable"
    elif not _intruder_served(service, attempt.status):
        return Check(node.name, AREA, name, "pass",
                     f"{observed}: association accepted, but the request refused",
                     reference=REJECT_REF)
    return Check(node.name, AREA, name, "fail", observed, _calling_remedy(node), REJECT_REF)


def _wrong_called_check(node: Node) -> Check:
    attempt = _associate(node, HARNESS_AE_TITLE, WRONG_CALLED_AE, Verification, _echo)
    observed = f"calling AE {HARNESS_AE_TITLE} to called AE {WRONG_CALLED_AE}: {attempt.words()}"
    name = "wrong called AE"
    if not attempt.associated or not _success(attempt.status):
        return Check(node.name, AREA, name, "pass", observed, reference=REJECT_REF)
    return Check(node.name, AREA, name, "fail", observed, _called_remedy(node), REJECT_REF)


def _existing_study(node: Node) -> str | None:
    """One study the node holds (to move it nowhere), found with the harness's C-FIND."""
    try:
        return node.dimse(timeout_s=TIMEOUT_S).any_study_uid()
    except EnvironmentProblem:
        return None


def _study_to_move(node: Node) -> tuple[str | None, str]:
    """A study the node holds, else one synthetic instance stored for the probe when the
    node is writable (a C-MOVE of nothing proves nothing: dcmqrscp answers it 0x0000 without
    looking at the destination), else None."""
    study = _existing_study(node)
    if study:
        return study, f"existing study {study}"
    if not node.writable:
        return None, f"made-up study {MADE_UP_STUDY} (the node holds none)"
    from synthetic_data.samples import sample_study

    node.require_writable("store a synthetic study to move to an unknown destination")
    instance = sample_study(seed=PROBE_STUDY_SEED)[0]
    try:
        stored = node.dimse(timeout_s=TIMEOUT_S).store([instance])
    except EnvironmentProblem as exc:
        return None, f"made-up study {MADE_UP_STUDY} (storing one failed: {exc})"
    if not stored.ok:
        return None, f"made-up study {MADE_UP_STUDY} (the node refused the probe's C-STORE)"
    uid = str(instance.StudyInstanceUID)
    return uid, f"synthetic study {uid} stored for the probe"


def _unknown_destination_check(node: Node) -> Check:
    """PS3.4 C.4.2.1.4.1: a C-MOVE to an AE title the node does not know fails with 0xA801."""
    name = "C-MOVE to unknown destination"
    study, what = _study_to_move(node)
    attempt = _associate(node, HARNESS_AE_TITLE, node.ae_title,
                         StudyRootQueryRetrieveInformationModelMove,
                         _move(study or MADE_UP_STUDY, UNKNOWN_DESTINATION))
    observed = f"{what}: {attempt.words()}"
    if not attempt.associated:
        return Check(node.name, AREA, name, "skip",
                     f"the harness's own C-MOVE association was refused: {observed}",
                     reference=MOVE_REF)
    if attempt.status == MOVE_DESTINATION_UNKNOWN:
        return Check(node.name, AREA, name, "pass", observed, reference=MOVE_REF)
    if not _success(attempt.status):
        return Check(node.name, AREA, name, "pass",
                     f"{observed}: refused, though not with 0xA801", reference=MOVE_REF)
    if study is None:
        return Check(node.name, AREA, name, "skip",
                     f"{observed}: inconclusive, nothing to move (declare the node writable "
                     "or run it on a node holding a study)", reference=MOVE_REF)
    return Check(node.name, AREA, name, "fail", observed, _move_remedy(node), MOVE_REF)


def access_checks(node: Node, known_destination: str | None = None) -> list[Check]:
    """The access-control row of `node`: unknown calling AE per service, wrong called AE,
    C-MOVE to an unknown destination. `known_destination`: the AE title the unknown caller's
    C-MOVE names (default: the harness's own; never a third party that would receive data)."""
    if node.dicom_port is None:
        return [Check(node.name, AREA, "DICOM access control", "skip", "node has no DICOM port")]
    control = _associate(node, HARNESS_AE_TITLE, node.ae_title, Verification, _echo)
    if not control.associated or not _success(control.status):
        # a node that answers nobody would pass every refusal: nothing can be told
        return [Check(node.name, AREA, name, "skip", "the harness's own C-ECHO (calling AE "
                      f"{HARNESS_AE_TITLE}) did not succeed: {control.words()}")
                for name in CHECK_NAMES]
    destination = known_destination or HARNESS_AE_TITLE
    checks = _unknown_calling_checks(node, destination)
    checks.append(_wrong_called_check(node))
    checks.append(_unknown_destination_check(node))
    return checks
