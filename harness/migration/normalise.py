"""What a ledger row holds: a PACS node's instance normalised and digested.

A row means the same thing whichever node it came from, because everything that depends on
the encoding is normalised away before hashing:

- group 0002, group lengths, pixel data and its encapsulation helpers, PlanarConfiguration
  and trailing padding are dropped;
- text is decoded with the instance's own character set (a charset conversion that keeps
  the text is equal), trailing padding is stripped, DS/IS become numbers;
- private elements are compared as their little-endian value bytes, so an element that is
  `UN` after a change to implicit VR equals its explicit-VR original;
- binary values (OW, OF, OL, OD, OV) and decoded pixels are compared in little endian, so a
  file read in Explicit VR Big Endian (PS3.5 A.3, retired) equals its little-endian copy;
- `pixel_digest` hashes the *decoded* pixels (dtype, shape, values), so a lossless change of
  transfer syntax is equal; when a syntax cannot be decoded here the raw PixelData bytes are
  hashed instead and `pixel_mode` says `raw`;
- colour pixels are decoded to RGB (pydicom converts YBR_FULL, YBR_FULL_422, ... when it
  decodes), so PhotometricInterpretation of a colour image is recorded as `RGB` whichever
  colour model it was stored in: a JPEG decoded on retrieval (YBR_FULL_422 -> RGB, PS3.5
  8.2.1) has the same row as its original.

Patient identity (PatientID, IssuerOfPatientID, PatientName, PatientBirthDate, PatientSex),
SOPInstanceUID and SpecificCharacterSet are columns of their own and are left out of
`attrs_digest`, so migration rules on them (prefix, issuer added, charset conversion) are
checked in SQL, and an instance stored again under a new SOP Instance UID has the same
(`attrs_digest`, `pixel_digest`) as the original: that is how duplicates are found.

`keys_digest` covers KEY_ATTRS only: the attributes every kind of node answers in C-FIND
(and QIDO). It is what two ledgers are compared on where an instance was not retrieved on
both sides (depth `attributes`, or outside the sample).

The SQLite file these rows go into is harness/migration/ledger.py; this module is only about
the DICOM side (PS3.5 encodings, PS3.3 attributes), so it can be tested without a file.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import numpy
from pydicom import Dataset
from pydicom import config as pydicom_config
from pydicom import hooks as pydicom_hooks
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_sequence
from pydicom.filewriter import write_data_element
from pydicom.hooks import raw_element_value as _default_raw_element_value
from pydicom.hooks import raw_element_vr as _default_raw_element_vr
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array as decode_pixels
from pydicom.tag import BaseTag

#: Patient identity: a column each in `instances`, not part of attrs_digest.
IDENTITY_COLUMNS: dict[str, str] = {
    "PatientID": "patient_id",
    "IssuerOfPatientID": "issuer",
    "PatientName": "patient_name",
    "PatientBirthDate": "birth_date",
    "PatientSex": "sex",
}
#: Attributes kept out of attrs_digest (they are columns, or the join key itself).
NOT_DIGESTED = frozenset({*IDENTITY_COLUMNS, "SOPInstanceUID", "SpecificCharacterSet"})
#: The study's own attributes every C-FIND at STUDY level answers (PS3.4 C.6.1.1.3).
_STUDY_KEYS: tuple[str, ...] = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
)
#: Compared where an instance was not retrieved on both sides: what C-FIND always answers.
KEY_ATTRS: tuple[str, ...] = (
    *_STUDY_KEYS,
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "InstanceNumber",
)
STUDY_QUERY_KEYS: tuple[str, ...] = (
    *IDENTITY_COLUMNS,
    *_STUDY_KEYS,
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_QUERY_KEYS: tuple[str, ...] = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
)
IMAGE_QUERY_KEYS: tuple[str, ...] = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber")

#: Which entity an attribute describes; used to roll findings up (reconcile.py).
PATIENT_ATTRS = frozenset(
    {
        *IDENTITY_COLUMNS,
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "PatientBirthTime",
        "PatientBirthName",
        "PatientMotherBirthName",
        "EthnicGroup",
        "PatientComments",
        "IssuerOfPatientIDQualifiersSequence",
        "TypeOfPatientID",
        "ResponsiblePerson",
        "PatientSpeciesDescription",
    }
)
STUDY_ATTRS = frozenset(
    {
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "IssuerOfAccessionNumberSequence",
        "StudyID",
        "StudyDescription",
        "ReferringPhysicianName",
        "ProcedureCodeSequence",
        "NameOfPhysiciansReadingStudy",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "AdmittingDiagnosesDescription",
        "RequestAttributesSequence",
    }
)
SERIES_ATTRS = frozenset(
    {
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "SeriesDate",
        "SeriesTime",
        "BodyPartExamined",
        "Laterality",
        "ProtocolName",
        "PatientPosition",
        "FrameOfReferenceUID",
        "Manufacturer",
        "ManufacturerModelName",
        "InstitutionName",
        "StationName",
        "DeviceSerialNumber",
        "SoftwareVersions",
        "OperatorsName",
        "PerformingPhysicianName",
    }
)

# Elements whose presence or value depends on the encoding, never on the content.
_DROPPED_TAGS = frozenset(
    {
        0x00280006,  # PlanarConfiguration: how a codec lays out samples
        0x7FE00001,  # ExtendedOffsetTable
        0x7FE00002,  # ExtendedOffsetTableLengths
        0x7FE00003,  # EncapsulatedPixelDataValueTotalLength
        0x7FE00008,  # FloatPixelData (hashed as pixels)
        0x7FE00009,  # DoubleFloatPixelData (hashed as pixels)
        0x7FE00010,  # PixelData (hashed as pixels)
        0xFFFCFFFC,  # DataSetTrailingPadding
    }
)
#: Colour models whose pixels pydicom decodes to RGB (PS3.3 C.7.6.3.1.2): stored as "RGB".
_COLOUR_MODELS = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420",
                            "YBR_PARTIAL_422", "YBR_ICT", "YBR_RCT"})
_PHOTOMETRIC = 0x00280004
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
                       "UI", "UR", "UT"})
_INT_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
_FLOAT_VRS = frozenset({"FL", "FD"})
_SCALAR_VRS = _TEXT_VRS | _INT_VRS | _FLOAT_VRS | {"IS", "DS", "AT"}
_INLINE_BYTES = 64  # longer binary values are stored as a digest in attrs_json
_ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian: the value is a sequence


def digest(data: bytes) -> str:
    """The one hash used everywhere in a ledger (BLAKE2b, 128 bits, hex)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def json_digest(obj: Any) -> str:
    return digest(json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                  .encode())


