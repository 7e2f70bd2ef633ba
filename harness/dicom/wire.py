"""DIMSE on a plain socket for C-STORE, C-GET and C-FIND: datasets go to the wire as they are.

Why not pynetdicom here: storing and retrieving are where the client's own cost decides the
result (load tests, migrations, contract ingest and retrieval times). pynetdicom moves every
dataset through several Python layers and threads (~5-8 ms per 0.5 MB instance here); this
module frames bytes into P-DATA-TF PDUs with a few slices and one `sendall` per few MB, and
reassembles what arrives the same way, so one association runs at the PACS's pace
(docs/performance.md). C-FIND is here because pynetdicom 3.0.4's association thread can take
a C-FIND response off its queue when C-FINDs follow each other on one association (lost
matches under load: benchmarks/repro_find_loss.py). Echo and move stay on pynetdicom.

Scope, all of PS3.8 that these need: A-ASSOCIATE-RQ/AC/RJ with one presentation context
per (SOP class, transfer syntax) and SCP role selection for C-GET's sub-operations, maximum
PDU length both ways, P-DATA-TF with command and dataset fragments, A-RELEASE, A-ABORT both
ways, the ARTIM timer. One operation at a time (no asynchronous operations window), as PACSs
expect. The PDUs themselves are encoded and decoded, bounds-checked, in harness/dicom/pdu.py:
whatever a peer sends, we end with TransferFailed / AssociationFailed saying what was wrong.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from harness.dicom import pdu

# What gets sent (file meta, data-set framing) lives in part10; re-exported for callers.
from harness.dicom.part10 import (  # noqa: F401
    FileMeta,
    dataset_bytes,
    decode_dataset,
    encode_dataset,
    read_file_meta,
)
from harness.dicom.pdu import PDV, PduError
from harness.dicom.tcp import QUICKACK

OUR_MAX_PDU = 1 << 20  # what we accept from the peer (only responses come back)
UNLIMITED_PDU_CHUNK = 1 << 20  # fragment size when the peer announces no limit
SEND_BATCH = 4 << 20  # bytes of dataset framed per sendall
LARGEST_PDU_READ = 16 << 20  # anything longer is a broken or hostile peer
LARGEST_COMMAND = 1 << 20  # a command set is a few hundred bytes (PS3.7 9.3, 10.3)
LARGEST_IDENTIFIER = 16 << 20  # a C-FIND response identifier holds a few attributes
DEFAULT_MAX_MATCHES = 1_000_000  # C-FIND matches kept in memory for one query
DEFAULT_ARTIM_S = 30.0  # PS3.8 9.1.5; pynetdicom's ACSE timeout has the same default


class AssociationFailed(Exception):
    """The peer refused, aborted or never answered the association request (message says)."""


class TransferFailed(Exception):
    """The association broke during an operation: abort, closed socket or timeout."""


class CommandSetError(PduError):
    """A command set (PS3.7 6.3, implicit VR little endian) that cannot be parsed."""


@dataclass(frozen=True)
class FindAnswer:
    """What the peer answered to one C-FIND-RQ: the final status (and its comment) and the
    identifiers of the pending responses, encoded in the context's transfer syntax."""

    status: int
    error_comment: str
    matches: list[bytes]


@dataclass(frozen=True)
class StoreAnswer:
    """What the peer answered to one C-STORE-RQ."""

    status: int
    error_comment: str = ""


# -- command sets ------------------------------------------------------------------------------


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


def query_rq(command_field: int, message_id: int, sop_class: str) -> bytes:
    """The command set of a request with an identifier: C-FIND-RQ (0x0020) or C-GET-RQ
    (0x0010), PS3.7 9.3.2.1 / 9.3.3.1."""
    return encode_command(
        {
            0x00000002: sop_class,
            0x00000100: command_field,
            0x00000110: message_id & 0xFFFF,
            0x00000700: 0x0000,  # medium priority
            0x00000800: 0x0001,  # the identifier follows
        }
    )


