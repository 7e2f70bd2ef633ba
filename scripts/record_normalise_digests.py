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
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from types import ModuleType

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
    folder = Path(tempfile.mkdtemp(prefix="normalise-at-"))
    path = folder / f"normalise_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def corpus() -> Iterator[tuple[str, bytes]]:
    """(name, Part 10 bytes): the shipped real-world files, then the synthetic set."""
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
