"""Embedded PACS: a zero-install DICOM Query/Retrieve SCP with storage, built on pynetdicom.

Why it exists: every harness run needs at least one PACS it can start, fill, query, retrieve
from and wipe without Docker or a vendor install. This module is that default node. It is
started as a subprocess by the harness::

    python -m harness.embedded_pacs --ae-title LEGACY --port 11112 --storage DIR \\
        --peers PEERS.json [--host 127.0.0.1] [--log-level info] [--timeout 30]

``--port 0`` binds an ephemeral port; the startup line on stderr always names the real one::

    embedded PACS <AE> listening on <host>:<port>

Services: Verification; Storage SCP for every storage SOP class of pynetdicom's
``AllStoragePresentationContexts`` with every transfer syntax; Patient Root and Study Root
Query/Retrieve FIND, MOVE and GET. SIGTERM or SIGINT shut the server down and exit 0.

``PEERS.json`` maps C-MOVE destinations, ``{"AETITLE": {"host": "127.0.0.1", "port": 11113}}``.
It is re-read on every C-MOVE request, so the harness may rewrite it while the server runs
(write it to a temporary name and ``os.replace`` it, so a request never sees half a file).

Safe to expose to a hostile network (PS3.8 7.1.1, 9.1.5): the called AE title must be this
node's (else A-ASSOCIATE-RJ reason 7); with ``--peers``, the calling AE title must be one of
the peers (reason 3; the file is re-read per association). A PDU announcing more than
``MAX_PDU_BYTES`` or starting with an unknown PDU type drops the connection before its body is
read; the A-ASSOCIATE-RQ must arrive within ``--timeout`` seconds (default 30) of connecting
and every later PDU within ``--timeout`` of its first byte, idle associations are aborted
after twice that; so stalled or dripping peers are reaped and cannot hold the 128 association
slots. Wildcard matching never backtracks. SIGTERM exits within a few seconds even while a
request is being served.

Storage layout (stable: the harness adapter reads it directly)::

    DIR/index.sqlite    SQLite index in WAL mode (plus index.sqlite-wal / index.sqlite-shm)
    DIR/files/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
                        each instance exactly as received: preamble, file meta, then the data
                        set bytes unchanged, in the transfer syntax it arrived in
    DIR/tmp/            in-flight writes, moved into files/ with os.replace (never half files)

Schema (``SCHEMA_VERSION`` 1, also in ``PRAGMA user_version``), one row per stored instance.
Text columns are never NULL: an absent attribute is ``''``. Multi-valued text is joined with
a backslash. PN values are Unicode, decoded with the instance's Specific Character Set::

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

Storing the same SOP Instance UID again replaces row and file (status 0x0000). Only what can
be read back is stored: a data set that does not decode to its end (truncated, or mislabelled:
not in the negotiated syntax) is refused with 0xC000, one whose uncompressed pixel data is
shorter than its image attributes announce, or without Study/Series/SOP Instance UID, with
0xA900; each refusal carries an Error Comment naming the reason (PS3.4 B.2.3). Disk or database
errors give 0xA700. Refused C-STOREs leave no row; the log has one line each, no traceback.

Adapter API (import from this module; all safe while the server runs):

* ``open_index(path) -> sqlite3.Connection``: opens ``path`` (the .sqlite file, or DIR),
  creates the schema if missing; autocommit mode, WAL, rows are ``sqlite3.Row``.
* ``statistics(storage_dir) -> {"patients", "studies", "series", "instances"}``
* ``wipe_storage(storage_dir) -> int``: deletes every row and stored file, returns the number
  of rows deleted. It holds the SQLite write lock meanwhile, so a concurrent C-STORE lands
  either entirely before (and is wiped) or entirely after (and is kept).

Retrieval: C-GET and C-MOVE send the stored files. When the receiving association accepted the
stored transfer syntax for the SOP class the data set goes out unchanged (compressed pixel data
included). An uncompressed instance is otherwise converted losslessly to an accepted uncompressed
syntax (implicit/explicit VR little endian, deflated, explicit VR big endian; OW/OF/OL/OD/OV
values byte-swapped across endianness). A compressed instance is decompressed (then converted
likewise) only when the peer accepted no compressed syntax it could use and pydicom has a decoder
(RLE always; JPEG family only with pylibjpeg/GDCM/Pillow); it is never recompressed into another
compressed syntax. If no usable context remains (e.g. a C-GET requestor that did not offer the
SOP class, or offered only another compressed syntax), that C-STORE sub-operation counts as
failed and its SOP Instance UID goes into the Failed SOP Instance UID List: the final status is
0xB000 (warning) if some sub-operations succeeded, or 0xA702 if all failed. The server never
crashes on it.

C-MOVE proposes one presentation context per (SOP class, transfer syntax) pair of the matched
instances, then, room permitting (128 contexts at most), Explicit and Implicit VR Little Endian
for each class, so a destination without the stored syntax gets a conversion. Instances whose
pair did not fit are failed sub-operations.

Retrieve keys are hierarchical unique keys: PatientID (PATIENT), StudyInstanceUID (STUDY),
SeriesInstanceUID (SERIES), SOPInstanceUID (IMAGE), each a single value or a backslash list;
unique keys of higher levels narrow the selection when present. A missing key of the level, an
unknown level, or PATIENT level in Study Root gives 0xA900 (C-FIND too). pynetdicom can only
report a C-GET/C-MOVE handler status after one announced sub-operation, so such a 0xA900
response carries NumberOfFailedSuboperations 1, and a C-MOVE first associates with the
(known) destination. Unknown C-MOVE destination or unreachable destination: 0xA801.

Durability: a C-STORE is acknowledged only after its file was renamed into place and its index
row committed. Neither is fsync'ed (the index runs WAL with synchronous=NORMAL): a crash of the
server process loses nothing acknowledged and never leaves a half file; a power loss may drop
the last acknowledged instances (acceptable for a test node; an fsync per instance cost more
than the insert).

Matching (PS3.4 C.2.2.2) is lenient/relational: any supported key at or above the query level
is a matching key; keys below the level are returned empty. Single value, universal (empty),
``*``/``?`` wildcards (case-sensitive except PN), backslash lists (UID lists, and OR-lists for
other keys), DA/TM ranges ``A-B``, ``-B``, ``A-`` (partial bounds such as ``-2020`` allowed).

Logging goes to stderr: one line per association and one per DIMSE request (its final response,
with the calling AE title and status). Patient names and IDs are never logged, only UIDs.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import copy
import datetime as dt
import hashlib
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom.config
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.multival import MultiValue
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    build_context,
    evt,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

LOG = logging.getLogger("harness.embedded_pacs")

SCHEMA_VERSION = 1
INDEX_FILENAME = "index.sqlite"
FILES_DIRNAME = "files"
TMP_DIRNAME = "tmp"
MAX_CONTEXTS = 128

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3

# --------------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------------

# (column, DICOM keyword) for the attributes copied from each received data set.
_DATASET_COLUMNS: tuple[tuple[str, str], ...] = (
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
    *(col for col, _ in _DATASET_COLUMNS),
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


def _connect(db_file: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db_file, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


def _index_file(path: str | os.PathLike[str]) -> Path:
    """A directory (existing, or not yet created and without a suffix) means DIR/index.sqlite."""
    p = Path(path)
    if p.is_dir() or (not p.exists() and not p.suffix):
        return p / INDEX_FILENAME
    return p


def open_index(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """Open (creating if needed) the SQLite index, so the server and the adapter share one schema.

    ``path`` is the ``index.sqlite`` file or the storage directory holding it. The connection
    is in autocommit mode (use ``BEGIN IMMEDIATE`` for multi-statement writes), in WAL mode so
    readers never block the server, with a 30 s busy timeout and ``sqlite3.Row`` rows.
    """
    db_file = _index_file(path)
    db_file.parent.mkdir(parents=True, exist_ok=True)
    conn = _connect(db_file)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(_SCHEMA)
        if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Hold SQLite's write lock for the block: serialises stores and wipes across processes."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


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
        with _write_transaction(conn):
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


# --------------------------------------------------------------------------------------------
# Query model
# --------------------------------------------------------------------------------------------

LEVELS: tuple[str, ...] = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_PATIENT, _STUDY, _SERIES, _IMAGE = range(4)


@dataclass(frozen=True)
class _Attr:
    column: str | None  # None: computed from the entity's rows
    level: int
    kind: str  # uid, date, time, pn, int, str, list (computed CS list), count, const


_ATTRS: dict[str, _Attr] = {
    "PatientID": _Attr("patient_id", _PATIENT, "str"),
    "PatientName": _Attr("patient_name", _PATIENT, "pn"),
    "PatientBirthDate": _Attr("patient_birth_date", _PATIENT, "date"),
    "PatientSex": _Attr("patient_sex", _PATIENT, "str"),
    "IssuerOfPatientID": _Attr("issuer_of_patient_id", _PATIENT, "str"),
    "NumberOfPatientRelatedStudies": _Attr(None, _PATIENT, "count"),
    "NumberOfPatientRelatedSeries": _Attr(None, _PATIENT, "count"),
    "NumberOfPatientRelatedInstances": _Attr(None, _PATIENT, "count"),
    "StudyInstanceUID": _Attr("study_instance_uid", _STUDY, "uid"),
    "StudyDate": _Attr("study_date", _STUDY, "date"),
    "StudyTime": _Attr("study_time", _STUDY, "time"),
    "AccessionNumber": _Attr("accession_number", _STUDY, "str"),
    "StudyDescription": _Attr("study_description", _STUDY, "str"),
    "StudyID": _Attr("study_id", _STUDY, "str"),
    "ReferringPhysicianName": _Attr("referring_physician_name", _STUDY, "pn"),
    "ModalitiesInStudy": _Attr(None, _STUDY, "list"),
    "SOPClassesInStudy": _Attr(None, _STUDY, "list"),
    "NumberOfStudyRelatedSeries": _Attr(None, _STUDY, "count"),
    "NumberOfStudyRelatedInstances": _Attr(None, _STUDY, "count"),
    "SeriesInstanceUID": _Attr("series_instance_uid", _SERIES, "uid"),
    "Modality": _Attr("modality", _SERIES, "str"),
    "SeriesNumber": _Attr("series_number", _SERIES, "int"),
    "SeriesDescription": _Attr("series_description", _SERIES, "str"),
    "NumberOfSeriesRelatedInstances": _Attr(None, _SERIES, "count"),
    "SOPInstanceUID": _Attr("sop_instance_uid", _IMAGE, "uid"),
    "SOPClassUID": _Attr("sop_class_uid", _IMAGE, "uid"),
    "InstanceNumber": _Attr("instance_number", _IMAGE, "int"),
    "AvailableTransferSyntaxUID": _Attr("transfer_syntax_uid", _IMAGE, "uid"),
}

# Unique key of each level, used for grouping rows into entities and for retrieval.
_LEVEL_KEY = {
    _PATIENT: ("patient_id", "issuer_of_patient_id"),
    _STUDY: ("study_instance_uid",),
    _SERIES: ("series_instance_uid",),
    _IMAGE: ("sop_instance_uid",),
}
_UNIQUE_KEYWORD = {
    _PATIENT: "PatientID",
    _STUDY: "StudyInstanceUID",
    _SERIES: "SeriesInstanceUID",
    _IMAGE: "SOPInstanceUID",
}

_PATIENT_ROOT = {
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
}


class InvalidIdentifier(ValueError):
    """The request identifier cannot be served (status 0xA900)."""


@dataclass
class _Query:
    level: int
    keys: dict[str, list[str]]  # keyword -> non-empty query values (matching keys only)


def _query_values(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, MultiValue | list | tuple):
        items = [str(v) for v in value]
    elif isinstance(value, bytes):
        return []
    else:
        items = str(value).split("\\")
    return [s.strip() for s in items if s is not None and s.strip() != ""]


def _parse_query(identifier: Dataset, model: UID) -> _Query:
    level_name = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level_name not in LEVELS:
        raise InvalidIdentifier(f"QueryRetrieveLevel {level_name!r} not supported")
    level = LEVELS.index(level_name)
    if level == _PATIENT and model not in _PATIENT_ROOT:
        raise InvalidIdentifier("PATIENT level requires the Patient Root model")
    keys: dict[str, list[str]] = {}
    for elem in identifier:
        attr = _ATTRS.get(elem.keyword)
        if attr is None or attr.level > level or elem.VR == "SQ":
            continue
        if attr.kind in ("count", "const"):
            continue
        values = _query_values(elem.value)
        if values and not all(v == "*" for v in values):
            keys[elem.keyword] = values
    return _Query(level, keys)


def _has_wildcard(q: str) -> bool:
    return "*" in q or "?" in q


def wildcard_match(pattern: str, value: str, ignore_case: bool = False) -> bool:
    """PS3.4 C.2.2.2.4 wildcard matching: ``*`` any run of characters, ``?`` exactly one.

    Without backtracking, so a hostile pattern such as ``*A*A*A*A*B`` costs at most
    len(pattern) x len(value) character comparisons: the pattern is split at ``*``; the first
    piece must start the value, the last must end it, and each middle piece is placed at its
    earliest position after the previous one (an earliest placement never loses a match).
    """
    if ignore_case:
        pattern_chars = [c.lower() for c in pattern]
        value_chars = [c.lower() for c in value]
    else:
        pattern_chars, value_chars = list(pattern), list(value)
    pieces: list[list[str]] = [[]]
    for char in pattern_chars:
        if char == "*":
            pieces.append([])
        else:
            pieces[-1].append(char)

    def fits(piece: list[str], at: int) -> bool:
        return all(p == "?" or p == value_chars[at + i] for i, p in enumerate(piece))

    if len(pieces) == 1:
        return len(value_chars) == len(pieces[0]) and fits(pieces[0], 0)
    first, *middle, last = pieces
    end = len(value_chars) - len(last)
    if len(first) > end or not fits(first, 0) or not fits(last, end):
        return False
    position = len(first)
    for piece in middle:
        while position + len(piece) <= end and not fits(piece, position):
            position += 1
        if position + len(piece) > end:
            return False
        position += len(piece)
    return True


def _range(q: str, value: str, strip: str) -> bool:
    lo, hi = (part.strip().replace(strip, "") for part in q.split("-", 1))
    value = value.replace(strip, "")
    if not value:
        return False
    if lo and value < lo:
        return False
    return not (hi and value[: len(hi)] > hi)


def _match_one(kind: str, q: str, value: str) -> bool:
    value = value.strip()
    if kind == "uid":
        return q == value
    if kind in ("date", "time"):
        strip = "." if kind == "date" else ":"
        if "-" in q:
            return _range(q, value, strip)
        if _has_wildcard(q):
            return wildcard_match(q, value)
        q, value = q.replace(strip, ""), value.replace(strip, "")
        return q == value if kind == "date" else bool(value) and value.startswith(q)
    if kind == "pn":
        candidates = {value, value.split("=")[0]}
        if _has_wildcard(q):
            return any(wildcard_match(q, v, ignore_case=True) for v in candidates)
        return any(q.casefold() == v.casefold() for v in candidates)
    if _has_wildcard(q):
        return wildcard_match(q, value)
    if kind == "int":
        try:
            return int(q) == int(value)
        except ValueError:
            return q == value
    return q == value


@dataclass
class _Entity:
    level: int
    rows: list[sqlite3.Row] = field(default_factory=list)

    @property
    def rep(self) -> sqlite3.Row:
        """The most recently received row: its values answer for the entity."""
        return self.rows[-1]

    def distinct(self, column: str) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            if row[column]:
                seen.setdefault(row[column], None)
        return list(seen)

    def computed(self, keyword: str) -> str | list[str]:
        if keyword in ("NumberOfPatientRelatedStudies",):
            return str(len(self.distinct("study_instance_uid")))
        if keyword in ("NumberOfPatientRelatedSeries", "NumberOfStudyRelatedSeries"):
            return str(len(self.distinct("series_instance_uid")))
        if keyword.endswith("RelatedInstances"):
            return str(len(self.rows))
        if keyword == "ModalitiesInStudy":
            return sorted(self.distinct("modality"))
        if keyword == "SOPClassesInStudy":
            return sorted(self.distinct("sop_class_uid"))
        raise KeyError(keyword)

    def matches(self, keys: dict[str, list[str]]) -> bool:
        for keyword, queries in keys.items():
            attr = _ATTRS[keyword]
            if attr.column is None:
                values = list(self.computed(keyword))
                kind = "str"
            else:
                values = self.distinct(attr.column) or [""]
                kind = attr.kind
            if not any(_match_one(kind, q, v) for q in queries for v in values):
                return False
        return True


def _prefilter(query: _Query) -> tuple[str, list[str]]:
    """SQL narrowing on exact keys at or above the level; exact matching is done in Python."""
    clauses: list[str] = []
    params: list[str] = []
    for keyword, values in query.keys.items():
        attr = _ATTRS[keyword]
        if attr.column is None or any(_has_wildcard(v) for v in values):
            continue
        if attr.kind == "uid" or keyword == "PatientID":
            clauses.append(f"{attr.column} IN ({','.join('?' * len(values))})")
            params.extend(values)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    return where, params


def search(conn: sqlite3.Connection, query: _Query) -> list[_Entity]:
    """Group index rows into entities of the query level and keep those that match."""
    where, params = _prefilter(query)
    rows = conn.execute(
        f"SELECT * FROM instances {where} ORDER BY received_at, sop_instance_uid", params
    ).fetchall()
    groups: dict[tuple[str, ...], _Entity] = {}
    key_cols = _LEVEL_KEY[query.level]
    for row in rows:
        key = tuple(row[c] for c in key_cols)
        groups.setdefault(key, _Entity(query.level)).rows.append(row)
    return [e for e in groups.values() if e.matches(query.keys)]


def _response(identifier: Dataset, entity: _Entity, ae_title: str) -> Dataset:
    resp = Dataset()
    resp.SpecificCharacterSet = "ISO_IR 192"
    resp.QueryRetrieveLevel = LEVELS[entity.level]
    for elem in identifier:
        keyword = elem.keyword
        if keyword in ("SpecificCharacterSet", "QueryRetrieveLevel") or elem.tag.is_private:
            continue
        if elem.VR == "SQ":
            resp.add_new(elem.tag, "SQ", [])
            continue
        attr = _ATTRS.get(keyword)
        value: Any = None
        if keyword == "RetrieveAETitle":
            value = ae_title
        elif keyword == "InstanceAvailability":
            value = "ONLINE"
        elif attr is not None and attr.level <= entity.level:
            value = entity.computed(keyword) if attr.column is None else entity.rep[attr.column]
        if value in ("", []):
            value = None
        try:
            resp.add_new(elem.tag, elem.VR, value)
        except Exception:  # a bad stored value must not break the response
            LOG.debug("cannot encode stored value for %s; returned empty", keyword)
            resp.add_new(elem.tag, elem.VR, None)
    if "RetrieveAETitle" not in resp:
        resp.RetrieveAETitle = ae_title
    return resp


def _retrieve_rows(conn: sqlite3.Connection, identifier: Dataset, model: UID) -> list[sqlite3.Row]:
    """Instances selected by a C-GET/C-MOVE identifier: unique keys of the level and above."""
    level_name = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level_name not in LEVELS:
        raise InvalidIdentifier(f"QueryRetrieveLevel {level_name!r} not supported")
    level = LEVELS.index(level_name)
    if level == _PATIENT and model not in _PATIENT_ROOT:
        raise InvalidIdentifier("PATIENT level requires the Patient Root model")
    clauses: list[str] = []
    params: list[str] = []
    for lvl in range(level + 1):
        keyword = _UNIQUE_KEYWORD[lvl]
        values = _query_values(identifier.get(keyword))
        if not values:
            if lvl == level:
                raise InvalidIdentifier(f"{keyword} is required at {level_name} level")
            continue
        column = _ATTRS[keyword].column
        clauses.append(f"{column} IN ({','.join('?' * len(values))})")
        params.extend(values)
    return conn.execute(
        f"SELECT * FROM instances WHERE {' AND '.join(clauses)} ORDER BY study_instance_uid, "
        "series_instance_uid, CAST(instance_number AS INTEGER), sop_instance_uid",
        params,
    ).fetchall()


#: Uncompressed syntaxes, the one a converted instance goes out in first (PS3.5 A.1 to A.5).
_UNCOMPRESSED_PREFERENCE: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
_WORD_TYPECODES = {"OW": "H", "OF": "I", "OL": "I", "OD": "Q", "OV": "Q"}


def _swap_binary_words(ds: Dataset) -> None:
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


def move_contexts(pairs: Iterable[tuple[str, str]]) -> list[PresentationContext]:
    """Contexts for a C-MOVE sub-association: stored syntaxes first so files go out unchanged,
    then explicit and implicit VR little endian for classes stored in another syntax (what
    every Storage SCP accepts, PS3.5 10.1), so a conversion is possible."""
    unique = list(dict.fromkeys((str(c), str(t)) for c, t in pairs))
    wanted = list(unique)
    for sop_class, ts in unique:
        for fallback_ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            fallback = (sop_class, str(fallback_ts))
            if ts != fallback_ts and fallback not in wanted:
                wanted.append(fallback)
    # Exact pairs take precedence over fallbacks when the 128 limit bites.
    return [build_context(c, t) for c, t in wanted[:MAX_CONTEXTS]]


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------


def load_peers(path: str | os.PathLike[str] | None) -> dict[str, tuple[str, int]]:
    """Read the C-MOVE destination table; re-read per request so the harness can edit it live."""
    if path is None:
        return {}
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    peers: dict[str, tuple[str, int]] = {}
    for title, spec in data.items():
        host = spec.get("host") or spec.get("address") or "127.0.0.1"
        peers[str(title).strip()] = (str(host), int(spec["port"]))
    return peers


_SAFE_NAME = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,127}$")


def _safe_component(uid: str) -> str:
    """A UID as a path component; anything odd is hashed so it cannot escape DIR/files."""
    if _SAFE_NAME.match(uid) and ".." not in uid:
        return uid
    return "x" + hashlib.sha1(uid.encode("utf-8", "replace")).hexdigest()


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _prompt_tcp(event: Any) -> None:
    """EVT_CONN_OPEN: no Nagle delay, immediate ACKs (why: harness/dicom/tcp.py; this module
    runs without the package, so it carries this copy)."""
    transport = getattr(getattr(event.assoc, "dul", None), "socket", None)
    sock = getattr(transport, "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if quickack is None:
        return
    plain_recv = transport.recv

    def recv(nr_bytes: int) -> bytearray:
        data = plain_recv(nr_bytes)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
        return data

    transport.recv = recv


# Largest PDU read from a peer, any type (PS3.8 9.3.1): P-DATA-TF is bounded by the maximum
# length we announce (MAX_PDU_RECEIVE) and an A-ASSOCIATE-RQ with 128 contexts fits easily, so
# a larger announcement is hostile or broken: the connection is dropped before reading the body.
MAX_PDU_RECEIVE = 65536
MAX_PDU_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 30.0
SHUTDOWN_GRACE_S = 3.0
VALID_PDU_TYPES = frozenset(range(0x01, 0x08))
_STOPPING = threading.Event()  # set at shutdown: pending reads give up at once
MAX_ASSOCIATIONS = 128  # associations whose A-ASSOCIATE-RQ arrived (PS3.8 local limit)
MAX_AWAITING_REQUEST = 512  # connections still owing their A-ASSOCIATE-RQ (ARTIM running)
_READERS: weakref.WeakKeyDictionary[Any, _GuardedReader] = weakref.WeakKeyDictionary()


class _GuardedReader:
    """Replaces pynetdicom's blocking ``AssociationSocket.recv`` for one connection.

    pynetdicom reads a PDU header, then blocks until the announced number of bytes arrived, with
    no cap and no deadline. Here each PDU must arrive whole within ``timeout_s`` of its first
    byte, the A-ASSOCIATE-RQ within ``timeout_s`` of the connection (ARTIM, PS3.8 9.1.5), an
    unknown PDU type or a length above MAX_PDU_BYTES drops the connection at once. A dropped or
    late read returns short, which pynetdicom treats as a closed transport (Evt17).
    """

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self.sock = sock
        self.timeout_s = timeout_s
        self.opened = time.monotonic()
        self.deadline = self.opened + timeout_s
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        self.quickack = getattr(socket, "TCP_QUICKACK", None)
        self._body_pending = False
        self.request_read = False  # the first PDU (the A-ASSOCIATE-RQ) has been read

    def _peer(self) -> str:
        try:
            host, port = self.sock.getpeername()[:2]
        except OSError:
            return "?"
        return f"{host}:{port}"

    def _drop(self, why: str) -> bytearray:
        LOG.warning("connection from %s dropped: %s", self._peer(), why)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        return bytearray()

    def recv(self, nr_bytes: int) -> bytearray:
        header = nr_bytes == 6 and not self._body_pending
        if header:
            self.deadline = time.monotonic() + self.timeout_s
            if not self.request_read:
                self.deadline = min(self.deadline, self.opened + self.timeout_s)
        data = bytearray()
        while len(data) < nr_bytes:
            remaining = self.deadline - time.monotonic()
            if _STOPPING.is_set():
                return self._drop("server shutting down")
            if remaining <= 0:
                what = "PDU" if self.request_read else "A-ASSOCIATE-RQ"
                return self._drop(f"{what} incomplete after {self.timeout_s:g} s")
            if not self.poller.poll(min(remaining, 0.5) * 1000):
                continue
            try:
                chunk = self.sock.recv(min(nr_bytes - len(data), 65536))
            except OSError:
                return bytearray()
            if not chunk:
                return data
            data += chunk
        if self.quickack is not None:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.IPPROTO_TCP, self.quickack, 1)
        if header:
            pdu_type, length = data[0], int.from_bytes(data[2:6], "big")
            if pdu_type not in VALID_PDU_TYPES:
                return self._drop(f"not DICOM (first byte 0x{pdu_type:02X})")
            if not self.request_read and pdu_type != 0x01:
                return self._drop(f"PDU type 0x{pdu_type:02X} before A-ASSOCIATE-RQ")
            if length > MAX_PDU_BYTES:
                return self._drop(f"PDU of {length} bytes announced (limit {MAX_PDU_BYTES})")
            self._body_pending = length > 0
            self.request_read = True
        else:
            self._body_pending = False
        return data


def _awaiting_request(associations: Iterable[Any]) -> int:
    """How many of these connections have not yet delivered their A-ASSOCIATE-RQ."""
    count = 0
    for assoc in associations:
        reader = _READERS.get(assoc)
        count += reader is not None and not reader.request_read
    return count


def _guard_connection(timeout_s: float) -> Any:
    """EVT_CONN_OPEN handler of the server: prompt TCP plus the guarded reader; beyond
    MAX_AWAITING_REQUEST silent connections a new one is closed at once (bounds the threads
    a connection flood costs while ARTIM reaps the silent ones)."""

    def on_open(event: Any) -> None:
        _prompt_tcp(event)
        transport = getattr(getattr(event.assoc, "dul", None), "socket", None)
        sock = getattr(transport, "socket", None)
        if sock is None:
            return
        reader = _GuardedReader(sock, timeout_s)
        if _awaiting_request(event.assoc.ae.active_associations) >= MAX_AWAITING_REQUEST:
            reader._drop(f"{MAX_AWAITING_REQUEST} connections already owe an A-ASSOCIATE-RQ")
        _READERS[event.assoc] = reader
        transport.recv = reader.recv

    return on_open


def _calling(event: Any) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except Exception:
        return "?"


def _refusal(status: int, reason: str) -> Dataset:
    """A C-STORE response status with its Error Comment (LO: 64 characters at most)."""
    answer = Dataset()
    answer.Status = status
    answer.ErrorComment = reason[:64]
    return answer


def _unreadable(ds: Dataset) -> str:
    """Why a received data set cannot be read back in full ('' when it can)."""
    try:
        for elem in ds.iterall():  # decodes every element, sequence items included
            _ = elem.value
    except Exception as exc:
        return f"data set does not parse: {type(exc).__name__}"
    return ""


def _mismatch(ds: Dataset) -> str:
    """Why a data set does not hold what its attributes announce ('' when it does): here,
    uncompressed pixel data shorter than its Image Pixel attributes require (PS3.5 8.1.1;
    YBR_FULL_422 takes two samples a pixel, PS3.3 C.7.6.3.1.2), which is how a truncated
    file shows once received."""
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    if "PixelData" not in ds or syntax.is_compressed:
        return ""
    try:
        expected = get_expected_length(ds, unit="bytes")
    except (AttributeError, KeyError, TypeError, ValueError):
        return "pixel data without Rows, Columns or Bits Allocated"
    if len(ds.PixelData) < expected:
        return f"pixel data {len(ds.PixelData)} bytes, expected {expected}"
    return ""


class _PacsAE(AE):
    """An AE whose accepted calling AE titles are the peers file's, re-read per association so
    the harness may edit the topology live; no peers file: any calling AE title is accepted."""

    peers_file: Path | None = None

    @property  # type: ignore[override]
    def maximum_associations(self) -> int:
        """The local limit (PS3.8 9.3.4 reason 2) counts only associations whose request
        arrived: silent connections, reaped by ARTIM, cannot lock honest peers out."""
        return self._maximum_associations + _awaiting_request(self.active_associations)

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        self._maximum_associations = max(1, int(value))

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        if self.peers_file is None:
            return []
        try:
            return list(load_peers(self.peers_file))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            LOG.error(
                "peers file %s unusable, only %s may call: %s", self.peers_file, self.ae_title, exc
            )
            return [self.ae_title]


class EmbeddedPacs:
    """State shared by the handlers: storage paths, peers file, a write lock and request notes."""

    def __init__(
        self,
        ae_title: str,
        storage_dir: Path,
        peers_file: Path | None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.ae_title = ae_title
        self.timeout_s = timeout_s
        self.storage = storage_dir
        self.files_dir = storage_dir / FILES_DIRNAME
        self.tmp_dir = storage_dir / TMP_DIRNAME
        self.db_file = storage_dir / INDEX_FILENAME
        self.peers_file = peers_file
        self.ae: AE | None = None
        self._write_lock = threading.Lock()
        self._store_conn: sqlite3.Connection | None = None  # held by stores, under _write_lock
        self._notes: dict[tuple[int, int], str] = {}
        self._notes_lock = threading.Lock()

    # -- setup ---------------------------------------------------------------------------------

    def prepare_storage(self) -> None:
        """Create the layout and schema; drop temp files a crashed predecessor left behind."""
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp_dir.iterdir():
            with contextlib.suppress(OSError):
                stale.unlink()
        open_index(self.db_file).close()

    def build_ae(self) -> AE:
        """An AE offering exactly the services the harness expects of a legacy PACS.

        Called AE title must be ours and calling AE title one of the peers (PS3.8 7.1.1.6,
        rejected with reasons 7 and 3). Slow or stalled peers are dropped by the deadlines of
        ``_GuardedReader`` and the idle timeout, so the association limit is high enough for
        honest peers to get in while hostile ones wait to be reaped.
        """
        ae = _PacsAE(ae_title=self.ae_title)
        ae.peers_file = self.peers_file
        ae.require_called_aet = True
        ae.maximum_associations = MAX_ASSOCIATIONS
        ae.maximum_pdu_size = MAX_PDU_RECEIVE
        ae.acse_timeout = self.timeout_s
        ae.dimse_timeout = 2 * self.timeout_s
        ae.network_timeout = 2 * self.timeout_s
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(
                cx.abstract_syntax, ALL_TRANSFER_SYNTAXES, scp_role=True, scu_role=False
            )
        for model in (
            PatientRootQueryRetrieveInformationModelFind,
            PatientRootQueryRetrieveInformationModelMove,
            PatientRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelMove,
            StudyRootQueryRetrieveInformationModelGet,
        ):
            ae.add_supported_context(model)
        self.ae = ae
        return ae

    def handlers(self) -> list[tuple[Any, Any]]:
        """Event bindings for ``AE.start_server``."""
        return [
            (evt.EVT_CONN_OPEN, _guard_connection(self.timeout_s)),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_GET, self.on_get),
            (evt.EVT_C_MOVE, self.on_move),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_DIMSE_SENT, self.on_dimse_sent),
        ]

    # -- logging -------------------------------------------------------------------------------

    def _note(self, event: Any, text: str) -> None:
        """Attach detail to the request; it is logged with the final response's status."""
        key = (id(event.assoc), int(event.request.MessageID))
        with self._notes_lock:
            self._notes[key] = text

    def on_accepted(self, event: Any) -> None:
        req = event.assoc.requestor
        LOG.info(
            "association accepted calling=%s peer=%s:%s", _calling(event), req.address, req.port
        )

    def on_rejected(self, event: Any) -> None:
        LOG.warning("association rejected calling=%s", _calling(event))

    def on_aborted(self, event: Any) -> None:
        LOG.warning("association aborted calling=%s", _calling(event))

    def on_released(self, event: Any) -> None:
        LOG.debug("association released calling=%s", _calling(event))

    def on_dimse_sent(self, event: Any) -> None:
        """Log each request once, when its final (non-pending) response goes out."""
        msg = event.message
        name = type(msg).__name__
        if not name.endswith("_RSP"):
            return
        cs = msg.command_set
        status = int(cs.get("Status", 0))
        if status in (0xFF00, 0xFF01):
            return
        msg_id = int(cs.get("MessageIDBeingRespondedTo", 0))
        with self._notes_lock:
            note = self._notes.pop((id(event.assoc), msg_id), "")
        parts = [
            name.replace("_", "-"),
            f"calling={_calling(event)}",
            f"msg_id={msg_id}",
            f"status=0x{status:04X}",
        ]
        if name == "C_STORE_RSP":
            parts.append(f"sop={cs.get('AffectedSOPInstanceUID', '')}")
        if name in ("C_GET_RSP", "C_MOVE_RSP"):
            parts.append(
                "completed={} failed={} warning={}".format(
                    cs.get("NumberOfCompletedSuboperations", 0),
                    cs.get("NumberOfFailedSuboperations", 0),
                    cs.get("NumberOfWarningSuboperations", 0),
                )
            )
        if note:
            parts.append(note)
        LOG.info(" ".join(str(p) for p in parts))

    # -- services ------------------------------------------------------------------------------

    def on_echo(self, event: Any) -> int:
        """Verification always succeeds: the node is alive if it answers."""
        return 0x0000

    def on_store(self, event: Any) -> int | Dataset:
        """Store the bytes exactly as received, then index them (see module docstring).

        Only what can be read back is stored: a data set that does not parse to its end in
        the negotiated syntax, or whose pixel data is shorter than its image attributes say,
        is refused with 0xC000 or 0xA900 and an Error Comment naming the reason (PS3.4 B.2.3),
        instead of failing later when it is retrieved.
        """
        req = event.request
        try:
            data = event.encoded_dataset()
            ds = dcmread(BytesIO(data))
            problem = _unreadable(ds)
        except Exception as exc:
            problem = f"data set does not decode: {type(exc).__name__}"
        if problem:
            self._note(event, f"refused: {problem}")
            return _refusal(0xC000, problem)
        try:
            sop_instance = _text(ds, "SOPInstanceUID")
            sop_class = _text(ds, "SOPClassUID") or str(req.AffectedSOPClassUID)
            values = {col: _text(ds, kw) for col, kw in _DATASET_COLUMNS}
            charset = _text(ds, "SpecificCharacterSet")
            problem = _mismatch(ds)
        except Exception as exc:
            problem = f"attribute values do not decode: {type(exc).__name__}"
        if problem:
            self._note(event, f"refused: {problem}")
            return _refusal(0xA900, problem)
        study, series = values["study_instance_uid"], values["series_instance_uid"]
        if not (sop_instance and study and series):
            self._note(event, "refused: missing Study/Series/SOP Instance UID")
            return _refusal(0xA900, "missing Study, Series or SOP Instance UID")
        status = 0x0000
        if sop_instance != str(req.AffectedSOPInstanceUID) or sop_class != str(
            req.AffectedSOPClassUID
        ):
            status = 0xB007
        rel = "/".join(
            (
                FILES_DIRNAME,
                _safe_component(study),
                _safe_component(series),
                _safe_component(sop_instance) + ".dcm",
            )
        )
        final = self.storage / rel
        tmp_name: str | None = None
        try:
            fd, tmp_name = tempfile.mkstemp(prefix="store-", suffix=".part", dir=self.tmp_dir)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            row = {
                **values,
                "sop_instance_uid": sop_instance,
                "sop_class_uid": sop_class,
                "transfer_syntax_uid": str(event.context.transfer_syntax),
                "specific_character_set": charset,
                "path": rel,
                "size_bytes": len(data),
                "received_at": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                "calling_ae_title": _calling(event),
                "store_status": status,
            }
            with self._write_lock:
                conn = self._index_for_stores()
                try:
                    with _write_transaction(conn):
                        old = conn.execute(
                            "SELECT path FROM instances WHERE sop_instance_uid = ?",
                            (sop_instance,),
                        ).fetchone()
                        final.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(tmp_name, final)
                        tmp_name = None
                        conn.execute(_INSERT_INSTANCE, [row[c] for c in COLUMNS])
                except sqlite3.Error:
                    self._close_store_index()  # the next store starts from a fresh connection
                    raise
            if old is not None and old["path"] != rel:
                with contextlib.suppress(OSError):
                    (self.storage / old["path"]).unlink()
            if old is not None:
                self._note(event, "replaced")
        except (OSError, sqlite3.Error) as exc:
            LOG.error("C-STORE cannot be stored: %s: %s", type(exc).__name__, exc)
            return 0xA700
        finally:
            if tmp_name is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
        return status

    def _index_for_stores(self) -> sqlite3.Connection:
        """The connection stores share (caller holds ``_write_lock``): opening one per instance
        cost more than the insert, and closing the last connection checkpoints the WAL.
        synchronous=NORMAL: a commit reaches the OS, not the platter (module docstring)."""
        if self._store_conn is None:
            self._store_conn = _connect(self.db_file)
            self._store_conn.execute("PRAGMA synchronous = NORMAL")
        return self._store_conn

    def _close_store_index(self) -> None:
        if self._store_conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._store_conn.close()
            self._store_conn = None

    def on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        """C-FIND over the index; see the module docstring for the matching rules."""
        model = UID(event.request.AffectedSOPClassUID)
        try:
            identifier = event.identifier
            query = _parse_query(identifier, model)
        except InvalidIdentifier as exc:
            self._note(event, f"invalid identifier: {exc}")
            yield 0xA900, None
            return
        except Exception as exc:
            self._note(event, f"undecodable identifier: {type(exc).__name__}")
            yield 0xC310, None
            return
        try:
            conn = _connect(self.db_file)
            try:
                entities = search(conn, query)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            self._note(event, f"index error: {exc}")
            yield 0xC311, None
            return
        self._note(event, f"level={LEVELS[query.level]} matches={len(entities)}")
        for entity in entities:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, _response(identifier, entity, self.ae_title)

    def _select(self, event: Any) -> list[sqlite3.Row]:
        model = UID(event.request.AffectedSOPClassUID)
        conn = _connect(self.db_file)
        try:
            return _retrieve_rows(conn, event.identifier, model)
        finally:
            conn.close()

    def _payload(
        self, row: sqlite3.Row, accepted: list[PresentationContext] | None
    ) -> Dataset | None:
        """The stored instance to send, in a syntax the peer accepted for its class.

        As stored when the peer accepted that syntax. An uncompressed instance is otherwise
        converted losslessly to an accepted uncompressed syntax (binary OW/OF/OL/OD/OV values
        byte-swapped when the endianness changes, PS3.5 7.3; pydicom re-encodes the rest).
        A compressed one is decompressed when the peer accepted only uncompressed syntaxes
        for the class and pydicom has a decoder, then converted the same way; otherwise it
        goes as stored and, lacking a context, fails that sub-operation.
        """
        try:
            ds = dcmread(self.storage / row["path"])
        except Exception as exc:
            LOG.error(
                "cannot read stored instance %s: %s", row["sop_instance_uid"], type(exc).__name__
            )
            return None
        if accepted is None:
            return ds
        ts = UID(ds.file_meta.TransferSyntaxUID)
        syntaxes = [
            UID(cx.transfer_syntax[0])
            for cx in accepted
            if cx.abstract_syntax == row["sop_class_uid"] and cx.transfer_syntax
        ]
        uncompressed = [s for s in syntaxes if not s.is_compressed]
        if ts in syntaxes or not uncompressed:
            return ds
        if ts.is_compressed:
            try:
                ds.decompress(generate_instance_uid=False)
                LOG.debug("decompressed %s for a peer without %s", row["sop_instance_uid"], ts)
            except Exception as exc:  # no decoder: the sub-operation fails
                LOG.warning(
                    "cannot decompress %s (%s): %s",
                    row["sop_instance_uid"],
                    ts.name,
                    type(exc).__name__,
                )
                return ds
            ts = UID(ds.file_meta.TransferSyntaxUID)
            if ts in syntaxes:
                return ds
        if any(s.is_little_endian == ts.is_little_endian for s in uncompressed):
            return ds  # pynetdicom converts VR encoding and deflation itself
        target = min(uncompressed, key=_UNCOMPRESSED_PREFERENCE.index)
        try:
            _swap_binary_words(ds)  # also decodes every element in the stored encoding
            correct_ambiguous_vr(ds, target.is_little_endian)
        except Exception as exc:
            LOG.warning("cannot convert %s: %s", row["sop_instance_uid"], type(exc).__name__)
            return ds
        ds.set_original_encoding(target.is_implicit_VR, target.is_little_endian)
        ds.file_meta.TransferSyntaxUID = target
        return ds

    def _retrieve(
        self, event: Any, rows: list[sqlite3.Row], accepted: list[PresentationContext] | None
    ) -> Iterator[tuple[int, Dataset | None]]:
        for row in rows:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            ds = self._payload(row, accepted)
            if ds is None:
                # Unreadable file: a stub without SOP Class UID makes pynetdicom's C-STORE
                # raise, which it counts as a failed sub-operation listing this UID.
                ds = Dataset()
                ds.SOPInstanceUID = row["sop_instance_uid"]
            yield 0xFF00, ds

    def on_get(self, event: Any) -> Iterator[int | tuple[int, Dataset | None]]:
        """C-GET: C-STORE the matched files back over the requestor's association."""
        try:
            rows = self._select(event)
        except InvalidIdentifier as exc:
            self._note(event, f"invalid identifier: {exc}")
            yield 1
            yield 0xA900, None
            return
        except Exception as exc:
            self._note(event, f"cannot process: {type(exc).__name__}")
            yield 1
            yield 0xC410, None
            return
        self._note(event, f"matches={len(rows)}")
        yield len(rows)
        accepted = [cx for cx in event.assoc.accepted_contexts if cx.as_scu]
        yield from self._retrieve(event, rows, accepted)

    def on_move(self, event: Any) -> Iterator[Any]:
        """C-MOVE: open an association to the destination named in the peers file and send."""
        dest = str(event.move_destination or "").strip()
        try:
            peers = load_peers(self.peers_file)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            LOG.error("peers file %s unusable: %s", self.peers_file, exc)
            peers = {}
        if dest not in peers:
            self._note(event, f"unknown destination {dest!r}")
            yield None, None
            return
        host, port = peers[dest]
        try:
            rows = self._select(event)
        except Exception as exc:
            invalid = isinstance(exc, InvalidIdentifier)
            self._note(
                event,
                f"dest={dest} "
                + (
                    f"invalid identifier: {exc}"
                    if invalid
                    else f"cannot process: {type(exc).__name__}"
                ),
            )
            # pynetdicom only reports a handler status after the destination is associated.
            yield host, port, {"contexts": [build_context(Verification)]}
            yield 1
            yield (0xA900 if invalid else 0xC510), None
            return
        self._note(event, f"dest={dest} matches={len(rows)}")
        contexts = move_contexts((r["sop_class_uid"], r["transfer_syntax_uid"]) for r in rows)
        assert self.ae is not None
        before = list(self.ae.active_associations)
        yield (
            host,
            port,
            {
                "contexts": contexts or [build_context(Verification)],
                "evt_handlers": [(evt.EVT_CONN_OPEN, _prompt_tcp)],
            },
        )
        yield len(rows)
        accepted = self._store_assoc_contexts(before, dest, port)
        yield from self._retrieve(event, rows, accepted)

    def _store_assoc_contexts(
        self, before: list[Any], dest: str, port: int
    ) -> list[PresentationContext] | None:
        """Accepted contexts of the sub-association pynetdicom just opened, if identifiable.

        None (ambiguous, e.g. two simultaneous moves to the same peer) means: send as stored
        and let pynetdicom choose; only the decompression fallback is lost.
        """
        assert self.ae is not None
        found = [
            a
            for a in self.ae.active_associations
            if a not in before
            and a.is_requestor
            and a.is_established
            and str(a.acceptor.ae_title).strip() == dest
            and a.acceptor.port == port
        ]
        return list(found[0].accepted_contexts) if len(found) == 1 else None


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