def attr_name(tag: int) -> str:
    """The attrs_json key of a tag: its keyword, or GGGGEEEE for private and unknown tags."""
    keyword = "" if (tag >> 16) % 2 else keyword_for_tag(tag)
    return keyword or f"{tag:08X}"


# ---------------------------------------------------------------------------------------
# normalisation


def _decode_strict(raw: bytes, encodings: list[str]) -> str | None:
    """Text when `raw` is valid in the charset, else None (pydicom would substitute)."""
    try:
        return raw.decode(encodings[0])
    except (UnicodeDecodeError, LookupError):
        if b"\x1b" not in raw or len(encodings) < 2:
            return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            text = decode_bytes(raw, encodings, set())  # ISO 2022 escape sequences
        except (UnicodeError, LookupError, ValueError):
            return None
    return None if "\ufffd" in text else text


def _bytes_repr(raw: bytes, encodings: list[str]) -> Any:
    """A private or UN value: a nested sequence, text, or the bytes themselves."""
    if raw[:4] == _ITEM_TAG:
        try:
            items = read_sequence(BytesIO(raw), True, True, len(raw), encodings)
            return [normalise(item, encodings) for item in items]
        except Exception:  # noqa: BLE001 - not a sequence after all: compare the bytes
            pass
    raw = raw.rstrip(b"\x00 ")
    if not raw:
        return None
    text = _decode_strict(raw, encodings)
    if text is not None and text.isprintable():
        return text
    return _binary_repr(raw)


def _binary_repr(raw: bytes) -> str | None:
    if not raw:
        return None
    if len(raw) <= _INLINE_BYTES:
        return "hex:" + raw.hex()
    return f"blake2b:{digest(raw)}:{len(raw)}"


