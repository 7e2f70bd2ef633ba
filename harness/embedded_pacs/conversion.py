"""Transfer syntax conversion for C-GET/C-MOVE: a stored instance in a syntax the peer accepted.

When the receiving association accepted the stored transfer syntax for the SOP class the data
set goes out unchanged (compressed pixel data included). An uncompressed instance is otherwise
converted losslessly to an accepted uncompressed syntax (implicit/explicit VR little endian,
deflated, explicit VR big endian; OW/OF/OL/OD/OV values byte-swapped across endianness). A
compressed instance is decompressed (then converted likewise) only when the peer accepted no
compressed syntax it could use and pydicom has a decoder (RLE always; JPEG family only with
pylibjpeg/GDCM/Pillow); it is never recompressed into another compressed syntax.
"""

from __future__ import annotations

import array
import logging

from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.presentation import PresentationContext

LOG = logging.getLogger("harness.embedded_pacs")

#: Uncompressed syntaxes, the one a converted instance goes out in first (PS3.5 A.1 to A.5).
_UNCOMPRESSED_PREFERENCE: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
_WORD_TYPECODES = {"OW": "H", "OF": "I", "OL": "I", "OD": "Q", "OV": "Q"}


def swap_binary_words(ds: Dataset) -> None:
    """Byte-swap every OW/OF/OL/OD/OV value (sequence items included) in place: the values
    pydicom keeps as raw bytes, so changing endianness is left to the caller (PS3.5 7.3)."""
    for elem in ds.iterall():
        code = _WORD_TYPECODES.get(elem.VR)
        if code is None or not isinstance(elem.value, bytes | bytearray):
            continue
        words = array.array(code)
        if len(elem.value) % words.itemsize:
            raise ValueError(f"{elem.tag} {elem.VR} value of odd length {len(elem.value)}")
        words.frombytes(elem.value)
        words.byteswap()
        elem.value = words.tobytes()


def for_peer(ds: Dataset, sop_class: str, accepted: list[PresentationContext]) -> Dataset:
    """``ds`` (as read from storage) in a syntax the peer ``accepted`` for ``sop_class``.

    As stored when the peer accepted that syntax. An uncompressed instance is otherwise
    converted losslessly to an accepted uncompressed syntax (binary OW/OF/OL/OD/OV values
    byte-swapped when the endianness changes, PS3.5 7.3; pydicom re-encodes the rest).
    A compressed one is decompressed when the peer accepted only uncompressed syntaxes
    for the class and pydicom has a decoder, then converted the same way; otherwise it
    goes as stored and, lacking a context, fails that sub-operation.
    """
    uid = ds.get("SOPInstanceUID", "?")
    ts = UID(ds.file_meta.TransferSyntaxUID)
    syntaxes = [
        UID(cx.transfer_syntax[0])
        for cx in accepted
        if cx.abstract_syntax == sop_class and cx.transfer_syntax
    ]
    uncompressed = [s for s in syntaxes if not s.is_compressed]
    if ts in syntaxes or not uncompressed:
        return ds
    if ts.is_compressed:
        try:
            ds.decompress(generate_instance_uid=False)
            LOG.debug("decompressed %s for a peer without %s", uid, ts)
        except Exception as exc:  # no decoder: the sub-operation fails
            LOG.warning("cannot decompress %s (%s): %s", uid, ts.name, type(exc).__name__)
            return ds
        ts = UID(ds.file_meta.TransferSyntaxUID)
        if ts in syntaxes:
            return ds
    if any(s.is_little_endian == ts.is_little_endian for s in uncompressed):
        return ds  # pynetdicom converts VR encoding and deflation itself
    target = min(uncompressed, key=_UNCOMPRESSED_PREFERENCE.index)
    try:
        swap_binary_words(ds)  # also decodes every element in the stored encoding
        correct_ambiguous_vr(ds, target.is_little_endian)
    except Exception as exc:
        LOG.warning("cannot convert %s: %s", uid, type(exc).__name__)
        return ds
    ds.set_original_encoding(target.is_implicit_VR, target.is_little_endian)
    ds.file_meta.TransferSyntaxUID = target
    return ds
