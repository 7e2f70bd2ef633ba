"""Bounds on pynetdicom associations (echo, move, association set-up) that a peer cannot
push back: a timer that aborts and shuts the socket down (PS3.8 9.2, AA-2), as the wire layer's
OperationDeadline does for its own associations.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Any


def shut_down(assoc: Any) -> None:
    """Shut a failed pynetdicom association's socket down (its reader thread then ends)."""
    raw = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if raw is not None:
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)


class Watchdog:
    """Ends a pynetdicom association whose step outlives its budget (`budget_s` from the
    start or the last `progress()`): sends an A-ABORT and shuts the socket down.

    pynetdicom's timeouts do not bound a dripping or chatty peer: its reactor thread reads a
    PDU to its announced end, a read at a time (each within the socket timeout), and checks
    the ARTIM timer and dimse_timeout only between PDUs; and a C-MOVE answered by pending
    responses forever is one message within dimse_timeout after another. Shutting the socket
    down ends the reactor's read at once (PS3.8 9.2, AA-2: the transport is closed).
    """

    def __init__(self, assoc: Callable[[], Any], budget_s: float) -> None:
        self.assoc = assoc  # the association once there is one (None before it is opened)
        self.budget_s = budget_s
        self.expired = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self.progress()

    def progress(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.budget_s, self.expire)
            self._timer.daemon = True
            self._timer.start()

    def expire(self) -> None:
        """End the association now; whatever waits for it wakes at once."""
        self.expired = True
        assoc = self.assoc()
        if assoc is None:
            return
        transport = getattr(getattr(assoc, "dul", None), "socket", None)
        raw = getattr(transport, "socket", None)
        if raw is not None:
            try:  # A-ABORT, source service-user (PS3.8 9.3.8), if the peer takes it at once
                raw.send(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00", socket.MSG_DONTWAIT)
            except (OSError, ValueError):  # ValueError: TLS sockets take no flags
                pass
            try:
                raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        assoc.dimse.msg_queue.put((None, None))  # as pynetdicom does when a peer aborts

    def stop(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