def _private_bytes(elem: DataElement, encodings: list[str]) -> bytes:
    """The little-endian value bytes of an element, as implicit VR would write them."""
    if isinstance(elem.value, bytes | bytearray):
        return bytes(elem.value)
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    write_data_element(fp, elem, encodings)
    return fp.getvalue()[8:]


def _scalar(vr: str, value: Any) -> Any:
    if value is None:
        return None
    if vr in _INT_VRS:
        return int(value)
    if vr in _FLOAT_VRS:
        number = float(value)
        return number if math.isfinite(number) else str(number)
    if vr == "IS":
        try:
            return int(value)
        except (TypeError, ValueError):
            return str(value).strip() or None
    if vr == "DS":
        try:
            number = float(value)
        except (TypeError, ValueError):
            return str(value).strip() or None
        return number if math.isfinite(number) else str(number)
    if vr == "AT":
        return f"{int(value):08X}"
    text = str(value).rstrip(" \x00")
    if vr not in ("LT", "ST", "UT"):
        text = text.lstrip(" ")
    return text or None


#: Bytes per word of the binary VRs whose values depend on the byte order (PS3.5 7.3).
_WORD_SIZES = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def little_endian_bytes(value: bytes, vr: str | None, little: bool) -> bytes:
    """The value bytes of an OW, OF, OL, OD or OV element in little endian: an element read
    from an Explicit VR Big Endian file (PS3.5 A.3, retired) then equals its little-endian
    copy, as a PACS that converts the syntax on receipt stores it."""
    size = _WORD_SIZES.get(vr or "")
    if little or size is None or len(value) % size:
        return value
    return numpy.frombuffer(value, dtype=f">u{size}").astype(f"<u{size}").tobytes()


def element_value(elem: DataElement, encodings: list[str], little: bool = True) -> Any:
    """One element's value in encoding-independent form (JSON-ready); `little`: the byte
    order the element was read in."""
    vr = elem.VR
    if vr == "SQ":
        return [normalise(item, encodings) for item in elem.value]
    if elem.tag.is_private or vr == "UN":
        if vr == "SQ":
            return [normalise(item, encodings) for item in elem.value]
        if isinstance(elem.value, bytes | bytearray):
            return _bytes_repr(little_endian_bytes(bytes(elem.value), vr, little), encodings)
        return _bytes_repr(_private_bytes(elem, encodings), encodings)
    value = elem.value
    if isinstance(value, bytes | bytearray):
        return _binary_repr(little_endian_bytes(bytes(value), vr, little))
    if vr not in _SCALAR_VRS:
        vr = "LO"
    if isinstance(value, MultiValue | list | tuple):
        return [_scalar(vr, v) for v in value] or None
    return _scalar(vr, value)


def dataset_encodings(ds: Dataset, inherited: list[str] | None = None) -> list[str]:
    charset = ds.get("SpecificCharacterSet")
    if charset is None:
        return inherited or ["iso8859"]
    try:
        return convert_encodings(charset)
    except (LookupError, ValueError):
        return inherited or ["iso8859"]


def normalise(ds: Dataset, inherited: list[str] | None = None) -> dict[str, Any]:
    """Every attribute of `ds` (recursively) in encoding-independent form, by attr_name.

    Most elements are read from their raw bytes (`_raw_value`) without pydicom building a
    DataElement; the others, and every one whose raw form is unusual, take the element path
    (`_converted_value`). Both give the same value: tests/test_normalise_speed.py holds them
    to the digests recorded before the raw path existed.
    """
    encodings = dataset_encodings(ds, inherited)
    little = _read_little_endian(ds)
    raw_path = _raw_path_usable()
    out: dict[str, Any] = {}
    for key in ds.keys():
        tag = int(key)  # a plain int: BaseTag compares in Python, slowly
        plan = _TAG_PLANS.get(tag) or _tag_plan(tag)
        if plan is _SKIPPED:
            continue
        name, public_vr = plan
        value = _NOT_RAW
        if raw_path:
            elem = ds.get_item(key)
            if type(elem) is RawDataElement:
                value = _raw_value(elem, public_vr, encodings)
        if value is _NOT_RAW:
            value = _converted_value(ds, key, encodings, little)
        if tag == _PHOTOMETRIC and value in _COLOUR_MODELS:
            value = "RGB"  # pixels are compared decoded to RGB (see pixel_digest)
        out[name] = value
    return out


