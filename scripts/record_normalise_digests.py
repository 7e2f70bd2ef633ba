"""Record the ledger-row digests of the c9d1af4 `normalise.py` into tests/data/, once.

    .venv/bin/python scripts/record_normalise_digests.py      # rewrites the fixture

Why: `normalise` was rewritten for speed (issue 18); the meaning of a row must not change,
so tests/test_normalise_speed.py checks that today's rows give the digests this script
recorded from the implementation before the rewrite (commit c9d1af4, loaded from git at
run time, never copied). The corpus is public test data only: the DICOM files pydicom and
pynetdicom ship (tests/realworld.py `valid_files()`) and a synthetic set made by
`synthetic_data` (every character set and transfer syntax it writes, quirks on). No
patient data: the fixture holds digests, names and the digest of each input file.
"""

from __future__ import annotations

import importlib.util
import json
import random
import struct
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from io import BytesIO
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REFERENCE_COMMIT = "c9d1af4"
FIXTURE = ROOT / "tests" / "data" / "normalise_digests.json"
#: What the synthetic part of the corpus is made of (generator options, recorded with it).
SYNTHETIC = {"patients": 15, "studies_per_patient": 1, "seed": 18, "scale": "tiny",
             "quirks": True, "modalities": ["CT", "MR", "CR", "DX", "US", "SR", "DOC", "SC"],
             "charsets": ["default", "latin1", "utf8", "japanese", "korean"],
             "transfer_syntaxes": ["implicit", "explicit", "deflated", "rle", "jpeg-lossless",
                                   "j2k-lossless", "j2k-lossy"]}


def normalise_at(commit: str) -> ModuleType:
    """`harness/migration/normalise.py` as it was at `commit`, as a module of its own."""
    source = subprocess.run(["git", "-C", str(ROOT), "show",
                             f"{commit}:harness/migration/normalise.py"],
                            check=True, capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory(prefix="normalise-at-") as folder:
        path = Path(folder) / f"normalise_{commit}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return module


def corpus() -> Iterator[tuple[str, bytes]]:
    """(name, Part 10 bytes): shipped real-world files, synthetic set, odd and random values."""
    from pydicom import dcmwrite

    from synthetic_data import GeneratorOptions, generate
    from tests.realworld import valid_files

    for item in valid_files():
        yield item.name, item.path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index, ds in enumerate(generate(GeneratorOptions(**SYNTHETIC))):
            out = BytesIO()
            dcmwrite(out, ds, enforce_file_format=True)
            yield (f"synthetic/{index:04d}-{ds.Modality}-{ds.file_meta.TransferSyntaxUID}",
                   out.getvalue())
    yield from odd_values()
    yield from random_values()


#: Values at the edges of PS3.5 6.2 (padding, backslashes, empty, non-ASCII, odd numbers,
#: private elements of every kind) as raw bytes: (tag, VR, bytes or (struct code, numbers)).
ODD_VALUES: list[tuple[int, str, Any]] = [
    (0x00080016, "UI", b"1.2.840.10008.5.1.4.1.1.7\x00"),
    (0x00080020, "DA", b"20240101"),
    (0x0008002A, "DT", b"20200101120000.000000+0100 "),
    (0x00080030, "TM", b"1200  "),
    (0x00080050, "SH", b" A1\\B2 \x00"),
    (0x00080054, "AE", b" AE1 \\\tAE2\x00 "),
    (0x00080060, "CS", b" OT "),
    (0x00080070, "LO", b"Caf\xe9 Inc "),
    (0x00080080, "LO", b"A\\\\B  "),
    (0x00080081, "ST", b"line1\r\nline2\\x \x00"),
    (0x00080090, "PN", b"Doe^John==  "),
    (0x00081030, "LO", b""),
    (0x00081040, "LO", b"  lead"),
    (0x00081140, "SQ", [[(0x00081150, "UI", b"1.2.3\x00"), (0x00081155, "UI", b"1.2.4\x00")]]),
    (0x00100010, "PN", b"A^B\\C^D = "),
    (0x00100020, "LO", b"ID1 "),
    (0x00101010, "AS", b"034Y"),
    (0x00180050, "DS", b" 1.50 "),
    (0x00180088, "DS", b"1e3 "),
    (0x00189087, "FD", ("d", [1.5])),
    (0x00200011, "IS", b" 12 "),
    (0x00200013, "IS", b"1.0 "),
    (0x00200032, "DS", b" -1.5\\2e3 \\.5 "),
    (0x00200037, "DS", b"1\\\\0\\nan\\1_0\\0 "),
    (0x00200052, "UI", b"1.2\\3.4\x00"),
    (0x00200060, "CS", b""),
    (0x00280002, "US", ("H", [1])),
    (0x00280030, "DS", b"0.5\\0.5 "),
    (0x00280106, "US", ("H", [0])),
    (0x00281101, "SS", ("h", [-4096, 0, 16])),
    (0x00321060, "LO", b"\xe5\xb1\xb1 "),
    (0x00400275, "SQ", []),
    (0x0040A132, "UL", ("I", [70000, 1])),
    (0x0040A160, "UT", b"free text\\with backslash  "),
    (0x00090010, "LO", b"ACME 1.0"),
    (0x00091001, "LO", b" lead "),
    (0x00091002, "LO", b"a\\b "),
    (0x00091003, "OB", b"\x00\x01\x02\x00"),
    (0x00091004, "SL", ("i", [-2])),
    (0x00091005, "FD", ("d", [1.25])),
    (0x00091006, "DS", b"1.2.3 "),
    (0x00091007, "UN", b"plain text"),
    (0x00091008, "LO", b"\xff\xfe"),
    (0x00091009, "UN", b""),
    (0x0009100A, "SQ", [[(0x00100020, "LO", b"X ")]]),
]
_LONG_LENGTH_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}


