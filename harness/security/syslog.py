"""A syslog receiver for the audit messages nodes send during a run (IHE ATNA, PS3.15 A.5).

Transports: UDP, one message per datagram (RFC 5426), and TLS with octet-counting framing,
``LEN SP MSG`` (RFC 5425 4.3). Messages are RFC 5424; RFC 3164 ("BSD") lines are tolerated
(PRI, timestamp, host and tag taken when present, the rest kept as the body).

Why hand-written: the PyPI parsers for RFC 5424 (syslog-rfc5424-parser, last release 2019;
loggerglue, 2011) are unmaintained and none handles RFC 3164 too; the header is seven
space-separated fields (RFC 5424 6), small enough to parse here and test directly.

Bounded (a hostile or chatty sender cannot exhaust the harness): a message longer than
``max_message_bytes`` is dropped and counted; beyond ``max_messages`` kept, further messages
are counted as dropped; at most ``MAX_TLS_CONNECTIONS`` TLS senders at once; every socket
read has a timeout, so ``stop()`` returns promptly.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

LOG = logging.getLogger("harness.security.syslog")

MAX_MESSAGE_BYTES = 64 * 1024
MAX_MESSAGES = 100_000
MAX_TLS_CONNECTIONS = 16
POLL_S = 0.2  # how often the receiver threads look at the stop flag
HANDSHAKE_TIMEOUT_S = 10.0

Transport = Literal["udp", "tls"]


class SyslogFormatError(ValueError):
    """A message or frame that does not follow RFC 5424 / 5425."""


@dataclass(frozen=True)
class SyslogMessage:
    """One received syslog message (RFC 5424 6); '' or None where the sender put NILVALUE."""

    received: dt.datetime
    peer: str
    priority: int | None  # facility * 8 + severity (RFC 5424 6.2.1)
    timestamp: str | None
    hostname: str
    app_name: str
    procid: str
    msgid: str
    structured_data: dict[str, dict[str, str]] = field(default_factory=dict)
    body: bytes = b""
    format: Literal["rfc5424", "rfc3164"] = "rfc5424"

    @property
    def facility(self) -> int | None:
        return None if self.priority is None else self.priority // 8

    @property
    def severity(self) -> int | None:
        return None if self.priority is None else self.priority % 8

    def text(self) -> str:
        """The body as text (RFC 5424 6.4: UTF-8, with an optional BOM)."""
        return self.body.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "replace")


_PRI = re.compile(rb"<(\d{1,3})>")
_BSD_TIMESTAMP = re.compile(rb"([A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) ")
_SD_PARAM = re.compile(r'\s*([^\s="\]]{1,32})="((?:[^"\\]|\\.)*)"', re.DOTALL)
_SD_ESCAPE = re.compile(r'\\(["\\\]])')


def _nil(value: bytes) -> str:
    return "" if value == b"-" else value.decode("utf-8", "replace")


def _sd_end(data: bytes) -> int:
    """Where STRUCTURED-DATA (RFC 5424 6.3) ends in ``data``: after '-' or the last ']' of
    its SD-ELEMENTs (a ']' inside a quoted PARAM-VALUE is escaped or quoted)."""
    if data.startswith(b"-"):
        return 1
    position, quoted = 0, False
    while position < len(data) and data[position:position + 1] == b"[":
        position += 1
        while True:
            if position >= len(data):
                raise SyslogFormatError("structured data: element not closed with ']'")
            byte = data[position:position + 1]
            if byte == b"\\" and quoted:
                position += 2
                continue
            position += 1
            if byte == b'"':
                quoted = not quoted
            elif byte == b"]" and not quoted:
                break
    if position == 0:
        raise SyslogFormatError("structured data: neither '-' nor '['")
    return position


def _structured_data(text: str) -> dict[str, dict[str, str]]:
    """SD-ELEMENTs (RFC 5424 6.3): {SD-ID: {PARAM-NAME: PARAM-VALUE}}."""
    elements: dict[str, dict[str, str]] = {}
    while text.startswith("["):
        sd_id = re.match(r"\[([^\s\]=\"]{1,32})", text)
        if sd_id is None:
            raise SyslogFormatError("structured data: element without SD-ID")
        params: dict[str, str] = {}
        rest = text[sd_id.end():]
        while not rest.startswith("]"):
            param = _SD_PARAM.match(rest)
            if param is None:
                raise SyslogFormatError(f"structured data [{sd_id.group(1)}: malformed parameter")
            params[param.group(1)] = _SD_ESCAPE.sub(r"\1", param.group(2))
            rest = rest[param.end():]
        elements[sd_id.group(1)] = params
        text = rest[1:]
    return elements


def parse_syslog(data: bytes, peer: str = "", received: dt.datetime | None = None) -> SyslogMessage:
    """One message, RFC 5424 when its header says version 1, else read as RFC 3164."""
    received = received or dt.datetime.now(dt.UTC)
    pri = _PRI.match(data)
    if pri is None or int(pri.group(1)) > 191:
        # RFC 3164 4.3.3: a relay gives a message without PRI the priority 13; we keep none.
        return SyslogMessage(received, peer, None, None, "", "", "", "", body=data,
                             format="rfc3164")
    priority = int(pri.group(1))
    rest = data[pri.end():]
    if rest.startswith(b"1 "):
        header = rest[2:].split(b" ", 5)
        if len(header) < 6:
            raise SyslogFormatError(f"RFC 5424 header of {len(header) + 1} fields, expected 7")
        timestamp, hostname, app_name, procid, msgid, tail = header
        end = _sd_end(tail)
        elements = _structured_data(tail[:end].decode("utf-8", "replace"))
        body = tail[end:]
        if body and not body.startswith(b" "):
            raise SyslogFormatError("RFC 5424: no space between structured data and message")
        return SyslogMessage(
            received, peer, priority, _nil(timestamp) or None, _nil(hostname), _nil(app_name),
            _nil(procid), _nil(msgid), elements, body.removeprefix(b" "),
        )
    stamp = _BSD_TIMESTAMP.match(rest)
    timestamp = None
    hostname = tag = ""
    if stamp is not None:
        timestamp = stamp.group(1).decode()
        rest = rest[stamp.end():]
        host, _, remainder = rest.partition(b" ")
        hostname, rest = host.decode("utf-8", "replace"), remainder
    procid = ""
    tag_match = re.match(rb"([A-Za-z0-9_./-]{1,32})(?:\[(\d+)\])?: ?", rest)
    if tag_match is not None:
        tag = tag_match.group(1).decode()
        procid = (tag_match.group(2) or b"").decode()
        rest = rest[tag_match.end():]
    return SyslogMessage(received, peer, priority, timestamp, hostname, tag, procid, "",
                         body=rest, format="rfc3164")


def octet_frames(buffer: bytearray, max_bytes: int = MAX_MESSAGE_BYTES) -> list[bytes]:
    """Take the whole ``MSG-LEN SP SYSLOG-MSG`` frames (RFC 5425 4.3) off the front of
    ``buffer``; a partial frame stays. A bad length or one above ``max_bytes`` raises
    SyslogFormatError (the stream cannot be resynchronised: the caller closes it)."""
    frames: list[bytes] = []
    while buffer:
        space = buffer.find(b" ", 0, 8)
        if space < 0:
            if len(buffer) >= 8 or not buffer.isdigit():
                raise SyslogFormatError("octet-counting frame: no MSG-LEN before the message")
            break
        digits = bytes(buffer[:space])
        if not digits.isdigit() or digits.startswith(b"0"):
            raise SyslogFormatError(f"octet-counting frame: bad MSG-LEN {digits[:8]!r}")
        length = int(digits)
        if length > max_bytes:
            raise SyslogFormatError(f"message of {length} bytes (limit {max_bytes})")
        if len(buffer) < space + 1 + length:
            break
        frames.append(bytes(buffer[space + 1:space + 1 + length]))
        del buffer[:space + 1 + length]
    return frames


class SyslogReceiver:
    """Collects syslog messages on ``host:port`` in a background thread (module docstring).

    TLS needs ``certificate_file`` and ``key_file``; with ``ca_file`` senders must present a
    certificate that CA signed (RFC 5425 5.2: mutual authentication)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        transport: Transport = "udp",
        *,
        certificate_file: Path | str | None = None,
        key_file: Path | str | None = None,
        ca_file: Path | str | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_messages: int = MAX_MESSAGES,
    ) -> None:
        if transport not in ("udp", "tls"):
            raise ValueError(f"syslog transport {transport!r}: udp or tls")
        if transport == "tls" and not (certificate_file and key_file):
            raise ValueError("syslog over TLS needs a certificate and its key")
        self.host, self.port, self.transport = host, port, transport
        self.max_message_bytes = max_message_bytes
        self.max_messages = max_messages
        self._tls_files = (certificate_file, key_file, ca_file)
        self._messages: list[SyslogMessage] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socket: socket.socket | None = None
        self.dropped = 0  # over max_messages
        self.oversize = 0  # over max_message_bytes
        self.unparsable = 0  # not syslog at all (kept nowhere, counted)
        self.tls_sessions = 0  # TLS handshakes completed (with a trusted sender, given a CA)
        self.tls_refused = 0  # TLS handshakes failed: no or an untrusted certificate, ...
        self.tls_error = ""  # why the last one failed

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> SyslogReceiver:
        """Listen; unusable TLS files (OSError, ssl.SSLError) or a taken port raise here."""
        context = self._tls_context() if self.transport == "tls" else None
        kind = socket.SOCK_DGRAM if self.transport == "udp" else socket.SOCK_STREAM
        sock = socket.socket(socket.AF_INET, kind)
        try:
            if self.transport == "udp":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            if self.transport == "tls":
                sock.listen(MAX_TLS_CONNECTIONS)
            sock.settimeout(POLL_S)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self.port = sock.getsockname()[1]
        if context is None:
            self._spawn(self._serve_udp, f"syslog-udp-{self.port}")
        else:
            self._spawn(self._serve_tls, f"syslog-tls-{self.port}", context)
        return self

    def stop(self) -> None:
        """Stop every thread and close the sockets (each read times out within POLL_S)."""
        self._stop.set()
        # the listening thread ends first, so no connection thread starts after this loop
        while alive := [t for t in self._threads if t.is_alive()]:
            for thread in alive:
                thread.join()
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> SyslogReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    # -- what was received -----------------------------------------------------------
    def messages(self) -> list[SyslogMessage]:
        with self._changed:
            return list(self._messages)

    def wait_for(
        self, predicate: Callable[[list[SyslogMessage]], bool], timeout_s: float
    ) -> bool:
        """Wait until ``predicate(messages)`` holds (re-checked on every arrival) or the
        timeout passes; whether it holds."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self._messages), timeout_s)

    def _count(self, counter: str) -> None:
        with self._changed:
            setattr(self, counter, getattr(self, counter) + 1)
            self._changed.notify_all()

    def _keep(self, data: bytes, peer: str) -> None:
        if len(data) > self.max_message_bytes:
            self._count("oversize")
            return
        try:
            message = parse_syslog(data, peer)
        except SyslogFormatError as exc:
            self._count("unparsable")
            LOG.warning("syslog message from %s unparsable: %s", peer, exc)
            return
        with self._changed:
            if len(self._messages) >= self.max_messages:
                self.dropped += 1
            else:
                self._messages.append(message)
            self._changed.notify_all()

    # -- transports ------------------------------------------------------------------
    def _serve_udp(self) -> None:
        assert self._socket is not None
        while not self._stop.is_set():
            try:
                # one byte more than allowed tells an oversize datagram from a full one
                data, address = self._socket.recvfrom(self.max_message_bytes + 1)
            except TimeoutError:
                continue
            except OSError:
                return
            self._keep(data, f"{address[0]}:{address[1]}")

    def _tls_context(self) -> ssl.SSLContext:
        certificate, key, ca = self._tls_files
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 5425 as updated by BCP 195
        context.load_cert_chain(str(certificate), str(key))
        if ca:
            context.load_verify_locations(str(ca))
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _serve_tls(self, context: ssl.SSLContext) -> None:
        assert self._socket is not None
        while not self._stop.is_set():
            try:
                conn, address = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            live = sum(t.is_alive() for t in self._threads) - 1
            if live >= MAX_TLS_CONNECTIONS:
                LOG.warning("syslog TLS sender %s refused: %d connections", address, live)
                conn.close()
                continue
            self._threads = [t for t in self._threads if t.is_alive()]
            self._spawn(self._read_tls, f"syslog-tls-{address[1]}", conn, context, address)

    def _read_tls(self, conn: socket.socket, context: ssl.SSLContext, address: tuple) -> None:
        peer = f"{address[0]}:{address[1]}"
        buffer = bytearray()
        conn.settimeout(POLL_S)
        tls = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        with tls:
            if not self._handshake(tls, peer):
                return
            while not self._stop.is_set():
                try:
                    chunk = tls.recv(65536)
                except TimeoutError:
                    continue
                except (OSError, ssl.SSLError):
                    return
                if not chunk:
                    return
                buffer += chunk
                try:
                    for frame in octet_frames(buffer, self.max_message_bytes):
                        self._keep(frame, peer)
                except SyslogFormatError as exc:
                    if "limit" in str(exc):
                        self._count("oversize")
                    LOG.warning("syslog TLS sender %s closed: %s", peer, exc)
                    with contextlib.suppress(OSError):
                        tls.shutdown(socket.SHUT_RDWR)
                    return

    def _handshake(self, tls: ssl.SSLSocket, peer: str) -> bool:
        """The TLS handshake, within HANDSHAKE_TIMEOUT_S and given up at stop()."""
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                tls.do_handshake()
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError) as exc:
                LOG.warning("syslog TLS sender %s: handshake failed: %s", peer, exc)
                self._refused(f"{peer}: {exc}")
                return False
            self._count("tls_sessions")
            return True
        if self._stop.is_set():
            return False
        LOG.warning("syslog TLS sender %s: no handshake within %g s", peer, HANDSHAKE_TIMEOUT_S)
        self._refused(f"{peer}: no handshake within {HANDSHAKE_TIMEOUT_S:g} s")
        return False

    def _refused(self, reason: str) -> None:
        with self._changed:
            self.tls_refused += 1
            self.tls_error = reason
            self._changed.notify_all()
