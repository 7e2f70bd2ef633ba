"""IHE ATNA audit messages of the embedded PACS (``--audit-syslog udp://HOST:PORT``, off by
default), so the harness's audit-trail check can be tested against a node that audits.

One RFC 5424 message over UDP (RFC 5426) per operation served, its body a DICOM audit message
(PS3.15 A.5.1), sent as IHE ITI TF-2 3.20 says (PRI 85: authpriv.notice; MSGID IHE+RFC-3881):

- C-STOREs received: "DICOM Instances Transferred" (110104, action C, PS3.15 A.5.3.4), one per
  study and association, sent when the association ends; the worst outcome of its C-STOREs;
- C-FIND: "Query" (110112, action E, A.5.3.10), the identifier in ParticipantObjectQuery;
- C-MOVE / C-GET served as the source: 110104 action R, one per request;
- a refused association (unknown calling or called AE title): "Security Alert" (110113,
  A.5.3.11) with event type "Node Authentication" (110126): the requesting node failed to
  authenticate by its AE title. User Authentication (A.5.3.12) is for a person's login and
  logout, which DICOM associations do not have.

Outcome (A.5.1 EventOutcomeIndicator): 0 success, 4 a warning or cancel (the action was not
complete), 8 a failure status. Participants: the calling AE (UserIsRequestor true) and this
node; objects: the Study Instance UID and the Patient ID (synthetic data in this node).

Sending never blocks or breaks a DIMSE operation: a non-blocking UDP socket, errors logged
once. Standard library only: this package runs alone in its container image.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import socket
import threading
import xml.etree.ElementTree as ET
from io import BytesIO
from typing import Any
from urllib.parse import urlsplit

LOG = logging.getLogger("harness.embedded_pacs")

PRI = 10 * 8 + 5  # facility authpriv (10), severity notice (5): IHE ITI TF-2 3.20.7.1
MSGID = "IHE+RFC-3881"
APP_NAME = "pacs-harness-embedded"

INSTANCES_TRANSFERRED = ("110104", "DICOM Instances Transferred")
QUERY = ("110112", "Query")
SECURITY_ALERT = ("110113", "Security Alert")
NODE_AUTHENTICATION = ("110126", "Node Authentication")
SOURCE_ROLE = ("110153", "Source Role ID")
DESTINATION_ROLE = ("110152", "Destination Role ID")
STUDY_UID_TYPE = ("110180", "Study Instance UID")
SOP_CLASS_TYPE = ("110181", "SOP Class UID")
PATIENT_NUMBER_TYPE = ("2", "Patient Number")  # RFC 3881 code, as PS3.15 A.5.2.6 uses


class AuditSyslogError(ValueError):
    """An --audit-syslog value that is not udp://HOST:PORT."""


