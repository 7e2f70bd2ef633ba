"""Storage of the embedded PACS: the files as received and their SQLite index.

Layout (stable: the harness adapter reads it directly)::

    DIR/index.sqlite    SQLite index in WAL mode (plus index.sqlite-wal / index.sqlite-shm)
    DIR/files/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
                        each instance exactly as received: preamble, file meta, then the data
                        set bytes unchanged, in the transfer syntax it arrived in
    DIR/tmp/            in-flight writes, moved into files/ with os.replace (never half files)

Schema (``SCHEMA_VERSION`` 1, in ``PRAGMA user_version``; an index of a newer version is
refused), one row per stored instance. Text columns are never NULL: an absent attribute is
``''``. Multi-valued text is joined with a backslash. PN values are Unicode, decoded with the
instance's Specific Character Set::

    CREATE TABLE instances (
        sop_instance_uid          TEXT PRIMARY KEY,  -- (0008,0018)
        sop_class_uid             TEXT NOT NULL,     -- (0008,0016)
        patient_id                TEXT NOT NULL,     -- (0010,0020)
        patient_name              TEXT NOT NULL,     -- (0010,0010)
        patient_birth_date        TEXT NOT NULL,     -- (0010,0030)
        patient_sex               TEXT NOT NULL,     -- (0010,0040)
        issuer_of_patient_id      TEXT NOT NULL,     -- (0010,0021)
        study_instance_uid        TEXT NOT NULL,     -- (0020,000D)
        study_date                TEXT NOT NULL,     -- (0008,0020)
        study_time                TEXT NOT NULL,     -- (0008,0030)
        accession_number          TEXT NOT NULL,     -- (0008,0050)
        study_description         TEXT NOT NULL,     -- (0008,1030)
        study_id                  TEXT NOT NULL,     -- (0020,0010)
        referring_physician_name  TEXT NOT NULL,     -- (0008,0090)
        modality                  TEXT NOT NULL,     -- (0008,0060)
        series_instance_uid       TEXT NOT NULL,     -- (0020,000E)
        series_number             TEXT NOT NULL,     -- (0020,0011), IS text as received
        series_description        TEXT NOT NULL,     -- (0008,103E)
        instance_number           TEXT NOT NULL,     -- (0020,0013), IS text as received
        transfer_syntax_uid       TEXT NOT NULL,     -- as received (the file's 0002,0010)
        specific_character_set    TEXT NOT NULL,     -- (0008,0005) of the instance
        path                      TEXT NOT NULL,     -- relative to DIR, '/' separated
        size_bytes                INTEGER NOT NULL,  -- size of the stored file
        received_at               TEXT NOT NULL,     -- ISO 8601 UTC, milliseconds
        calling_ae_title          TEXT NOT NULL,     -- who sent it
        store_status              INTEGER NOT NULL   -- status returned for that C-STORE:
                                                     -- 0x0000, or 0xB007 when the data set's
                                                     -- SOP class/instance UID differs from the
                                                     -- request's (stored anyway)
    );
    -- indexes on patient_id, study_instance_uid, series_instance_uid

Durability: a C-STORE is acknowledged only after its file was renamed into place and its index
row committed. Neither is fsync'ed (the index runs WAL with synchronous=NORMAL): a crash of the
server process loses nothing acknowledged and never leaves a half file; a power loss may drop
the last acknowledged instances (acceptable for a test node; an fsync per instance cost more
than the insert).

Adapter API (all safe while the server runs; this module imports no DICOM library):

* ``open_index(path) -> sqlite3.Connection``: opens ``path`` (the .sqlite file, or DIR),
  creates the schema if missing; autocommit mode, WAL, rows are ``sqlite3.Row``.
* ``statistics(storage_dir) -> {"patients", "studies", "series", "instances"}``
* ``wipe_storage(storage_dir) -> int``: deletes every row and stored file, returns the number
  of rows deleted. It holds the SQLite write lock meanwhile, so a concurrent C-STORE lands
  either entirely before (and is wiped) or entirely after (and is kept).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import sqlite3
import tempfile
import threading
from pathlib import Path
from typing import Any

from harness import sqlite_db

LOG = logging.getLogger("harness.embedded_pacs")

SCHEMA_VERSION = 1
INDEX_FILENAME = "index.sqlite"
FILES_DIRNAME = "files"
TMP_DIRNAME = "tmp"

# (column, DICOM keyword) for the attributes copied from each received data set.
DATASET_COLUMNS: tuple[tuple[str, str], ...] = (
    ("patient_id", "PatientID"),
    ("patient_name", "PatientName"),
    ("patient_birth_date", "PatientBirthDate"),
    ("patient_sex", "PatientSex"),
    ("issuer_of_patient_id", "IssuerOfPatientID"),
    ("study_instance_uid", "StudyInstanceUID"),
    ("study_date", "StudyDate"),
    ("study_time", "StudyTime"),
    ("accession_number", "AccessionNumber"),
    ("study_description", "StudyDescription"),
    ("study_id", "StudyID"),
    ("referring_physician_name", "ReferringPhysicianName"),
    ("modality", "Modality"),
    ("series_instance_uid", "SeriesInstanceUID"),
    ("series_number", "SeriesNumber"),
    ("series_description", "SeriesDescription"),
    ("instance_number", "InstanceNumber"),
)

COLUMNS: tuple[str, ...] = (
    "sop_instance_uid",
    "sop_class_uid",
    *(col for col, _ in DATASET_COLUMNS),
    "transfer_syntax_uid",
    "specific_character_set",
    "path",
    "size_bytes",
    "received_at",
    "calling_ae_title",
    "store_status",
)

_TEXT_COLUMNS = [c for c in COLUMNS if c not in ("sop_instance_uid", "size_bytes", "store_status")]
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS instances (\n"
    "    sop_instance_uid TEXT PRIMARY KEY,\n"
    + "".join(f"    {col} TEXT NOT NULL DEFAULT '',\n" for col in _TEXT_COLUMNS)
    + "    size_bytes INTEGER NOT NULL DEFAULT 0,\n"
    "    store_status INTEGER NOT NULL DEFAULT 0\n"
    ");\n"
    "CREATE INDEX IF NOT EXISTS idx_instances_patient ON instances (patient_id);\n"
    "CREATE INDEX IF NOT EXISTS idx_instances_study ON instances (study_instance_uid);\n"
    "CREATE INDEX IF NOT EXISTS idx_instances_series ON instances (series_instance_uid);\n"
)

_INSERT_INSTANCE = (
    f"INSERT OR REPLACE INTO instances ({','.join(COLUMNS)}) "
    f"VALUES ({','.join('?' * len(COLUMNS))})"
)


def connect(db_file: Path) -> sqlite3.Connection:
    """A connection to an index that ``open_index`` already created (the file is in WAL mode):
    for one request's reads, without changing the file's pragmas."""
    return sqlite_db.connect(db_file, journal_mode=None, synchronous=None)


def _index_file(path: str | os.PathLike[str]) -> Path:
    """A directory (existing, or not yet created and without a suffix) means DIR/index.sqlite."""
    p = Path(path)
    if p.is_dir() or (not p.exists() and not p.suffix):
        return p / INDEX_FILENAME
    return p


def open_index(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open (creating if needed) the SQLite index, so the server and the adapter share one schema.

    ``path`` is the ``index.sqlite`` file or the storage directory holding it. The connection
    is in autocommit mode (use ``harness.sqlite_db.transaction`` for multi-statement writes),
    in WAL mode so readers never block the server, with a 30 s busy timeout and ``sqlite3.Row``
    rows. An index of a newer schema version raises ``harness.sqlite_db.SchemaVersionError``.
    """
    db_file = _index_file(path)
    db_file.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite_db.connect(db_file, synchronous=None)
    try:
        version = sqlite_db.check_schema_version(
            conn, SCHEMA_VERSION, what=f"embedded PACS index {db_file}"
        )
        conn.executescript(_SCHEMA)
        if version == 0:
            sqlite_db.set_schema_version(conn, SCHEMA_VERSION)
    except BaseException:
        conn.close()
        raise
    return conn