def _read_little_endian(ds: Dataset) -> bool:
    """The byte order `ds` was read in (a data set built in memory: little endian)."""
    try:
        return ds.original_encoding[1] is not False
    except AttributeError:
        return True


def _converted_value(ds: Dataset, tag: BaseTag, encodings: list[str], little: bool) -> Any:
    """The value through pydicom's DataElement (every VR, every encoding)."""
    try:
        return element_value(ds[tag], encodings, little)
    except Exception:  # noqa: BLE001 - an unreadable value is still a value to compare
        raw = ds.get_item(tag)
        return _bytes_repr(bytes(getattr(raw, "value", b"") or b""), encodings)


# ---------------------------------------------------------------------------------------
# the raw path: the same values as element_value, read from the encoded bytes (PS3.5 6.2)

_NOT_RAW = object()  # this element takes the DataElement path
_SKIPPED = ("", None)
#: Per tag: ("", None) when dropped, else (attr_name, dictionary VR or None).
_TAG_PLANS: dict[int, tuple[str, str | None]] = {}


def _tag_plan(tag: int) -> tuple[str, str | None]:
    if tag >> 16 == 0x0002 or tag & 0xFFFF == 0 or tag in _DROPPED_TAGS:
        plan = _SKIPPED
    else:
        public_vr = None
        if not (tag >> 16) % 2:
            try:
                public_vr = dictionary_VR(tag)
            except KeyError:
                pass
        plan = (attr_name(tag), public_vr)
    _TAG_PLANS[tag] = plan
    return plan


def _raw_path_usable() -> bool:
    """The raw path repeats pydicom's default reading (PS3.5 6.2 values as pydicom 3 converts
    them); a changed configuration or hook sends everything through pydicom itself."""
    return (pydicom_config.settings.reading_validation_mode != pydicom_config.RAISE
            and not pydicom_config.datetime_conversion
            and not pydicom_config.use_DS_numpy and not pydicom_config.use_IS_numpy
            and not pydicom_config.use_DS_decimal
            and pydicom_hooks.raw_element_vr is _default_raw_element_vr
            and pydicom_hooks.raw_element_value is _default_raw_element_value)


#: VRs pydicom decodes with its default repertoire whatever the character set (PS3.5 6.1.2);
#: a UID loses its white space at both ends (pydicom's UID strips it).
_DEFAULT_REPERTOIRE_VRS = frozenset({"AS", "CS", "DA", "DT", "TM", "UI"})
_CHARSET_SPLIT_VRS = frozenset({"LO", "SH", "UC", "PN"})  # multi-valued, charset text
_CHARSET_SINGLE_VRS = frozenset({"LT", "ST", "UT"})  # one value, backslash is text
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "OB or OW"})
_STRUCT_FORMATS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "UV": "Q", "SV": "q",
                   "FL": "f", "FD": "d"}
_STRUCT_SIZES = {vr: struct.calcsize("<" + code) for vr, code in _STRUCT_FORMATS.items()}
#: Explicit VRs whose little-endian bytes pydicom reads and writes back unchanged.
_BYTES_KEPT_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "AT", "US", "SS", "UL", "SL",
                             "UV", "SV"})
_VR_UNSURE = frozenset({None, "SQ", "UN"})  # the value may be a sequence
_LUT_DESCRIPTORS = frozenset({0x00281101, 0x00281102, 0x00281103, 0x00283002})
_INTEGER_TEXT = re.compile(r" *[+-]?[0-9]+ *")
_DECIMAL_TEXT = re.compile(r" *[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)? *")
#: Private value bytes that survive pydicom's read-then-rewrite unchanged whatever their VR:
#: printable ASCII without backslash or leading space (numbers from such bytes are finite).
_PLAIN_PRIVATE = re.compile(rb"[!-\[\]-~][ -\[\]-~]*")