def _encode(elements: list[tuple[int, str, Any]], implicit: bool, little: bool) -> bytes:
    """Elements as PS3.5 7.1 writes them (sorted by tag), sequences with defined lengths."""
    order = "<" if little else ">"
    out = b""
    for tag, vr, value in sorted(elements, key=lambda e: (e[0] >> 16, e[0] & 0xFFFF)):
        if vr == "SQ":
            value = b"".join(struct.pack(order + "HHI", 0xFFFE, 0xE000, len(item)) + item
                             for item in (_encode(i, implicit, little) for i in value))
        elif isinstance(value, tuple):
            value = struct.pack(f"{order}{len(value[1])}{value[0]}", *value[1])
        head = struct.pack(order + "HH", tag >> 16, tag & 0xFFFF)
        if implicit:
            head += struct.pack(order + "I", len(value))
        elif vr in _LONG_LENGTH_VRS:
            head += vr.encode() + b"\0\0" + struct.pack(order + "I", len(value))
        else:
            head += vr.encode() + struct.pack(order + "H", len(value))
        out += head + value
    return out


_SYNTAXES = {"implicit": ("1.2.840.10008.1.2", True, True),
             "explicit": ("1.2.840.10008.1.2.1", False, True),
             "big-endian": ("1.2.840.10008.1.2.2", False, False)}


