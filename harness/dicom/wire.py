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
expect. The PDUs themselves are encoded and decoded, bounds-checked, in harness/dicom/pdu.py,
the DIMSE command sets in dimse.py: whatever a peer sends, we end with TransferFailed /
AssociationFailed saying what was wrong.

Every operation has a deadline a peer cannot push back (docs/safety.md): `timeout_s` plus the
bytes it moves at `min_rate` (default 64 KiB/s), counted from its start, or for C-GET and
C-FIND from the last sub-operation or match received. A peer trickling below that rate, or
answering with pending responses forever, is cut off however often each read returns; one
that sends fast but never ends a message meets the size caps first.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import NoReturn

from harness.dicom import pdu
from harness.dicom.deadline import OperationDeadline
from harness.dicom.dimse import (
    NO_DATASET,
    CommandSetError,
    FindAnswer,
    StoreAnswer,
    c_cancel_rq,
    c_store_rq,
    command_uid,
    command_us,
    encode_command,
    parse_command,
    query_rq,
)
from harness.dicom.pdu import PDV, PduError
from harness.dicom.tcp import QUICKACK

OUR_MAX_PDU = 1 << 20  # what we accept from the peer (only responses come back)
UNLIMITED_PDU_CHUNK = 1 << 20  # fragment size when the peer announces no limit
SEND_BATCH = 4 << 20  # bytes of dataset framed per sendall
LARGEST_PDU_READ = 16 << 20  # anything longer is a broken or hostile peer
LARGEST_COMMAND = 1 << 20  # a command set is a few hundred bytes (PS3.7 9.3, 10.3)
LARGEST_IDENTIFIER = 16 << 20  # a C-FIND response identifier holds a few attributes
DEFAULT_LARGEST_DATASET = 2 << 30  # a C-GET sub-operation's data set, reassembled in memory
PDV_OVERHEAD = 6  # PDV item length and message control header: what an empty PDV costs
DEFAULT_MAX_MATCHES = 1_000_000  # C-FIND matches kept in memory for one query
DEFAULT_MAX_PENDING = 1000  # pending responses in a row without a sub-operation or match
DEFAULT_ARTIM_S = 30.0  # PS3.8 9.1.5; pynetdicom's ACSE timeout has the same default
DEFAULT_MIN_RATE = 64 << 10  # bytes/s: the slowest link an operation is given time for


class AssociationFailed(Exception):
    """The peer refused, aborted or never answered the association request (message says)."""


class TransferFailed(Exception):
    """The association broke during an operation: abort, closed socket or timeout. The
    message says what happened; callers name the peer (they know it as the user does)."""


class PeerFault(TransferFailed):
    """The peer, not the instance at hand, is at fault: it broke the protocol (a malformed
    PDU or DIMSE message) or a bound (operation deadline, DIMSE timeout, pending responses,
    message size). Callers stop using the peer instead of trying the next instance."""




