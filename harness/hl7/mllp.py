"""MLLP client: one HL7 v2 message out, its ACK back (HL7 v2.5.1 Appendix C.4, minimal lower
layer protocol: 0x0B, the message, 0x1C 0x0D).

Written here rather than taken from a library: python-hl7's MLLPClient connects and reads
without any timeout and returns whatever one recv() holds (half an ACK, or two); its asyncio
streams need an event loop the rest of the harness does not run; hl7apy ships only a server.
Here the whole exchange (connect, send, ACK read) shares one deadline, the read buffer is
bounded, and every failure is one line naming the peer.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from harness.errors import EnvironmentProblem
from harness.hl7.messages import Ack, HL7MessageError, parse_ack

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
DEFAULT_TIMEOUT_S = 10.0
MAX_ACK_BYTES = 64 * 1024  # an ACK is a few hundred bytes; a peer sending more is broken


class MllpError(EnvironmentProblem):
    """The peer could not be reached, stayed silent, or answered no MLLP frame (exit code 3:
    the environment, not a finding)."""


@dataclass(frozen=True)
class Exchange:
    """One message sent and its ACK."""

    peer: str
    control_id: str
    ack: Ack
    elapsed_s: float


def frame(message: str) -> bytes:
    """The MLLP block of an ER7 message (segments separated by CR, HL7 v2.5 2.8)."""
    body = message.replace("\r\n", "\r").replace("\n", "\r").encode("utf-8")
    if START_BLOCK in body or b"\x1c" in body:
        raise HL7MessageError("message holds an MLLP framing byte (0x0B or 0x1C)")
    return START_BLOCK + body + END_BLOCK


def _receive_frame(sock: socket.socket, peer: str, deadline: float) -> bytes:
    """The bytes between 0x0B and 0x1C 0x0D, read before `deadline`, at most MAX_ACK_BYTES."""
    buffer = bytearray()
    while True:
        end = buffer.find(END_BLOCK)
        if end >= 0:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            what = f"{len(buffer)} bytes without 0x1C 0x0D" if buffer else "nothing"
            raise MllpError(f"HL7 peer {peer}: no ACK before the deadline (received {what})")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError as exc:
            raise MllpError(f"HL7 peer {peer}: reading the ACK failed: {exc}") from None
        if not chunk:
            raise MllpError(f"HL7 peer {peer}: closed the connection before a complete ACK "
                            f"({len(buffer)} bytes received)")
        buffer += chunk
        if len(buffer) > MAX_ACK_BYTES:
            raise MllpError(f"HL7 peer {peer}: more than {MAX_ACK_BYTES} bytes without an "
                            "end of block: not an MLLP ACK")
    if not buffer.startswith(START_BLOCK):
        raise MllpError(f"HL7 peer {peer}: the answer does not start with 0x0B "
                        f"(starts {bytes(buffer[:8])!r}): not MLLP framing")
    return bytes(buffer[1:end])


def send_message(host: str, port: int, message: str, control_id: str,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> Exchange:
    """Send `message` to host:port and return its ACK; the connect, the send and the ACK read
    all end within `timeout_s`. An ACK for another control id is an MllpError."""
    peer = f"{host}:{port}"
    data = frame(message)
    started = time.monotonic()
    deadline = started + timeout_s
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise MllpError(f"HL7 peer {peer}: cannot connect: {exc}") from None
    try:
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.sendall(data)
        except OSError as exc:
            raise MllpError(f"HL7 peer {peer}: sending the message failed: {exc}") from None
        raw = _receive_frame(sock, peer, deadline)
    finally:
        sock.close()
    try:
        ack = parse_ack(raw, peer)
    except HL7MessageError as exc:
        raise MllpError(str(exc)) from None
    if ack.control_id != control_id:
        raise MllpError(f"HL7 peer {peer}: ACK for message {ack.control_id!r}, "
                        f"sent {control_id!r}")
    return Exchange(peer, control_id, ack, time.monotonic() - started)
