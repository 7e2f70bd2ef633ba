"""Connections of the embedded PACS: TCP options, and deadlines and size limits on every read.

Safe to expose to a hostile network (PS3.8 9.1.5, 9.3.1): a PDU announcing more than
``MAX_PDU_BYTES`` or starting with an unknown PDU type drops the connection before its body is
read; the A-ASSOCIATE-RQ must arrive within the timeout (``--timeout``, default 30 s) of
connecting (ARTIM) and every later PDU within the timeout of its first byte, so stalled or
dripping peers are reaped. Connections still owing their A-ASSOCIATE-RQ do not count against
the association limit (see server.py), and beyond ``MAX_AWAITING_REQUEST`` of them a new one is
closed at once. At shutdown (``STOPPING``) pending reads give up at once.

DICOM over TLS (PS3.15 B.1, ``--tls-*``): the server wraps each accepted socket without
handshaking (pynetdicom would handshake in its accept loop, where one silent client stalls
every other); the handshake runs in the connection's own thread within the ARTIM timeout, and a
client that fails it (plaintext, no or an untrusted certificate, an old protocol) is dropped
with one log line. TLS sockets then read like plain ones, with a short socket timeout so a
partial TLS record cannot block past the deadline.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

LOG = logging.getLogger("harness.embedded_pacs")

# Largest PDU read from a peer, any type (PS3.8 9.3.1): P-DATA-TF is bounded by the maximum
# length we announce (MAX_PDU_RECEIVE) and an A-ASSOCIATE-RQ with 128 contexts fits easily, so
# a larger announcement is hostile or broken: the connection is dropped before reading the body.
MAX_PDU_RECEIVE = 65536
MAX_PDU_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 30.0
VALID_PDU_TYPES = frozenset(range(0x01, 0x08))
STOPPING = threading.Event()  # set at shutdown: pending reads give up at once
MAX_ASSOCIATIONS = 128  # associations whose A-ASSOCIATE-RQ arrived (PS3.8 local limit)
MAX_AWAITING_REQUEST = 512  # connections still owing their A-ASSOCIATE-RQ (ARTIM running)
_READERS: weakref.WeakKeyDictionary[Any, GuardedReader] = weakref.WeakKeyDictionary()
TLS_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}
CLIENT_CERTIFICATE_MODES = {
    "required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
}
#: a TLS socket's timeout per read (its writes get the whole timeout)
TLS_SLICE_S = 0.5


def server_tls_context(
    certificate: str, key: str, ca: str, min_version: str = "1.2",
    client_certificate: str = "required",
) -> ssl.SSLContext:
    """The server side of DICOM TLS (PS3.15 B.1): our certificate, the oldest protocol taken,
    and whether a client must present a certificate signed by ``ca``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[min_version]
    if context.minimum_version < ssl.TLSVersion.TLSv1_2:
        # OpenSSL 3's default security level refuses TLS 1.0/1.1 whatever the minimum says
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.load_cert_chain(certificate, key)
    context.load_verify_locations(ca)
    context.verify_mode = CLIENT_CERTIFICATE_MODES[client_certificate]
    return context


