"""The files a user names to store: folders are walked, so a study folder is one argument."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path


def iter_dicom_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Every file under the given files and folders (sorted, recursive)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
