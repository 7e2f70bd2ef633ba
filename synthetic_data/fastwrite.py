"""Part 10 encoding that reuses the bytes of elements shared by a whole series.

pydicom's ``dcmwrite`` re-encodes all ~100 elements of every object, which costs a few
milliseconds per file. Objects of one series share most of their DataElement objects (they
are merged from cached layers), so :class:`ArchiveEncoder` encodes each shared element once
(with pydicom's own ``write_data_element``) and then only the few per-instance elements of
each file. The output is byte-identical to ``dcmwrite(..., enforce_file_format=True)``;
tests check that.
"""

from __future__ import annotations

import struct
import zlib

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as PydicomSequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

_PIXEL_DATA = 0x7FE00010
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_META_ORDER = (
    (0x00020001, "OB"), (0x00020002, "UI"), (0x00020003, "UI"), (0x00020010, "UI"),
    (0x00020012, "UI"), (0x00020013, "SH"), (0x00020016, "AE"),
)


def _explicit(tag: int, vr: str, value: bytes) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    if vr in _LONG_VRS:
        return head + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _meta_element(tag: int, vr: str, value: object) -> bytes:
    if isinstance(value, str):
        raw = value.encode("ascii")
        if len(raw) % 2:
            raw += b"\x00" if vr == "UI" else b" "
    else:
        raw = bytes(value)  # type: ignore[arg-type]
    return _explicit(tag, vr, raw)


_ASCII_VRS = {"AE", "AS", "CS", "DA", "DT", "TM", "UI", "DS", "IS"}
_CHARSET_VRS = {"LO", "LT", "PN", "SH", "ST", "UC", "UT"}
_NUMBER_FORMATS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d"}


def _text(value: object) -> str:
    original = getattr(value, "original_string", None)  # DS / IS keep what was given
    return original if isinstance(original, str) else str(value)


def _header(tag: int, vr: str, length: int, implicit: bool) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack("<I", length)
    if vr in _LONG_VRS:
        return head + vr.encode() + b"\x00\x00" + struct.pack("<I", length)
    return head + vr.encode() + struct.pack("<H", length)


def fast_element_bytes(tag: int, elem: DataElement, implicit: bool,
                       encodings: list[str]) -> bytes | None:
    """Encode the common simple cases exactly like pydicom; None means 'ask pydicom'."""
    vr = elem.VR
    value = elem.value
    if vr in _ASCII_VRS or vr in _CHARSET_VRS:
        if value is None:
            text = ""
        elif isinstance(value, list | tuple | MultiValue):
            text = "\\".join(_text(v) for v in value)
        else:
            text = _text(value)
        if text.isascii():
            raw = text.encode("ascii")
        elif vr in _CHARSET_VRS and len(encodings) == 1:
            try:
                raw = text.encode(encodings[0])
            except (UnicodeEncodeError, LookupError):
                return None
        else:
            return None
        if len(raw) % 2:
            raw += b"\x00" if vr == "UI" else b" "
        return _header(tag, vr, len(raw), implicit) + raw
    if vr in ("OB", "OW", "UN") and isinstance(value, bytes):
        raw = value + b"\x00" if len(value) % 2 else value
        return _header(tag, vr, len(raw), implicit) + raw
    fmt = _NUMBER_FORMATS.get(vr)
    if fmt is not None and value is not None:
        values = list(value) if isinstance(value, list | tuple | MultiValue) else [value]
        if not all(isinstance(v, int | float) for v in values):
            return None
        raw = struct.pack("<" + fmt * len(values), *values)
        return _header(tag, vr, len(raw), implicit) + raw
    return None


def _finish(parts: list[bytes], transfer_syntax: str) -> list[bytes]:
    """Deflate the dataset bytes when the transfer syntax says so."""
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        deflated = compressor.compress(b"".join(parts)) + compressor.flush()
        parts = [deflated + (b"\x00" if len(deflated) % 2 else b"")]
    return parts


def _first(item: tuple) -> int:
    return item[0]