def command_us(elements: dict[int, bytes], tag: int, default: int = 0) -> int:
    """An unsigned short of a parsed command set."""
    raw = elements.get(tag, b"")
    return struct.unpack("<H", raw[:2])[0] if len(raw) >= 2 else default


def command_uid(elements: dict[int, bytes], tag: int) -> str:
    return elements.get(tag, b"").rstrip(b"\0 ").decode("ascii", "replace")


def parse_command(data: bytes) -> dict[int, bytes]:
    """Elements of an implicit VR little endian command set, by tag (PS3.7 6.3); every
    length is checked against what is there, so a malformed one is CommandSetError."""
    elements: dict[int, bytes] = {}
    offset = 0
    while offset < len(data):
        if offset + 8 > len(data):
            raise CommandSetError(
                f"command set: {len(data) - offset} stray bytes at offset {offset}, "
                "too short for an element header"
            )
        group, element, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        if length > len(data) - offset:
            raise CommandSetError(
                f"command set: element ({group:04X},{element:04X}) announces {length} bytes, "
                f"only {len(data) - offset} left"
            )
        elements[(group << 16) | element] = bytes(data[offset : offset + length])
        offset += length
    return elements




# -- the association ---------------------------------------------------------------------------


class WireAssociation:
    """One association: open, then C-STORE or C-GET one operation at a time, release.

    `timeout_s` bounds each wait for the peer during an operation (the DIMSE timeout);
    `artim_s` bounds the whole wait for the A-ASSOCIATE-AC/RJ and for the A-RELEASE-RP (the
    ARTIM timer, PS3.8 9.1.5), default the smaller of `timeout_s` and 30 s.
    """

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
        artim_s: float | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.artim_s = min(timeout_s, DEFAULT_ARTIM_S) if artim_s is None else artim_s
        self._pending_pdvs: deque[PDV] = deque()
        self._buffer = bytearray()
        # the whole operation's end (a C-FIND's deadline_s): a peer dripping one byte per
        # read would otherwise reset the per-read timeout forever
        self._operation_deadline: float | None = None
        self._message_id = 0
        self.accepted: dict[tuple[str, str], int] = {}
        self.contexts: dict[int, tuple[str, str]] = {}  # accepted id -> (SOP class, syntax)
        self.peer_max_pdu = 0
        self.peer_implementation = ""  # class UID and version name, for messages and reports
        self.scp_roles_requested: frozenset[str] = frozenset(scp_roles)
        # SOP classes the peer lets us act as SCP for (C-GET's C-STORE sub-operations);
        # PS3.7 D.3.3.4: without a role selection reply the default roles hold (we are SCU only)
        self.scp_roles_granted: frozenset[str] = frozenset()
        self.sock: socket.socket | None = None
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
        self.sock = sock
        try:
            self._negotiate(called_ae, calling_ae, list(pairs), scp_roles)
        except (AssociationFailed, TransferFailed) as exc:
            self.close()
            raise AssociationFailed(str(exc)) from None
        except BaseException:
            self.abort()
            raise

    @property
    def is_open(self) -> bool:
        return self.sock is not None

    @property
    def scp_roles_refused(self) -> frozenset[str]:
        """SOP classes we asked to act as SCP for and the peer did not grant (PS3.7 D.3.3.4):
        a C-GET of such a class may get nothing back."""
        return self.scp_roles_requested - self.scp_roles_granted

    # -- PDU transport --------------------------------------------------------------------
    def _recv_exact(self, count: int, deadline: float | None, waiting_for: str) -> bytes:
        """`count` bytes; each read waits at most timeout_s, or, given a `deadline` (the
        ARTIM timer's), all of them together end by that monotonic time."""
        assert self.sock is not None
        ends = deadline if deadline is not None else self._operation_deadline
        try:
            while len(self._buffer) < count:
                if ends is not None:
                    remaining = ends - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    self.sock.settimeout(min(remaining, self.timeout_s))
                chunk = self.sock.recv(max(65536, count - len(self._buffer)))
                if not chunk:
                    raise TransferFailed("connection closed by the peer")
                if QUICKACK is not None:  # acknowledge now: see harness/dicom/tcp.py
                    try:
                        self.sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
                    except OSError:
                        pass
                self._buffer += chunk
        except TimeoutError:
            if deadline is not None:
                raise TransferFailed(
                    f"no answer within {self.artim_s:g} s to the {waiting_for} "
                    "(ARTIM timer, PS3.8 9.1.5)"
                ) from None
            if ends is not None and time.monotonic() >= ends:
                raise TransferFailed("not finished within the operation's deadline (the peer "
                                     "sent too little, too slowly)") from None
            raise TransferFailed(f"no answer within {self.timeout_s:g} s") from None
        except OSError as exc:
            raise TransferFailed(f"connection lost: {exc.strerror or exc}") from None
        finally:
            if ends is not None and self.sock is not None:
                self.sock.settimeout(self.timeout_s)
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def _read_pdu(self, deadline: float | None = None, waiting_for: str = "") -> pdu.Pdu:
        """The next PDU, decoded. A malformed one aborts the association (source: service
        provider, PS3.8 9.3.8) and raises TransferFailed naming what was wrong."""
        header = self._recv_exact(pdu.PDU_HEADER_LENGTH, deadline, waiting_for)
        try:
            pdu_type, length = pdu.decode_pdu_header(header)
        except PduError as exc:
            self._fail(f"malformed PDU from the peer: {exc}", reason=1)
        if length > LARGEST_PDU_READ:  # we announced OUR_MAX_PDU; this is not DICOM
            self._fail(
                f"peer sent a PDU of {length} bytes ({pdu.PDU_NAMES[pdu_type]}), "
                f"more than the {LARGEST_PDU_READ} we read",
                reason=6,
            )
        body = self._recv_exact(length, deadline, waiting_for)
        try:
            return pdu.decode_pdu_body(pdu_type, body)
        except PduError as exc:
            self._fail(f"malformed PDU from the peer: {exc}", reason=6)

    def _fail(self, message: str, reason: int | None = None) -> NoReturn:
        """Abort, then TransferFailed(message). With a `reason` the PDU itself was wrong: the
        abort's source is the service provider (PS3.8 9.3.8); without one the DIMSE message
        was, and the source is the service user (us)."""
        if reason is None:
            self.abort()
        else:
            self.abort(source=2, reason=reason)
        raise TransferFailed(message)

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
        """Send the A-ASSOCIATE-RQ, read the answer within the ARTIM timer, record what the
        A-ASSOCIATE-AC accepted: presentation contexts, maximum PDU length, SCP roles."""
        deadline = time.monotonic() + self.artim_s
        self._send(pdu.associate_rq(called, calling, pairs, OUR_MAX_PDU, scp_roles))
        answer = self._read_pdu(deadline, "A-ASSOCIATE-RQ")
        if isinstance(answer, pdu.AAssociateRJ):
            raise AssociationFailed(f"{answer.describe()} (calling AE {calling})")
        if isinstance(answer, pdu.AAbort):
            raise AssociationFailed(f"aborted by the peer during negotiation ({answer.describe()})")
        if not isinstance(answer, pdu.AAssociateAC):
            self._fail(f"unexpected answer to the A-ASSOCIATE-RQ: {pdu.pdu_name(answer)}", reason=2)
        proposed = {2 * index + 1: pair for index, pair in enumerate(pairs)}
        for result in answer.contexts:
            pair = proposed.get(result.context_id)
            if result.result == 0 and pair is not None and result.transfer_syntax == pair[1]:
                self.accepted[pair] = result.context_id
                self.contexts[result.context_id] = pair
        user = answer.user_information
        self.peer_max_pdu = user.max_length
        self.peer_implementation = " ".join(
            part
            for part in (user.implementation_class_uid, user.implementation_version_name)
            if part
        )
        self.scp_roles_granted = frozenset(
            role.sop_class_uid
            for role in user.role_selections
            if role.scp_role and role.sop_class_uid in self.scp_roles_requested
        )

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
            self._fail("C-STORE-RSP without a status")
        return StoreAnswer(command_us(elements, 0x00000900), command_uid(elements, 0x00000902))

    def _next_pdv(self) -> PDV:
        """The next PDV received, on a presentation context the peer accepted."""
        while not self._pending_pdvs:
            if self.sock is None:
                raise TransferFailed("association already closed")
            received = self._read_pdu()
            if isinstance(received, pdu.AAbort):
                self.close()
                raise TransferFailed(f"association aborted by the peer ({received.describe()})")
            if not isinstance(received, pdu.PDataTF):
                self._fail(f"unexpected {pdu.pdu_name(received)} while waiting for data", reason=2)
            self._pending_pdvs.extend(received.pdvs)
        pdv = self._pending_pdvs.popleft()
        if pdv.context_id not in self.contexts:
            self._fail(
                f"PDV on presentation context {pdv.context_id}, which was not accepted", reason=6
            )
        return pdv

    def _read_message(
        self, largest_dataset: int | None = None
    ) -> tuple[int, dict[int, bytes], bytes | None]:
        """The next DIMSE message: context id, command elements, dataset bytes (or None);
        a dataset longer than `largest_dataset` aborts the association."""
        command: list[bytes] = []
        size = context_id = 0
        while True:
            pdv = self._next_pdv()
            if not pdv.is_command:
                self._fail("dataset fragment where a command was expected")
            if command and pdv.context_id != context_id:
                self._fail("command fragments on two presentation contexts")
            context_id = pdv.context_id
            command.append(pdv.fragment)
            size += len(pdv.fragment)
            if size > LARGEST_COMMAND:
                self._fail(f"command set longer than {LARGEST_COMMAND} bytes")
            if pdv.is_last:
                break
        try:
            elements = parse_command(b"".join(command))
        except CommandSetError as exc:
            self._fail(f"malformed DIMSE message from the peer: {exc}")
        if command_us(elements, 0x00000800, NO_DATASET) == NO_DATASET:
            return context_id, elements, None
        dataset: list[bytes] = []
        size = 0
        while True:
            pdv = self._next_pdv()
            if pdv.is_command:
                self._fail("command fragment inside a dataset")
            if pdv.context_id != context_id:
                self._fail(
                    f"dataset on presentation context {pdv.context_id}, its command on "
                    f"{context_id}",
                )
            dataset.append(pdv.fragment)
            size += len(pdv.fragment)
            if largest_dataset is not None and size > largest_dataset:
                self._fail(f"dataset longer than {largest_dataset} bytes")
            if pdv.is_last:
                return context_id, elements, b"".join(dataset)

    def _send_message(
        self, context_id: int, command: bytes, data: bytes | memoryview | None
    ) -> None:
        """One DIMSE message: the command PDU, then the dataset in peer-sized PDUs."""
        chunk = self.peer_max_pdu - 6 if self.peer_max_pdu >= 16 else UNLIMITED_PDU_CHUNK
        last_command = pdu.COMMAND | pdu.LAST_FRAGMENT
        pieces: list[bytes | memoryview] = [
            pdu.pdata_header(context_id, last_command, len(command)),
            command,
        ]
        if data is None:
            self._send(b"".join(pieces))
            return
        pending = len(command)
        view = memoryview(data)
        for start in range(0, max(len(view), 1), chunk):
            fragment = view[start : start + chunk]
            last = start + chunk >= len(view)
            control = pdu.LAST_FRAGMENT if last else 0
            pieces += [pdu.pdata_header(context_id, control, len(fragment)), fragment]
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
        status we answer. Returns the final C-GET-RSP (command elements, dataset bytes).
        Sub-operations come only for classes in `scp_roles_granted` (PS3.7 D.3.3.4)."""
        self._message_id = self._message_id % 0xFFFF + 1
        command = query_rq(0x0010, self._message_id, self.contexts[context_id][0])
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
                self._fail(f"unexpected DIMSE command 0x{field:04X} during C-GET")

    # -- C-FIND ---------------------------------------------------------------------------------
    def find(
        self,
        context_id: int,
        identifier: bytes,
        *,
        max_matches: int = DEFAULT_MAX_MATCHES,
        deadline_s: float | None = None,
    ) -> FindAnswer:
        """C-FIND-RQ with an encoded identifier (PS3.7 9.1.2), read until the final response.

        Every response is read on this thread, off this socket, in order: nothing else can
        take one (pynetdicom's association thread could, under load). A peer that sends more
        than `max_matches` pending responses, or is not done within `deadline_s` (each read
        still waits at most timeout_s), is aborted with TransferFailed saying so; so is a
        response to another message, or any other DIMSE command."""
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        self._operation_deadline = deadline
        try:
            return self._find(context_id, identifier, max_matches, deadline, deadline_s)
        finally:
            self._operation_deadline = None

    def _find(self, context_id: int, identifier: bytes, max_matches: int,
              deadline: float | None, deadline_s: float | None) -> FindAnswer:
        self._message_id = self._message_id % 0xFFFF + 1
        command = query_rq(0x0020, self._message_id, self.contexts[context_id][0])
        self._send_message(context_id, command, identifier)
        matches: list[bytes] = []
        while True:
            if deadline is not None and time.monotonic() > deadline:
                self._fail(
                    f"C-FIND not finished within {deadline_s:g} s "
                    f"({len(matches)} matches so far)"
                )
            _, elements, data = self._read_message(LARGEST_IDENTIFIER)
            field = command_us(elements, 0x00000100)
            if field != 0x8020:
                self._fail(f"unexpected DIMSE command 0x{field:04X} during C-FIND")
            answered = command_us(elements, 0x00000120)
            if answered != self._message_id:
                self._fail(
                    f"C-FIND-RSP to message {answered}, the request was message "
                    f"{self._message_id}"
                )
            if 0x00000900 not in elements:
                self._fail("C-FIND-RSP without a status")
            status = command_us(elements, 0x00000900)
            if status not in (0xFF00, 0xFF01):  # PS3.4 C.4.1.1.4: anything else is final
                return FindAnswer(status, command_uid(elements, 0x00000902), matches)
            if data is not None:
                if len(matches) >= max_matches:
                    self._fail(f"C-FIND answered more than {max_matches} matches")
                matches.append(data)

    # -- ending ---------------------------------------------------------------------------------
    def release(self) -> None:
        """A-RELEASE-RQ, then wait for the A-RELEASE-RP no longer than the ARTIM timer
        (PS3.8 9.1.5); a peer that does not answer in time is aborted. Never raises."""
        if self.sock is None:
            return
        deadline = time.monotonic() + self.artim_s
        try:
            self._send(pdu.AReleaseRQ().encode())
            while True:
                answer = self._read_pdu(deadline, "A-RELEASE-RQ")
                if isinstance(answer, pdu.AReleaseRP | pdu.AAbort):
                    break
                if isinstance(answer, pdu.AReleaseRQ):  # release collision, PS3.8 7.2
                    self._send(pdu.AReleaseRP().encode())
                    break
                # P-DATA-TF already under way when we asked: not ours any more
        except TransferFailed:
            self.abort()
            return
        self.close()

    def abort(self, source: int = 0, reason: int = 0) -> None:
        """A-ABORT (PS3.8 9.3.8; by default source service-user) and close; never raises."""
        if self.sock is None:
            return
        try:
            self.sock.settimeout(min(self.timeout_s, 2.0))
            self.sock.sendall(pdu.AAbort(source, reason).encode())
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None