def statistics(storage_dir: str | os.PathLike[str]) -> dict[str, int]:
    """Count what the node holds, so scenarios can assert on it without a C-FIND round trip."""
    conn = open_index(Path(storage_dir) / INDEX_FILENAME)
    try:
        row = conn.execute(
            "SELECT COUNT(DISTINCT patient_id), COUNT(DISTINCT study_instance_uid), "
            "COUNT(DISTINCT series_instance_uid), COUNT(*) FROM instances"
        ).fetchone()
    finally:
        conn.close()
    return {"patients": row[0], "studies": row[1], "series": row[2], "instances": row[3]}


def wipe_storage(storage_dir: str | os.PathLike[str]) -> int:
    """Delete every indexed row and stored file, so a disposable node starts a scenario empty.

    Safe while the server runs: the SQLite write lock is held throughout, and stores take the
    same lock around moving their file into place and indexing it. In-flight temporary files
    under ``tmp/`` are left to their writers. Returns the number of rows deleted.
    """
    storage = Path(storage_dir)
    files_dir = storage / FILES_DIRNAME
    conn = open_index(storage / INDEX_FILENAME)
    try:
        with sqlite_db.transaction(conn):
            count = conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
            if files_dir.is_dir():
                for child in files_dir.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            child.unlink()
            conn.execute("DELETE FROM instances")
    finally:
        conn.close()
    leftovers = list(files_dir.rglob("*")) if files_dir.is_dir() else []
    if any(p.is_file() for p in leftovers):
        LOG.warning("wipe: %d entries could not be deleted under %s", len(leftovers), files_dir)
    return count