class WireAssociation:
    """One association: open, then C-STORE or C-GET one operation at a time, release.

    `timeout_s` bounds each wait for the peer during an operation (the DIMSE timeout), and
    with `min_rate` (bytes/s) the whole operation (OperationDeadline); `artim_s` bounds the
    whole wait for the A-ASSOCIATE-AC/RJ and for the A-RELEASE-RP (the ARTIM timer, PS3.8
    9.1.5), default the smaller of `timeout_s` and 30 s. A data set received by C-GET
    longer than `max_dataset_bytes`, or more than `max_pending` pending responses in a row,
    end the operation.
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
        min_rate: float = DEFAULT_MIN_RATE,
        max_dataset_bytes: int = DEFAULT_LARGEST_DATASET,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        if min_rate <= 0:
            raise ValueError(f"min_rate must be > 0 bytes/s, not {min_rate}")
        self.timeout_s = timeout_s
        self.artim_s = min(timeout_s, DEFAULT_ARTIM_S) if artim_s is None else artim_s
        self.min_rate = min_rate
        self.max_dataset_bytes = max_dataset_bytes
        self.max_pending = max_pending
        self.operation: OperationDeadline | None = None  # of the operation under way
        self._pending_pdvs: deque[PDV] = deque()
        self._buffer = bytearray()
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
        self._sock_timeout = timeout_s
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
        """`count` bytes, by a `deadline` (the ARTIM timer's, a monotonic time) if given,
        else within the operation's deadline (OperationDeadline), else each read waiting at
        most timeout_s."""
        assert self.sock is not None
        operation = self.operation if deadline is None else None
        try:
            while len(self._buffer) < count:
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    self._set_timeout(remaining)
                elif operation is not None:
                    self._set_timeout(operation.read_wait())
                else:
                    self._set_timeout(self.timeout_s)
                chunk = self.sock.recv(max(65536, count - len(self._buffer)))
                if not chunk:
                    raise TransferFailed("connection closed by the peer")
                if QUICKACK is not None:  # acknowledge now: see harness/dicom/tcp.py
                    try:
                        self.sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
                    except OSError:
                        pass
                if operation is not None:
                    operation.received(len(chunk))
                self._buffer += chunk
        except TimeoutError:
            if deadline is not None:
                raise TransferFailed(
                    f"no answer within {self.artim_s:g} s to the {waiting_for} "
                    "(ARTIM timer, PS3.8 9.1.5)"
                ) from None
            if operation is not None:
                self._fail(operation.expired())
            raise PeerFault(f"no answer within {self.timeout_s:g} s") from None
        except OSError as exc:
            raise TransferFailed(f"connection lost: {exc.strerror or exc}") from None
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    def _read_pdu(self, deadline: float | None = None, waiting_for: str = "") -> pdu.Pdu:
        """The next PDU, decoded. A malformed one aborts the association (source: service
        provider, PS3.8 9.3.8) and raises PeerFault naming what was wrong."""
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
        """Abort, then PeerFault(message). With a `reason` the PDU itself was wrong: the
        abort's source is the service provider (PS3.8 9.3.8); without one the DIMSE message
        was, and the source is the service user (us)."""
        self.operation = None
        if reason is None:
            self.abort()
        else:
            self.abort(source=2, reason=reason)
        raise PeerFault(message)

    def _send(self, data: bytes | bytearray) -> None:
        """sendall, within the operation's deadline (which `data` extends) if one runs:
        a whole sendall, however many MB, has one timeout (Python 3.5+)."""
        assert self.sock is not None
        operation = self.operation
        try:
            if operation is not None:
                operation.sent(len(data))
                remaining = operation.remaining()
                if remaining <= 0:
                    raise TimeoutError
                self._set_timeout(remaining)
            else:
                self._set_timeout(self.timeout_s)
            self.sock.sendall(data)
        except TimeoutError:
            if operation is not None:
                operation.idle_wait = False
                self._fail(operation.expired())
            raise PeerFault(f"peer did not read within {self.timeout_s:g} s") from None
        except OSError as exc:
            raise TransferFailed(f"connection lost: {exc.strerror or exc}") from None

    def _set_timeout(self, seconds: float) -> None:
        """The socket's timeout for the next call; unchanged values cost no system call
        (while data flows, every read waits the same DIMSE timeout)."""
        assert self.sock is not None
        if seconds != self._sock_timeout:
            self.sock.settimeout(seconds)
            self._sock_timeout = seconds

    def _begin(self, waiting_for: str, hard_s: float | None = None) -> OperationDeadline:
        """Start the deadline of the next operation (one at a time, PS3.7 D.3.3.3)."""
        self.operation = OperationDeadline(waiting_for, self.timeout_s, self.min_rate, hard_s)
        return self.operation

    def _pending(self, operation: OperationDeadline, what: str) -> None:
        """One more pending response without progress; too many in a row end it."""
        operation.pending_in_a_row += 1
        if operation.pending_in_a_row > self.max_pending:
            self._fail(f"more than {self.max_pending} pending {what} in a row")

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
        """Send one C-STORE-RQ with its dataset; read_store_response() collects the answer.
        The operation's deadline starts here: timeout_s + what is sent at min_rate."""
        self._message_id = self._message_id % 0xFFFF + 1
        command = c_store_rq(self._message_id, sop_class, sop_instance)
        self._begin("C-STORE-RSP")
        self._send_message(context_id, command, data)

    def read_store_response(self) -> StoreAnswer:
        """Wait for the C-STORE-RSP to the request just sent (PS3.7 9.3.1.2). C-STORE has no
        pending status (PS3.4 B.2.3); pending ones are passed over, up to max_pending."""
        operation = self.operation or self._begin("C-STORE-RSP")
        while True:
            elements, _, status = self._read_response(
                0x8001, "C-STORE-RSP", "instead of a C-STORE-RSP"
            )
            if status not in (0xFF00, 0xFF01):
                self.operation = None
                return StoreAnswer(status, command_uid(elements, 0x00000902))
            self._pending(operation, "C-STORE-RSPs")

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
        self, largest_dataset: int
    ) -> tuple[int, dict[int, bytes], bytes | None]:
        """The next DIMSE message: context id, command elements, dataset bytes (or None).
        A command or dataset longer than its cap (LARGEST_COMMAND, `largest_dataset`),
        counting each PDV's header too (so empty fragments add up), aborts the association."""
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
            size += len(pdv.fragment) + PDV_OVERHEAD
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
            size += len(pdv.fragment) + PDV_OVERHEAD
            if size > largest_dataset:
                self._fail(f"dataset longer than {largest_dataset} bytes, unfinished")
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
        Sub-operations come only for classes in `scp_roles_granted` (PS3.7 D.3.3.4).

        The deadline (OperationDeadline) starts afresh with each sub-operation received: a
        long retrieve goes on as long as instances keep coming at min_rate or faster; bytes
        of a message that never ends, or pending responses without a sub-operation (at most
        max_pending in a row), do not keep it alive."""
        self._message_id = self._message_id % 0xFFFF + 1
        command = query_rq(0x0010, self._message_id, self.contexts[context_id][0])
        operation = self._begin("C-GET sub-operation or final C-GET-RSP")
        self._send_message(context_id, command, identifier)
        while True:
            store_context, elements, data = self._read_message(self.max_dataset_bytes)
            field = command_us(elements, 0x00000100)
            if field == 0x0001 and data is not None:  # C-STORE-RQ of a sub-operation
                operation.progress()
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
                operation.progress()  # the time on_store took is ours, not the peer's
                self._send_message(store_context, response, None)
            elif field == 0x8010:  # C-GET-RSP
                if command_us(elements, 0x00000900) not in (0xFF00, 0xFF01):
                    self.operation = None
                    return elements, data
                self._pending(operation, "C-GET-RSPs without a sub-operation")
            else:
                self._fail(f"unexpected DIMSE command 0x{field:04X} during C-GET")

    def _read_response(
        self, command_field: int, name: str, where: str
    ) -> tuple[dict[int, bytes], bytes | None, int]:
        """The next message, which must be the response `name` (Command Field
        `command_field`, PS3.7 E.1) to the request just sent, with a status: its command
        elements, data set and status. Anything else aborts with PeerFault saying what
        (`where`: how the message names an unexpected command, e.g. "during C-FIND")."""
        _, elements, data = self._read_message(LARGEST_IDENTIFIER)
        field = command_us(elements, 0x00000100)
        if field != command_field:
            self._fail(f"unexpected DIMSE command 0x{field:04X} {where}")
        answered = command_us(elements, 0x00000120)
        if answered != self._message_id:
            self._fail(f"{name} to message {answered}, the request was message {self._message_id}")
        if 0x00000900 not in elements:
            self._fail(f"{name} without a status")
        return elements, data, command_us(elements, 0x00000900)

    # -- C-FIND ---------------------------------------------------------------------------------
    def find(
        self,
        context_id: int,
        identifier: bytes,
        *,
        max_matches: int = DEFAULT_MAX_MATCHES,
        deadline_s: float | None = None,
        cancel_after: int | None = None,
    ) -> FindAnswer:
        """C-FIND-RQ with an encoded identifier (PS3.7 9.1.2), read until the final response.

        With `cancel_after`, a C-CANCEL-RQ goes out once that many matches arrived (PS3.7
        9.3.2.3): the peer then ends with Cancel (0xFE00), or Success if it was done first;
        matches it still sends before its final response are dropped, not kept.

        Every response is read on this thread, off this socket, in order: nothing else can
        take one (pynetdicom's association thread could, under load). A peer that sends more
        than `max_matches` matches (or max_pending pending responses without one in a row),
        or is not done within `deadline_s`, or not within the operation deadline from the
        last match (OperationDeadline), is aborted with PeerFault saying so; so is a
        response to another message, or any other DIMSE command."""
        self._message_id = self._message_id % 0xFFFF + 1
        command = query_rq(0x0020, self._message_id, self.contexts[context_id][0])
        operation = self._begin("C-FIND-RSP", deadline_s)
        matches: list[bytes] = []

        def not_finished() -> str:
            return (
                f"C-FIND not finished within {deadline_s:g} s ({len(matches)} matches so far)"
            )

        self._send_message(context_id, command, identifier)
        cancelled = False
        while True:
            operation.hard_message = not_finished()
            if operation.hard_at is not None and time.monotonic() > operation.hard_at:
                self._fail(not_finished())
            elements, data, status = self._read_response(0x8020, "C-FIND-RSP", "during C-FIND")
            if status not in (0xFF00, 0xFF01):  # PS3.4 C.4.1.1.4: anything else is final
                self.operation = None
                return FindAnswer(status, command_uid(elements, 0x00000902), matches)
            if data is None:
                self._pending(operation, "C-FIND-RSPs without a match")
                continue
            if cancelled:
                # answered before the peer saw the C-CANCEL-RQ: bounded like any pending
                self._pending(operation, "C-FIND-RSPs after C-CANCEL")
                continue
            if len(matches) >= max_matches:
                self._fail(f"C-FIND answered more than {max_matches} matches")
            matches.append(data)
            operation.progress()
            if cancel_after is not None and len(matches) >= cancel_after:
                self._send_message(context_id, c_cancel_rq(self._message_id), None)
                cancelled = True

    # -- C-MOVE ---------------------------------------------------------------------------------
    def move(
        self, context_id: int, destination_ae: str, identifier: bytes
    ) -> tuple[dict[int, bytes], bytes | None]:
        """C-MOVE-RQ to `destination_ae` with an encoded identifier (PS3.7 9.1.4), read until
        the final C-MOVE-RSP: its command elements (status, sub-operation counts) and data
        set. The deadline starts afresh whenever a sub-operation ended (the counts grew);
        pending responses without that count against max_pending. Why here and not on
        pynetdicom: its association threads cost ~70 ms of CPU per C-MOVE (measured, 12
        studies: 0.7-1.0 s), which the PACS on the same machine then lacks."""
        self._message_id = self._message_id % 0xFFFF + 1
        padded = destination_ae + " " * (len(destination_ae) % 2)  # AE: space padded (PS3.5)
        command = encode_command(
            {
                0x00000002: self.contexts[context_id][0],
                0x00000100: 0x0021,
                0x00000110: self._message_id,
                0x00000600: padded,
                0x00000700: 0x0000,
                0x00000800: 0x0001,
            }
        )
        operation = self._begin("C-MOVE-RSP")
        self._send_message(context_id, command, identifier)
        ended = -1
        while True:
            elements, data, status = self._read_response(0x8021, "C-MOVE-RSP", "during C-MOVE")
            if status not in (0xFF00, 0xFF01):
                self.operation = None
                return elements, data
            counts = sum(command_us(elements, tag) for tag in (0x00001021, 0x00001022, 0x00001023))
            if counts > ended:
                ended = counts
                operation.progress()
            else:
                self._pending(operation, "C-MOVE-RSPs without a finished sub-operation")

    # -- ending ---------------------------------------------------------------------------------
    def release(self) -> None:
        """A-RELEASE-RQ, then wait for the A-RELEASE-RP no longer than the ARTIM timer
        (PS3.8 9.1.5); a peer that does not answer in time is aborted. Never raises."""
        if self.sock is None:
            return
        self.operation = None
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

    def release_in_background(self) -> None:
        """release() on a thread of its own, for an association whose work is done (its last
        response came): nothing the caller waits for depends on the A-RELEASE-RP (PS3.8
        7.2). Waiting for it is bounded only by the ARTIM timer, so a peer slow to answer
        would hold the caller that long and end in success, no retry: the shape of the 30 s
        stall of issue 18. The thread ends within that bound."""
        threading.Thread(target=self.release, name="release", daemon=True).start()

    def abort(self, source: int = 0, reason: int = 0) -> None:
        """A-ABORT (PS3.8 9.3.8; by default source service-user) and close; never raises."""
        if self.sock is None:
            return
        try:
            self._set_timeout(min(self.timeout_s, 2.0))
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
