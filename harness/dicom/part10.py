"""What gets sent: Part 10 files read and checked, data sets framed and converted.

A C-STORE carries a data set without its file meta (PS3.7 9.3.1). Before one goes on the
wire this module makes sure it is what it claims to be, so a bad file is refused with its
reason instead of stalling the peer:

- the file meta (PS3.10 7.1) tells where the data set starts and in which transfer syntax;
  a file without meta is read as a bare data set whose syntax is inferred (as pydicom's
  force read does), a file whose meta lacks the syntax likewise;
- the data set is parsed to its end with pydicom and its last element must fit in the file
  (a truncated file is refused); its own SOP Class and Instance UIDs are what the command
  carries (PS3.4 B.4.1.2: the data set is the truth; a meta that disagrees is a quirk);
- the data set sent has even length (PS3.5 7.1); a deflated one gets a trailing 0x00
  (PS3.5 A.5);
- conversions between uncompressed syntaxes (PS3.5 A.1-A.5) swap the bytes of OW, OF, OL,
  OD and OV values when the byte order changes; decompression is pydicom's.
"""

from __future__ import annotations

import copy
import functools
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import VR
from pynetdicom.dsutils import decode

from harness.dicom.names import transfer_syntax_name

#: Explicit VRs whose length field has 4 bytes after 2 reserved ones (PS3.5 7.1.2).
LONG_LENGTH_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_KNOWN_VRS = frozenset(vr.value.encode() for vr in VR if len(vr.value) == 2)
#: The uncompressed transfer syntaxes the harness converts between (PS3.5 A.1-A.5).
UNCOMPRESSED_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
#: Byte width of the values of VRs that hold words of fixed size (PS3.5 6.2).
_WORD_SIZES = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_PIXEL_DATA = 0x7FE00010
_SOP_INSTANCE_UID = 0x00080018
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
HEAD_BYTES = 16384  # enough for the meta and the data set's first elements in nearly any file


class NotDicom(ValueError):
    """Neither a Part 10 file nor a bare data set: something else (a manifest, notes)."""


class NotAnInstance(NotDicom):
    """A DICOM file that holds no composite instance (a DICOMDIR): nothing to store."""


#: Names that say "DICOM file": one that does not read as DICOM is refused, not skipped.
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")


class BadFile(ValueError):
    """A DICOM file that must not be sent as it is: the message says why."""


@dataclass(frozen=True)
class FileMeta:
    """Where a Part 10 file's dataset starts, and the meta elements the sender needs."""

    dataset_offset: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def read_file_meta(head: bytes | memoryview) -> FileMeta | None:
    """The file meta (group 0002) of a Part 10 file, from the file's first bytes.

    Walks the explicit VR little endian meta elements (PS3.10 7.1), so a missing or wrong
    group length does not matter. A UID the meta lacks is "". None when `head` is not a
    Part 10 file or the meta runs past `head`.
    """
    if len(head) < 132 or bytes(head[128:132]) != b"DICM":
        return None
    offset = 132
    values: dict[int, str] = {}
    while offset + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, offset)
        if group != 0x0002:
            return FileMeta(offset, values.get(2, ""), values.get(3, ""), values.get(0x10, ""))
        vr = bytes(head[offset + 4 : offset + 6])
        if vr in LONG_LENGTH_VRS:
            if offset + 12 > len(head):
                return None
            (length,) = struct.unpack_from("<I", head, offset + 8)
            start = offset + 12
        else:
            (length,) = struct.unpack_from("<H", head, offset + 6)
            start = offset + 8
        if start + length > len(head):
            return None
        if element in (2, 3, 0x10):
            raw = bytes(head[start : start + length])
            values[element] = raw.rstrip(b"\0 ").decode("ascii", "replace")
        offset = start + length
    return None


# -- encoding data sets --------------------------------------------------------------------


def even_length(data: bytes | memoryview, transfer_syntax: str) -> bytes | memoryview:
    """A deflated data set padded to even length with a trailing 0x00 (PS3.5 A.5);
    any other data set unchanged (encoders write even lengths, PS3.5 7.1)."""
    if len(data) % 2 and _encoding(transfer_syntax)[3]:
        return bytes(data) + b"\0"
    return data


def encode_dataset(ds: Dataset, transfer_syntax: str) -> bytes:
    """A dataset (without file meta) encoded in `transfer_syntax`, deflated if it says so,
    of even length."""
    syntax = UID(transfer_syntax)
    buffer = DicomBytesIO()
    buffer.is_little_endian = syntax.is_little_endian
    buffer.is_implicit_VR = syntax.is_implicit_VR
    write_dataset(buffer, ds)
    data = buffer.getvalue()
    if syntax.is_deflated:
        compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
    return bytes(even_length(data, syntax))


