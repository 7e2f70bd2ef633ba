"""Reference migrator: copy every study of a source PACS to a target, with zero-loss proof.

Why it exists: a migration project needs a migrator it can trust as a baseline (and to
compare the site's own tool against). The unit of work is a study. The plan (the source's
study list, from a study-level C-FIND) is kept in a SQLite state file, so a run that is
killed, even with SIGKILL, resumes with the same plan: studies confirmed on the target are
not sent again, partially sent ones are sent again whole (a PACS keeps one copy per SOP
Instance UID, so re-sending creates no duplicate).

A study is *confirmed* when the target's IMAGE-level C-FIND (per series) shows every SOP
Instance UID the source's IMAGE-level C-FIND listed. Only then is it written as confirmed,
one transaction per study. Neither listing is taken on one read: each must agree with the
node's NumberOfStudyRelatedInstances or with a second read (``stable_study_content``);
reads that disagreed are reported per study (outcome, state file, migrate's output).

Methods (how the instances travel):

* ``move``     the source C-MOVEs the study to the target's AE title (a peer it must know);
* ``get``      C-GET from the source, each instance C-STOREd to the target as it arrives, in
               the transfer syntax it came in (one presentation context per SOP class and
               transfer syntax, nothing transcoded);
* ``dicomweb`` WADO-RS the study from the source (``transfer-syntax=*``: as stored), STOW-RS
               it to the target;
* ``orthanc``  the source Orthanc pushes the study over its REST API
               (``POST /modalities/{target node name}/store``).

``ExternalMigration`` runs the site's own migration tool instead; ``Migrator.verify`` then
checks the result study by study without sending anything.

State file schema (SQLite, WAL; ``PRAGMA user_version`` = ``STATE_SCHEMA_VERSION``)::

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

Run it from the command line with ``pacs-harness migrate`` (harness/cli/migrate.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import sqlite_db
from harness.dicom.client import DimseClient
from harness.dicom.contexts import MAX_CONTEXTS
from harness.dicom.dicomweb import (
    AUTH_STATUSES,
    AuthenticationFailed,
    DicomwebClient,
    authentication_failed,
    parse_multipart,
)
from harness.dicom.status import RetrievedInstance, Status
from harness.dicom.wire import TransferFailed, WireAssociation
from harness.errors import ConfigError, EnvironmentProblem, HarnessError
from harness.migration.methods import METHODS
from harness.nodes.base import Node

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


# ---------------------------------------------------------------------------------------
# listing and confirming over C-FIND


@dataclass
class StudyContent:
    """SOP Instance UIDs of one study on one node, by series."""

    series: dict[str, set[str]] = field(default_factory=dict)
    sop_classes: set[str] = field(default_factory=set)  # where the node returned them
    # NumberOfStudyRelatedInstances as the node answered it (0: no such study; None: the
    # node does not return the attribute)
    reported_instances: int | None = None

    @property
    def instances(self) -> dict[str, str]:
        return {sop: series for series, sops in self.series.items() for sop in sops}


# called once per listing read, between the IMAGE-level walk and the study-level count
# (role "source" or "target", study UID, read number from 1); tests change a node there
ListingHook = Callable[[str, str, int], None]


class UnstableListing(MigrationError):
    """A node's listing of a study did not settle within the tries or the deadline."""

    def __init__(self, message: str, notes: list[str]) -> None:
        super().__init__(message)
        self.notes = notes


def list_studies(client: DimseClient) -> list[str]:
    """Every Study Instance UID the node lists at study level, in the order it answered."""
    found = client.find("STUDY", {"StudyInstanceUID": None})
    if not found.ok:
        raise EnvironmentProblem(f"peer {client}: study-level C-FIND answered {found.status}")
    uids = [str(ds.get("StudyInstanceUID", "")) for ds in found.matches]
    return list(dict.fromkeys(u for u in uids if u))


def _find(assoc: Any, client: DimseClient, level: str, keys: dict[str, str | None]) -> list:
    """One Study Root C-FIND over the listing's association (the harness's own wire layer,
    which reads every response itself: harness/dicom/query.py); anything but success raises."""
    result = client.find_over(assoc, level, keys)
    if not result.ok:
        raise MigrationError(f"peer {client}: {level} C-FIND answered {result.status}")
    return result.matches