class ArchiveEncoder:
    """Encode objects whose elements are shared between objects, caching element bytes.

    The element cache is keyed by element identity (the element is kept alive by the cache,
    so an id cannot be reused while cached) and by the encoding (VR implicitness, charset).
    The last series template is also kept encoded in tag order, so an instance costs only
    the encoding of its own few elements and a merge.
    """

    def __init__(self, max_cached: int = 4096) -> None:
        self._cache: dict[tuple[int, bool, tuple[str, ...]], tuple[DataElement, bytes]] = {}
        self._max = max_cached
        # (template, key, elements by tag, encoded (tag, chunks), tags, runs per extra tags)
        self._template: tuple | None = None
        self._charsets: dict[object, list[str]] = {}
        self._meta_cache: dict[int, tuple[DataElement, bytes]] = {}
        self._meta_template: tuple[FileMetaDataset, dict[int, DataElement]] | None = None

    # ---- single elements ----------------------------------------------------------------
    @staticmethod
    def _encode(elem: DataElement, implicit: bool, encodings: list[str]) -> bytes:
        fp = DicomBytesIO()
        fp.is_implicit_VR = implicit
        fp.is_little_endian = True
        write_data_element(fp, elem, encodings)
        return fp.getvalue()

    @staticmethod
    def _pixel_bytes(elem: DataElement, implicit: bool) -> list[bytes]:
        value = elem.value
        tag = struct.pack("<HH", 0x7FE0, 0x0010)
        if elem.is_undefined_length:
            head = tag + (b"\x00\x00\x00\x00" if implicit else b"OB\x00\x00")
            return [head + b"\xff\xff\xff\xff", value, b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"]
        length = struct.pack("<I", len(value))
        head = tag + (b"" if implicit else elem.VR.encode() + b"\x00\x00")
        return [head + length, value]

    def _element(self, t: int, elem: DataElement, implicit: bool, encodings: list[str],
                 enc_key: tuple[str, ...]) -> bytes:
        key = (id(elem), implicit, enc_key)
        hit = self._cache.get(key)
        if hit is None or hit[0] is not elem:
            if elem.VR == "SQ":
                raw = self._sequence(t, elem, implicit, encodings, enc_key)
            else:
                raw = fast_element_bytes(t, elem, implicit, encodings)
            hit = (elem, raw if raw is not None else self._encode(elem, implicit, encodings))
            self._cache[key] = hit
        return hit[1]

    def _sequence(self, t: int, elem: DataElement, implicit: bool, encodings: list[str],
                  enc_key: tuple[str, ...]) -> bytes | None:
        """A defined-length sequence of defined-length items, as pydicom writes ours."""
        if elem.is_undefined_length or not isinstance(elem.value, PydicomSequence):
            return None
        items = []
        for item in elem.value:
            if not isinstance(item, Dataset) or item.is_undefined_length_sequence_item:
                return None
            if 0x00080005 in item:  # an item with its own charset: let pydicom do it
                return None
            pairs = sorted(((int(k), e) for k, e in item.items()), key=_first)
            chunks = self._encoded(pairs, implicit, encodings)
            if chunks is None:
                return None
            body = b"".join(p for _, chunk in chunks for p in chunk)
            items.append(b"\xfe\xff\x00\xe0" + struct.pack("<I", len(body)) + body)
        value = b"".join(items)
        return _header(t, "SQ", len(value), implicit) + value

    def _encoded(self, items: list[tuple[int, DataElement]], implicit: bool,
                 encodings: list[str]) -> list[tuple[int, list[bytes]]] | None:
        """Encode (tag, element) pairs in the given order; None if one is not ours."""
        enc_key = tuple(encodings)
        out = []
        for t, elem in items:
            if (t & 0xFFFF) == 0 and (t >> 16) > 6:
                continue  # retired group lengths are not written
            if not isinstance(elem, DataElement):
                return None  # a raw element read from a file: let pydicom handle it
            if t == _PIXEL_DATA:
                out.append((t, self._pixel_bytes(elem, implicit)))
            else:
                out.append((t, [self._element(t, elem, implicit, encodings, enc_key)]))
        return out

    def _encodings(self, ds: Dataset) -> list[str]:
        elem = ds.get(0x00080005)
        value = elem.value if elem is not None else None
        key = tuple(value) if isinstance(value, list | MultiValue) else value
        found = self._charsets.get(key)
        if found is None:
            found = self._charsets[key] = convert_encodings(ds.get("SpecificCharacterSet",
                                                                   default_encoding))
        return found

    def _room(self) -> None:
        if len(self._cache) > self._max:
            self._cache.clear()
            self._template = None

    # ---- file meta ----------------------------------------------------------------------
    def meta(self, meta: FileMetaDataset, extra: list[DataElement] | None = None) -> bytes:
        """Preamble, 'DICM' and the file meta group as dcmwrite writes them; `extra`
        elements override the meta template's, shared elements' bytes are cached."""
        if self._meta_template is None or self._meta_template[0] is not meta:
            self._meta_template = (meta, {int(t): e for t, e in meta.items()})
        elements = dict(self._meta_template[1])
        elements.update((int(e.tag), e) for e in extra or [])
        parts = []
        for tag, vr in _META_ORDER:
            elem = elements.get(tag)
            if elem is None:
                continue
            hit = self._meta_cache.get(id(elem))
            if hit is None or hit[0] is not elem:
                hit = (elem, _meta_element(tag, vr, elem.value))
                if len(self._meta_cache) > 1000:
                    self._meta_cache.clear()
                self._meta_cache[id(elem)] = hit
            parts.append(hit[1])
        body = b"".join(parts)
        group_length = _explicit(0x00020000, "UL", struct.pack("<I", len(body)))
        return b"\x00" * 128 + b"DICM" + group_length + body

    # ---- templates and merging ------------------------------------------------------------
    def _template_encoded(self, template: Dataset, implicit: bool,
                          encodings: list[str]) -> bool:
        """Make `self._template` hold the encoded template; False if it cannot be."""
        key = (id(template), implicit, tuple(encodings))
        cached = self._template
        if cached is None or cached[0] is not template or cached[1] != key:
            items = sorted(((int(t), e) for t, e in template.items()), key=_first)
            encoded = self._encoded(items, implicit, encodings)
            if encoded is None:
                return False
            self._template = (template, key, dict(items), encoded, [t for t, _ in encoded], {})
        return True

    def _with_extras(self, extras: list[tuple[int, DataElement]], implicit: bool,
                     encodings: list[str]) -> list[bytes] | None:
        """The encoded template with `extras` inserted or replacing template elements.

        The template's bytes between the extras' positions are joined once per set of extra
        tags, so an instance costs a handful of byte strings, not one per element.
        """
        assert self._template is not None
        encoded, segments = self._template[3], self._template[5]
        extra_encoded = self._encoded(sorted(extras, key=_first), implicit, encodings)
        if extra_encoded is None:
            return None
        key = tuple(t for t, _ in extra_encoded)
        runs = segments.get(key)
        if runs is None:
            runs, current, i = [], [], 0
            for t in key:
                while i < len(encoded) and encoded[i][0] < t:
                    current.extend(encoded[i][1])
                    i += 1
                if i < len(encoded) and encoded[i][0] == t:
                    i += 1  # replaced by the instance's element
                runs.append(b"".join(current))
                current = []
            for _, chunk in encoded[i:]:
                current.extend(chunk)
            runs.append(b"".join(current))
            if len(segments) > 16:
                segments.clear()
            segments[key] = runs
        parts = []
        for run, (_, chunk) in zip(runs, extra_encoded, strict=False):
            parts.append(run)
            parts.extend(chunk)
        parts.append(runs[-1])
        return parts

    # ---- whole objects ---------------------------------------------------------------------
    def body(self, ds: Dataset, transfer_syntax: str,
             template: Dataset | None = None) -> list[bytes]:
        """The encoded dataset (after the file meta) as a list of byte strings.

        With `template` (the series template `ds` was copied from), the template's encoded
        elements are reused and only the elements that differ are encoded and merged in.
        """
        implicit = transfer_syntax == ImplicitVRLittleEndian
        encodings = self._encodings(ds)
        self._room()
        parts = None
        if template is not None and self._template_encoded(template, implicit, encodings):
            by_tag = self._template[2]  # type: ignore[index]
            # int keys: looking up a BaseTag would call its Python-level __eq__
            extras = [(ti, e) for t, e in ds.items() if by_tag.get(ti := int(t)) is not e]
            new = sum(1 for t, _ in extras if t not in by_tag)
            if len(ds) - new == len(by_tag):  # else the instance dropped template elements
                parts = self._with_extras(extras, implicit, encodings)
        if parts is None:
            items = sorted(((int(t), e) for t, e in ds.items()), key=_first)
            merged = self._encoded(items, implicit, encodings)
            if merged is not None:
                parts = [p for _, chunk in merged for p in chunk]
        if parts is None:  # not our elements: plain pydicom
            fp = DicomBytesIO()
            fp.is_implicit_VR, fp.is_little_endian = implicit, True
            write_dataset(fp, ds)
            parts = [fp.getvalue()]
        return _finish(parts, transfer_syntax)

    def encode(self, ds: Dataset, template: Dataset | None = None) -> bytes:
        """The whole Part 10 file of a Dataset with file_meta."""
        ts = ds.file_meta.TransferSyntaxUID
        return b"".join([self.meta(ds.file_meta), *self.body(ds, ts, template)])

    def encode_parts(self, template: Dataset, elements: list[DataElement],
                     meta_template: FileMetaDataset, meta_elements: list[DataElement]
                     ) -> list[bytes]:
        """A whole file, in pieces, from a series template plus one instance's own elements.

        Same bytes as assembling that Dataset and calling :meth:`encode`, without building it;
        the pieces are not joined so that large pixel data is not copied again.
        """
        transfer_syntax = meta_template.get(0x00020010).value
        implicit = transfer_syntax == ImplicitVRLittleEndian
        encodings = self._encodings(template)
        self._room()
        parts = None
        if self._template_encoded(template, implicit, encodings):
            parts = self._with_extras([(int(e.tag), e) for e in elements], implicit, encodings)
        if parts is None:
            items = dict(template.items())
            items.update((e.tag, e) for e in elements)
            parts = self.body(Dataset(items), transfer_syntax)
        else:
            parts = _finish(parts, transfer_syntax)
        return [self.meta(meta_template, meta_elements), *parts]