def decode_dataset(data: bytes, transfer_syntax: str) -> Dataset:
    """A dataset received in `transfer_syntax` (the counterpart of encode_dataset)."""
    syntax = UID(transfer_syntax)
    return decode(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)


def dataset_bytes(payload: Dataset | Path, transfer_syntax: str) -> bytes | memoryview:
    """The bytes to send for one instance: a dataset encoded, or a checked file's own data
    set framed to even length (BadFile / NotDicom when it cannot be sent)."""
    if isinstance(payload, Dataset):
        return encode_dataset(payload, transfer_syntax)
    return read_part10(payload).framed()


# -- reading files --------------------------------------------------------------------------


@dataclass
class Part10:
    """One file read for sending: its data set's bytes, encoding, identity and quirks."""

    source: str
    data: bytes | memoryview  # the data set as stored in the file (still deflated if so)
    transfer_syntax_uid: str
    sop_class_uid: str  # from the data set, which the command must carry
    sop_instance_uid: str
    read_dataset: Callable[[], Dataset] = field(repr=False)  # the full pydicom parse
    quirks: list[str] = field(default_factory=list)
    _dataset: Dataset | None = field(default=None, repr=False)

    @property
    def dataset(self) -> Dataset:
        """The whole data set, parsed on first use (only conversions need it)."""
        if self._dataset is None:
            self._dataset = self.read_dataset()
        return self._dataset

    def framed(self) -> bytes | memoryview:
        """The file's own data set bytes as they go on the wire (even length)."""
        return even_length(self.data, self.transfer_syntax_uid)

    def converted(self, transfer_syntax: str, *, decompress: bool = False) -> bytes:
        """The data set re-encoded in another syntax; compressed pixel data only with
        `decompress` (BadFile when that is not possible)."""
        return convert(
            self.dataset, self.transfer_syntax_uid, transfer_syntax, decompress=decompress
        )


@functools.cache
def _encoding(syntax: str) -> tuple[bool, bool, bool, bool]:
    """(known, implicit VR, little endian, deflated) of a transfer syntax (PS3.5 10);
    an unknown one reads as explicit VR little endian."""
    uid = UID(syntax)
    if not uid.is_transfer_syntax:
        return False, False, True, False
    return True, uid.is_implicit_VR, uid.is_little_endian, uid.is_deflated


def _infer_encoding(data: bytes | memoryview) -> tuple[bool, bool] | None:
    """(implicit VR, little endian) of a bare data set from its first element header, as
    pydicom's force read infers it; None when the bytes do not look like a data set."""
    if len(data) < 8:
        return None
    group_le = struct.unpack_from("<H", data, 0)[0]
    group_be = struct.unpack_from(">H", data, 0)[0]
    if bytes(data[4:6]) in _KNOWN_VRS:
        if group_le in (0x0002, 0x0004, 0x0008) or group_le < group_be:
            return False, True
        return False, False
    if group_le in (0x0002, 0x0004, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028):
        return True, True
    return None


def _syntax_of(implicit: bool, little: bool) -> str:
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _element_end(elem) -> int | None:
    """Where an element read from a stream ends, if its length says."""
    length = getattr(elem, "length", 0xFFFFFFFF)
    tell = getattr(elem, "value_tell", None)
    if tell is None or length == 0xFFFFFFFF:
        return None
    return tell + length


_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF


