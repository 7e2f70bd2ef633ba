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
    study_durations(run_id, study_instance_uid, one row per study a run worked on
                    status, elapsed_s,          its outcome and wall time in that run
                    list_source_s, send_s,      seconds in each phase (PHASES)
                    confirm_target_s, backoff_s, at)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
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

# 2: table unstable_listings; 3: table study_durations (older files gain the tables)
STATE_SCHEMA_VERSION = 3

# Where a study's time goes (seconds per phase, kept per study): what a slow study was
# waiting for. The target's listing before a send counts as confirming on the target.
PHASES = {
    "list_source": "listing source",
    "send": "sending",
    "confirm_target": "confirming on target",
    "backoff": "retry backoff",
}
DEFAULT_SLOW_STUDY_S = 60.0

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
CREATE TABLE IF NOT EXISTS study_durations (
    run_id             INTEGER NOT NULL,
    study_instance_uid TEXT NOT NULL,
    status             TEXT NOT NULL,
    elapsed_s          REAL NOT NULL,
    list_source_s      REAL NOT NULL,
    send_s             REAL NOT NULL,
    confirm_target_s   REAL NOT NULL,
    backoff_s          REAL NOT NULL,
    at                 TEXT NOT NULL,
    PRIMARY KEY (run_id, study_instance_uid)
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
    # seconds spent in each of PHASES (the wall time between them is bookkeeping)
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    @property
    def waiting_for(self) -> str:
        """The phase this study spent the most time in, as PHASES words it."""
        return PHASES[max(PHASES, key=lambda phase: self.phases.get(phase, 0.0))]


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile of `values` (`share` in percent; no interpolation, so every
    figure is a measured one); 0.0 for no values."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[max(1, math.ceil(share / 100 * len(ordered))) - 1]


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
    slow_study_s: float = DEFAULT_SLOW_STUDY_S  # a study slower than this is reported

    def study_durations(self) -> dict[str, Any]:
        """p50, p99 and max of the studies this run worked on (not the skipped ones)."""
        worked = [o.elapsed_s for o in self.outcomes if o.status != "skipped_already_confirmed"]
        return {"studies": len(worked),
                **{name: round(percentile(worked, share), 3)
                   for name, share in (("p50", 50), ("p99", 99), ("max", 100))}}

    def slow_studies(self) -> list[dict[str, Any]]:
        """Studies slower than `slow_study_s`, slowest first, with their time by phase."""
        slow = [o for o in self.outcomes if o.elapsed_s > self.slow_study_s
                and o.status != "skipped_already_confirmed"]
        return [{"study": o.study_instance_uid, "status": o.status,
                 "elapsed_s": round(o.elapsed_s, 3), "waiting_for": o.waiting_for,
                 "phases_s": {phase: round(s, 3) for phase, s in o.phases.items()}}
                for o in sorted(slow, key=lambda o: -o.elapsed_s)]

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
        data["study_durations_s"] = self.study_durations()
        data["slow_studies"] = self.slow_studies()
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
                readable=(1, 2),  # gain tables unstable_listings, study_durations below
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

    def record_duration(self, run_id: int, outcome: StudyOutcome) -> None:
        """How long the study took in this run and in which phase (table study_durations)."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO study_durations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, outcome.study_instance_uid, outcome.status, outcome.elapsed_s,
                 *(outcome.phases.get(phase, 0.0) for phase in PHASES), _now()),
            )

    def durations(self, run_id: int | None = None) -> list[sqlite3.Row]:
        """Rows of study_durations (of one run, or of all), in the order they were written."""
        where, params = ("WHERE run_id = ?", (run_id,)) if run_id is not None else ("", ())
        return self.query(f"SELECT * FROM study_durations {where} ORDER BY rowid", params)

    def fail(self, study: str, error: str) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE studies SET state = 'failed', last_error = ?, updated_at = ? "
                "WHERE study_instance_uid = ?",
                (error, _now(), study),
            )