def _reported_instances(matches: list) -> int | None:
    """NumberOfStudyRelatedInstances of a study-level answer (PS3.4 C.3.4): 0 when the
    node has no such study, None when it does not return the (optional) attribute."""
    if not matches:
        return 0
    value = matches[0].get("NumberOfStudyRelatedInstances")
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def study_content(
    client: DimseClient,
    study: str,
    series_uids: list[str] | None = None,
    *,
    between: Callable[[], None] | None = None,
) -> StudyContent:
    """The study's instances via IMAGE-level C-FIND, one query per series, then the study's
    own NumberOfStudyRelatedInstances (where the node returns it) to cross-check them.

    Walks SERIES then IMAGE (each level with its parent's unique key), which every Q/R SCP
    supports, strict hierarchical ones like dcmqrscp included. `series_uids` skips the
    series query (the count is then not asked: it covers every series). `between` runs
    after the walk, before the count.
    """
    content = StudyContent()
    whole_study = series_uids is None
    assoc = client.find_association()
    try:
        if series_uids is None:
            found = _find(
                assoc, client, "SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": None}
            )
            series_uids = list(
                dict.fromkeys(
                    str(ds.SeriesInstanceUID) for ds in found if ds.get("SeriesInstanceUID")
                )
            )
        for series in series_uids:
            images = _find(
                assoc,
                client,
                "IMAGE",
                {
                    "StudyInstanceUID": study,
                    "SeriesInstanceUID": series,
                    "SOPInstanceUID": None,
                    "SOPClassUID": None,
                },
            )
            sops = {str(ds.SOPInstanceUID) for ds in images if ds.get("SOPInstanceUID")}
            content.sop_classes |= {str(ds.SOPClassUID) for ds in images if ds.get("SOPClassUID")}
            if sops:
                content.series[series] = sops
        if between is not None:
            between()
        if whole_study:
            counted = _find(
                assoc,
                client,
                "STUDY",
                {"StudyInstanceUID": study, "NumberOfStudyRelatedInstances": None},
            )
            content.reported_instances = _reported_instances(counted)
    finally:
        assoc.release()
    return content


def _describe_read(content: StudyContent) -> str:
    listed = len(content.instances)
    if content.reported_instances is None:
        return f"{listed} listed"
    return f"{listed} listed, NumberOfStudyRelatedInstances {content.reported_instances}"


def stable_study_content(
    client: DimseClient,
    study: str,
    *,
    role: str = "node",
    tries: int = 5,
    deadline_s: float = 60.0,
    pause_s: float = 0.2,
    on_listing: ListingHook | None = None,
    stop: threading.Event | None = None,
) -> tuple[StudyContent, list[str]]:
    """A listing of the study that a second means agrees with, and what was unstable.

    A PACS under load may answer one SERIES or IMAGE C-FIND with fewer matches (Orthanc
    was seen answering 0), so one listing proves nothing. A read is accepted when the
    node's NumberOfStudyRelatedInstances (PS3.4 C.3.4) equals the instances listed, or,
    where the node does not return that count, when two consecutive reads list the same
    SOP Instance UIDs. At most `tries` reads within `deadline_s`; else UnstableListing.
    Returns the accepted content and one note per read that disagreed (empty: stable).
    """
    notes: list[str] = []
    reads: list[str] = []
    previous: StudyContent | None = None
    deadline = time.monotonic() + deadline_s
    for read in range(1, tries + 1):
        hook = (lambda read=read: on_listing(role, study, read)) if on_listing else None
        content = study_content(client, study, between=hook)
        reads.append(_describe_read(content))
        listed = set(content.instances)
        counted = content.reported_instances
        if counted is not None:
            if counted == len(listed):
                return content, notes
            notes.append(f"{role} read {read}: {_describe_read(content)}")
        elif previous is not None and listed == set(previous.instances):
            return content, notes
        elif previous is not None:
            notes.append(
                f"{role} read {read}: listing changed ({len(previous.instances)} -> "
                f"{len(listed)} instances)"
            )
        previous = content
        if time.monotonic() >= deadline or read == tries:
            break
        if stop is not None and stop.is_set():
            break
        if stop is None:
            time.sleep(pause_s)
        else:
            stop.wait(pause_s)
    raise UnstableListing(
        f"{role} {client}: listing of study {study} did not settle in {len(reads)} reads "
        f"({'; '.join(reads)})",
        notes,
    )


