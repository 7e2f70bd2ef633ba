"""One peer (host, port, AE title) and the associations the harness opens to it.

pynetdicom's for echo and move (bounded by watchdog.py), harness/dicom/wire.py's for store,
find and get. Failing to associate at all is an environment problem
(`DimseConnectionError`, exit 3) that names the peer. TLS: `tls=TLSConfig(...)` becomes
pynetdicom's `tls_args` and the wire layer's TLS socket.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.presentation import PresentationContext

from harness.dicom.tcp import prompt_tcp
from harness.dicom.watchdog import Watchdog, shut_down
from harness.dicom.wire import (
    DEFAULT_LARGEST_DATASET,
    DEFAULT_MAX_MATCHES,
    DEFAULT_MIN_RATE,
    AssociationFailed,
    WireAssociation,
)
from harness.errors import EnvironmentProblem

HARNESS_AE_TITLE = "PACSHARNESS"
LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class OperationDone:
    """One DIMSE operation this process performed on a peer (for observers, e.g. the
    audit journal: "every access is audited", IHE ATNA). `study_uid` None: not one study."""

    operation: str  # "C-STORE" (one per study and store() call), "C-FIND", "C-MOVE", "C-GET"
    host: str
    port: int
    called_ae: str
    calling_ae: str
    study_uid: str | None
    ok: bool
    started: dt.datetime
    finished: dt.datetime
    detail: str = ""


OperationObserver = Callable[[OperationDone], None]
PeerFilter = Callable[[str, int, str], bool]  # (host, port, called AE) -> observed?
_observers: list[tuple[OperationObserver, PeerFilter | None]] = []


def add_operation_observer(observer: OperationObserver, peers: PeerFilter | None = None) -> None:
    """Call `observer` after each C-STORE/C-FIND/C-MOVE/C-GET of any DimseClient (to the
    `peers` it names; None: every peer)."""
    _observers.append((observer, peers))


def remove_operation_observer(observer: OperationObserver) -> None:
    _observers[:] = [pair for pair in _observers if pair[0] != observer]


def observed(peer: DimsePeer) -> bool:
    """Does anyone observe `peer` (so a store reads each file's study only then)?"""
    return any(peers is None or peers(peer.host, peer.port, peer.called_ae)
               for _, peers in list(_observers))


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class TLSConfig:
    """Client-side TLS settings; ready for nodes that require DICOM over TLS."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_hostname: str | None = None
    #: False only to tell "up, but its certificate is not trusted" from "down" (Node.ready)
    verify: bool = True

    def tls_args(self) -> tuple[ssl.SSLContext, str | None]:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context, self.server_hostname


class DimseConnectionError(EnvironmentProblem):
    """The peer could not be reached or refused the association."""


class DimsePeer:
    """A peer's address and limits, and how to open an association to it; the DIMSE
    operations build on this (store.py, query.py, retrieve.py, client.py)."""

    def __init__(
        self,
        host: str,
        port: int,
        called_ae: str,
        calling_ae: str = HARNESS_AE_TITLE,
        *,
        tls: TLSConfig | None = None,
        timeout_s: float = 30.0,
        max_pdu: int = 0,
        max_store_associations: int | None = None,
        max_find_matches: int = DEFAULT_MAX_MATCHES,
        find_deadline_s: float = 3600.0,
        min_rate: float = DEFAULT_MIN_RATE,
        max_dataset_bytes: int = DEFAULT_LARGEST_DATASET,
    ) -> None:
        self.host, self.port, self.called_ae = host, port, called_ae
        self.calling_ae = calling_ae
        self.tls = tls
        self.timeout_s = timeout_s
        self.max_pdu = max_pdu
        self.max_store_associations = max_store_associations
        self.max_find_matches = max_find_matches  # more is an error, not a memory exhaustion
        self.find_deadline_s = find_deadline_s  # a whole C-FIND, however the peer trickles
        # every operation's deadline: timeout_s + the bytes it moves at min_rate (bytes/s),
        # see harness/dicom/deadline.py OperationDeadline and docs/safety.md
        self.min_rate = min_rate
        self.max_dataset_bytes = max_dataset_bytes  # one C-GET sub-operation, in memory

    def __repr__(self) -> str:
        return f"{self.called_ae}@{self.host}:{self.port}"

    # -- association -----------------------------------------------------------------
    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = self.timeout_s
        ae.dimse_timeout = self.timeout_s
        ae.network_timeout = self.timeout_s
        ae.connection_timeout = min(self.timeout_s, 10.0)
        ae.maximum_pdu_size = self.max_pdu
        return ae

    def associate(
        self,
        contexts: Sequence[PresentationContext],
        *,
        ext_neg: list | None = None,
        evt_handlers: list | None = None,
    ):
        """Open an association or raise DimseConnectionError naming the peer."""
        ae = self._ae()
        kwargs: dict[str, Any] = {
            "ae_title": self.called_ae,
            "contexts": list(contexts),
            "max_pdu": self.max_pdu,
        }
        if ext_neg:
            kwargs["ext_neg"] = ext_neg
        opened: list[Any] = []  # the association, from its connection's opening
        kwargs["evt_handlers"] = [
            *(evt_handlers or []),
            (evt.EVT_CONN_OPEN, lambda event: opened.append(event.assoc)),
            (evt.EVT_ACSE_SENT, self._closing),
        ]
        if self.tls:
            kwargs["tls_args"] = self.tls.tls_args()
        # the A-ASSOCIATE-AC within timeout_s, however a peer drips it (see Watchdog)
        watchdog = Watchdog(lambda: opened[0] if opened else None, self.timeout_s)
        try:
            assoc = ae.associate(self.host, self.port, **kwargs)
        finally:
            watchdog.stop()
        if not assoc.is_established:
            # pynetdicom's reader thread may still block in recv() on a peer that announced a
            # long junk PDU and went quiet; shutting the socket down lets that thread end
            shut_down(assoc)
            reason = (
                f"not established within {self.timeout_s:g} s"
                if watchdog.expired
                else "rejected"
                if assoc.is_rejected
                else "aborted"
                if assoc.is_aborted
                else ("no answer")
            )
            raise DimseConnectionError(
                f"peer {self}: association {reason} (calling AE {self.calling_ae})"
            )
        # pynetdicom reads and writes PDUs on a blocking socket once associated: a peer that
        # stalls mid-PDU (a cut or blackholed link, a frozen PACS) would hang this thread and
        # any kill() of the association forever. With a timeout, the read fails, pynetdicom
        # treats it as a closed transport, and the operation reports a failure instead.
        transport = getattr(getattr(assoc, "dul", None), "socket", None)
        if transport is not None and getattr(transport, "socket", None) is not None:
            transport.socket.settimeout(self.timeout_s)
            prompt_tcp(transport)  # no 40 ms Nagle/delayed-ACK stall per message
        return assoc

    def notify(
        self, operation: str, study_uid: str | None, ok: bool, started: dt.datetime,
        detail: str = "",
    ) -> None:
        """Tell the observers; an observer's failure is logged, never the operation's."""
        if not _observers:
            return
        done = OperationDone(operation, self.host, self.port, self.called_ae, self.calling_ae,
                             study_uid, ok, started, utc_now(), detail)
        for observer, peers in list(_observers):
            if peers is not None and not peers(self.host, self.port, self.called_ae):
                continue
            try:
                observer(done)
            except Exception:  # noqa: BLE001 - observing must not break an operation
                LOG.exception("operation observer failed on %s", operation)

    def _closing(self, event: Any) -> None:
        """EVT_ACSE_SENT: once we release or abort, the association must end within
        2 x timeout_s. A peer dripping bytes keeps pynetdicom's reader thread in recv() (each
        byte restarts the socket timeout) and release()/abort() waiting for it forever; past
        that bound the socket is shut down, which ends both."""
        if type(getattr(event, "primitive", None)).__name__ in ("A_RELEASE", "A_ABORT",
                                                               "A_P_ABORT"):
            watchdog = threading.Timer(2 * self.timeout_s, shut_down, [event.assoc])
            watchdog.daemon = True
            watchdog.start()

    def wire_association(
        self, pairs: list[tuple[str, str]], scp_roles: Sequence[str] = ()
    ) -> WireAssociation:
        """An association for C-STORE / C-GET (harness/dicom/wire.py) or DimseConnectionError."""
        try:
            return WireAssociation(
                self.host,
                self.port,
                self.called_ae,
                self.calling_ae,
                pairs,
                timeout_s=self.timeout_s,
                tls=self.tls.tls_args() if self.tls else None,
                scp_roles=scp_roles,
                min_rate=self.min_rate,
                max_dataset_bytes=self.max_dataset_bytes,
            )
        except AssociationFailed as exc:
            raise DimseConnectionError(
                f"peer {self}: association {exc} (calling AE {self.calling_ae})"
            ) from None
