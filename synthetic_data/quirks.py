"""Legacy quirks on request, so a PACS can be tested against what old modalities send.

With ``quirks=True`` about half of the series get one to three of these, all listed in the
manifest's ``quirks`` field of every affected instance (such objects are not IOD-clean on
purpose):

- ``missing_type2``: type 2 attributes left out entirely (referring physician, accession
  number, study ID, birth date, sex);
- ``nonstandard_date``: dates written as ``YYYY/MM/DD`` and ``DD.MM.YYYY``;
- ``trailing_spaces``: extra trailing spaces in Patient ID, Patient Name and descriptions;
- ``odd_length``: Study Description stored with an odd value length (no pad byte), as old
  writers did; a reader has to repair it (not applied to deflated files);
- ``retired_attributes``: retired ACR-NEMA attributes (Recognition Code, Other Patient IDs,
  Image Position / Image Orientation).
"""

from __future__ import annotations

import random
import struct
import warnings

from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

QUIRKS = ("missing_type2", "nonstandard_date", "trailing_spaces", "odd_length",
          "retired_attributes")
_TYPE2 = (0x00080090, 0x00080050, 0x00200010, 0x00100030, 0x00100040)


def choose(rng: random.Random, deflated: bool) -> list[str]:
    """Which quirks a series gets (often none), in a fixed order."""
    if rng.random() < 0.5:
        return []
    pool = [q for q in QUIRKS if not (deflated and q == "odd_length")]
    picked = set(rng.sample(pool, 1 + rng.randrange(3)))
    return [q for q in QUIRKS if q in picked]


def _set(ds: Dataset, tag: int, vr: str, value: object) -> None:
    """Replace (never mutate: elements are shared between instances) without validation."""
    mode = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds[tag] = DataElement(tag, vr, value)
    finally:
        config.settings.writing_validation_mode = mode


def apply_series(ds: Dataset, applied: list[str], rng: random.Random) -> None:
    """Apply the dataset-level quirks to a series template."""
    if "missing_type2" in applied:
        for tag in _TYPE2:
            if tag in ds:
                del ds[tag]
    if "nonstandard_date" in applied:
        for tag in (0x00080020, 0x00080021):
            if tag in ds:
                v = str(ds[tag].value)
                _set(ds, tag, "DA", f"{v[:4]}/{v[4:6]}/{v[6:]}")
        if 0x00100030 in ds:
            v = str(ds[0x00100030].value)
            _set(ds, 0x00100030, "DA", f"{v[6:]}.{v[4:6]}.{v[:4]}")
    if "trailing_spaces" in applied:
        _set(ds, 0x00100020, "LO", str(ds.PatientID) + "   ")
        _set(ds, 0x00100010, "PN", str(ds[0x00100010].value) + "  ")
        if 0x0008103E in ds:
            _set(ds, 0x0008103E, "LO", str(ds.SeriesDescription) + "    ")
    if "odd_length" in applied:
        text = str(ds.get("StudyDescription", "STUDY")).rstrip()
        if len(text.encode()) % 2 == 0:
            text += "."
        _set(ds, 0x00081030, "LO", text)
    if "retired_attributes" in applied:
        _set(ds, 0x00080010, "SH", "ACR-NEMA 2.0")
        _set(ds, 0x00101000, "LO", f"OLD{rng.randrange(10**6):06d}")
        if "ImagePositionPatient" in ds or "Rows" in ds:
            _set(ds, 0x00200030, "DS", ["0", "0", "0"])
            _set(ds, 0x00200035, "DS", ["1", "0", "0", "0", "1", "0"])


def patch_bytes(data: bytes, ds: Dataset, transfer_syntax: str, applied: list[str]) -> bytes:
    """Byte-level quirks on the written file (odd_length: drop Study Description's pad)."""
    if "odd_length" not in applied or 0x00081030 not in ds:
        return data
    implicit = transfer_syntax == "1.2.840.10008.1.2"
    start = data.index(b"DICM") + 4
    meta_len = struct.unpack("<I", data[start + 8:start + 12])[0]
    body = start + 12 + meta_len
    tag = b"\x08\x00\x30\x10"
    pos = data.find(tag + (b"" if implicit else b"LO"), body)
    if pos < 0:
        return data
    if implicit:
        (length,) = struct.unpack("<I", data[pos + 4:pos + 8])
        head = tag + struct.pack("<I", length - 1)
        value_at = pos + 8
    else:
        (length,) = struct.unpack("<H", data[pos + 6:pos + 8])
        head = tag + b"LO" + struct.pack("<H", length - 1)
        value_at = pos + 8
    if length % 2 or data[value_at + length - 1:value_at + length] != b" ":
        return data
    return data[:pos] + head + data[value_at:value_at + length - 1] + data[value_at + length:]