def check_structure(
    stream: bytes | memoryview,
    implicit: bool,
    little: bool,
    *,
    stop_after: int | None = None,
    stray_allowed: bool = False,
) -> dict[int, bytes]:
    """Walk every element header of a data set, into sequences and items (PS3.5 7.1, 7.5):
    each value must fit, each undefined length must end with its delimiter. BadFile names
    the element where the stream ends early. Headers only, so it costs little.

    Returns the values of the top-level SOP Class and Instance UIDs; with `stop_after`, the
    walk ends at the first top-level tag beyond it (to read a file's head). With
    `stray_allowed`, fewer than 8 bytes after the last element are tolerated (and flagged
    under the key _STRAY)."""
    found: dict[int, bytes] = {}
    order = "<" if little else ">"
    explicit_header = struct.Struct(order + "HH2sH")  # tag, VR, 2-byte length
    implicit_header = struct.Struct(order + "HHI")  # tag, 4-byte length (items too)
    long_length = struct.Struct(order + "I")
    size = len(stream)

    def tag_name(tag: int) -> str:
        return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"

    def walk(offset: int, end: int, implicit: bool, until: int | None) -> int:
        """Elements from `offset` up to `end`, or to the delimiter `until`; new offset."""
        top = until is None
        while offset < end:
            if offset + 8 > end:
                if top and stray_allowed and not any(stream[offset:end]):
                    found[_STRAY] = b""  # zero padding after the last element
                    return offset
                raise BadFile(f"truncated: {end - offset} stray bytes at offset {offset}")
            vr = b""
            if implicit:
                group, element, length = implicit_header.unpack_from(stream, offset)
            else:
                group, element, vr, length = explicit_header.unpack_from(stream, offset)
            tag = group << 16 | element
            if top and stop_after is not None and tag > stop_after:
                return offset
            if group == 0xFFFE:  # items and delimiters: tag and 4-byte length, no VR
                if not implicit:
                    (length,) = long_length.unpack_from(stream, offset + 4)
                offset += 8
                if tag == until:
                    return offset
                if tag != _ITEM:
                    raise BadFile(f"unexpected delimiter {tag_name(tag)} at offset {offset - 8}")
                if length == _UNDEFINED:
                    offset = walk(offset, end, implicit, _ITEM_END)
                elif offset + length > end:
                    raise BadFile(f"truncated: an item at offset {offset - 8} runs past the end")
                else:
                    offset += length
                continue
            if vr in LONG_LENGTH_VRS:
                if offset + 12 > end:
                    raise BadFile(f"truncated in the header of {tag_name(tag)}")
                (length,) = long_length.unpack_from(stream, offset + 8)
                offset += 12
            else:
                offset += 8
            if length == _UNDEFINED:
                # a sequence, or encapsulated pixel data; UN holds implicit VR LE (PS3.5 6.2.2)
                try:
                    offset = walk(offset, end, implicit or vr == b"UN", _SEQUENCE_END)
                except BadFile as exc:
                    raise BadFile(f"{exc} (inside {tag_name(tag)})") from None
            elif offset + length > end:
                raise BadFile(
                    f"truncated: element {tag_name(tag)} needs {offset + length - end} bytes "
                    "more than the file has"
                )
            else:
                if top and tag in _IDENTITY_TAGS:
                    found[tag] = bytes(stream[offset : offset + length])
                offset += length
        if not top:
            raise BadFile("truncated: a sequence or item has no end delimiter")
        return offset

    walk(0, size, implicit, None)
    return found


_SOP_CLASS_UID = 0x00080016
_STRAY = -1
_IDENTITY_TAGS = (_SOP_CLASS_UID, _SOP_INSTANCE_UID)


def _uid_value(raw: bytes | None) -> str:
    return (raw or b"").rstrip(b"\0 ").decode("ascii", "replace")


def _parse(stream: bytes | memoryview, implicit: bool, little: bool, *, head: bool) -> Dataset:
    """The data set's top-level elements (values converted on first use) with pydicom;
    with `head`, only those up to SOP Instance UID. BadFile if pydicom cannot."""
    stop_when = (lambda tag, vr, length: tag > _SOP_INSTANCE_UID) if head else None
    try:
        ds = read_dataset(BytesIO(stream), implicit, little, stop_when=stop_when)
    except (EOFError, OSError, ValueError, TypeError, KeyError, IndexError, struct.error) as exc:
        raise BadFile(f"data set does not parse: {exc}") from None
    if len(ds) == 0 and not head:
        raise BadFile("empty data set")
    return ds


def _looks_implicit(stream: bytes | memoryview) -> bool | None:
    """Is the first element implicit VR? (its "VR" bytes are not two capital letters, the
    test pydicom applies); None when there is no first element."""
    if len(stream) < 6:
        return None
    first, second = stream[4], stream[5]
    return not (0x40 < first < 0x5B and 0x40 < second < 0x5B)


def _encode_or_refuse(ds: Dataset, syntax: str) -> bytes:
    """`ds` written anew in `syntax`, every element converted first (pydicom writes raw
    elements back as they were read, odd lengths included)."""
    try:
        for _ in ds:  # converts each raw element in place; the writer then pads values
            pass
        return encode_dataset(ds, syntax)
    except Exception as exc:  # noqa: BLE001 - pydicom's encoder names the element
        raise BadFile(f"cannot re-encode in {transfer_syntax_name(syntax)}: {exc}") from None