# ---------------------------------------------------------------------------------------
# transfer methods


class _StoreStream:
    """One association to the target, C-STOREing datasets as they come (for C-GET relay).

    The association is re-opened with one more presentation context whenever an instance
    arrives with a (SOP class, transfer syntax) pair not seen yet, so nothing is transcoded.
    """

    def __init__(self, client: DimseClient) -> None:
        self.client = client
        self.pairs: list[tuple[str, str]] = []
        self.assoc: WireAssociation | None = None

    def send(self, instance: RetrievedInstance) -> None:
        """Store one retrieved instance on the target, its bytes exactly as they came."""
        pair = (instance.sop_class_uid, instance.transfer_syntax_uid)
        if pair not in self.pairs:
            if len(self.pairs) >= MAX_CONTEXTS:
                self.pairs.pop(0)
            self.pairs.append(pair)
            self.close()
        if self.assoc is None or not self.assoc.is_open:
            self.assoc = self.client.wire_association(self.pairs)
        context_id = self.assoc.accepted.get(pair)
        if context_id is None:
            raise MigrationError(
                f"peer {self.client} does not accept SOP class {pair[0]} with transfer "
                f"syntax {pair[1]}"
            )
        uid = instance.sop_instance_uid
        try:
            answer = self.assoc.store(context_id, pair[0], uid, instance.encoded)
        except TransferFailed as exc:
            self.assoc.abort()
            raise MigrationError(f"peer {self.client}: no C-STORE response ({exc})") from None
        status = Status(answer.status)
        if not status.ok:
            raise MigrationError(
                f"peer {self.client} answered C-STORE of {uid} with {status}"
            )

    def close(self) -> None:
        if self.assoc is not None:
            self.assoc.release()
        self.assoc = None


def _wado_study(client: DicomwebClient, study: str) -> list[bytes]:
    """WADO-RS of a whole study as stored (`transfer-syntax=*`), Part 10 bytes per instance."""
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    url = f"{client.root_url}/studies/{study}"
    try:
        rsp = client.session.get(url, headers={"Accept": accept}, timeout=client.timeout_s)
    except Exception as exc:  # requests' errors: connection refused, timeout
        raise MigrationError(f"WADO-RS {url}: {exc.__class__.__name__}") from None
    if rsp.status_code in AUTH_STATUSES:
        raise authentication_failed(client.node_label, rsp.status_code)
    if rsp.status_code >= 400:
        raise MigrationError(f"WADO-RS {url}: HTTP {rsp.status_code}")
    return parse_multipart(rsp.content, rsp.headers.get("Content-Type", ""))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


# ---------------------------------------------------------------------------------------
# the migrator


