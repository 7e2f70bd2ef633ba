"""Modality Performed Procedure Step SCP of the embedded PACS (PS3.4 F.7).

A modality N-CREATEs a step "IN PROGRESS" and N-SETs it until it is "COMPLETED" or
"DISCONTINUED"; a finished step is final (PS3.4 F.7.2.2.2: status 0x0110, Error ID A710, "may
no longer be updated"). Steps are kept in ``DIR/mpps.sqlite`` (its own file beside the image
index, so the image index's schema is untouched), one row per step with its attributes as
DICOM JSON (PS3.18 F.2), so the harness reads back what a modality reported (``read_steps``).

Statuses answered (PS3.4 F.7.2.1.2, F.7.2.2.2, PS3.7 C): 0x0111 duplicate SOP instance,
0x0106 invalid attribute value (a status other than IN PROGRESS at creation, or not one of the
three), 0x0112 no such SOP instance, 0x0110 a finished step N-SET again.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.uid import generate_uid

from harness import sqlite_db

MPPS_FILE = "mpps.sqlite"
SCHEMA_VERSION = 1
STATUSES = ("IN PROGRESS", "COMPLETED", "DISCONTINUED")
SCHEMA = """
CREATE TABLE IF NOT EXISTS steps (
    sop_instance_uid   TEXT PRIMARY KEY,  -- the MPPS instance (Affected SOP Instance UID)
    status             TEXT NOT NULL,     -- (0040,0252) PerformedProcedureStepStatus
    calling_ae_title   TEXT NOT NULL,     -- the modality that created it
    created_at         TEXT NOT NULL,     -- ISO 8601 UTC
    updated_at         TEXT NOT NULL,
    attributes         TEXT NOT NULL      -- the step's attributes, DICOM JSON (PS3.18 F.2)
);
"""


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def open_steps(storage_dir: Path):
    """The step table of `storage_dir` (created when missing)."""
    conn = sqlite_db.connect(Path(storage_dir) / MPPS_FILE)
    sqlite_db.check_schema_version(conn, SCHEMA_VERSION, what=f"MPPS table {storage_dir}")
    conn.executescript(SCHEMA)
    sqlite_db.set_schema_version(conn, SCHEMA_VERSION)
    return conn


def read_steps(storage_dir: Path) -> dict[str, tuple[str, Dataset]]:
    """Every step kept: MPPS SOP Instance UID -> (status, attributes)."""
    if not (Path(storage_dir) / MPPS_FILE).exists():
        return {}
    conn = open_steps(storage_dir)
    try:
        rows = conn.execute("SELECT sop_instance_uid, status, attributes FROM steps").fetchall()
    finally:
        conn.close()
    return {r[0]: (r[1], Dataset.from_json(r[2])) for r in rows}


def _failure(code: int, comment: str) -> Dataset:
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]  # LO
    return status


def _calling(event: Any) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except Exception:  # noqa: BLE001
        return "?"


def handle_n_create(event: Any, storage_dir: Path, note: Any) -> tuple[Any, Dataset | None]:
    """EVT_N_CREATE: a new step, IN PROGRESS (PS3.4 F.7.2.1)."""
    uid = str(event.request.AffectedSOPInstanceUID or "") or generate_uid()
    attributes = event.attribute_list
    status = str(attributes.get("PerformedProcedureStepStatus", ""))
    note(f"mpps={uid} status={status!r}")
    if status != "IN PROGRESS":
        return _failure(0x0106, "PerformedProcedureStepStatus must be IN PROGRESS"), None
    conn = open_steps(storage_dir)
    try:
        with sqlite_db.transaction(conn):
            if conn.execute("SELECT 1 FROM steps WHERE sop_instance_uid = ?", (uid,)).fetchone():
                return _failure(0x0111, "duplicate MPPS SOP Instance UID"), None
            conn.execute(
                "INSERT INTO steps VALUES (?, ?, ?, ?, ?, ?)",
                (uid, status, _calling(event), _now(), _now(), attributes.to_json()),
            )
    finally:
        conn.close()
    return 0x0000, attributes


def handle_n_set(event: Any, storage_dir: Path, note: Any) -> tuple[Any, Dataset | None]:
    """EVT_N_SET: changes to an IN PROGRESS step; a finished one is refused (F.7.2.2.2)."""
    uid = str(event.request.RequestedSOPInstanceUID or "")
    changes = event.modification_list
    conn = open_steps(storage_dir)
    try:
        with sqlite_db.transaction(conn):
            row = conn.execute(
                "SELECT status, attributes FROM steps WHERE sop_instance_uid = ?", (uid,)
            ).fetchone()
            if row is None:
                note(f"mpps={uid} unknown")
                return _failure(0x0112, "no such MPPS instance"), None
            if row[0] != "IN PROGRESS":
                note(f"mpps={uid} already {row[0]}")
                return _failure(0x0110, f"A710: step already {row[0]}"), None
            current = Dataset.from_json(row[1])
            for element in changes:
                current[element.tag] = element
            status = str(current.get("PerformedProcedureStepStatus", ""))
            if status not in STATUSES:
                return _failure(0x0106, f"PerformedProcedureStepStatus {status!r}"), None
            conn.execute(
                "UPDATE steps SET status = ?, updated_at = ?, attributes = ? "
                "WHERE sop_instance_uid = ?",
                (status, _now(), current.to_json(), uid),
            )
    finally:
        conn.close()
    note(f"mpps={uid} status={status!r}")
    return 0x0000, changes