def _inflate(data: bytes | memoryview) -> bytes:
    """A deflated data set's bytes (PS3.5 A.5); BadFile if the stream is cut short."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(data)
    except zlib.error as exc:
        raise BadFile(f"deflated data set is corrupt: {exc}") from None
    if not inflater.eof:
        raise BadFile("deflated data set is cut short")
    return inflated


def _uid(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a value pydicom cannot convert is as good as absent
        return ""
    return str(value or "").strip()


def read_part10(path: str | Path) -> Part10:
    """Read and check one file (NotDicom, BadFile or OSError when it cannot be sent)."""
    path = Path(path)
    raw = path.read_bytes()
    return parse_part10(raw, str(path))


def parse_part10(raw: bytes, source: str) -> Part10:
    """`raw` (a whole file) checked and parsed; see read_part10."""
    quirks: list[str] = []
    view = memoryview(raw)
    has_prefix = len(raw) >= 132 and raw[128:132] == b"DICM"
    meta = read_file_meta(view) if has_prefix else None
    if has_prefix and meta is None:
        raise BadFile("file meta (group 0002) cut short or malformed")
    if meta is not None and meta.sop_class_uid == MEDIA_STORAGE_DIRECTORY:
        raise NotAnInstance("a DICOMDIR (media storage directory, PS3.10 8), not an instance")
    if meta is not None:
        data = view[meta.dataset_offset :]
        syntax = meta.transfer_syntax_uid
        if not syntax:
            inferred = _infer_encoding(data)
            if inferred is None:
                raise BadFile("file meta has no Transfer Syntax UID and the data set is unreadable")
            syntax = _syntax_of(*inferred)
            quirks.append(
                f"file meta has no Transfer Syntax UID; read as {transfer_syntax_name(syntax)}"
            )
    else:
        data = view
        inferred = _infer_encoding(data)
        if inferred is None:
            raise NotDicom("not DICOM: no 'DICM' prefix and no data set")
        syntax = _syntax_of(*inferred)
        quirks.append(f"no file meta; read as {transfer_syntax_name(syntax)}")
    known, implicit, little, deflated = _encoding(syntax)
    if not known:
        # a private syntax: its data set is explicit VR little endian unless it says otherwise
        quirks.append(f"unknown transfer syntax {syntax}; read as explicit VR little endian")
    stream = _inflate(data) if deflated else data
    found_implicit = _looks_implicit(stream)
    mislabelled = found_implicit is not None and found_implicit != implicit
    if mislabelled:
        found, declared = ("implicit", "explicit") if found_implicit else ("explicit", "implicit")
        quirks.append(
            f"data set is {found} VR though {transfer_syntax_name(syntax)} is {declared}: "
            "re-encoded"
        )
        implicit = bool(found_implicit)
    try:
        # zero padding is told apart from a cut header by its first byte: little endian only
        identity = check_structure(
            stream, implicit, little, stray_allowed=little and not deflated
        )
    except BadFile:
        if meta is None:  # a bare data set that does not parse: not DICOM after all
            raise NotDicom("not DICOM: no 'DICM' prefix and no readable data set") from None
        raise

    def read_whole() -> Dataset:
        return _parse(stream, implicit, little, head=False)

    sop_class = _uid_value(identity.get(_SOP_CLASS_UID))
    sop_instance = _uid_value(identity.get(_SOP_INSTANCE_UID))
    if not sop_class or not sop_instance:
        missing = "SOP Class UID" if not sop_class else "SOP Instance UID"
        raise BadFile(f"the data set has no {missing}")
    if meta is not None:
        if not meta.sop_class_uid or not meta.sop_instance_uid:
            quirks.append("file meta lacks the Media Storage SOP Class or Instance UID")
        if meta.sop_class_uid and meta.sop_class_uid != sop_class:
            quirks.append(
                f"file meta says SOP class {meta.sop_class_uid}, data set {sop_class}: sent as "
                "the data set says"
            )
        if meta.sop_instance_uid and meta.sop_instance_uid != sop_instance:
            quirks.append(
                f"file meta says SOP instance {meta.sop_instance_uid}, data set "
                f"{sop_instance}: sent as the data set says"
            )
    if _STRAY in identity:
        quirks.append("stray zero bytes after the last element: not sent")
        data = _encode_or_refuse(read_whole(), syntax)
    elif mislabelled:
        data = _encode_or_refuse(read_whole(), syntax)
    elif len(data) % 2 and not deflated:
        quirks.append("odd-length data set: re-encoded to even length")
        data = _encode_or_refuse(read_whole(), syntax)
    return Part10(source, data, syntax, sop_class, sop_instance, read_whole, quirks)


# -- converting -----------------------------------------------------------------------------


def _swap(value: bytes, width: int) -> bytes:
    """`value` with the byte order of each `width`-byte word reversed."""
    if width < 2 or len(value) % width:
        return value
    import numpy

    return numpy.frombuffer(value, dtype=f"u{width}").byteswap().tobytes()


def _swap_words(ds: Dataset) -> None:
    """Reverse the byte order of OW/OF/OL/OD/OV values (pydicom keeps them as bytes).

    Native pixel data follows Bits Allocated (PS3.5 8.1.1 / A.2: a 32-bit sample is one
    32-bit value), as pydicom reads it; other word VRs by their own word size."""
    bits = 0
    try:
        bits = int(ds.get("BitsAllocated", 0) or 0)
    except (TypeError, ValueError):
        pass
    for elem in ds:  # converts raw elements; sequences recurse
        if elem.VR == "SQ":
            for item in elem.value:
                _swap_words(item)
            continue
        width = _WORD_SIZES.get(str(elem.VR))
        if not width or not isinstance(elem.value, bytes) or elem.is_undefined_length:
            continue
        if elem.tag == _PIXEL_DATA and bits in (16, 32, 64):
            width = bits // 8
        elif elem.tag == _PIXEL_DATA and bits == 8:
            continue
        elem.value = _swap(elem.value, width)


def convert(ds: Dataset, source: str, target: str, *, decompress: bool = False) -> bytes:
    """`ds` (encoded in `source`) re-encoded in the uncompressed syntax `target`.

    Compressed pixel data is decompressed only when `decompress` is set (BadFile otherwise,
    or when pydicom cannot decode it)."""
    if not UID(source).is_transfer_syntax:
        raise BadFile(f"cannot convert from the unknown transfer syntax {source}")
    ds = copy.deepcopy(ds)  # the caller's data set stays as it was
    if UID(source).is_compressed:
        if not decompress:
            raise BadFile(f"{transfer_syntax_name(source)} needs decompressing (not asked)")
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = source
        try:
            ds.decompress(generate_instance_uid=False)  # same instance, other encoding
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the file's reason
            raise BadFile(f"cannot decompress {transfer_syntax_name(source)}: {exc}") from None
        source = ExplicitVRLittleEndian
    if UID(source).is_little_endian != UID(target).is_little_endian:
        _swap_words(ds)
    try:
        return encode_dataset(ds, target)
    except Exception as exc:  # noqa: BLE001 - pydicom's encoder names the element
        raise BadFile(f"cannot encode in {transfer_syntax_name(target)}: {exc}") from None


def read_header(path: str | Path) -> Part10:
    """The start of a file, enough to know its data set's SOP class, instance and transfer
    syntax (for presentation contexts); falls back to the whole file when needed."""
    path = Path(path)
    with path.open("rb") as file:
        head = file.read(HEAD_BYTES)
        complete = len(head) < HEAD_BYTES
    try:
        part = _header_from(head, str(path))
    except (BadFile, NotDicom):
        if complete:
            raise
        return read_part10(path)
    if part is None:
        return read_part10(path)
    return part


def _header_from(head: bytes, source: str) -> Part10 | None:
    """Like parse_part10 up to SOP Instance UID, without checks; None when `head` is short."""
    has_prefix = len(head) >= 132 and head[128:132] == b"DICM"
    meta = read_file_meta(head) if has_prefix else None
    if meta is None or not meta.transfer_syntax_uid:
        return None  # the rare cases: read the whole file
    syntax = meta.transfer_syntax_uid
    known, implicit, little, deflated = _encoding(syntax)
    if deflated or not known:
        return None
    stream = memoryview(head)[meta.dataset_offset :]
    found_implicit = _looks_implicit(stream)
    if found_implicit is None or found_implicit != implicit:
        return None  # mislabelled: the full read says so
    try:
        identity = check_structure(stream, implicit, little, stop_after=_SOP_INSTANCE_UID)
    except BadFile:
        return None  # e.g. the head ends inside an element: the full read decides
    sop_class = _uid_value(identity.get(_SOP_CLASS_UID))
    sop_instance = _uid_value(identity.get(_SOP_INSTANCE_UID))
    if not sop_class or not sop_instance:
        return None

    def read_whole() -> Dataset:
        return read_part10(source).dataset

    return Part10(source, b"", str(syntax), sop_class, sop_instance, read_whole)
