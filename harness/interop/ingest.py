"""What a node did with an object it took in: kept, coerced, altered, rejected or lost.

Per object stored and retrieved back: `kept` (same encoding, same bytes), `coerced` (only
the encoding changed: equal attributes decoded and equal pixels decoded), `altered` (content
changed), `lost` (acknowledged, then not returned); `rejected` is decided by the caller from
the C-STORE status. Attributes are compared decoded, so a transfer syntax change (PS3.5
section 10) or an explicit/implicit VR change is not an alteration; pixels are compared
decoded, so a lossless recompression is not one either.
"""

from __future__ import annotations

import hashlib
from io import BytesIO

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element


def _pixels_digest(ds: Dataset) -> str | None:
    if "PixelData" not in ds:
        return None
    try:
        return hashlib.sha256(np.ascontiguousarray(ds.pixel_array).tobytes()).hexdigest()
    except Exception:  # noqa: BLE001 - no decoder: compare the encoded bytes instead
        return hashlib.sha256(bytes(ds.PixelData)).hexdigest()


# top-level pixel data is compared decoded (`_pixels_digest`): its encoding may change
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _binary_digest(value: bytes, vr: str, little_endian: bool) -> str:
    """SHA-256 of a binary value in little endian order, so a byte order change of OW (PS3.5
    7.3) is not an alteration while any changed byte is."""
    data = bytes(value)
    if vr == "OW" and not little_endian and len(data) % 2 == 0:
        swapped = bytearray(data)
        swapped[0::2], swapped[1::2] = data[1::2], data[0::2]
        data = bytes(swapped)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _typed_like(elem: DataElement, other: DataElement, charset: object) -> DataElement:
    """A UN element decoded with the VR the other side gives the same tag: a private
    attribute of an implicit VR object reads as UN (PS3.5 6.2.2: its value, a sequence
    included, is implicit VR little endian), which is no change of content."""
    value = bytes(elem.value or b"")
    raw = RawDataElement(elem.tag, other.VR, len(value), value, 0, True, True)
    try:
        return convert_raw_data_element(raw, encoding=charset)
    except Exception:  # noqa: BLE001 - not decodable as that VR: compare the bytes
        return elem


def _normalise(ds: Dataset, like: Dataset | None, little_endian: bool, charset: object,
               top: bool) -> dict[str, object]:
    values: dict[str, object] = {}
    for elem in ds:
        if elem.tag.group == 0x0002 or elem.tag.element == 0x0000:  # meta, group lengths
            continue
        if top and elem.keyword in PIXEL_KEYWORDS:
            continue
        other = like.get(elem.tag) if like is not None else None
        if other is not None and elem.VR == "UN" and other.VR != "UN":
            elem = _typed_like(elem, other, charset)
        key = elem.keyword or str(elem.tag)
        if elem.VR == "SQ":
            if other is not None and other.VR == "UN":
                other = _typed_like(other, elem, charset)
            theirs = list(other.value) if other is not None and other.VR == "SQ" else []
            values[key] = [
                _normalise(item, theirs[n] if n < len(theirs) else None, little_endian,
                           charset, False)
                for n, item in enumerate(elem.value)
            ]
        elif isinstance(elem.value, (bytes, bytearray)):
            values[key] = _binary_digest(elem.value, elem.VR, little_endian)
        else:
            values[key] = "" if elem.value is None else str(elem.value)
    return values


def _content(ds: Dataset, like: Dataset | None = None) -> dict[str, object]:
    """Every attribute but the pixels, decoded (not bytes) so an encoding change is not an
    alteration: sequences item by item, recursively (an SR content tree, PS3.3 C.17.3),
    binary values (OB, OW, UN, ...: an encapsulated PDF) as digests. `like`: the object
    compared with, whose VRs decode this one's UN elements."""
    encoding = getattr(ds, "original_encoding", None)
    little_endian = True if not encoding or encoding[1] is None else bool(encoding[1])
    return _normalise(ds, like, little_endian, ds.get("SpecificCharacterSet"), True)


def as_received(ds: Dataset) -> Dataset:
    """The object as a receiver decodes it (e.g. private tags of implicit VR become bytes)."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return dcmread(buffer)


def differences(original: Dataset, returned: Dataset) -> list[str]:
    before, after = _content(original, returned), _content(returned, original)
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def classify(original: Dataset, returned: Dataset | None, returned_ts: str | None) -> str:
    if returned is None:
        return "lost"
    original = as_received(original)
    same_content = _content(returned, original) == _content(original, returned)
    same_encoding = returned_ts == original.file_meta.TransferSyntaxUID
    if same_encoding and returned.get("PixelData") == original.get("PixelData") and same_content:
        return "kept"
    if not same_content:
        return "altered"
    if _pixels_digest(returned) != _pixels_digest(original):
        # lossy originals may be re-encoded, but pixels must still decode the same
        return "altered"
    return "coerced"
