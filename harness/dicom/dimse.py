"""DIMSE messages: the command sets the wire layer sends and parses, and what came back.

A command set is implicit VR little endian with its group length first and its elements in
tag order (PS3.7 6.3, 9.3); the data set or identifier that follows is framed separately
(part10.py). Parsing checks every length against what is there, so a peer's malformed
command is a CommandSetError, never an IndexError.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from harness.dicom.pdu import PduError


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


def c_cancel_rq(message_id: int) -> bytes:
    """The C-CANCEL-RQ command set (PS3.7 9.3.2.3): stop the C-FIND (or C-GET, C-MOVE)
    whose request was `message_id`; no data set follows."""
    return encode_command(
        {
            0x00000100: 0x0FFF,
            0x00000120: message_id & 0xFFFF,
            0x00000800: NO_DATASET,
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