class _RateLimiter:
    """At most `rate` acquisitions per second over all workers (evenly spaced)."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self.next_at = time.monotonic()
        self.lock = threading.Lock()

    def acquire(self, stop: threading.Event) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            slot = max(now, self.next_at)
            self.next_at = slot + self.interval
        stop.wait(max(0.0, slot - time.monotonic()))


class Migrator:
    """Copies every study of `source` to `target` with one of METHODS; resumable.

    rate_limit is in studies per second (the unit of work), over all workers together.
    Retries: each study gets 1 + `retries` attempts, waiting backoff_s, 2*backoff_s, ...
    between them. Workers are capped by the target's own limit (dcmqrscp: 1 association).
    Each listing (source and target) takes at most `listing_tries` reads within
    `listing_timeout_s` to settle; `on_listing` is called during each read (tests use it
    to change a node between two reads).
    """

    def __init__(
        self,
        source: Node,
        target: Node,
        method: str = "move",
        *,
        state_path: str | os.PathLike[str],
        workers: int = 4,
        rate_limit: float | None = None,
        retries: int = 3,
        backoff_s: float = 0.5,
        confirm_timeout_s: float = 10.0,
        listing_tries: int = 5,
        listing_timeout_s: float = 60.0,
        on_listing: ListingHook | None = None,
    ) -> None:
        if method not in METHODS:
            raise ConfigError(f"method {method!r}: unknown (allowed: {', '.join(METHODS)})")
        if workers < 1:
            raise ConfigError(f"workers: must be >= 1, got {workers}")
        if rate_limit is not None and rate_limit <= 0:
            raise ConfigError(f"rate limit: must be > 0 studies/s, got {rate_limit}")
        if retries < 0 or backoff_s < 0:
            raise ConfigError("retries and backoff must be >= 0")
        if listing_tries < 2:
            raise ConfigError(f"listing tries: must be >= 2, got {listing_tries}")
        if source.name == target.name:
            raise ConfigError(f"source and target are the same node ({source.name})")
        target.require_writable("migrate studies into it")
        self.source, self.target, self.method = source, target, method
        cap = target.capabilities.store_associations
        self.workers = min(workers, cap) if cap else workers
        self.rate_limit = rate_limit
        self.retries = retries
        self.backoff_s = backoff_s
        self.confirm_timeout_s = confirm_timeout_s
        self.listing_tries = listing_tries
        self.listing_timeout_s = listing_timeout_s
        self.on_listing = on_listing
        self.state_path = Path(state_path)
        self._check_method()
        self.state: MigrationState | None = None
        self._plan: list[str] | None = None
        self._confirmed: set[str] = set()
        self._confirmed_lock = threading.Lock()
        self._stop = threading.Event()
        self.run_id = 0

    def __repr__(self) -> str:
        return f"<Migrator {self.method} {self.source.name} -> {self.target.name}>"

    def _check_method(self) -> None:
        """Refuse, before anything is sent, a method one of the nodes cannot do."""
        service = {"move": "C-MOVE", "get": "C-GET"}.get(self.method)
        offered = self.source.capabilities.retrieve_methods
        if service and service not in offered:
            raise ConfigError(
                f"method {self.method}: source node {self.source.name} ({self.source.kind}) "
                f"offers no {service} (it offers {', '.join(offered)})"
            )
        if self.method == "dicomweb":
            for role, node in (("source", self.source), ("target", self.target)):
                if node.dicomweb() is None:
                    raise ConfigError(
                        f"method dicomweb: {role} node {node.name} serves no DICOMweb "
                        "(declare http_port and dicomweb_root)"
                    )
        if self.method == "orthanc" and self.source.rest() is None:
            raise ConfigError(
                f"method orthanc: source node {self.source.name} is not an Orthanc "
                "(or has no http_port / orthanc_rest: true)"
            )

    # -- state -------------------------------------------------------------------------
    def open(self) -> MigrationState:
        if self.state is None:
            state = MigrationState(self.state_path)
            try:
                state.bind({"source_ae": self.source.ae_title, "target_ae": self.target.ae_title})
            except BaseException:
                state.close()
                raise
            with self._confirmed_lock:
                self._confirmed = state.confirmed()
            self.state = state
        return self.state

    def close(self) -> None:
        if self.state is not None:
            self.state.close()
            self.state = None

    def __enter__(self) -> Migrator:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def plan(self) -> list[str]:
        """The studies to migrate: saved in the state file, else listed from the source."""
        if self._plan is None:
            state = self.open()
            saved = state.plan()
            if not saved:
                saved = list_studies(self.source.dimse())
                state.save_plan(saved)
            self._plan = saved
        return list(self._plan)

    def is_confirmed(self, study: str) -> bool:
        """True once the study is confirmed on the target (thread-safe; for the monitor)."""
        with self._confirmed_lock:
            return study in self._confirmed

    def stop(self) -> None:
        """Ask the workers to finish the study at hand and take no more."""
        self._stop.set()

    # -- run ---------------------------------------------------------------------------
    def run(self, progress: ProgressCallback | None = None) -> MigrationResult:
        """Migrate every study of the plan not yet confirmed; returns this run's totals."""
        return self._run(progress, send=True)

    def verify(self, progress: ProgressCallback | None = None) -> MigrationResult:
        """Confirm studies already on the target without sending (after an external tool).

        Studies found complete count as `already_on_target`, the others as failed.
        """
        return self._run(progress, send=False)

    def _run(self, progress: ProgressCallback | None, *, send: bool) -> MigrationResult:
        start = time.monotonic()
        studies = self.plan()
        state = self.open()
        self._stop.clear()
        auth_failures: list[AuthenticationFailed] = []
        self.run_id = state.start_run(self.method if send else "verify")
        result = MigrationResult(
            self.method if send else "verify",
            self.source.name,
            self.target.name,
            studies_total=len(studies),
        )
        lock = threading.Lock()
        done = 0
        say = progress or (lambda _done, _total, _outcome: None)
        say(0, len(studies), None)

        def finish(outcome: StudyOutcome) -> None:
            nonlocal done
            with lock:
                result.add(outcome)
                done += 1
                count = done
            say(count, len(studies), outcome)

        work: deque[str] = deque()
        for uid in studies:
            if self.is_confirmed(uid):
                finish(StudyOutcome(uid, "skipped_already_confirmed"))
            else:
                work.append(uid)
        queue_lock = threading.Lock()
        limiter = _RateLimiter(self.rate_limit if send else None)

        def worker() -> None:
            while not self._stop.is_set():
                with queue_lock:
                    if not work:
                        return
                    uid = work.popleft()
                limiter.acquire(self._stop)
                if self._stop.is_set():
                    return
                try:
                    outcome = self._study(uid, send)
                except AuthenticationFailed as exc:  # no retry logs in: stop every worker
                    auth_failures.append(exc)
                    self._stop.set()
                    return
                except Exception as exc:  # e.g. the state file's disk is full: report, go on
                    outcome = StudyOutcome(uid, "failed", error=f"internal: {_describe(exc)}")
                finish(outcome)

        threads = [
            threading.Thread(target=worker, name=f"migrate-{n}", daemon=True)
            for n in range(min(self.workers, max(1, len(work))))
        ]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.2)
        except KeyboardInterrupt:
            self._stop.set()  # the state file is consistent after every study; just stop
            raise
        result.elapsed_s = time.monotonic() - start
        state.finish_run(self.run_id, result)
        if auth_failures:
            raise auth_failures[0]
        return result

    def _study(self, uid: str, send: bool) -> StudyOutcome:
        """All attempts at one study: list, check the target, send, confirm."""
        state = self.open()
        start = time.monotonic()
        outcome = StudyOutcome(uid, "failed")
        source_content: StudyContent | None = None
        attempts = 1 + self.retries if send else 1
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                if self._stop.wait(self.backoff_s * 2 ** (attempt - 2)):
                    break
            outcome.attempts = attempt
            send_id = None
            try:
                if source_content is None:
                    listed = self._listing(self.source, "source", uid, outcome)
                    if not listed.instances:
                        raise MigrationError(
                            f"source {self.source.name} lists no instance of study {uid}"
                        )
                    source_content = listed
                    state.record_instances(uid, source_content.instances)
                    outcome.instances = len(source_content.instances)
                missing = self._missing(uid, source_content, outcome)
                if missing and send:
                    send_id = state.start_send(self.run_id, uid, attempt, self.method)
                    sent = self._send(uid, source_content)
                    outcome.instances_sent += sent
                    state.finish_send(send_id, sent, None)
                    send_id = None
                    missing = self._wait_confirmed(uid, source_content, outcome)
                if missing:
                    raise MigrationError(
                        f"{len(missing)} of {len(source_content.instances)} instances not on "
                        f"target {self.target.name}" + (" after sending" if send else "")
                    )
            except AuthenticationFailed as exc:  # not transient: a retry is refused again
                if send_id is not None:
                    state.finish_send(send_id, 0, _describe(exc))
                raise
            except Exception as exc:  # any failure of this attempt is retried, then recorded
                outcome.error = _describe(exc)
                if send_id is not None:
                    state.finish_send(send_id, 0, outcome.error)
                continue
            state.confirm(self.run_id, uid)
            with self._confirmed_lock:
                self._confirmed.add(uid)
            outcome.status = "migrated" if outcome.instances_sent else "already_on_target"
            outcome.error = None
            break
        else:
            state.fail(uid, outcome.error or "failed")
        if outcome.status == "failed" and outcome.error is None:
            outcome.error = "stopped before the study was confirmed"
        outcome.elapsed_s = time.monotonic() - start
        return outcome

    def _listing(self, node: Node, role: str, uid: str, outcome: StudyOutcome) -> StudyContent:
        """The study as `node` lists it once the listing settled; disagreeing reads are
        noted in the outcome and the state file (also when it never settles)."""
        state = self.open()
        try:
            content, notes = stable_study_content(
                node.dimse(),
                uid,
                role=role,
                tries=self.listing_tries,
                deadline_s=self.listing_timeout_s,
                on_listing=self.on_listing,
                stop=self._stop,
            )
        except UnstableListing as exc:
            gave_up = [*exc.notes, str(exc)]
            outcome.unstable_listings += gave_up
            state.record_unstable(self.run_id, uid, gave_up, settled=False)
            raise
        if notes:
            outcome.unstable_listings += notes
            state.record_unstable(self.run_id, uid, notes, settled=True)
        return content

    def _missing(
        self, uid: str, source_content: StudyContent, outcome: StudyOutcome
    ) -> set[str]:
        """SOP Instance UIDs of the source study that the target's C-FIND does not show."""
        on_target = self._listing(self.target, "target", uid, outcome)
        wanted = set(source_content.instances)
        return wanted - set(on_target.instances)

    def _wait_confirmed(
        self, uid: str, source_content: StudyContent, outcome: StudyOutcome
    ) -> set[str]:
        """Poll the target briefly: some PACS index what they received a moment later."""
        deadline = time.monotonic() + self.confirm_timeout_s
        while True:
            missing = self._missing(uid, source_content, outcome)
            if not missing or time.monotonic() >= deadline or self._stop.is_set():
                return missing
            time.sleep(0.5)

    # -- methods -----------------------------------------------------------------------
    def _send(self, uid: str, content: StudyContent) -> int:
        """Send one study with the chosen method; returns how many instances went out."""
        return {
            "move": self._send_move,
            "get": self._send_get,
            "dicomweb": self._send_dicomweb,
            "orthanc": self._send_orthanc,
        }[self.method](uid, content)

    def _send_move(self, uid: str, _content: StudyContent) -> int:
        result = self.source.dimse().move(self.target.ae_title, "STUDY", {"StudyInstanceUID": uid})
        if not result.ok:
            raise MigrationError(
                f"C-MOVE to {self.target.ae_title} answered {result.status} "
                f"(completed {result.completed}, failed {result.failed})"
            )
        return result.completed + result.warning

    def _send_get(self, uid: str, content: StudyContent) -> int:
        stream = _StoreStream(self.target.dimse())
        stored = 0
        errors: list[str] = []

        def relay(instance) -> None:
            nonlocal stored
            try:
                stream.send(instance)
            except Exception as exc:
                errors.append(_describe(exc))
                raise  # pynetdicom answers the source's C-STORE with a failure status
            stored += 1

        try:
            result = self.source.dimse().get(
                "STUDY",
                {"StudyInstanceUID": uid},
                # the study's own SOP classes, as listed (get() looks them up again only
                # when they do not fit one association)
                sop_classes=sorted(content.sop_classes) or None,
                on_instance=relay,
                keep=False,
            )
        finally:
            stream.close()
        if errors:
            raise MigrationError(f"C-STORE to {self.target.name}: {errors[0]}")
        if not result.ok:
            raise MigrationError(
                f"C-GET answered {result.status} (completed {result.completed}, "
                f"failed {result.failed})"
            )
        return stored

    def _send_dicomweb(self, uid: str, _content: StudyContent) -> int:
        source, target = self.source.dicomweb(), self.target.dicomweb()
        assert source is not None and target is not None  # checked in _check_method
        parts = _wado_study(source, uid)
        if not parts:
            raise MigrationError(f"WADO-RS of study {uid} from {self.source.name} was empty")
        response = target.store(parts)
        failed = response.get("00081198", {}).get("Value", [])  # FailedSOPSequence
        if failed:
            raise MigrationError(f"STOW-RS to {self.target.name}: {len(failed)} instances failed")
        return len(parts)

    def _send_orthanc(self, uid: str, _content: StudyContent) -> int:
        rest = self.source.rest()
        assert rest is not None  # checked in _check_method
        ids = [r["ID"] for r in rest.lookup(uid) if r.get("Type") == "Study"]
        if not ids:
            raise MigrationError(f"Orthanc {self.source.name} has no study {uid}")
        try:
            answer = rest.post_json(
                f"/modalities/{self.target.name}/store",
                {"Resources": ids, "Synchronous": True},
            )
        except AuthenticationFailed:
            raise
        except EnvironmentProblem as exc:
            raise MigrationError(
                f"{exc} (is {self.target.name} in the DicomModalities of {self.source.name}?)"
            ) from None
        answer = answer or {}
        if int(answer.get("FailedInstancesCount", 0) or 0):
            raise MigrationError(
                f"Orthanc store to {self.target.name}: "
                f"{answer['FailedInstancesCount']} instances failed"
            )
        return int(answer.get("InstancesCount", 0) or 0)


