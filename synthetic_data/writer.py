"""Write an archive folder: DICOM files plus the manifest, all or nothing.

Files go to a hidden sibling folder first, which is renamed to the requested name only when
everything has been written; on any failure (or Ctrl-C) it is removed, so no half-written
archive is ever left behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

from pydicom.filewriter import dcmwrite

from harness.errors import ConfigError
from synthetic_data import quirks
from synthetic_data.generator import GeneratedInstance, estimate, iter_instances
from synthetic_data.manifest import ManifestWriter, write_summary
from synthetic_data.options import GeneratorOptions

Progress = Callable[[int, int], None]
_DISK_MARGIN = 64 * 1024 * 1024


def encode_instance(inst: GeneratedInstance) -> bytes:
    """The bytes of one Part 10 file (with any byte-level quirk applied)."""
    buf = BytesIO()
    dcmwrite(buf, inst.dataset, enforce_file_format=True)
    data = buf.getvalue()
    if inst.record["quirks"]:
        data = quirks.patch_bytes(data, inst.dataset, inst.record["quirks"])
    return data


def _existing_parent(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_target(opts: GeneratorOptions, out_dir: Path) -> tuple[int, int]:
    """Refuse a non-empty folder or a plan that does not fit on the disk."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"out: {out_dir} exists and is not an empty folder; "
                          "give a new or empty folder")
    count, size = estimate(opts)
    free = shutil.disk_usage(_existing_parent(out_dir.parent)).free
    if size + _DISK_MARGIN > free:
        raise ConfigError(
            f"scale: {opts.scale} with these options needs about {size / 1e9:.2f} GB but only "
            f"{free / 1e9:.2f} GB is free at {out_dir.parent}; use a smaller scale or fewer "
            "patients/studies")
    return count, size


def write_archive(opts: GeneratorOptions, out_dir: str | os.PathLike,
                  progress: Progress | None = None) -> dict:
    """Write every object and the manifest into out_dir; return the counts."""
    out = Path(out_dir).absolute()
    total, _ = check_target(opts, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        manifest = ManifestWriter(tmp)
        made: set[str] = set()
        try:
            for done, inst in enumerate(iter_instances(opts), start=1):
                path = tmp / inst.path
                if path.parent.as_posix() not in made:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    made.add(path.parent.as_posix())
                data = encode_instance(inst)
                path.write_bytes(data)
                record = dict(inst.record)
                record["path"] = inst.path
                record["size"] = len(data)
                record["sha256"] = hashlib.sha256(data).hexdigest()
                manifest.add(record)
                if progress is not None:
                    progress(done, total)
        finally:
            manifest.close()
        counts = manifest.counts()
        write_summary(tmp, opts.summary(), counts)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts
