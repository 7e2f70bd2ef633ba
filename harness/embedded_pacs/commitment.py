"""Storage Commitment Push Model SCP of the embedded PACS (PS3.4 J.3).

N-ACTION (Action Type 1 on the well-known instance): every referenced instance is checked
against the index and its stored file; the N-ACTION-RSP says only that the request was taken
(0x0000), or why not (0x0123 no such action, 0x0117 not the well-known instance, 0x0115 a
request without Transaction UID or references). Then the N-EVENT-REPORT (Event Type 1 all
committed, 2 failures exist) goes out from a thread of its own, once the N-ACTION-RSP is sent:

* on the same association while the requester keeps it open (PS3.4 J.3.3);
* else, when the requester released it (or releases it while the report is under way), on a
  new association to the requester, found by its AE title in the peers file (peers.py), with
  SCP/SCU Role Selection proposing this node as SCP (PS3.4 J.3.3, PS3.7 D.3.3.4).

Failure reasons (PS3.4 J.3.3.1, Failed SOP Sequence): 0x0112 no such object instance (no index
row, or its file is gone), 0x0119 class/instance conflict (stored under another SOP class),
0x0110 processing failure (the index cannot be read). Each wait is bounded by the server's
timeout; a report that cannot be delivered at all is logged, one line, never retried forever.
"""

from __future__ import annotations

import logging
import sqlite3
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.pdu_primitives import A_RELEASE, SCP_SCU_RoleSelectionNegotiation

from harness.embedded_pacs.connection import prompt_tcp
from harness.embedded_pacs.peers import PEERS_FILE_ERRORS, load_peer_table
from harness.embedded_pacs.storage import INDEX_FILENAME, connect

LOG = logging.getLogger("harness.embedded_pacs")

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model SOP Class
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_COMMITMENT = 1  # Action Type ID
ALL_COMMITTED, FAILURES_EXIST = 1, 2  # Event Type IDs
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
PROCESSING_FAILURE = 0x0110
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
LOOKUP_CHUNK = 500  # SQLite host parameters per query


def _reference(sop_class: str, sop_instance: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    if reason is not None:
        item.FailureReason = reason
    return item


class Committer:
    """The N-ACTION handler and the report sender, over one storage directory and peers file."""

    def __init__(self, storage_dir: Path, peers_file: Path | None, ae_title: str,
                 timeout_s: float, client_tls: ssl.SSLContext | None = None) -> None:
        self.storage = storage_dir
        self.peers_file = peers_file
        self.ae_title = ae_title
        self.timeout_s = timeout_s
        self.client_tls = client_tls  # our certificate, for requesters that take TLS only
        self._responses: dict[tuple[int, int], threading.Event] = {}  # N-ACTION-RSPs awaited
        self._lock = threading.Lock()

    # -- N-ACTION ------------------------------------------------------------------------------

    def handle_action(self, event: Any, calling: str,
                      note: Callable[[str], None]) -> tuple[int, Dataset | None]:
        """EVT_N_ACTION: check the request, answer it, and schedule the report."""
        req = event.request
        if int(req.ActionTypeID) != REQUEST_COMMITMENT:
            note(f"action type {req.ActionTypeID} unknown")
            return 0x0123, None
        if str(req.RequestedSOPInstanceUID) != WELL_KNOWN_INSTANCE:
            note("not the well-known SOP instance")
            return 0x0117, None
        try:
            info = event.action_information
            transaction_uid = str(info.TransactionUID)
            references = [(str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
                          for item in info.ReferencedSOPSequence]
        except Exception as exc:  # noqa: BLE001 - a requester's malformed data set
            note(f"action information unreadable: {type(exc).__name__}")
            return 0x0115, None
        if not transaction_uid or not references:
            note("no Transaction UID or no Referenced SOP Sequence")
            return 0x0115, None
        sent = threading.Event()
        with self._lock:
            self._responses[(id(event.assoc), int(req.MessageID))] = sent
        note(f"transaction={transaction_uid} instances={len(references)}")
        threading.Thread(
            target=self._report, name=f"commitment-{transaction_uid[-12:]}", daemon=True,
            args=(event.assoc, calling, transaction_uid, references, sent),
        ).start()
        return 0x0000, None

    def on_dimse_sent(self, event: Any) -> None:
        """EVT_DIMSE_SENT: an N-ACTION-RSP is out, so its report may follow it."""
        msg = event.message
        if type(msg).__name__ != "N_ACTION_RSP":
            return
        key = (id(event.assoc), int(msg.command_set.get("MessageIDBeingRespondedTo", 0)))
        with self._lock:
            sent = self._responses.pop(key, None)
        if sent is not None:
            sent.set()

    # -- the check -----------------------------------------------------------------------------

    def check(self, references: list[tuple[str, str]]) -> tuple[list[Dataset], list[Dataset]]:
        """(committed, failed) Referenced SOP Sequence items for `references`."""
        try:
            stored = self._stored({uid for _, uid in references})
        except (OSError, sqlite3.Error) as exc:
            LOG.error("storage commitment: index unreadable: %s", exc)
            return [], [_reference(c, i, PROCESSING_FAILURE) for c, i in references]
        committed, failed = [], []
        for sop_class, uid in references:
            row = stored.get(uid)
            if row is None or not (self.storage / row[1]).is_file():
                failed.append(_reference(sop_class, uid, NO_SUCH_OBJECT_INSTANCE))
            elif row[0] != sop_class:
                failed.append(_reference(sop_class, uid, CLASS_INSTANCE_CONFLICT))
            else:
                committed.append(_reference(sop_class, uid))
        return committed, failed

    def _stored(self, uids: set[str]) -> dict[str, tuple[str, str]]:
        """SOP Instance UID -> (SOP Class UID, relative path) of those indexed."""
        wanted = sorted(uids)
        found: dict[str, tuple[str, str]] = {}
        conn = connect(self.storage / INDEX_FILENAME)
        try:
            for start in range(0, len(wanted), LOOKUP_CHUNK):
                chunk = wanted[start:start + LOOKUP_CHUNK]
                for row in conn.execute(
                    "SELECT sop_instance_uid, sop_class_uid, path FROM instances WHERE "
                    f"sop_instance_uid IN ({','.join('?' * len(chunk))})", chunk):
                    found[row[0]] = (row[1], row[2])
        finally:
            conn.close()
        return found

    # -- the report ----------------------------------------------------------------------------

    def _report(self, assoc: Any, calling: str, transaction_uid: str,
                references: list[tuple[str, str]], sent: threading.Event) -> None:
        """Once the N-ACTION-RSP is out: check, then send the N-EVENT-REPORT (module
        docstring: which association)."""
        if not sent.wait(self.timeout_s):
            LOG.warning("storage commitment transaction=%s: N-ACTION-RSP not sent",
                        transaction_uid)
        committed, failed = self.check(references)
        info = Dataset()
        info.TransactionUID = transaction_uid
        if committed:
            info.ReferencedSOPSequence = committed
        if failed:
            info.FailedSOPSequence = failed
        event_type = FAILURES_EXIST if failed else ALL_COMMITTED
        summary = (f"transaction={transaction_uid} committed={len(committed)} "
                   f"failed={len(failed)}")
        if self._still_open(assoc) and self._send_on(assoc, info, event_type):
            LOG.info("N-EVENT-REPORT calling=%s %s on the same association", calling, summary)
            return
        if self._send_new(calling, info, event_type):
            LOG.info("N-EVENT-REPORT calling=%s %s on a new association", calling, summary)

    @staticmethod
    def _still_open(assoc: Any) -> bool:
        """Established, and no A-RELEASE-RQ waiting to be answered."""
        if not assoc.is_established:
            return False
        pending = assoc.dul.peek_next_pdu()
        return not (isinstance(pending, A_RELEASE) and pending.result is None)

    def _send_on(self, assoc: Any, info: Dataset, event_type: int) -> bool:
        """The report on `assoc`; False when it got no success answer. A release arriving
        meanwhile wakes the wait at once (a report then goes on a new association)."""
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.05):
                if not self._still_open(assoc):
                    # a reactor that ended (released) never pauses: the send must not wait
                    # for it; then the wait for the answer ends at once
                    assoc._is_paused = True
                    assoc.dimse.msg_queue.put((None, None))
                    return

        watcher = threading.Thread(target=watch, name="commitment-watch", daemon=True)
        watcher.start()
        try:
            status, _ = assoc.send_n_event_report(info, event_type, STORAGE_COMMITMENT,
                                                  WELL_KNOWN_INSTANCE)
        except (RuntimeError, ValueError, OSError) as exc:
            LOG.info("storage commitment report on the same association failed: %s", exc)
            return False
        finally:
            done.set()
        code = status.get("Status") if status is not None else None
        return code is not None and int(code) == 0x0000

    def _send_new(self, calling: str, info: Dataset, event_type: int) -> bool:
        """The report on a new association to the requester (by AE title in the peers file)."""
        try:
            peers = load_peer_table(self.peers_file)
        except PEERS_FILE_ERRORS as exc:
            LOG.error("storage commitment report: peers file %s unusable: %s",
                      self.peers_file, exc)
            return False
        if calling not in peers:
            LOG.error("storage commitment report: requester %s not in the peers file", calling)
            return False
        host, port, tls = peers[calling]
        if tls and self.client_tls is None:
            LOG.error("storage commitment report: %s takes TLS, this node has no certificate",
                      calling)
            return False
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = STORAGE_COMMITMENT
        role.scu_role, role.scp_role = False, True
        assoc = ae.associate(
            host, port, [build_context(STORAGE_COMMITMENT, SYNTAXES)], ae_title=calling,
            ext_neg=[role], evt_handlers=[(evt.EVT_CONN_OPEN, prompt_tcp)],
            **({"tls_args": (self.client_tls, host)} if tls else {}))
        if not assoc.is_established:
            LOG.error("storage commitment report: no association with %s at %s:%s",
                      calling, host, port)
            return False
        try:
            status, _ = assoc.send_n_event_report(info, event_type, STORAGE_COMMITMENT,
                                                  WELL_KNOWN_INSTANCE)
        finally:
            if assoc.is_established:
                assoc.release()
        code = status.get("Status") if status is not None else None
        if code is None or int(code) != 0x0000:
            LOG.error("storage commitment report to %s answered %s", calling, code)
            return False
        return True
