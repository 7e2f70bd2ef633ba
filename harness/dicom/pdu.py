"""The DICOM Upper Layer PDUs (PS3.8 9.3) and the association items they carry (PS3.7 D.3.3),
encoded and decoded with every length checked.

Why our own: harness/dicom/wire.py runs C-STORE and C-GET on a plain socket (see there), and
HAProxy's DICOM health check (harness/resilience/ha.py) needs an A-ASSOCIATE-RQ as bytes;
both build it
here (`associate_rq`), so there is one A-ASSOCIATE-RQ in the harness. Decoding never trusts a
length it reads: anything malformed raises PduError naming the PDU, the item and the offset,
never IndexError or struct.error. Names follow PS3.8 (A-ASSOCIATE-RQ -> AAssociateRQ).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # DICOM Application Context Name, PS3.7 A.2.1
IMPLEMENTATION_CLASS_UID = "2.25.217958312904782271629875573895301975957"  # pacs-harness
IMPLEMENTATION_VERSION_NAME = "PACSHARNESS"

# PDU types, PS3.8 9.3.1
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
PDU_NAMES = {
    A_ASSOCIATE_RQ: "A-ASSOCIATE-RQ",
    A_ASSOCIATE_AC: "A-ASSOCIATE-AC",
    A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
    P_DATA_TF: "P-DATA-TF",
    A_RELEASE_RQ: "A-RELEASE-RQ",
    A_RELEASE_RP: "A-RELEASE-RP",
    A_ABORT: "A-ABORT",
}
PDU_HEADER_LENGTH = 6  # type, reserved, 4-byte length

# Message control header of a PDV, PS3.8 E.2
COMMAND = 0x01
LAST_FRAGMENT = 0x02
# PDVs decoded from one P-DATA-TF: a peer gains nothing from more, and each costs memory
# (a 16 MiB PDU of empty PDVs would otherwise be 2.8 million objects)
LARGEST_PDV_COUNT = 65536

# A-ASSOCIATE-RJ result/source/reason, PS3.8 9.3.4 (Table 9-21)
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
_REJECT_SOURCES = {
    1: "service-user",
    2: "service-provider (ACSE)",
    3: "service-provider (presentation)",
}
# A-ABORT source/reason, PS3.8 9.3.8 (Table 9-26)
ABORT_SOURCES = {0: "service-user", 1: "reserved", 2: "service-provider"}
ABORT_REASONS = {
    0: "reason not specified",
    1: "unrecognized PDU",
    2: "unexpected PDU",
    3: "reserved",
    4: "unrecognized PDU parameter",
    5: "unexpected PDU parameter",
    6: "invalid PDU parameter value",
}
# Presentation context results in the A-ASSOCIATE-AC, PS3.8 9.3.3.2 (Table 9-18)
CONTEXT_RESULTS = {
    0: "acceptance",
    1: "user-rejection",
    2: "no reason (provider rejection)",
    3: "abstract syntax not supported (provider rejection)",
    4: "transfer syntaxes not supported (provider rejection)",
}


class PduError(Exception):
    """A PDU (or something carried in one) is malformed; the message says what and where."""


# -- the PDUs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoleSelection:
    """SCP/SCU Role Selection sub-item (PS3.7 D.3.3.4): may each side act as SCU / SCP."""

    sop_class_uid: str
    scu_role: bool
    scp_role: bool


@dataclass(frozen=True)
class UserInformation:
    """The User Information item's sub-items we speak (PS3.8 9.3.2.3, PS3.7 D.3.3); others
    (extended negotiation, user identity) are skipped on decoding, as PS3.8 9.3.1 allows."""

    max_length: int = 0  # Maximum Length Received, PS3.8 D.1; 0: no limit
    implementation_class_uid: str = IMPLEMENTATION_CLASS_UID
    implementation_version_name: str = IMPLEMENTATION_VERSION_NAME
    role_selections: tuple[RoleSelection, ...] = ()
    async_ops_window: tuple[int, int] | None = None  # (invoked, performed), PS3.7 D.3.3.3


@dataclass(frozen=True)
class ProposedContext:
    """Presentation Context item of an A-ASSOCIATE-RQ (PS3.8 9.3.2.2)."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class ContextResult:
    """Presentation Context item of an A-ASSOCIATE-AC (PS3.8 9.3.3.2)."""

    context_id: int
    result: int  # 0 acceptance, see CONTEXT_RESULTS
    transfer_syntax: str = ""  # not significant unless accepted