def _raw_value(raw: RawDataElement, public_vr: str | None, encodings: list[str]) -> Any:
    """`element_value` of the converted element, or _NOT_RAW where this path cannot tell."""
    value = raw.value
    vr = raw.VR or public_vr
    if not value:  # empty: None, but for a sequence or a VR pydicom must look up
        return None if value is not None and raw.length == 0 and vr not in _VR_UNSURE \
            and (public_vr or raw.tag >> 16 & 1) else _NOT_RAW
    if public_vr is None:  # private: compared as its little-endian value bytes
        if not raw.is_little_endian or raw.tag >> 16 & 1 == 0:
            return _NOT_RAW
        if raw.VR in _BYTES_KEPT_VRS or _PLAIN_PRIVATE.fullmatch(value.rstrip(b"\x00 ")):
            return _bytes_repr(bytes(value), encodings)
        return _NOT_RAW
    if vr in _BINARY_VRS:
        return _binary_repr(little_endian_bytes(bytes(value), vr, raw.is_little_endian))
    if vr in _DEFAULT_REPERTOIRE_VRS:
        parts = value.decode("latin-1").rstrip(" \x00").split("\\")
        return _values(vr, [part.strip() for part in parts] if vr == "UI" else parts)
    if vr in _CHARSET_SPLIT_VRS or vr in _CHARSET_SINGLE_VRS:
        if not value.isascii() or b"\x1b" in value:
            return _NOT_RAW  # the character set matters: pydicom decodes it
        if vr == "PN":
            if b"=" in value:
                return _NOT_RAW  # PersonName drops empty trailing groups (PS3.5 6.2.1)
            return _values(vr, value.rstrip(b"\x00 ").decode("ascii").split("\\"))
        if vr in _CHARSET_SINGLE_VRS:
            return _scalar(vr, value.decode("ascii").rstrip("\x00 "))
        return _values(vr, [v.rstrip("\x00 ") for v in value.decode("ascii").split("\\")])
    if vr in _STRUCT_FORMATS:
        size = _STRUCT_SIZES[vr]
        if len(value) % size or raw.tag in _LUT_DESCRIPTORS:
            return _NOT_RAW
        numbers = struct.unpack(f"{'><'[raw.is_little_endian]}{len(value) // size}"
                                f"{_STRUCT_FORMATS[vr]}", value)
        return _values(vr, numbers)
    if vr == "DS":
        parts = value.decode("latin-1").strip().rstrip(" \x00").split("\\")
        return _numbers(parts, _DECIMAL_TEXT, float)
    if vr == "IS":
        parts = value.decode("latin-1").rstrip(" \x00").split("\\")
        return _numbers(parts, _INTEGER_TEXT, int)
    if vr == "AE":
        return _values(vr, [v.strip() for v in value.decode("latin-1").split("\\")])
    return _NOT_RAW  # SQ, AT, UR, UN, ambiguous VRs: the DataElement path


def _values(vr: str, parts: Sequence[Any]) -> Any:
    if len(parts) == 1:
        return _scalar(vr, parts[0])
    return [_scalar(vr, part) for part in parts]


def _numbers(parts: list[str], pattern: re.Pattern, number: type) -> Any:
    """DS and IS as `_scalar` makes them, for the plain decimal forms only."""
    values: list[Any] = []
    for part in parts:
        if not part.strip():
            values.append(None)
        elif pattern.fullmatch(part):
            values.append(_scalar("DS" if number is float else "IS", number(part)))
        else:
            return _NOT_RAW
    return values[0] if len(values) == 1 else values


def pixel_digest(ds: Dataset) -> tuple[str | None, str | None]:
    """(digest, mode) of the decoded pixels; mode `raw` when they could not be decoded here."""
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            break
    else:
        return None, None
    if keyword == "PixelData":
        try:
            # what ds.pixel_array decodes (pydicom 3's default backend), without the cache
            # bookkeeping that reads every image attribute twice
            opts = getattr(ds, "_pixel_array_opts", {"use_pdh": True})
            arr = ds.pixel_array if opts.get("use_pdh") else decode_pixels(ds)
            if arr.dtype.str.startswith(">"):  # read from a big endian file (PS3.5 A.3)
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            hashed = hashlib.blake2b(f"{arr.dtype.str}:{arr.shape}:".encode(), digest_size=16)
            hashed.update(numpy.ascontiguousarray(arr))  # the bytes of tobytes(), uncopied
            return hashed.hexdigest(), "decoded"
        except Exception:  # noqa: BLE001 - an undecodable syntax is recorded, never fatal
            pass
    raw = ds[keyword].value
    return digest(bytes(raw or b"")), "raw"


