"""Write an archive folder: DICOM files plus the manifest, all or nothing.

Files go to a hidden sibling folder first, which is renamed to the requested name only when
everything has been written; on any failure (or Ctrl-C) it is removed, so no half-written
archive is ever left behind.
"""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from harness.errors import ConfigError
from synthetic_data import quirks
from synthetic_data.fastwrite import ArchiveEncoder
from synthetic_data.generator import GeneratedInstance, plan
from synthetic_data.manifest import ManifestWriter, write_summary
from synthetic_data.options import GeneratorOptions

Progress = Callable[[int, int], None]
_DISK_MARGIN = 64 * 1024 * 1024


def encode_instance(inst: GeneratedInstance, encoder: ArchiveEncoder) -> list[bytes]:
    """The bytes of one Part 10 file, in pieces (with any byte-level quirk applied)."""
    parts = encoder.encode_parts(inst.template, inst.elements, inst.meta_template,
                                 inst.file_meta_elements())
    if inst.record["quirks"]:
        return [quirks.patch_bytes(b"".join(parts), inst.template,
                                   inst.record["transfer_syntax"], inst.record["quirks"])]
    return parts


def _existing_parent(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_target(opts: GeneratorOptions, out_dir: Path, size: int) -> None:
    """Refuse a non-empty folder or a plan (of `size` bytes) that does not fit on the disk."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"out: {out_dir} exists and is not an empty folder; "
                          "give a new or empty folder")
    free = shutil.disk_usage(_existing_parent(out_dir.parent)).free
    if size + _DISK_MARGIN > free:
        raise ConfigError(
            f"scale: {opts.scale} with these options needs about {size / 1e9:.2f} GB but only "
            f"{free / 1e9:.2f} GB is free at {out_dir.parent}; use a smaller scale or fewer "
            "patients/studies")


class _FileSink:
    """Writes files, hashes them and appends manifest lines on one background thread.

    Hashing and file writes release the GIL, so they overlap with building the next object.
    The queue is bounded, so at most a few objects are in memory at any time.
    """

    def __init__(self, root: Path, manifest: ManifestWriter, depth: int = 8) -> None:
        self.root = root
        self.manifest = manifest
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._folder = ""
        self._thread = threading.Thread(target=self._run, name="archive-writer", daemon=True)
        self._thread.start()

    def put(self, rel_path: str, parts: list[bytes], record: dict) -> None:
        if self.error is not None:
            raise self.error
        self._queue.put((rel_path, parts, record))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after a failure
            try:
                self._write(*item)
            except BaseException as exc:  # reported to the main thread
                self.error = exc

    def _write(self, rel_path: str, parts: list[bytes], record: dict) -> None:
        path = os.path.join(self.root, rel_path)
        folder = os.path.dirname(path)
        if folder != self._folder:  # objects arrive series by series
            os.makedirs(folder, exist_ok=True)
            self._folder = folder
        size = sum(len(p) for p in parts)
        if size < 1 << 20:
            parts = [b"".join(parts)]  # small file: one write, one hash update
        digest = hashlib.sha256()
        with open(path, "wb") as fh:
            for part in parts:
                fh.write(part)
                digest.update(part)
        record = dict(record)
        record["path"] = rel_path
        record["size"] = size
        record["sha256"] = digest.hexdigest()
        self.manifest.add(record)

    def close(self) -> None:
        """Wait for every queued file; re-raise a failure from the writer thread."""
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error


def write_archive(opts: GeneratorOptions, out_dir: str | os.PathLike,
                  progress: Progress | None = None) -> dict:
    """Write every object and the manifest into out_dir; return the counts."""
    out = Path(out_dir).absolute()
    total, size, instances = plan(opts)
    check_target(opts, out, size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        manifest = ManifestWriter(tmp)
        sink = _FileSink(tmp, manifest)
        encoder = ArchiveEncoder()
        try:
            for done, inst in enumerate(instances, start=1):
                sink.put(inst.path, encode_instance(inst, encoder), inst.record)
                if progress is not None:
                    progress(done, total)
        finally:
            try:
                sink.close()
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
