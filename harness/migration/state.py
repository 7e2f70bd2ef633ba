"""The migrator's resumable state: a SQLite file, and what one run records in it.

Why a file: a run that is killed, even with SIGKILL, must resume with the same plan (the
source's study list), send no study confirmed on the target again, and keep every send
attempt for the audit. Each study's outcome is written in its own transaction, so the file
is consistent after every study.

Schema (SQLite, WAL; ``PRAGMA user_version`` = ``STATE_SCHEMA_VERSION``)::

    meta(key TEXT PRIMARY KEY, value TEXT)      source_ae, target_ae, created_at, ...
    studies(study_instance_uid TEXT PRIMARY KEY,
            position INTEGER,                   order in the plan
            state TEXT,                         pending | confirmed | failed
            source_instances INTEGER,           SOP instances the source listed (NULL: not yet)
            attempts INTEGER,                   send attempts over all runs
            confirmed_run INTEGER,              run that confirmed it
            last_error TEXT, updated_at TEXT)
    instances(sop_instance_uid TEXT PRIMARY KEY, study_instance_uid, series_instance_uid,
              confirmed INTEGER)                0/1: seen on the target
    sends(id INTEGER PRIMARY KEY, run_id, study_instance_uid, attempt, method,
          started_at, finished_at,              finished_at NULL: the process died meanwhile
          instances_sent, ok, error)            one row per attempt that sent something
    runs(run_id INTEGER PRIMARY KEY, pid, method, started_at, finished_at, result_json)
    unstable_listings(id INTEGER PRIMARY KEY, run_id, study_instance_uid,
                      detail,                   one read that disagreed, or the give-up
                      settled INTEGER, at)      1: a later read agreed; 0: it never did
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import sqlite_db
from harness.errors import ConfigError, HarnessError

STATE_SCHEMA_VERSION = 2  # 2: table unstable_listings (a version 1 file gains it)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    position           INTEGER NOT NULL,
    state              TEXT NOT NULL DEFAULT 'pending'
                       CHECK (state IN ('pending', 'confirmed', 'failed')),
    source_instances   INTEGER,
    attempts           INTEGER NOT NULL DEFAULT 0,
    confirmed_run      INTEGER,
    last_error         TEXT,
    updated_at         TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid    TEXT PRIMARY KEY,
    study_instance_uid  TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    confirmed           INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_instance_uid);
CREATE TABLE IF NOT EXISTS sends (
    id                 INTEGER PRIMARY KEY,
    run_id             INTEGER NOT NULL,
    study_instance_uid TEXT NOT NULL,
    attempt            INTEGER NOT NULL,
    method             TEXT NOT NULL,
    started_at         TEXT NOT NULL,
    finished_at        TEXT,
    instances_sent     INTEGER,
    ok                 INTEGER,
    error              TEXT
);
CREATE INDEX IF NOT EXISTS sends_study ON sends (study_instance_uid);
CREATE TABLE IF NOT EXISTS unstable_listings (
    id                 INTEGER PRIMARY KEY,
    run_id             INTEGER NOT NULL,
    study_instance_uid TEXT NOT NULL,
    detail             TEXT NOT NULL,
    settled            INTEGER NOT NULL,
    at                 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id      INTEGER PRIMARY KEY,
    pid         INTEGER NOT NULL,
    method      TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    result_json TEXT
);
"""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class MigrationError(HarnessError):
    """One attempt at one study went wrong (retried, then recorded per study)."""