@dataclass(frozen=True)
class AAssociateRQ:
    """A-ASSOCIATE-RQ (PS3.8 9.3.2)."""

    called_ae: str
    calling_ae: str
    contexts: tuple[ProposedContext, ...]
    user_information: UserInformation
    application_context: str = APPLICATION_CONTEXT
    protocol_version: int = 1

    def encode(self) -> bytes:
        items = [_item(0x10, _uid(self.application_context))]
        for context in self.contexts:
            body = struct.pack(">BBBB", context.context_id, 0, 0, 0) + _item(
                0x30, _uid(context.abstract_syntax)
            )
            body += b"".join(_item(0x40, _uid(ts)) for ts in context.transfer_syntaxes)
            items.append(_item(0x20, body))
        items.append(_encode_user_information(self.user_information))
        return _association_pdu(A_ASSOCIATE_RQ, self, items)


@dataclass(frozen=True)
class AAssociateAC:
    """A-ASSOCIATE-AC (PS3.8 9.3.3); the AE titles are the reserved fields that echo the RQ."""

    called_ae: str
    calling_ae: str
    contexts: tuple[ContextResult, ...]
    user_information: UserInformation
    application_context: str = APPLICATION_CONTEXT
    protocol_version: int = 1

    def encode(self) -> bytes:
        items = [_item(0x10, _uid(self.application_context))]
        for context in self.contexts:
            body = struct.pack(">BBBB", context.context_id, 0, context.result, 0)
            body += _item(0x40, _uid(context.transfer_syntax))
            items.append(_item(0x21, body))
        items.append(_encode_user_information(self.user_information))
        return _association_pdu(A_ASSOCIATE_AC, self, items)


@dataclass(frozen=True)
class AAssociateRJ:
    """A-ASSOCIATE-RJ (PS3.8 9.3.4)."""

    result: int  # 1 permanent, 2 transient
    source: int
    reason: int

    def encode(self) -> bytes:
        return _pdu(A_ASSOCIATE_RJ, struct.pack(">BBBB", 0, self.result, self.source, self.reason))

    def describe(self) -> str:
        """E.g. 'rejected permanently: called AE title not recognized'."""
        kind = {1: "rejected permanently", 2: "rejected (transient)"}.get(
            self.result, f"rejected (result {self.result})"
        )
        why = _REJECT_REASONS.get((self.source, self.reason))
        if why is None:
            source = _REJECT_SOURCES.get(self.source, "unknown source")
            why = f"source {self.source} ({source}), reason {self.reason}"
        return f"{kind}: {why}"


@dataclass(frozen=True, slots=True)
class PDV:
    """Presentation Data Value item (PS3.8 9.3.5.1) with its message control header (E.2)."""

    context_id: int
    control: int
    fragment: bytes

    @property
    def is_command(self) -> bool:
        return bool(self.control & COMMAND)

    @property
    def is_last(self) -> bool:
        return bool(self.control & LAST_FRAGMENT)


@dataclass(frozen=True)
class PDataTF:
    """P-DATA-TF (PS3.8 9.3.5): one or more PDVs."""

    pdvs: tuple[PDV, ...]

    def encode(self) -> bytes:
        return _pdu(
            P_DATA_TF,
            b"".join(
                struct.pack(">IBB", len(pdv.fragment) + 2, pdv.context_id, pdv.control)
                + pdv.fragment
                for pdv in self.pdvs
            ),
        )


@dataclass(frozen=True)
class AReleaseRQ:
    """A-RELEASE-RQ (PS3.8 9.3.6)."""

    def encode(self) -> bytes:
        return _pdu(A_RELEASE_RQ, bytes(4))


@dataclass(frozen=True)
class AReleaseRP:
    """A-RELEASE-RP (PS3.8 9.3.7)."""

    def encode(self) -> bytes:
        return _pdu(A_RELEASE_RP, bytes(4))


@dataclass(frozen=True)
class AAbort:
    """A-ABORT (PS3.8 9.3.8)."""

    source: int = 0  # 0 service-user, 2 service-provider
    reason: int = 0  # significant only when the source is the service-provider

    def encode(self) -> bytes:
        return _pdu(A_ABORT, struct.pack(">BBBB", 0, 0, self.source, self.reason))

    def describe(self) -> str:
        """E.g. 'source 2 (service-provider), reason 6 (invalid PDU parameter value)'."""
        source = ABORT_SOURCES.get(self.source, "unknown")
        if self.source == 2:
            reason = ABORT_REASONS.get(self.reason, "unknown")
        else:
            reason = "not significant for this source"
        return f"source {self.source} ({source}), reason {self.reason} ({reason})"