_SAFE_NAME = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,127}$")


def safe_component(uid: str) -> str:
    """A UID as a path component; anything odd is hashed so it cannot escape DIR/files."""
    if _SAFE_NAME.match(uid) and ".." not in uid:
        return uid
    return "x" + hashlib.sha1(uid.encode("utf-8", "replace")).hexdigest()


class Storage:
    """The server's writer: files moved into place and indexed under one write lock."""

    def __init__(self, storage_dir: Path) -> None:
        self.root = storage_dir
        self.files_dir = storage_dir / FILES_DIRNAME
        self.tmp_dir = storage_dir / TMP_DIRNAME
        self.db_file = storage_dir / INDEX_FILENAME
        self._write_lock = threading.Lock()
        self._store_conn: sqlite3.Connection | None = None  # held by stores, under _write_lock

    def prepare(self) -> None:
        """Create the layout and schema; drop temp files a crashed predecessor left behind."""
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp_dir.iterdir():
            with contextlib.suppress(OSError):
                stale.unlink()
        open_index(self.db_file).close()

    def relative_path(self, study: str, series: str, sop_instance: str) -> str:
        """Where an instance goes, relative to DIR ('/' separated, as in the index)."""
        parts = (safe_component(study), safe_component(series), safe_component(sop_instance))
        return "/".join((FILES_DIRNAME, parts[0], parts[1], parts[2] + ".dcm"))

    def put(self, data: bytes, row: dict[str, Any]) -> bool:
        """Write ``data`` to ``row["path"]`` and index ``row`` (COLUMNS) atomically; True when
        the SOP Instance UID was stored before (its row and file are replaced).

        The file is written under tmp/ first, then renamed into place and indexed in one SQLite
        write transaction: a concurrent wipe sees either both or neither. Raises OSError or
        sqlite3.Error (the caller answers 0xA700); nothing is left behind then.
        """
        final = self.root / row["path"]
        tmp_name: str | None = None
        try:
            fd, tmp_name = tempfile.mkstemp(prefix="store-", suffix=".part", dir=self.tmp_dir)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            with self._write_lock:
                conn = self._index_for_stores()
                try:
                    with sqlite_db.transaction(conn):
                        old = conn.execute(
                            "SELECT path FROM instances WHERE sop_instance_uid = ?",
                            (row["sop_instance_uid"],),
                        ).fetchone()
                        final.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(tmp_name, final)
                        tmp_name = None
                        conn.execute(_INSERT_INSTANCE, [row[c] for c in COLUMNS])
                except sqlite3.Error:
                    self._close_store_index()  # the next store starts from a fresh connection
                    raise
        finally:
            if tmp_name is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
        if old is not None and old["path"] != row["path"]:
            with contextlib.suppress(OSError):
                (self.root / old["path"]).unlink()
        return old is not None

    def _index_for_stores(self) -> sqlite3.Connection:
        """The connection stores share (caller holds ``_write_lock``): opening one per instance
        cost more than the insert, and closing the last connection checkpoints the WAL.
        synchronous=NORMAL: a commit reaches the OS, not the platter (module docstring)."""
        if self._store_conn is None:
            self._store_conn = sqlite_db.connect(
                self.db_file, journal_mode=None, synchronous="NORMAL"
            )
        return self._store_conn

    def _close_store_index(self) -> None:
        if self._store_conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._store_conn.close()
            self._store_conn = None

    def close(self) -> None:
        """Close the stores' connection (checkpoints the WAL) once no store runs any more."""
        with self._write_lock:
            self._close_store_index()