def _part10(elements: list[tuple[int, str, Any]], syntax: str, uid: str) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    uid_value = (uid + "\0")[: len(uid) // 2 * 2 + 2].encode()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = _SYNTAXES[syntax][0]
    out = BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue() + _encode([*elements, (0x00080018, "UI", uid_value)],
                                    *_SYNTAXES[syntax][1:])


def odd_values() -> Iterator[tuple[str, bytes]]:
    """ODD_VALUES in implicit VR, explicit VR little and big endian, under three charsets."""
    for charset in ("", "ISO_IR 100", "ISO_IR 192"):
        for index, syntax in enumerate(_SYNTAXES):
            elements = [*ODD_VALUES, *([(0x00080005, "CS", charset.encode())] if charset else [])]
            yield (f"odd/{syntax}-{charset or 'default'}",
                   _part10(elements, syntax, f"1.2.826.0.1.3680043.10.18.{len(charset)}.{index}"))


#: Where random values go: one public tag per VR, then private ones (creator ACME).
_RANDOM_PUBLIC = {"AE": 0x00080054, "AS": 0x00101010, "CS": 0x00080060, "DA": 0x00080020,
                  "DS": 0x00180050, "DT": 0x0008002A, "IS": 0x00200011, "LO": 0x00080070,
                  "LT": 0x00204000, "PN": 0x00080090, "SH": 0x00080050, "ST": 0x00080081,
                  "TM": 0x00080030, "UI": 0x00081150, "UT": 0x0040A160, "UC": 0x00080120,
                  "US": 0x00280002, "SS": 0x00281101, "UL": 0x0040A132, "FD": 0x00189087,
                  "OB": 0x00420011}
_RANDOM_PRIVATE = ("LO", "DS", "US", "UN", "SL", "FL", "CS")
_BINARY_SIZES = {"US": 2, "SS": 2, "UL": 4, "FD": 8, "OB": 1}
_RANDOM_BYTES = b"09.+-eE Ab^\\\x00=\t\x1b\xe9_n"  # separators, padding, escapes, Latin-1


def random_values(count: int = 40, seed: int = 18) -> Iterator[tuple[str, bytes]]:
    """`count` data sets of random values (seeded) in every VR, in each of _SYNTAXES."""
    rng = random.Random(seed)

    def text(choices: bytes, lengths: Sequence[int]) -> bytes:
        return bytes(rng.choice(choices) for _ in range(rng.choice(lengths)))

    for index in range(count):
        elements: list[tuple[int, str, Any]] = [(0x00090010, "LO", b"ACME")]
        for vr, tag in _RANDOM_PUBLIC.items():
            if vr in _BINARY_SIZES:
                elements.append((tag, vr, rng.randbytes(_BINARY_SIZES[vr] * rng.randint(0, 3))))
            else:
                elements.append((tag, vr, text(_RANDOM_BYTES, range(10))))
        for offset, vr in enumerate(_RANDOM_PRIVATE):
            elements.append((0x00091000 + offset, vr, text(_RANDOM_BYTES + b"\xfe\xff",
                                                          (2, 4, 6, 8))))
        for syntax in _SYNTAXES:
            yield (f"random/{index:02d}-{syntax}",
                   _part10(elements, syntax, f"1.2.826.0.1.3680043.10.18.9.{index}"))


def read(data: bytes):
    """The data set as a network peer hands it over: raw elements, converted on access."""
    from pydicom import dcmread

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(BytesIO(data))


def row_digests(module: ModuleType, data: bytes) -> dict[str, str | None]:
    """What a row means: its digests, and a digest of every column and of attrs_json."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = module.row_from_dataset(read(data))
    columns = json.dumps([list(row.values()), row.attrs_json], ensure_ascii=False)
    return {"attrs_digest": row.attrs_digest, "keys_digest": row.keys_digest,
            "pixel_digest": row.pixel_digest, "pixel_mode": row.pixel_mode,
            "row": module.digest(columns.encode())}


def record(module: ModuleType) -> dict[str, dict[str, str | None]]:
    return {name: {"input": module.digest(data), **row_digests(module, data)}
            for name, data in corpus()}


def main() -> None:
    module = normalise_at(REFERENCE_COMMIT)
    rows = record(module)
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps({"commit": REFERENCE_COMMIT, "synthetic": SYNTHETIC,
                                   "rows": rows}, indent=1, sort_keys=True) + "\n")
    print(f"{len(rows)} rows from {REFERENCE_COMMIT} written to {FIXTURE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