Pdu = AAssociateRQ | AAssociateAC | AAssociateRJ | PDataTF | AReleaseRQ | AReleaseRP | AAbort
_TYPE_OF: dict[type, int] = {
    AAssociateRQ: A_ASSOCIATE_RQ,
    AAssociateAC: A_ASSOCIATE_AC,
    AAssociateRJ: A_ASSOCIATE_RJ,
    PDataTF: P_DATA_TF,
    AReleaseRQ: A_RELEASE_RQ,
    AReleaseRP: A_RELEASE_RP,
    AAbort: A_ABORT,
}


def pdu_name(decoded: Pdu) -> str:
    """The PS3.8 name of a decoded PDU, e.g. 'A-RELEASE-RP'."""
    return PDU_NAMES[_TYPE_OF[type(decoded)]]


# -- building --------------------------------------------------------------------------------


def associate_rq(
    called_ae: str,
    calling_ae: str,
    pairs: Sequence[tuple[str, str]],
    max_pdu: int,
    scp_roles: Sequence[str] = (),
) -> bytes:
    """The harness's A-ASSOCIATE-RQ: presentation context 1, 3, 5, ... for each (SOP class,
    transfer syntax) pair in order, our Implementation Class UID and Version Name (PS3.7
    D.3.3.2), and SCP role selection (we may act as SCP, not as SCU) for `scp_roles`, the
    storage classes a C-GET sends back to us (PS3.7 D.3.3.4)."""
    if len(pairs) > 128:
        raise ValueError(f"{len(pairs)} presentation contexts proposed; at most 128 fit")
    contexts = tuple(
        ProposedContext(2 * index + 1, sop_class, (syntax,))
        for index, (sop_class, syntax) in enumerate(pairs)
    )
    roles = tuple(RoleSelection(uid, scu_role=False, scp_role=True) for uid in scp_roles)
    user = UserInformation(max_length=max_pdu, role_selections=roles)
    return AAssociateRQ(called_ae, calling_ae, contexts, user).encode()


def pdata_header(context_id: int, control: int, fragment_length: int) -> bytes:
    """P-DATA-TF header holding one PDV, whose fragment the caller sends right after it
    (so a large dataset goes out in slices, without copying it into PDUs)."""
    pdv_length = fragment_length + 2
    return struct.pack(">BBIIBB", P_DATA_TF, 0, pdv_length + 4, pdv_length, context_id, control)


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _item(item_type: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"item 0x{item_type:02X} of {len(value)} bytes does not fit")
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _uid(uid: str) -> bytes:
    return uid.encode("ascii")


def _ae(title: str) -> bytes:
    return title.encode("ascii", "replace")[:16].ljust(16, b" ")


def _association_pdu(pdu_type: int, pdu: AAssociateRQ | AAssociateAC, items: list[bytes]) -> bytes:
    fixed = struct.pack(">HH", pdu.protocol_version, 0) + _ae(pdu.called_ae) + _ae(pdu.calling_ae)
    return _pdu(pdu_type, fixed + bytes(32) + b"".join(items))


def _encode_user_information(user: UserInformation) -> bytes:
    subitems = [
        _item(0x51, struct.pack(">I", user.max_length)),
        _item(0x52, _uid(user.implementation_class_uid)),
    ]
    if user.async_ops_window is not None:
        subitems.append(_item(0x53, struct.pack(">HH", *user.async_ops_window)))
    for role in user.role_selections:
        uid = _uid(role.sop_class_uid)
        subitems.append(
            _item(0x54, struct.pack(">H", len(uid)) + uid + bytes([role.scu_role, role.scp_role]))
        )
    if user.implementation_version_name:
        subitems.append(_item(0x55, user.implementation_version_name.encode("ascii")))
    return _item(0x50, b"".join(subitems))


# -- decoding --------------------------------------------------------------------------------


def decode_pdu(data: bytes) -> Pdu:
    """One whole PDU (header included) or PduError."""
    if len(data) < PDU_HEADER_LENGTH:
        raise PduError(f"{len(data)} bytes, too short for a PDU header (6 bytes)")
    pdu_type, length = decode_pdu_header(data[:PDU_HEADER_LENGTH])
    if length != len(data) - PDU_HEADER_LENGTH:
        raise PduError(
            f"{_name(pdu_type)} announces {length} bytes, "
            f"{len(data) - PDU_HEADER_LENGTH} follow the header"
        )
    return decode_pdu_body(pdu_type, data[PDU_HEADER_LENGTH:])


