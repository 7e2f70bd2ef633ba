"""TCP settings for DICOM associations: send each piece at once, acknowledge at once.

DIMSE is request/response, and both DCMTK and pynetdicom write a PDU in pieces (header, then
value). With Linux defaults, Nagle's algorithm holds a small last piece until the previous
one is acknowledged, while the receiver delays that acknowledgement (up to 40 ms) hoping to
piggy-back it on its next send, which never comes because it is waiting for the rest of the
message. Each C-STORE on one association then idles ~40 ms in each direction. TCP_NODELAY
removes the wait on our sends; TCP_QUICKACK, set again after every read because Linux clears
it, removes the peer's wait on our acknowledgement. Measured effect in docs/performance.md.

`harness/embedded_pacs/connection.py` carries its own copy (it runs without the rest of the
harness).
"""

from __future__ import annotations

import socket
from typing import Any

QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def prompt_tcp(transport: Any) -> None:
    """Tune a pynetdicom AssociationSocket: no Nagle delay, immediate acknowledgements.

    Wraps the transport's `recv` (on this instance only) to re-arm TCP_QUICKACK after
    each read. A transport without a socket (already closed) is left alone.
    """
    sock = getattr(transport, "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return  # closed meanwhile: nothing to tune
    if QUICKACK is None or getattr(transport, "_prompt_acks", False):
        return
    plain_recv = transport.recv

    def recv(nr_bytes: int) -> bytearray:
        data = plain_recv(nr_bytes)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
        except OSError:
            pass  # the connection closed; the caller sees it from what recv returned
        return data

    transport.recv = recv
    transport._prompt_acks = True


def on_connection_open(event: Any) -> None:
    """pynetdicom EVT_CONN_OPEN handler: tune the new connection (for Storage SCPs we run)."""
    prompt_tcp(getattr(getattr(event.assoc, "dul", None), "socket", None))