def text_value(value: Any) -> str:
    """A normalised value as the text of a ledger column (multi-values joined by \\)."""
    if value is None:
        return ""
    if isinstance(value, list):
        return "\\".join("" if v is None else str(v) for v in value)
    return str(value)


# ---------------------------------------------------------------------------------------
# rows


@dataclass
class StudyRow:
    study_uid: str
    patient_id: str = ""
    issuer: str = ""
    patient_name: str = ""
    birth_date: str = ""
    sex: str = ""
    keys: dict[str, Any] = field(default_factory=dict)  # normalised STUDY_QUERY_KEYS
    reported_series: int | None = None
    reported_instances: int | None = None
    retrieve: bool = False  # retrieved fully (depth full, or in the sample)


@dataclass
class SeriesRow:
    series_uid: str
    study_uid: str
    modality: str = ""
    series_number: str = ""
    description: str = ""


@dataclass
class InstanceRow:
    sop_uid: str
    series_uid: str
    study_uid: str
    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    sop_class: str
    transfer_syntax: str | None
    charset: str | None
    keys_digest: str
    attrs_digest: str | None
    pixel_digest: str | None
    pixel_mode: str | None
    retrieved: int
    attrs_json: str
    retrieval_error: str | None = None  # listed, but retrieving it failed: why


    def values(self) -> tuple:
        return tuple(getattr(self, c) for c in INSTANCE_COLUMNS)


INSTANCE_COLUMNS: tuple[str, ...] = (
    "sop_uid", "series_uid", "study_uid", "patient_id", "issuer", "patient_name",
    "birth_date", "sex", "sop_class", "transfer_syntax", "charset", "keys_digest",
    "attrs_digest", "pixel_digest", "pixel_mode", "retrieved", "retrieval_error",
)


def keys_digest(attrs: dict[str, Any]) -> str:
    return json_digest({k: attrs.get(k) for k in KEY_ATTRS})


def row_from_dataset(ds: Dataset, transfer_syntax: str | None = None) -> InstanceRow:
    """The ledger row of a retrieved instance (depth full)."""
    attrs = normalise(ds)
    pixels, mode = pixel_digest(ds)
    if transfer_syntax is None:
        meta = getattr(ds, "file_meta", None)
        transfer_syntax = str(meta.TransferSyntaxUID) if meta and "TransferSyntaxUID" in meta \
            else None
    digested = {k: v for k, v in attrs.items() if k not in NOT_DIGESTED}
    return InstanceRow(
        sop_uid=text_value(attrs.get("SOPInstanceUID")),
        series_uid=text_value(attrs.get("SeriesInstanceUID")),
        study_uid=text_value(attrs.get("StudyInstanceUID")),
        **{col: text_value(attrs.get(kw)) for kw, col in IDENTITY_COLUMNS.items()},
        sop_class=text_value(attrs.get("SOPClassUID")),
        transfer_syntax=transfer_syntax,
        charset=text_value(attrs.get("SpecificCharacterSet")),
        keys_digest=keys_digest(attrs),
        attrs_digest=json_digest(digested),
        pixel_digest=pixels,
        pixel_mode=mode,
        retrieved=1,
        attrs_json=json.dumps(attrs, sort_keys=True, ensure_ascii=False),
    )


def row_from_keys(attrs: dict[str, Any]) -> InstanceRow:
    """The ledger row of an instance known from C-FIND or QIDO only (depth attributes).

    `attrs` holds the normalised study, series and image keys merged for this instance.
    """
    return InstanceRow(
        sop_uid=text_value(attrs.get("SOPInstanceUID")),
        series_uid=text_value(attrs.get("SeriesInstanceUID")),
        study_uid=text_value(attrs.get("StudyInstanceUID")),
        **{col: text_value(attrs.get(kw)) for kw, col in IDENTITY_COLUMNS.items()},
        sop_class=text_value(attrs.get("SOPClassUID")),
        transfer_syntax=None,
        charset=None,
        keys_digest=keys_digest(attrs),
        attrs_digest=None,
        pixel_digest=None,
        pixel_mode=None,
        retrieved=0,
        attrs_json=json.dumps(attrs, sort_keys=True, ensure_ascii=False),
    )