class _ContextTemplates(list):
    """The server's supported presentation contexts (PS3.8 9.3.3.2). pynetdicom deep-copies
    them for every association it accepts: 50-270 ms for 177 SOP classes x 45 transfer syntaxes,
    paid before each association's first C-STORE. A copy of each context with its own syntax
    list is as independent (UIDs are immutable strings) and takes ~2 ms."""

    def __deepcopy__(self, memo: dict) -> list:
        copies = []
        for context in self:
            twin = copy.copy(context)
            twin._transfer_syntax = list(context._transfer_syntax)
            copies.append(twin)
        return copies


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m harness.embedded_pacs",
        description="Embedded PACS: Verification, Storage and Query/Retrieve SCP.",
    )
    parser.add_argument("--ae-title", required=True, help="AE title of this node (max 16)")
    parser.add_argument("--port", type=int, required=True, help="TCP port, 0 for ephemeral")
    parser.add_argument("--storage", type=Path, required=True, help="storage directory")
    parser.add_argument(
        "--peers",
        type=Path,
        default=None,
        help="JSON of C-MOVE destinations, re-read on every C-MOVE",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds a peer has for its A-ASSOCIATE-RQ and for each PDU once started "
        f"(idle and DIMSE timeouts are twice this; default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    args = parser.parse_args(argv)
    title = args.ae_title.strip()
    if not title or len(title) > 16 or "\\" in title or not title.isprintable():
        parser.error(f"--ae-title {args.ae_title!r}: 1-16 printable characters, no backslash")
    if not args.timeout > 0:
        parser.error(f"--timeout {args.timeout}: must be positive")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: out of range")
    args.ae_title = title
    return args


def _one_line(record: logging.LogRecord) -> bool:
    """Log records without tracebacks: pynetdicom logs one when a sub-operation cannot be
    sent (no context for the class); the message line says enough for a test node's log."""
    if record.exc_info:
        exc = record.exc_info[1]
        record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
        record.args = None
        record.exc_info = None
        record.exc_text = None
    record.stack_info = None
    return True


def _configure_logging(level: str, ae_title: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_one_line)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s embedded-pacs[{ae_title}] %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # pynetdicom's and pydicom's own messages can carry identifiers: warnings and errors only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    # Validation messages quote values (names included); stored data is kept as received.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE


def serve(
    ae_title: str,
    port: int,
    storage_dir: Path,
    peers_file: Path | None,
    host: str = "127.0.0.1",
    stop: threading.Event | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> int:
    """Run the node until ``stop`` is set (or SIGTERM/SIGINT in the main thread); exit code."""
    pacs = EmbeddedPacs(ae_title, storage_dir.resolve(), peers_file, timeout_s)
    try:
        pacs.prepare_storage()
    except (OSError, sqlite3.Error) as exc:
        print(f"embedded PACS {ae_title}: storage {storage_dir} unusable: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    ae = pacs.build_ae()
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    try:
        server = ae.start_server((host, port), block=False, evt_handlers=pacs.handlers())
    except OSError as exc:
        print(f"embedded PACS {ae_title}: cannot bind {host}:{port}: {exc}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    assert server is not None
    server.contexts = _ContextTemplates(server.contexts)
    bound_port = server.server_address[1]
    print(f"embedded PACS {ae_title} listening on {host}:{bound_port}", file=sys.stderr, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        LOG.info("shutting down")
        _STOPPING.set()  # guarded reads give up, so no thread waits on a peer
        closer = threading.Thread(target=ae.shutdown, name="shutdown", daemon=True)
        closer.start()
        closer.join(SHUTDOWN_GRACE_S)
        if closer.is_alive():
            LOG.warning("associations still busy after %g s; exiting anyway", SHUTDOWN_GRACE_S)
        else:
            with pacs._write_lock:
                pacs._close_store_index()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    args = _parse_args(argv)
    _configure_logging(args.log_level, args.ae_title)
    return serve(
        args.ae_title, args.port, args.storage, args.peers, host=args.host, timeout_s=args.timeout
    )


if __name__ == "__main__":
    code = main()
    # pynetdicom's reactor threads are not daemons and a handler may still be busy (a long
    # C-FIND): exit now rather than wait for them; stores are atomic and SQLite is journalled.
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)