def decode_pdu_header(header: bytes) -> tuple[int, int]:
    """(PDU type, PDU length) of a 6-byte PDU header; PduError for an unknown type."""
    if len(header) != PDU_HEADER_LENGTH:
        raise PduError(f"PDU header of {len(header)} bytes, 6 expected")
    pdu_type, _, length = struct.unpack(">BBI", header)
    if pdu_type not in PDU_NAMES:
        raise PduError(f"unknown PDU type 0x{pdu_type:02X} (PS3.8 9.3.1)")
    return pdu_type, length


def decode_pdu_body(pdu_type: int, body: bytes) -> Pdu:
    """The PDU of type `pdu_type` whose body (what follows the header) is `body`."""
    if pdu_type in (A_ASSOCIATE_RQ, A_ASSOCIATE_AC):
        return _decode_association(pdu_type, body)
    if pdu_type == P_DATA_TF:
        return PDataTF(tuple(_decode_pdvs(body)))
    if pdu_type not in PDU_NAMES:
        raise PduError(f"unknown PDU type 0x{pdu_type:02X} (PS3.8 9.3.1)")
    if len(body) != 4:  # the fixed-size PDUs, PS3.8 9.3.4, 9.3.6-9.3.8
        raise PduError(f"{_name(pdu_type)} of {len(body)} bytes, 4 expected")
    if pdu_type == A_ASSOCIATE_RJ:
        return AAssociateRJ(result=body[1], source=body[2], reason=body[3])
    if pdu_type == A_RELEASE_RQ:
        return AReleaseRQ()
    if pdu_type == A_RELEASE_RP:
        return AReleaseRP()
    return AAbort(source=body[2], reason=body[3])


def _name(pdu_type: int) -> str:
    return PDU_NAMES.get(pdu_type, f"PDU type 0x{pdu_type:02X}")


def _text(raw: bytes) -> str:
    """A UID or AE title as received: ASCII, padding dropped, anything else replaced."""
    return raw.strip(b"\0 ").decode("ascii", "replace")


def _items(data: bytes, where: str, at: int) -> Iterator[tuple[int, bytes, int]]:
    """(item type, value, value's offset in the PDU) of each item (1-byte type, reserved,
    2-byte length) in `data`, which starts at offset `at` of the PDU."""
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise PduError(
                f"{where}: {len(data) - offset} stray bytes at offset {at + offset}, "
                "too short for an item header"
            )
        item_type, _, length = struct.unpack_from(">BBH", data, offset)
        end = offset + 4 + length
        if end > len(data):
            raise PduError(
                f"{where}: item 0x{item_type:02X} at offset {at + offset} announces {length} "
                f"bytes, only {len(data) - offset - 4} left"
            )
        yield item_type, data[offset + 4 : end], at + offset + 4
        offset = end


def _decode_association(pdu_type: int, body: bytes) -> AAssociateRQ | AAssociateAC:
    name = _name(pdu_type)
    if len(body) < 68:
        raise PduError(f"{name} of {len(body)} bytes, at least 68 expected (PS3.8 9.3.2)")
    (protocol_version,) = struct.unpack_from(">H", body, 0)
    called, calling = _text(body[4:20]), _text(body[20:36])
    application_context = ""
    user = UserInformation(implementation_class_uid="", implementation_version_name="")
    proposed: list[ProposedContext] = []
    results: list[ContextResult] = []
    for item_type, value, at in _items(body[68:], name, PDU_HEADER_LENGTH + 68):
        if item_type == 0x10:
            application_context = _text(value)
        elif item_type == 0x20 and pdu_type == A_ASSOCIATE_RQ:
            proposed.append(_decode_proposed_context(value, name, at))
        elif item_type == 0x21 and pdu_type == A_ASSOCIATE_AC:
            results.append(_decode_context_result(value, name, at))
        elif item_type == 0x50:
            user = _decode_user_information(value, name, at)
        # other item types: ignored, PS3.8 9.3.1
    if pdu_type == A_ASSOCIATE_RQ:
        return AAssociateRQ(
            called, calling, tuple(proposed), user, application_context, protocol_version
        )
    return AAssociateAC(
        called, calling, tuple(results), user, application_context, protocol_version
    )


