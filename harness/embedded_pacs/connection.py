"""Connections of the embedded PACS: TCP options, and deadlines and size limits on every read.

Safe to expose to a hostile network (PS3.8 9.1.5, 9.3.1): a PDU announcing more than
``MAX_PDU_BYTES`` or starting with an unknown PDU type drops the connection before its body is
read; the A-ASSOCIATE-RQ must arrive within the timeout (``--timeout``, default 30 s) of
connecting (ARTIM) and every later PDU within the timeout of its first byte, so stalled or
dripping peers are reaped. Connections still owing their A-ASSOCIATE-RQ do not count against
the association limit (see server.py), and beyond ``MAX_AWAITING_REQUEST`` of them a new one is
closed at once. At shutdown (``STOPPING``) pending reads give up at once.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
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
        self._body_pending = False
        self.request_read = False  # the first PDU (the A-ASSOCIATE-RQ) has been read

    def _peer(self) -> str:
        try:
            host, port = self.sock.getpeername()[:2]
        except OSError:
            return "?"
        return f"{host}:{port}"

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
            if not self.poller.poll(min(remaining, 0.5) * 1000):
                continue
            try:
                chunk = self.sock.recv(min(nr_bytes - len(data), 65536))
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

    return on_open