def describe_error(exc: BaseException) -> str:
    """One line for an exception, as outcomes and the sends table record it."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


# ---------------------------------------------------------------------------------------
# results


@dataclass
class StudyOutcome:
    """What happened to one study in this run."""

    study_instance_uid: str
    status: str  # migrated | skipped_already_confirmed | already_on_target | failed
    instances: int = 0  # SOP instances the source holds
    instances_sent: int = 0
    attempts: int = 0
    elapsed_s: float = 0.0
    error: str | None = None
    unstable_listings: list[str] = field(default_factory=list)  # reads that disagreed


@dataclass
class MigrationResult:
    """Totals of one run; `ok` when no study failed."""

    method: str
    source: str
    target: str
    studies_total: int = 0
    migrated: int = 0
    skipped_already_confirmed: int = 0
    already_on_target: int = 0
    failed: int = 0
    instances_sent: int = 0
    retries_used: int = 0
    elapsed_s: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)  # study UID -> last error
    # study UID -> reads of its listing that disagreed (settled or not)
    unstable_listings: dict[str, list[str]] = field(default_factory=dict)
    outcomes: list[StudyOutcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def add(self, outcome: StudyOutcome) -> None:
        self.outcomes.append(outcome)
        self.instances_sent += outcome.instances_sent
        self.retries_used += max(0, outcome.attempts - 1)
        if outcome.unstable_listings:
            self.unstable_listings[outcome.study_instance_uid] = list(outcome.unstable_listings)
        if outcome.status == "migrated":
            self.migrated += 1
        elif outcome.status == "skipped_already_confirmed":
            self.skipped_already_confirmed += 1
        elif outcome.status == "already_on_target":
            self.already_on_target += 1
        else:
            self.failed += 1
            self.errors[outcome.study_instance_uid] = outcome.error or "failed"

    def as_dict(self, with_outcomes: bool = False) -> dict[str, Any]:
        data = asdict(self)
        data["elapsed_s"] = round(self.elapsed_s, 3)
        data["ok"] = self.ok
        if not with_outcomes:
            del data["outcomes"]
        return data


ProgressCallback = Callable[[int, int, StudyOutcome | None], None]


# ---------------------------------------------------------------------------------------
# state file


class MigrationState:
    """The SQLite state file: plan, per-study confirmation, every send attempt.

    One connection shared by the worker threads behind a lock; autocommit plus explicit
    transactions, so every study's outcome is durable the moment it is known.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(str(self.path) + ".lock", "w")  # noqa: SIM115 - held open
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise ConfigError(
                f"{self.path}: state file in use by another migrator (one run at a time)"
            ) from None
        self._lock = threading.Lock()
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite_db.connect(self.path)
            sqlite_db.check_schema_version(
                conn,
                STATE_SCHEMA_VERSION,
                readable=(1,),  # gains table unstable_listings below
                what=f"{self.path}: state file",
                hint="use a new --state file",
            )
            conn.executescript(_SCHEMA)
            sqlite_db.set_schema_version(conn, STATE_SCHEMA_VERSION)
        except (sqlite_db.SchemaVersionError, sqlite3.Error) as exc:
            if conn is not None:
                conn.close()
            self._lock_file.close()
            if isinstance(exc, sqlite_db.SchemaVersionError):
                raise ConfigError(str(exc)) from None
            raise ConfigError(f"{self.path}: not a usable state file ({exc})") from None
        self.conn = conn

    def close(self) -> None:
        with self._lock:
            self.conn.close()
        self._lock_file.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock, sqlite_db.transaction(self.conn) as conn:
            yield conn

    def query(self, sql: str, params: tuple | list = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.conn.execute(sql, params).fetchall()

    # -- meta and plan -----------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        return {r["key"]: r["value"] for r in self.query("SELECT key, value FROM meta")}

    def bind(self, values: dict[str, str]) -> None:
        """Record which migration this file belongs to, or refuse a different one."""
        saved = self.meta()
        for key, value in values.items():
            if key in saved and saved[key] != value:
                raise ConfigError(
                    f"{self.path}: state file belongs to another migration ({key} "
                    f"{saved[key]!r}, not {value!r}); use another --state file"
                )
        with self.transaction() as conn:
            for key, value in values.items():
                conn.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, value))
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('created_at', ?)", (_now(),))

    def plan(self) -> list[str]:
        rows = self.query("SELECT study_instance_uid FROM studies ORDER BY position")
        return [r[0] for r in rows]

    def save_plan(self, studies: list[str]) -> None:
        with self.transaction() as conn:
            for position, uid in enumerate(studies):
                conn.execute(
                    "INSERT OR IGNORE INTO studies (study_instance_uid, position, updated_at) "
                    "VALUES (?, ?, ?)",
                    (uid, position, _now()),
                )

    def confirmed(self) -> set[str]:
        rows = self.query("SELECT study_instance_uid FROM studies WHERE state = 'confirmed'")
        return {r[0] for r in rows}

    # -- runs, studies, sends ----------------------------------------------------------
    def start_run(self, method: str) -> int:
        with self.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO runs (pid, method, started_at) VALUES (?, ?, ?)",
                (os.getpid(), method, _now()),
            )
            return int(cur.lastrowid)

    def finish_run(self, run_id: int, result: MigrationResult) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE runs SET finished_at = ?, result_json = ? WHERE run_id = ?",
                (_now(), json.dumps(result.as_dict()), run_id),
            )

    def record_instances(self, study: str, instances: dict[str, str]) -> None:
        """The source's SOP instances of a study (uid -> series uid)."""
        with self.transaction() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO instances (sop_instance_uid, study_instance_uid, "
                "series_instance_uid) VALUES (?, ?, ?)",
                [(uid, study, series) for uid, series in instances.items()],
            )
            conn.execute(
                "UPDATE studies SET source_instances = ?, updated_at = ? "
                "WHERE study_instance_uid = ?",
                (len(instances), _now(), study),
            )

    def start_send(self, run_id: int, study: str, attempt: int, method: str) -> int:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE studies SET attempts = attempts + 1, updated_at = ? "
                "WHERE study_instance_uid = ?",
                (_now(), study),
            )
            cur = conn.execute(
                "INSERT INTO sends (run_id, study_instance_uid, attempt, method, started_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (run_id, study, attempt, method, _now()),
            )
            return int(cur.lastrowid)

    def finish_send(self, send_id: int, sent: int, error: str | None) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE sends SET finished_at = ?, instances_sent = ?, ok = ?, error = ? "
                "WHERE id = ?",
                (_now(), sent, int(error is None), error, send_id),
            )

    def confirm(self, run_id: int, study: str) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE instances SET confirmed = 1 WHERE study_instance_uid = ?", (study,)
            )
            conn.execute(
                "UPDATE studies SET state = 'confirmed', confirmed_run = ?, last_error = NULL, "
                "updated_at = ? WHERE study_instance_uid = ?",
                (run_id, _now(), study),
            )

    def record_unstable(self, run_id: int, study: str, notes: list[str], settled: bool) -> None:
        """Reads of a study's listing that disagreed (see stable_study_content)."""
        with self.transaction() as conn:
            conn.executemany(
                "INSERT INTO unstable_listings (run_id, study_instance_uid, detail, settled, at) "
                "VALUES (?, ?, ?, ?, ?)",
                [(run_id, study, note, int(settled), _now()) for note in notes],
            )

    def fail(self, study: str, error: str) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE studies SET state = 'failed', last_error = ?, updated_at = ? "
                "WHERE study_instance_uid = ?",
                (error, _now(), study),
            )

