"""The embedded PACS server: its AE, the association policy, the event bindings and shutdown.

Association policy (PS3.8 7.1.1, 9.3.4): the called AE title must be this node's (else
A-ASSOCIATE-RJ reason 7); with ``--peers``, the calling AE title must be one of the peers
(reason 3; the file is re-read per association). At most ``MAX_ASSOCIATIONS`` associations
whose request arrived (reason 2 beyond); connections still silent are reaped by the deadlines
of connection.py and do not count. Idle associations are aborted after twice ``--timeout``.
SIGTERM or SIGINT shut the server down and exit 0, within a few seconds even while a request
is being served.

Logging goes to stderr: one line per association and one per DIMSE request (its final response,
with the calling AE title and status). Patient names and IDs are never logged, only UIDs.
"""

from __future__ import annotations

import copy
import logging
import signal
import socket
import sqlite3
import ssl
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import (
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from harness import sqlite_db
from harness.embedded_pacs import mpps
from harness.embedded_pacs.audit import AuditSender
from harness.embedded_pacs.commitment import STORAGE_COMMITMENT, Committer
from harness.embedded_pacs.connection import (
    DEFAULT_TIMEOUT_S,
    MAX_ASSOCIATIONS,
    MAX_PDU_RECEIVE,
    STOPPING,
    awaiting_request,
    guard_connection,
)
from harness.embedded_pacs.hl7 import Hl7Listener
from harness.embedded_pacs.peers import PEERS_FILE_ERRORS, load_peers
from harness.embedded_pacs.query import handle_find
from harness.embedded_pacs.retrieve import Retriever
from harness.embedded_pacs.storage import Storage
from harness.embedded_pacs.store import handle_store
from harness.embedded_pacs.worklist import handle_worklist_find

LOG = logging.getLogger("harness.embedded_pacs")

SHUTDOWN_GRACE_S = 3.0
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3

QUERY_RETRIEVE_MODELS = (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
)


def _calling(event: Any) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except Exception:
        return "?"


class _DeferredHandshakeServer(ThreadedAssociationServer):
    """pynetdicom's server, but a TLS handshake is left to the connection's thread
    (connection.guard_connection), within ARTIM: pynetdicom would handshake in the accept loop,
    where one silent or plaintext client stalls every other."""

    def get_request(self) -> tuple[socket.socket, Any]:
        client_socket, address = self.socket.accept()
        if self.ssl_context:
            client_socket = self.ssl_context.wrap_socket(
                client_socket, server_side=True, do_handshake_on_connect=False
            )
        return client_socket, address


class _PacsAE(AE):
    """An AE whose accepted calling AE titles are the peers file's, re-read per association so
    the harness may edit the topology live; no peers file: any calling AE title is accepted."""

    peers_file: Path | None = None

    @property  # type: ignore[override]
    def maximum_associations(self) -> int:
        """The local limit (PS3.8 9.3.4 reason 2) counts only associations whose request
        arrived: silent connections, reaped by ARTIM, cannot lock honest peers out."""
        return self._maximum_associations + awaiting_request(self.active_associations)

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        self._maximum_associations = max(1, int(value))

    def make_server(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["server_class"] = _DeferredHandshakeServer
        return super().make_server(*args, **kwargs)

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        if self.peers_file is None:
            return []
        try:
            return list(load_peers(self.peers_file))
        except PEERS_FILE_ERRORS as exc:
            LOG.error(
                "peers file %s unusable, only %s may call: %s", self.peers_file, self.ae_title, exc
            )
            return [self.ae_title]


class EmbeddedPacs:
    """State shared by the handlers: storage, peers file, and the notes logged per request."""

    def __init__(
        self,
        ae_title: str,
        storage_dir: Path,
        peers_file: Path | None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        audit: AuditSender | None = None,
        client_tls: ssl.SSLContext | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.audit = audit  # IHE ATNA messages (audit.py), None: not audited
        self.timeout_s = timeout_s
        self.storage = Storage(storage_dir)
        # client_tls: our certificate, for C-MOVE sub-associations to peers marked "tls"
        self.retriever = Retriever(storage_dir, peers_file, client_tls)
        self.committer = Committer(storage_dir, peers_file, ae_title, timeout_s, client_tls)
        self.peers_file = peers_file
        self.ae: AE | None = None
        self._notes: dict[tuple[int, int], str] = {}
        self._notes_lock = threading.Lock()

    def build_ae(self) -> AE:
        """An AE offering exactly the services the harness expects of a legacy PACS:
        Verification; Storage SCP for every storage SOP class of pynetdicom's
        ``AllStoragePresentationContexts`` with every transfer syntax; Patient Root and Study
        Root Query/Retrieve FIND, MOVE and GET; Modality Worklist FIND and MPPS (worklist.py,
        mpps.py) (module docstring for the association policy).
        """
        ae = _PacsAE(ae_title=self.ae_title)
        ae.peers_file = self.peers_file
        ae.require_called_aet = True
        ae.maximum_associations = MAX_ASSOCIATIONS
        ae.maximum_pdu_size = MAX_PDU_RECEIVE
        ae.acse_timeout = self.timeout_s
        ae.dimse_timeout = 2 * self.timeout_s
        ae.network_timeout = 2 * self.timeout_s
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(
                cx.abstract_syntax, ALL_TRANSFER_SYNTAXES, scp_role=True, scu_role=False
            )
        for model in QUERY_RETRIEVE_MODELS:
            ae.add_supported_context(model)
        ae.add_supported_context(STORAGE_COMMITMENT, [ExplicitVRLittleEndian,
                                                      ImplicitVRLittleEndian])
        ae.add_supported_context(ModalityWorklistInformationFind)  # worklist.py
        ae.add_supported_context(ModalityPerformedProcedureStep)  # mpps.py
        self.ae = ae
        return ae

    def handlers(self) -> list[tuple[Any, Any]]:
        """Event bindings for ``AE.start_server``."""
        return [
            (evt.EVT_CONN_OPEN, guard_connection(self.timeout_s)),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_GET, self.on_get),
            (evt.EVT_C_MOVE, self.on_move),
            (evt.EVT_N_ACTION, self.on_n_action),
            (evt.EVT_DIMSE_SENT, self.committer.on_dimse_sent),
            (evt.EVT_N_CREATE, self.on_n_create),
            (evt.EVT_N_SET, self.on_n_set),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_DIMSE_SENT, self.on_dimse_sent),
        ]

    # -- logging -------------------------------------------------------------------------------

    def _noter(self, event: Any) -> Callable[[str], None]:
        """A function attaching detail to this request; logged with its final response."""
        key = (id(event.assoc), int(event.request.MessageID))

        def note(text: str) -> None:
            with self._notes_lock:
                self._notes[key] = text

        return note

    def on_accepted(self, event: Any) -> None:
        req = event.assoc.requestor
        LOG.info(
            "association accepted calling=%s peer=%s:%s", _calling(event), req.address, req.port
        )

    def on_rejected(self, event: Any) -> None:
        LOG.warning("association rejected calling=%s", _calling(event))
        if self.audit:
            self.audit.rejected(event, _calling(event))

    def on_aborted(self, event: Any) -> None:
        LOG.warning("association aborted calling=%s", _calling(event))
        if self.audit:
            self.audit.association_ended(event)

    def on_released(self, event: Any) -> None:
        LOG.debug("association released calling=%s", _calling(event))
        if self.audit:
            self.audit.association_ended(event)

    def on_dimse_sent(self, event: Any) -> None:
        """Log each request once, when its final (non-pending) response goes out."""
        msg = event.message
        name = type(msg).__name__
        if not name.endswith("_RSP"):
            return
        cs = msg.command_set
        status = int(cs.get("Status", 0))
        if status in (0xFF00, 0xFF01):
            return
        msg_id = int(cs.get("MessageIDBeingRespondedTo", 0))
        with self._notes_lock:
            note = self._notes.pop((id(event.assoc), msg_id), "")
        parts = [
            name.replace("_", "-"),
            f"calling={_calling(event)}",
            f"msg_id={msg_id}",
            f"status=0x{status:04X}",
        ]
        if name == "C_STORE_RSP":
            parts.append(f"sop={cs.get('AffectedSOPInstanceUID', '')}")
        if name in ("C_GET_RSP", "C_MOVE_RSP"):
            parts.append(
                "completed={} failed={} warning={}".format(
                    cs.get("NumberOfCompletedSuboperations", 0),
                    cs.get("NumberOfFailedSuboperations", 0),
                    cs.get("NumberOfWarningSuboperations", 0),
                )
            )
        if note:
            parts.append(note)
        LOG.info(" ".join(str(p) for p in parts))
        if self.audit and name in ("C_FIND_RSP", "C_GET_RSP", "C_MOVE_RSP"):
            failed = int(cs.get("NumberOfFailedSuboperations", 0) or 0)
            self.audit.responded(event, msg_id, status, failed)

    # -- services (store.py, query.py, retrieve.py) ---------------------------------------------

    def on_echo(self, event: Any) -> int:
        """Verification always succeeds: the node is alive if it answers."""
        return 0x0000

    def on_store(self, event: Any) -> int | Dataset:
        result = handle_store(event, self.storage, _calling(event), self._noter(event))
        if self.audit:
            status = result if isinstance(result, int) else int(result.Status)
            self.audit.stored(event, _calling(event), status)
        return result

    def on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        if self.audit:
            self.audit.requested(event, "C-FIND", _calling(event))
        if event.request.AffectedSOPClassUID == ModalityWorklistInformationFind:
            return handle_worklist_find(event, self.storage.root, self._noter(event))
        return handle_find(event, self.storage.db_file, self.ae_title, self._noter(event))

    def on_n_create(self, event: Any) -> tuple[Any, Dataset | None]:
        return mpps.handle_n_create(event, self.storage.root, self._noter(event))

    def on_n_set(self, event: Any) -> tuple[Any, Dataset | None]:
        return mpps.handle_n_set(event, self.storage.root, self._noter(event))

    def on_get(self, event: Any) -> Iterator[int | tuple[int, Dataset | None]]:
        if self.audit:
            self.audit.requested(event, "C-GET", _calling(event), _calling(event))
        return self.retriever.handle_get(event, self._noter(event))

    def on_n_action(self, event: Any) -> tuple[int, Dataset | None]:
        return self.committer.handle_action(event, _calling(event), self._noter(event))

    def on_move(self, event: Any) -> Iterator[Any]:
        assert self.ae is not None
        if self.audit:
            destination = str(event.move_destination or "").strip()
            self.audit.requested(event, "C-MOVE", _calling(event), destination)
        return self.retriever.handle_move(event, self.ae, self._noter(event))


class _ContextTemplates(list):
    """The server's supported presentation contexts (PS3.8 9.3.3.2). pynetdicom deep-copies
    them for every association it accepts: 50-270 ms for 177 SOP classes x 45 transfer syntaxes,
    paid before each association's first C-STORE. A copy of each context with its own syntax
    list is as independent (UIDs are immutable strings) and takes ~2 ms."""

    def __deepcopy__(self, memo: dict) -> list:
        copies = []
        for context in self:
            twin = copy.copy(context)
            twin._transfer_syntax = list(context._transfer_syntax)
            copies.append(twin)
        return copies


def serve(
    ae_title: str,
    port: int,
    storage_dir: Path,
    peers_file: Path | None,
    host: str = "127.0.0.1",
    stop: threading.Event | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    audit: AuditSender | None = None,
    tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None,
    hl7_port: int | None = None,
) -> int:
    """Run the node until ``stop`` is set (or SIGTERM/SIGINT in the main thread); exit code.
    ``tls``: (server, client) contexts of connection.py: the port takes DICOM over TLS only
    (PS3.15 B.1) and C-MOVEs to TLS peers use the client one. ``hl7_port``: an MLLP
    listener for ADT^A08/A40 there (hl7.py), bound before the DICOM port."""
    server_tls, client_tls = tls or (None, None)
    pacs = EmbeddedPacs(ae_title, storage_dir.resolve(), peers_file, timeout_s, audit=audit,
                         client_tls=client_tls)
    try:
        pacs.storage.prepare()
    except sqlite_db.SchemaVersionError as exc:
        print(f"embedded PACS {ae_title}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, sqlite3.Error) as exc:
        print(f"embedded PACS {ae_title}: storage {storage_dir} unusable: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    hl7 = None
    if hl7_port is not None:
        try:
            hl7 = Hl7Listener(pacs.storage, host, hl7_port, timeout_s)
        except OSError as exc:
            print(f"embedded PACS {ae_title}: cannot bind HL7 {host}:{hl7_port}: {exc}",
                  file=sys.stderr)
            return EXIT_ENVIRONMENT
        hl7.start()
        print(f"embedded PACS {ae_title} HL7 (MLLP) listening on {host}:{hl7.port}",
              file=sys.stderr, flush=True)
    ae = pacs.build_ae()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    try:
        server = ae.start_server(
            (host, port), block=False, evt_handlers=pacs.handlers(), ssl_context=server_tls
        )
    except OSError as exc:
        print(f"embedded PACS {ae_title}: cannot bind {host}:{port}: {exc}", file=sys.stderr)
        if hl7 is not None:
            hl7.stop()
        return EXIT_ENVIRONMENT
    assert server is not None
    server.contexts = _ContextTemplates(server.contexts)
    bound_port = server.server_address[1]
    if server_tls:
        LOG.info("DICOM over TLS only on port %s (PS3.15 B.1)", bound_port)
    print(f"embedded PACS {ae_title} listening on {host}:{bound_port}", file=sys.stderr, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        LOG.info("shutting down")
        STOPPING.set()  # guarded reads give up, so no thread waits on a peer
        if hl7 is not None:
            hl7.stop()
        closer = threading.Thread(target=ae.shutdown, name="shutdown", daemon=True)
        closer.start()
        closer.join(SHUTDOWN_GRACE_S)
        if closer.is_alive():
            LOG.warning("associations still busy after %g s; exiting anyway", SHUTDOWN_GRACE_S)
        else:
            pacs.storage.close()
    return EXIT_OK