def client_tls_context(certificate: str, key: str, ca: str) -> ssl.SSLContext:
    """The client side, for C-MOVE sub-associations to TLS peers: verify the peer against
    ``ca`` (names too) and present our own certificate."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.load_cert_chain(certificate, key)
    return context


def prompt_tcp(event: Any) -> None:
    """EVT_CONN_OPEN: no Nagle delay, immediate ACKs (why: harness/dicom/tcp.py; this package
    runs without the rest of the harness in its container image, so it carries this copy)."""
    transport = getattr(getattr(event.assoc, "dul", None), "socket", None)
    sock = getattr(transport, "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if quickack is None:
        return
    plain_recv = transport.recv

    def recv(nr_bytes: int) -> bytearray:
        data = plain_recv(nr_bytes)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
        return data

    transport.recv = recv


class GuardedReader:
    """Replaces pynetdicom's blocking ``AssociationSocket.recv`` for one connection.

    pynetdicom reads a PDU header, then blocks until the announced number of bytes arrived, with
    no cap and no deadline. Here each PDU must arrive whole within ``timeout_s`` of its first
    byte, the A-ASSOCIATE-RQ within ``timeout_s`` of the connection (ARTIM, PS3.8 9.1.5), an
    unknown PDU type or a length above MAX_PDU_BYTES drops the connection at once. A dropped or
    late read returns short, which pynetdicom treats as a closed transport (Evt17).
    """

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self.sock = sock
        self.timeout_s = timeout_s
        self.opened = time.monotonic()
        self.deadline = self.opened + timeout_s
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        self.quickack = getattr(socket, "TCP_QUICKACK", None)
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._body_pending = False
        self.request_read = False  # the first PDU (the A-ASSOCIATE-RQ) has been read

    def _peer(self) -> str:
        try:
            host, port = self.sock.getpeername()[:2]
        except OSError:
            return "?"
        return f"{host}:{port}"

    def _recv(self, count: int) -> bytes:
        """One read; on TLS, bounded by TLS_SLICE_S (poll saw bytes, maybe not a whole record).
        Reads and writes of an association happen on its one DUL thread, so the timeout
        switch cannot cut a send short."""
        if not self.tls:
            return self.sock.recv(count)
        self.sock.settimeout(TLS_SLICE_S)
        try:
            return self.sock.recv(count)
        finally:
            self.sock.settimeout(self.timeout_s)

    def handshake(self) -> bool:
        """Complete the TLS handshake within the ARTIM timeout (PS3.8 9.1.5), or drop."""
        remaining = self.opened + self.timeout_s - time.monotonic()
        try:
            self.sock.settimeout(max(remaining, 0.01))  # one bound for the whole handshake
            self.sock.do_handshake()
        except (OSError, ValueError) as exc:
            self.drop(f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}")
            return False
        self.sock.settimeout(self.timeout_s)  # a peer that stops reading fails our sends
        return True

    def drop(self, why: str) -> bytearray:
        LOG.warning("connection from %s dropped: %s", self._peer(), why)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        return bytearray()

    def recv(self, nr_bytes: int) -> bytearray:
        header = nr_bytes == 6 and not self._body_pending
        if header:
            self.deadline = time.monotonic() + self.timeout_s
            if not self.request_read:
                self.deadline = min(self.deadline, self.opened + self.timeout_s)
        data = bytearray()
        while len(data) < nr_bytes:
            remaining = self.deadline - time.monotonic()
            if STOPPING.is_set():
                return self.drop("server shutting down")
            if remaining <= 0:
                what = "PDU" if self.request_read else "A-ASSOCIATE-RQ"
                return self.drop(f"{what} incomplete after {self.timeout_s:g} s")
            buffered = self.tls and self.sock.pending()  # decrypted bytes poll cannot see
            if not buffered and not self.poller.poll(min(remaining, 0.5) * 1000):
                continue
            try:
                chunk = self._recv(min(nr_bytes - len(data), 65536))
            except (TimeoutError, ssl.SSLWantReadError):
                continue  # a TLS record still partial: the deadline above bounds the wait
            except OSError:
                return bytearray()
            if not chunk:
                return data
            data += chunk
        if self.quickack is not None:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.IPPROTO_TCP, self.quickack, 1)
        if header:
            pdu_type, length = data[0], int.from_bytes(data[2:6], "big")
            if pdu_type not in VALID_PDU_TYPES:
                return self.drop(f"not DICOM (first byte 0x{pdu_type:02X})")
            if not self.request_read and pdu_type != 0x01:
                return self.drop(f"PDU type 0x{pdu_type:02X} before A-ASSOCIATE-RQ")
            if length > MAX_PDU_BYTES:
                return self.drop(f"PDU of {length} bytes announced (limit {MAX_PDU_BYTES})")
            self._body_pending = length > 0
            self.request_read = True
        else:
            self._body_pending = False
        return data


def awaiting_request(associations: Iterable[Any]) -> int:
    """How many of these connections have not yet delivered their A-ASSOCIATE-RQ."""
    count = 0
    for assoc in associations:
        reader = _READERS.get(assoc)
        count += reader is not None and not reader.request_read
    return count


def guard_connection(timeout_s: float) -> Any:
    """EVT_CONN_OPEN handler of the server: prompt TCP plus the guarded reader; beyond
    MAX_AWAITING_REQUEST silent connections a new one is closed at once (bounds the threads
    a connection flood costs while ARTIM reaps the silent ones)."""

    def on_open(event: Any) -> None:
        prompt_tcp(event)
        transport = getattr(getattr(event.assoc, "dul", None), "socket", None)
        sock = getattr(transport, "socket", None)
        if sock is None:
            return
        reader = GuardedReader(sock, timeout_s)
        if awaiting_request(event.assoc.ae.active_associations) >= MAX_AWAITING_REQUEST:
            reader.drop(f"{MAX_AWAITING_REQUEST} connections already owe an A-ASSOCIATE-RQ")
        _READERS[event.assoc] = reader
        transport.recv = reader.recv
        if reader.tls:
            reader.handshake()  # a failure shut the socket down: the first read ends it

    return on_open