def _context_head(value: bytes, where: str) -> tuple[int, int]:
    if len(value) < 4:
        raise PduError(f"{where}: presentation context item of {len(value)} bytes, 4+ expected")
    return value[0], value[2]


def _decode_proposed_context(value: bytes, name: str, at: int) -> ProposedContext:
    context_id, _ = _context_head(value, name)
    where = f"{name} presentation context {context_id}"
    abstract_syntax = ""
    syntaxes: list[str] = []
    for sub_type, sub_value, _ in _items(value[4:], where, at + 4):
        if sub_type == 0x30:
            abstract_syntax = _text(sub_value)
        elif sub_type == 0x40:
            syntaxes.append(_text(sub_value))
    return ProposedContext(context_id, abstract_syntax, tuple(syntaxes))


def _decode_context_result(value: bytes, name: str, at: int) -> ContextResult:
    context_id, result = _context_head(value, name)
    where = f"{name} presentation context {context_id}"
    syntaxes = [_text(v) for sub_type, v, _ in _items(value[4:], where, at + 4) if sub_type == 0x40]
    if result == 0 and len(syntaxes) != 1:
        raise PduError(f"{where}: accepted with {len(syntaxes)} transfer syntaxes, 1 expected")
    return ContextResult(context_id, result, syntaxes[0] if syntaxes else "")


def _decode_user_information(value: bytes, name: str, at: int) -> UserInformation:
    where = f"{name} user information"
    max_length = 0
    class_uid = version_name = ""
    roles: list[RoleSelection] = []
    window: tuple[int, int] | None = None
    for sub_type, sub, _ in _items(value, where, at):
        if sub_type == 0x51:
            if len(sub) != 4:
                raise PduError(f"{where}: maximum length sub-item of {len(sub)} bytes, 4 expected")
            (max_length,) = struct.unpack(">I", sub)
        elif sub_type == 0x52:
            class_uid = _text(sub)
        elif sub_type == 0x53:
            if len(sub) != 4:
                raise PduError(
                    f"{where}: asynchronous operations window of {len(sub)} bytes, 4 expected"
                )
            window = struct.unpack(">HH", sub)
        elif sub_type == 0x54:
            roles.append(_decode_role_selection(sub, where))
        elif sub_type == 0x55:
            version_name = _text(sub)
        # 0x56-0x59 (extended negotiation, user identity): not ours to read
    return UserInformation(max_length, class_uid, version_name, tuple(roles), window)


def _decode_role_selection(sub: bytes, where: str) -> RoleSelection:
    """PS3.7 D.3.3.4: UID length, UID, SCU role, SCP role."""
    if len(sub) < 2:
        raise PduError(f"{where}: role selection sub-item of {len(sub)} bytes")
    (uid_length,) = struct.unpack_from(">H", sub, 0)
    if len(sub) != uid_length + 4:
        raise PduError(
            f"{where}: role selection sub-item of {len(sub)} bytes with a UID of "
            f"{uid_length} bytes ({uid_length + 4} expected)"
        )
    uid = _text(sub[2 : 2 + uid_length])
    return RoleSelection(uid, scu_role=bool(sub[-2]), scp_role=bool(sub[-1]))


def _decode_pdvs(body: bytes) -> Iterator[PDV]:
    """The PDVs of a P-DATA-TF body, PS3.8 9.3.5.1 (4-byte length, context ID, data)."""
    if not body:
        raise PduError("P-DATA-TF without a PDV (PS3.8 9.3.5: one or more)")
    offset = count = 0
    while offset < len(body):
        at = PDU_HEADER_LENGTH + offset
        count += 1
        if count > LARGEST_PDV_COUNT:
            raise PduError(f"P-DATA-TF: more than {LARGEST_PDV_COUNT} PDVs at offset {at}")
        if offset + 6 > len(body):
            raise PduError(
                f"P-DATA-TF: {len(body) - offset} stray bytes at offset {at}, too short for a PDV"
            )
        (length,) = struct.unpack_from(">I", body, offset)
        if length < 2:
            raise PduError(f"P-DATA-TF: PDV at offset {at} of length {length}, 2+ expected")
        end = offset + 4 + length
        if end > len(body):
            raise PduError(
                f"P-DATA-TF: PDV at offset {at} announces {length} bytes, "
                f"only {len(body) - offset - 4} left in the PDU"
            )
        yield PDV(body[offset + 4], body[offset + 5], body[offset + 6 : end])
        offset = end