def parse_target(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "udp" or not parts.hostname or parts.path not in ("", "/"):
        raise AuditSyslogError(f"--audit-syslog {url!r}: expected udp://HOST:PORT")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not port:
        raise AuditSyslogError(f"--audit-syslog {url!r}: port 1-65535 required")
    return parts.hostname, port


def outcome_of(status: int) -> int:
    """EventOutcomeIndicator of a DIMSE status (PS3.7 C: 0x0000 success, 0xB... warning,
    0xFE00 cancel; anything else a failure)."""
    if status == 0x0000:
        return 0
    if status >> 12 == 0xB or status == 0xFE00:
        return 4
    return 8


def _code(parent: ET.Element, tag: str, code: tuple[str, str], system: str = "DCM") -> None:
    ET.SubElement(parent, tag, {"csd-code": code[0], "codeSystemName": system,
                                "originalText": code[1]})


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditSender:
    """Builds and sends this node's audit messages (module docstring)."""

    def __init__(self, url: str, ae_title: str, node_host: str = "127.0.0.1") -> None:
        self.target = parse_target(url)
        self.ae_title = ae_title
        self.node_host = node_host
        self.hostname = socket.gethostname() or "-"
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._warned = False
        self._lock = threading.Lock()
        # (id(assoc), study) -> [calling, peer address, patient id, worst outcome]
        self._stores: dict[tuple[int, str], list[Any]] = {}
        # (id(assoc), message id) -> what the request was, until its final response
        self._requests: dict[tuple[int, int], dict[str, Any]] = {}

    # -- hooks called by the server's handlers --------------------------------------------
    def stored(self, event: Any, calling: str, status: int) -> None:
        """A C-STORE was answered: counted for its study, sent when the association ends."""
        study, patient = _study_and_patient(event)
        if not study:
            return
        key = (id(event.assoc), study)
        with self._lock:
            entry = self._stores.setdefault(key, [calling, _address(event), patient, 0])
            entry[3] = max(entry[3], outcome_of(status))

    def requested(self, event: Any, operation: str, calling: str, destination: str = "") -> None:
        """A C-FIND/C-GET/C-MOVE request arrived; audited with its final response."""
        request: dict[str, Any] = {
            "operation": operation, "calling": calling, "address": _address(event),
            "destination": destination,
        }
        try:
            if operation == "C-FIND":
                request["query"] = event.request.Identifier.getvalue()
                request["syntax"] = str(event.context.transfer_syntax)
                request["sop_class"] = str(event.request.AffectedSOPClassUID)
            else:
                identifier = event.identifier
                request["studies"] = _values(identifier.get("StudyInstanceUID"))
                request["patient"] = str(identifier.get("PatientID", "") or "")
        except Exception as exc:  # noqa: BLE001 - auditing never breaks the operation
            self._warn(f"cannot read the {operation} request: {type(exc).__name__}")
            return
        with self._lock:
            self._requests[(id(event.assoc), int(event.request.MessageID))] = request

    def responded(self, event: Any, msg_id: int, status: int, failed: int) -> None:
        """The final response of a request went out: send its audit message."""
        with self._lock:
            request = self._requests.pop((id(event.assoc), msg_id), None)
        if request is None:
            return
        outcome = outcome_of(status)
        if outcome == 0 and failed:
            outcome = 4
        if request["operation"] == "C-FIND":
            self._send(self._query(request, outcome))
            return
        for study in request["studies"] or [""]:
            self._send(self._retrieved(request, study, outcome))

    def association_ended(self, event: Any) -> None:
        """Released or aborted: send the C-STORE studies it received."""
        assoc = id(event.assoc)
        with self._lock:
            ended = [(k, v) for k, v in self._stores.items() if k[0] == assoc]
            for key, _ in ended:
                del self._stores[key]
            for key in [k for k in self._requests if k[0] == assoc]:
                del self._requests[key]
        for (_, study), (calling, address, patient, outcome) in ended:
            self._send(self._received(study, calling, address, patient, outcome))

    def rejected(self, event: Any, calling: str) -> None:
        message = self._message(SECURITY_ALERT, "E", 4, event_type=NODE_AUTHENTICATION)
        self._participant(message, calling, True, _address(event), None)
        self._participant(message, self.ae_title, False, self.node_host, None)
        self._source(message)
        self._send(message)

    # -- messages ----------------------------------------------------------------------
    def _message(self, event_id: tuple[str, str], action: str, outcome: int,
                 event_type: tuple[str, str] | None = None) -> ET.Element:
        root = ET.Element("AuditMessage")
        ident = ET.SubElement(root, "EventIdentification", {
            "EventActionCode": action, "EventDateTime": _now(),
            "EventOutcomeIndicator": str(outcome),
        })
        _code(ident, "EventID", event_id)
        if event_type:
            _code(ident, "EventTypeCode", event_type)
        return root

    def _participant(self, root: ET.Element, ae_title: str, requestor: bool, address: str,
                     role: tuple[str, str] | None) -> None:
        attributes = {"UserID": ae_title, "AlternativeUserID": f"AETITLES={ae_title}",
                      "UserIsRequestor": "true" if requestor else "false"}
        if address:
            attributes |= {"NetworkAccessPointID": address, "NetworkAccessPointTypeCode": "2"}
        participant = ET.SubElement(root, "ActiveParticipant", attributes)
        if role:
            _code(participant, "RoleIDCode", role)

    def _source(self, root: ET.Element) -> None:
        source = ET.SubElement(root, "AuditSourceIdentification",
                               {"AuditSourceID": self.ae_title})
        ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})  # application server

    def _object(self, root: ET.Element, object_id: str, id_type: tuple[str, str], *,
                type_code: str, role: str, system: str = "DCM") -> ET.Element:
        obj = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": object_id, "ParticipantObjectTypeCode": type_code,
            "ParticipantObjectTypeCodeRole": role,
        })
        _code(obj, "ParticipantObjectIDTypeCode", id_type, system)
        return obj

    def _study_objects(self, root: ET.Element, study: str, patient: str) -> None:
        self._source(root)
        if study:
            self._object(root, study, STUDY_UID_TYPE, type_code="2", role="3")
        if patient:
            self._object(root, patient, PATIENT_NUMBER_TYPE, type_code="1", role="1",
                         system="RFC-3881")

    def _received(self, study: str, calling: str, address: str, patient: str,
                  outcome: int) -> ET.Element:
        root = self._message(INSTANCES_TRANSFERRED, "C", outcome)
        self._participant(root, calling, True, address, SOURCE_ROLE)
        self._participant(root, self.ae_title, False, self.node_host, DESTINATION_ROLE)
        self._study_objects(root, study, patient)
        return root

    def _retrieved(self, request: dict[str, Any], study: str, outcome: int) -> ET.Element:
        root = self._message(INSTANCES_TRANSFERRED, "R", outcome)
        calling, address = request["calling"], request["address"]
        self._participant(root, self.ae_title, False, self.node_host, SOURCE_ROLE)
        if request["operation"] == "C-GET" or request["destination"] == calling:
            self._participant(root, calling, True, address, DESTINATION_ROLE)
        else:
            self._participant(root, calling, True, address, None)
            self._participant(root, request["destination"], False, "", DESTINATION_ROLE)
        self._study_objects(root, study, request["patient"])
        return root

    def _query(self, request: dict[str, Any], outcome: int) -> ET.Element:
        root = self._message(QUERY, "E", outcome)
        self._participant(root, request["calling"], True, request["address"], SOURCE_ROLE)
        self._participant(root, self.ae_title, False, self.node_host, DESTINATION_ROLE)
        self._source(root)
        obj = self._object(root, request["sop_class"], SOP_CLASS_TYPE, type_code="2", role="3")
        ET.SubElement(obj, "ParticipantObjectQuery").text = base64.b64encode(
            request["query"]).decode()
        ET.SubElement(obj, "ParticipantObjectDetail", {
            "type": "TransferSyntax",
            "value": base64.b64encode(request["syntax"].encode()).decode(),
        })
        return root

    # -- transport ---------------------------------------------------------------------
    def frame(self, message: ET.Element) -> bytes:
        """RFC 5424 6: header, no structured data, a UTF-8 body with its BOM."""
        header = f"<{PRI}>1 {_now()} {self.hostname} {APP_NAME} {os.getpid()} {MSGID} - "
        return header.encode() + b"\xef\xbb\xbf" + ET.tostring(message, encoding="utf-8",
                                                             xml_declaration=False)

    def _send(self, message: ET.Element) -> None:
        try:
            self._socket.sendto(self.frame(message), self.target)
        except OSError as exc:
            self._warn(f"audit message to {self.target[0]}:{self.target[1]} not sent: {exc}")

    def _warn(self, text: str) -> None:
        if not self._warned:
            self._warned = True
            LOG.warning("%s (further audit errors are not logged)", text)

    def close(self) -> None:
        self._socket.close()


def _values(value: Any) -> list[str]:
    if not value:
        return []
    items = value if isinstance(value, list | tuple) else str(value).split("\\")
    return [str(v).strip() for v in items if str(v).strip()]


def _address(event: Any) -> str:
    try:
        return str(event.assoc.requestor.address)
    except Exception:  # noqa: BLE001
        return ""


def _study_and_patient(event: Any) -> tuple[str, str]:
    """Study Instance UID and Patient ID of a received C-STORE data set (its header only)."""
    from pydicom import dcmread

    try:
        ds = dcmread(BytesIO(event.encoded_dataset()), stop_before_pixels=True,
                     specific_tags=["StudyInstanceUID", "PatientID"])
        return str(ds.get("StudyInstanceUID", "") or "").strip(), str(
            ds.get("PatientID", "") or "").strip()
    except Exception:  # noqa: BLE001 - refused data sets have no study to audit
        return "", ""
