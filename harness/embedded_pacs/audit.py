"""IHE ATNA audit messages of the embedded PACS (``--audit-syslog udp://HOST:PORT`` or
``tls://HOST:PORT``, off by default), so the harness's audit-trail check can be tested
against a node that audits.

One RFC 5424 message per operation served, its body a DICOM audit message
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

Transports: ``udp://HOST:PORT`` (RFC 5426), a non-blocking socket; ``tls://HOST:PORT``
(RFC 5425: octet-counted frames over TLS 1.2+, the node's own certificate presented and the
receiver's verified against the CA, as IHE ITI-20 asks of both sides), one persistent
connection fed by a bounded queue from a background thread. Sending never blocks or breaks a
DIMSE operation: a full queue drops the message and counts it; every connect and send has a
deadline; a lost connection is re-made with backoff. Standard library only: this package runs
alone in its container image.
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import logging
import os
import select
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from io import BytesIO
from typing import Any, NamedTuple
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

QUEUE_SIZE = 1000  # TLS: messages waiting for the connection; beyond, dropped and counted
CONNECT_TIMEOUT_S = 5.0  # TCP connect plus TLS handshake
SEND_TIMEOUT_S = 5.0  # one frame's sendall
MESSAGE_DEADLINE_S = 30.0  # a message not delivered by then is dropped (and counted)
BACKOFF_S = (0.2, 5.0)  # first and longest wait before connecting again


class AuditSyslogError(ValueError):
    """An --audit-syslog value that is not udp://HOST:PORT or tls://HOST:PORT."""


class AuditTarget(NamedTuple):
    scheme: str  # "udp" (RFC 5426) or "tls" (RFC 5425)
    host: str
    port: int


def parse_target(url: str) -> AuditTarget:
    parts = urlsplit(url)
    if parts.scheme not in ("udp", "tls") or not parts.hostname or parts.path not in ("", "/"):
        raise AuditSyslogError(f"--audit-syslog {url!r}: expected udp://HOST:PORT or "
                               "tls://HOST:PORT")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not port:
        raise AuditSyslogError(f"--audit-syslog {url!r}: port 1-65535 required")
    return AuditTarget(parts.scheme, parts.hostname, port)


class TlsChannel:
    """One persistent RFC 5425 connection, written by a background thread from a bounded
    queue (module docstring). Counters: ``dropped`` (queue full), ``expired`` (not delivered
    within MESSAGE_DEADLINE_S), ``connections`` (TLS sessions made)."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext,
                 queue_size: int = QUEUE_SIZE) -> None:
        self.host, self.port, self.context = host, port, context
        self.queue_size = queue_size
        self.dropped = self.expired = self.connections = 0
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._ready = threading.Condition()
        self._stop = threading.Event()
        self._tls: ssl.SSLSocket | None = None
        self._failing = False  # an outage was logged; say when it ends
        self._thread = threading.Thread(target=self._run, name="audit-tls", daemon=True)
        self._thread.start()

    def send(self, message: bytes) -> None:
        """Queue one syslog message (never blocks); dropped and counted when the queue is full."""
        with self._ready:
            if len(self._queue) >= self.queue_size:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 100 == 0:
                    LOG.warning("audit queue full (%d): %d messages dropped", self.queue_size,
                                self.dropped)
                return
            self._queue.append((time.monotonic(), b"%d %s" % (len(message), message)))
            self._ready.notify()

    def close(self, timeout_s: float = SEND_TIMEOUT_S) -> None:
        self._stop.set()
        with self._ready:
            self._ready.notify()
        self._thread.join(timeout_s)
        self._disconnect()

    def _run(self) -> None:
        backoff = BACKOFF_S[0]
        while not self._stop.is_set():
            with self._ready:
                self._ready.wait_for(lambda: self._queue or self._stop.is_set())
                if self._stop.is_set():
                    return
                queued, frame = self._queue[0]
            if time.monotonic() - queued > MESSAGE_DEADLINE_S:
                self._pop(expired=True)
                continue
            if not self._connected() and not self._connect():
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_S[1])
                continue
            backoff = BACKOFF_S[0]
            try:
                assert self._tls is not None
                self._tls.sendall(frame)
            except OSError as exc:  # ssl.SSLError and TimeoutError too
                self._outage(f"audit message to {self.host}:{self.port} not sent: {exc}")
                self._disconnect()
                continue
            self._pop()

    def _pop(self, expired: bool = False) -> None:
        with self._ready:
            self._queue.popleft()
            if expired:
                self.expired += 1
                if self.expired == 1 or self.expired % 100 == 0:
                    LOG.warning("%d audit messages expired undelivered (%g s)", self.expired,
                                MESSAGE_DEADLINE_S)

    def _connected(self) -> bool:
        """Is the connection still open? A receiver sends nothing (RFC 5425 4.2), so a readable
        socket is its close, an alert, or TLS 1.3 session tickets (read and ignored)."""
        tls = self._tls
        if tls is None:
            return False
        try:
            while select.select([tls], [], [], 0)[0]:
                tls.setblocking(False)
                try:
                    if not tls.recv(4096):
                        raise ConnectionResetError("closed by the receiver")
                except ssl.SSLWantReadError:
                    break
                finally:
                    tls.settimeout(SEND_TIMEOUT_S)
        except (OSError, ValueError) as exc:
            self._outage(f"audit connection to {self.host}:{self.port} lost: {exc}")
            self._disconnect()
            return False
        return True

    def _connect(self) -> bool:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            self._outage(f"audit repository {self.host}:{self.port} unreachable: {exc}")
            return False
        try:
            tls = self.context.wrap_socket(sock, server_hostname=self.host)
        except OSError as exc:
            sock.close()
            self._outage(f"audit repository {self.host}:{self.port}: TLS refused: {exc}")
            return False
        tls.settimeout(SEND_TIMEOUT_S)
        self._tls = tls
        self.connections += 1
        if self._failing:
            self._failing = False
            LOG.warning("audit repository %s:%d reachable again", self.host, self.port)
        return True

    def _disconnect(self) -> None:
        tls, self._tls = self._tls, None
        if tls is not None:
            try:
                tls.close()
            except OSError:
                pass

    def _outage(self, text: str) -> None:
        """Logged once per outage (retries follow with backoff)."""
        if not self._failing:
            self._failing = True
            LOG.warning("%s (retrying with backoff)", text)


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

    def __init__(self, url: str, ae_title: str, node_host: str = "127.0.0.1",
                 tls_context: ssl.SSLContext | None = None) -> None:
        """``tls_context`` (connection.client_tls_context) is required for a tls:// target."""
        self.target = parse_target(url)
        self.ae_title = ae_title
        self.node_host = node_host
        self.hostname = socket.gethostname() or "-"
        self._socket: socket.socket | None = None
        self._channel: TlsChannel | None = None
        if self.target.scheme == "tls":
            if tls_context is None:
                raise AuditSyslogError(f"--audit-syslog {url}: TLS needs the node's certificate")
            self._channel = TlsChannel(self.target.host, self.target.port, tls_context)
        else:
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
        if self._channel is not None:
            self._channel.send(self.frame(message))
            return
        assert self._socket is not None
        try:
            self._socket.sendto(self.frame(message), (self.target.host, self.target.port))
        except OSError as exc:
            self._warn(f"audit message to {self.target.host}:{self.target.port} not sent: {exc}")

    def _warn(self, text: str) -> None:
        if not self._warned:
            self._warned = True
            LOG.warning("%s (further audit errors are not logged)", text)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        if self._socket is not None:
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
