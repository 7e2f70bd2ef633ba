"""DIMSE on a plain socket for C-STORE and C-GET: encoded datasets go to the wire as they are.

Why not pynetdicom here: storing and retrieving are where the client's own cost decides the
result (load tests, migrations, contract ingest and retrieval times). pynetdicom moves every
dataset through several Python layers and threads (~5-8 ms per 0.5 MB instance here); this
module frames bytes into P-DATA-TF PDUs with a few slices and one `sendall` per few MB, and
reassembles what arrives the same way, so one association runs at the PACS's pace
(docs/performance.md). Echo, find and move stay on pynetdicom.

Scope, all of PS3.8 that these two need: A-ASSOCIATE-RQ/AC/RJ with one presentation context
per (SOP class, transfer syntax) and SCP role selection for C-GET's sub-operations, maximum
PDU length both ways, P-DATA-TF with command and dataset fragments, A-RELEASE, A-ABORT both
ways. One operation at a time (no asynchronous operations window), as PACSs expect.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

# What gets sent (file meta, data-set framing) lives in part10; re-exported for callers.
from harness.dicom.part10 import (  # noqa: F401
    FileMeta,
    dataset_bytes,
    decode_dataset,
    encode_dataset,
    read_file_meta,
)
from harness.dicom.tcp import QUICKACK

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = b"2.25.217958312904782271629875573895301975957"  # pacs-harness
IMPLEMENTATION_VERSION = b"PACSHARNESS"
OUR_MAX_PDU = 1 << 20  # what we accept from the peer (only responses come back)
UNLIMITED_PDU_CHUNK = 1 << 20  # fragment size when the peer announces no limit
SEND_BATCH = 4 << 20  # bytes of dataset framed per sendall
LARGEST_PDU_READ = 16 << 20  # anything longer is a broken or hostile peer

_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized",
    (1, 7): "called AE title not recognized",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


class AssociationFailed(Exception):
    """The peer refused, aborted or never answered the association request (message says)."""


class TransferFailed(Exception):
    """The association broke during an operation: abort, closed socket or timeout."""


@dataclass(frozen=True)
class StoreAnswer:
    """What the peer answered to one C-STORE-RQ."""

    status: int
    error_comment: str = ""


# -- encoding ----------------------------------------------------------------------------------


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _ae(title: str) -> bytes:
    return title.encode("ascii", "replace")[:16].ljust(16, b" ")


def associate_rq(
    called: str,
    calling: str,
    pairs: Sequence[tuple[str, str]],
    max_pdu: int,
    scp_roles: Sequence[str] = (),
) -> bytes:
    """A-ASSOCIATE-RQ with presentation context 1, 3, 5, ... for each pair in order, and
    SCP role selection for `scp_roles` (storage classes C-GET will send back to us)."""
    items = [_item(0x10, APPLICATION_CONTEXT)]
    for index, (sop_class, syntax) in enumerate(pairs):
        body = (
            struct.pack(">BBBB", 2 * index + 1, 0, 0, 0)
            + _item(0x30, sop_class.encode())
            + _item(0x40, syntax.encode())
        )
        items.append(_item(0x20, body))
    roles = b"".join(
        _item(0x54, struct.pack(">H", len(uid)) + uid.encode() + b"\x00\x01")  # SCU no, SCP yes
        for uid in scp_roles
    )
    user = (
        _item(0x51, struct.pack(">I", max_pdu))
        + _item(0x52, IMPLEMENTATION_CLASS_UID)
        + roles
        + _item(0x55, IMPLEMENTATION_VERSION)
    )
    items.append(_item(0x50, user))
    body = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + bytes(32) + b"".join(items)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _element(group_element: int, value: bytes) -> bytes:
    group, element = divmod(group_element, 0x10000)
    return struct.pack("<HHI", group, element, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


NO_DATASET = 0x0101  # CommandDataSetType: nothing follows the command


def encode_command(elements: dict[int, int | str]) -> bytes:
    """A command set in implicit VR little endian (ints are US, strings UI), with its group
    length, elements in tag order as PS3.7 requires."""
    body = b"".join(
        _element(tag, struct.pack("<H", value) if isinstance(value, int) else _uid_value(value))
        for tag, value in sorted(elements.items())
    )
    return _element(0x00000000, struct.pack("<I", len(body))) + body


def c_store_rq(message_id: int, sop_class: str, sop_instance: str) -> bytes:
    """The C-STORE-RQ command set (PS3.7 9.3.1.1)."""
    return encode_command(
        {
            0x00000002: sop_class,
            0x00000100: 0x0001,
            0x00000110: message_id & 0xFFFF,
            0x00000700: 0x0000,  # medium priority
            0x00000800: 0x0001,  # a dataset follows
            0x00001000: sop_instance,
        }
    )


def command_us(elements: dict[int, bytes], tag: int, default: int = 0) -> int:
    """An unsigned short of a parsed command set."""
    raw = elements.get(tag, b"")
    return struct.unpack("<H", raw[:2])[0] if len(raw) >= 2 else default


def command_uid(elements: dict[int, bytes], tag: int) -> str:
    return elements.get(tag, b"").rstrip(b"\0 ").decode("ascii", "replace")


def parse_command(data: bytes) -> dict[int, bytes]:
    """Elements of an implicit VR little endian command set, by tag."""
    elements: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        elements[(group << 16) | element] = bytes(data[offset : offset + length])
        offset += length
    return elements


def _pdata(context_id: int, control: int, fragment: bytes | memoryview) -> list:
    """One P-DATA-TF PDU holding one PDV (header pieces, then the fragment itself)."""
    pdv_length = len(fragment) + 2
    return [
        struct.pack(">BBIIBB", 0x04, 0, pdv_length + 4, pdv_length, context_id, control),
        fragment,
    ]


# -- the association ---------------------------------------------------------------------------


class WireAssociation:
    """One association: open, then C-STORE or C-GET one operation at a time, release."""

    def __init__(
        self,
        host: str,
        port: int,
        called_ae: str,
        calling_ae: str,
        pairs: Sequence[tuple[str, str]],
        *,
        timeout_s: float,
        tls: tuple[ssl.SSLContext, str | None] | None = None,
        scp_roles: Sequence[str] = (),
    ) -> None:
        self.timeout_s = timeout_s
        self._pending_pdvs: deque[tuple[int, int, bytes]] = deque()
        self._buffer = bytearray()
        self._message_id = 0
        self.accepted: dict[tuple[str, str], int] = {}
        self.contexts: dict[int, tuple[str, str]] = {}  # accepted id -> (SOP class, syntax)
        self.peer_max_pdu = 0
        try:
            sock = socket.create_connection((host, port), timeout=min(timeout_s, 10.0))
        except OSError as exc:
            raise AssociationFailed(f"cannot connect: {exc.strerror or exc}") from None
        sock.settimeout(timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            context, hostname = tls
            try:
                sock = context.wrap_socket(sock, server_hostname=hostname)
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise AssociationFailed(f"TLS handshake failed: {exc}") from None
        self.sock: socket.socket | None = sock
        try:
            self._negotiate(called_ae, calling_ae, list(pairs), scp_roles)
        except (AssociationFailed, TransferFailed) as exc:
            self.close()
            raise AssociationFailed(str(exc)) from None

    @property
    def is_open(self) -> bool:
        return self.sock is not None

    # -- PDU transport --------------------------------------------------------------------
    def _recv_exact(self, count: int) -> bytes:
        assert self.sock is not None
        while len(self._buffer) < count:
            try:
                chunk = self.sock.recv(max(65536, count - len(self._buffer)))
            except TimeoutError:
                raise TransferFailed(f"no answer within {self.timeout_s:g} s") from None
            except OSError as exc:
                raise TransferFailed(f"connection lost: {exc.strerror or exc}") from None
            if not chunk:
                raise TransferFailed("connection closed by the peer")
            if QUICKACK is not None:  # acknowledge now: see harness/dicom/tcp.py
                try:
                    self.sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
                except OSError:
                    pass
            self._buffer += chunk
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def _read_pdu(self) -> tuple[int, bytes]:
        pdu_type, _, length = struct.unpack(">BBI", self._recv_exact(6))
        if length > LARGEST_PDU_READ:  # we announced OUR_MAX_PDU; this is not DICOM
            raise TransferFailed(f"peer sent a PDU of {length} bytes (type 0x{pdu_type:02X})")
        return pdu_type, self._recv_exact(length)

    def _send(self, data: bytes | bytearray) -> None:
        assert self.sock is not None
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise TransferFailed(f"peer did not read within {self.timeout_s:g} s") from None
        except OSError as exc:
            raise TransferFailed(f"connection lost: {exc.strerror or exc}") from None

    # -- association establishment ---------------------------------------------------------
    def _negotiate(
        self, called: str, calling: str, pairs: list[tuple[str, str]], scp_roles: Sequence[str]
    ) -> None:
        self._send(associate_rq(called, calling, pairs, OUR_MAX_PDU, scp_roles))
        pdu_type, body = self._read_pdu()
        if pdu_type == 0x03:
            result, source, reason = body[1], body[2], body[3]
            kind = "rejected permanently" if result == 1 else "rejected (transient)"
            why = _REJECT_REASONS.get((source, reason), f"source {source}, reason {reason}")
            raise AssociationFailed(f"{kind}: {why} (calling AE {calling})")
        if pdu_type == 0x07:
            raise AssociationFailed("aborted by the peer during negotiation")
        if pdu_type != 0x02 or len(body) < 68:
            raise AssociationFailed(f"unexpected answer (PDU type 0x{pdu_type:02X})")
        offset = 68
        while offset + 4 <= len(body):
            item_type, _, length = struct.unpack_from(">BBH", body, offset)
            value = body[offset + 4 : offset + 4 + length]
            offset += 4 + length
            if item_type == 0x21 and len(value) >= 4 and value[2] == 0:
                context_id = value[0]
                index = (context_id - 1) // 2
                syntax = _sub_item(value[4:], 0x40)
                if 0 <= index < len(pairs) and syntax is not None:
                    sop_class, proposed = pairs[index]
                    if syntax.rstrip(b"\0").decode() == proposed:
                        self.accepted[(sop_class, proposed)] = context_id
                        self.contexts[context_id] = (sop_class, proposed)
            elif item_type == 0x50:
                max_length = _sub_item(value, 0x51)
                if max_length is not None and len(max_length) == 4:
                    (self.peer_max_pdu,) = struct.unpack(">I", max_length)

    # -- C-STORE ------------------------------------------------------------------------------
    def store(
        self, context_id: int, sop_class: str, sop_instance: str, data: bytes | memoryview
    ) -> StoreAnswer:
        """Send one C-STORE-RQ with its dataset and wait for the C-STORE-RSP."""
        self.send_store(context_id, sop_class, sop_instance, data)
        return self.read_store_response()

    def send_store(
        self, context_id: int, sop_class: str, sop_instance: str, data: bytes | memoryview
    ) -> None:
        """Send one C-STORE-RQ with its dataset; read_store_response() collects the answer."""
        self._message_id = self._message_id % 0xFFFF + 1
        command = c_store_rq(self._message_id, sop_class, sop_instance)
        self._send_message(context_id, command, data)

    def read_store_response(self) -> StoreAnswer:
        """Wait for the C-STORE-RSP to the request just sent."""
        _, elements, _ = self._read_message()
        if 0x00000900 not in elements:
            self.abort()
            raise TransferFailed("C-STORE-RSP without a status")
        return StoreAnswer(command_us(elements, 0x00000900), command_uid(elements, 0x00000902))

    def _next_pdv(self) -> tuple[int, int, bytes]:
        """(context id, message control header, fragment) of the next PDV received."""
        while not self._pending_pdvs:
            pdu_type, body = self._read_pdu()
            if pdu_type == 0x07:
                self.close()
                raise TransferFailed("association aborted by the peer")
            if pdu_type != 0x04:
                self.abort()
                raise TransferFailed(f"unexpected PDU type 0x{pdu_type:02X} while waiting")
            self._pending_pdvs.extend(_pdvs(body))
        return self._pending_pdvs.popleft()

    def _read_message(self) -> tuple[int, dict[int, bytes], bytes | None]:
        """The next DIMSE message: context id, command elements, dataset bytes (or None)."""
        command: list[bytes] = []
        while True:
            context_id, control, fragment = self._next_pdv()
            if not control & 0x01:
                self.abort()
                raise TransferFailed("dataset fragment where a command was expected")
            command.append(fragment)
            if control & 0x02:
                break
        elements = parse_command(b"".join(command))
        if command_us(elements, 0x00000800, NO_DATASET) == NO_DATASET:
            return context_id, elements, None
        dataset: list[bytes] = []
        while True:
            _, control, fragment = self._next_pdv()
            if control & 0x01:
                self.abort()
                raise TransferFailed("command fragment inside a dataset")
            dataset.append(fragment)
            if control & 0x02:
                return context_id, elements, b"".join(dataset)

    def _send_message(
        self, context_id: int, command: bytes, data: bytes | memoryview | None
    ) -> None:
        """One DIMSE message: the command PDU, then the dataset in peer-sized PDUs."""
        chunk = self.peer_max_pdu - 6 if self.peer_max_pdu >= 16 else UNLIMITED_PDU_CHUNK
        pieces = _pdata(context_id, 0x03, command)  # command, last fragment
        if data is None:
            self._send(b"".join(pieces))
            return
        pending = len(command)
        view = memoryview(data)
        for start in range(0, max(len(view), 1), chunk):
            fragment = view[start : start + chunk]
            last = start + chunk >= len(view)
            pieces += _pdata(context_id, 0x02 if last else 0x00, fragment)
            pending += len(fragment)
            if pending >= SEND_BATCH or last:
                self._send(b"".join(pieces))
                pieces, pending = [], 0

    # -- C-GET ----------------------------------------------------------------------------------
    def get(
        self,
        context_id: int,
        identifier: bytes,
        on_store: Callable[[int, dict[int, bytes], bytes], int],
    ) -> tuple[dict[int, bytes], bytes | None]:
        """C-GET-RQ with an encoded identifier; every C-STORE sub-operation the peer sends
        goes to `on_store(context id, command, dataset bytes)`, whose return value is the
        status we answer. Returns the final C-GET-RSP (command elements, dataset bytes)."""
        self._message_id = self._message_id % 0xFFFF + 1
        sop_class = self.contexts[context_id][0]
        command = encode_command(
            {
                0x00000002: sop_class,
                0x00000100: 0x0010,
                0x00000110: self._message_id,
                0x00000700: 0x0000,
                0x00000800: 0x0001,
            }
        )
        self._send_message(context_id, command, identifier)
        while True:
            store_context, elements, data = self._read_message()
            field = command_us(elements, 0x00000100)
            if field == 0x0001 and data is not None:  # C-STORE-RQ of a sub-operation
                status = on_store(store_context, elements, data)
                response = encode_command(
                    {
                        0x00000002: command_uid(elements, 0x00000002),
                        0x00000100: 0x8001,
                        0x00000120: command_us(elements, 0x00000110),
                        0x00000800: NO_DATASET,
                        0x00000900: status,
                        0x00001000: command_uid(elements, 0x00001000),
                    }
                )
                self._send_message(store_context, response, None)
            elif field == 0x8010:  # C-GET-RSP
                if command_us(elements, 0x00000900) not in (0xFF00, 0xFF01):
                    return elements, data
            else:
                self.abort()
                raise TransferFailed(f"unexpected DIMSE command 0x{field:04X} during C-GET")

    # -- ending ---------------------------------------------------------------------------------
    def release(self) -> None:
        """A-RELEASE-RQ and wait for the RP; aborts if the peer does not answer properly."""
        if self.sock is None:
            return
        try:
            self._send(struct.pack(">BBIxxxx", 0x05, 0, 4))
            while True:
                pdu_type, _ = self._read_pdu()
                if pdu_type in (0x06, 0x07):
                    break
        except TransferFailed:
            pass
        self.close()

    def abort(self) -> None:
        """A-ABORT (source: service user) and close; never raises."""
        if self.sock is None:
            return
        try:
            self.sock.sendall(struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 0, 0))
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None


def _sub_item(value: bytes, wanted: int) -> bytes | None:
    offset = 0
    while offset + 4 <= len(value):
        item_type, _, length = struct.unpack_from(">BBH", value, offset)
        if item_type == wanted:
            return value[offset + 4 : offset + 4 + length]
        offset += 4 + length
    return None


def _pdvs(body: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(context id, message control header, fragment) of each PDV in a P-DATA-TF body."""
    offset = 0
    while offset + 6 <= len(body):
        (length,) = struct.unpack_from(">I", body, offset)
        yield body[offset + 4], body[offset + 5], body[offset + 6 : offset + 4 + length]
        offset += 4 + length