# ---------------------------------------------------------------------------------------
# the site's own tool


PLACEHOLDERS = (
    "source_ae",
    "source_host",
    "source_port",
    "target_ae",
    "target_host",
    "target_port",
)


@dataclass
class ExternalResult:
    """How the site's migration tool ended."""

    argv: list[str]
    exit_code: int | None  # None: killed (timeout or interrupt)
    timed_out: bool
    elapsed_s: float
    log_path: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["elapsed_s"] = round(self.elapsed_s, 3)
        data["ok"] = self.ok
        return data


class ExternalMigration:
    """Runs the site's own migration tool; the harness verifies its work afterwards.

    The command is split with shlex (no shell unless `shell=True`) and the placeholders
    {source_ae} {source_host} {source_port} {target_ae} {target_host} {target_port} are
    replaced in each word; the same values are in the environment as PACS_SOURCE_AE etc.
    Output goes to `log_path`. On timeout or Ctrl-C the whole process group is killed.
    """

    def __init__(
        self,
        command: str,
        source: Node,
        target: Node,
        *,
        env: dict[str, str] | None = None,
        timeout_s: float = 3600.0,
        log_path: str | os.PathLike[str] = "external-migration.log",
        shell: bool = False,
    ) -> None:
        if not command.strip():
            raise ConfigError("--external-command: empty command")
        self.command = command
        self.values = {
            "source_ae": source.ae_title,
            "source_host": source.host,
            "source_port": str(source.dicom_port),
            "target_ae": target.ae_title,
            "target_host": target.host,
            "target_port": str(target.dicom_port),
        }
        self.env = dict(env or {})
        self.timeout_s = timeout_s
        self.log_path = Path(log_path)
        self.shell = shell

    def _substitute(self, text: str, quote: bool) -> str:
        def value(match: re.Match[str]) -> str:
            raw = self.values[match.group(1)]
            return shlex.quote(raw) if quote else raw

        return re.sub(r"\{(" + "|".join(PLACEHOLDERS) + r")\}", value, text)

    def argv(self) -> list[str]:
        """The command as it will run, placeholders replaced."""
        if self.shell:
            return ["/bin/sh", "-c", self._substitute(self.command, quote=True)]
        try:
            words = shlex.split(self.command)
        except ValueError as exc:
            raise ConfigError(f"--external-command: {exc}") from None
        return [self._substitute(word, quote=False) for word in words]

    def run(self) -> ExternalResult:
        argv = self.argv()
        env = dict(os.environ)
        env.update({f"PACS_{k.upper()}": v for k, v in self.values.items()})
        env.update(self.env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"$ {shlex.join(argv)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            except FileNotFoundError:
                raise EnvironmentProblem(
                    f"--external-command: program not found: {argv[0]}"
                ) from None
            except PermissionError:
                raise EnvironmentProblem(f"--external-command: not executable: {argv[0]}") from None
            timed_out = False
            try:
                exit_code: int | None = proc.wait(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                exit_code = None
            except BaseException:  # Ctrl-C: the tool must not outlive the harness
                _kill_group(proc)
                raise
        return ExternalResult(
            argv, exit_code, timed_out, time.monotonic() - start, str(self.log_path)
        )


def _kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the tool's process group, then SIGKILL whatever of the group is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children that ignored SIGTERM, or the leader
    proc.wait()
