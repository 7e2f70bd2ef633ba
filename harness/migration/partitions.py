"""A crawl's study listing cut into partitions, each recorded in the ledger, so a listing of
millions of studies survives a kill and gets past an archive that caps C-FIND answers.

Why: a PACS may end a study-level C-FIND after N matches (PS3.4 C.4.1.1.4; Orthanc's
LimitFindResults answers Cancel FE00), and one universal query over ten million studies
is lost whole when the crawl is killed. Modes:

- `date`: one universal query; when it is cut (the node's final status is not Success, or
  it holds more than `size` matches: the crawl cancels it there, PS3.7 9.1.2.1.6), the
  range is halved by StudyDate, then a day by StudyTime (PS3.4 C.2.2.2.5 range matching;
  the bounds are discovery.py's), until no answer is cut. The cut universal answer's
  studies without a StudyDate become the `undated` partition: no date range matches them.
- `uid`: one universal query whose studies are grouped into 16 partitions by a hash of
  their StudyInstanceUID (for archives whose dates are useless); a cut answer is an error
  (wildcards are not allowed on UIDs, PS3.4 C.2.2.2.4, so there is nothing to split by).
- `none`: one universal query, one partition; a cut answer is an error.

A crawl spread over several machines (docs/scale.md) gives each machine a share with
`study_dates`: a StudyDate range ("20150101-20171231", open-ended "-20141231" or
"20180101-", or one day), which becomes the root partition instead of the universal query
(and is halved like any date partition), or `undated`: the universal query's studies that
have no StudyDate, which no range matches. The shares' ledgers are merged with
harness/migration/merge.py.

The work list is the `partitions` table (additive: created here, on the ledger's own
connection, next to ledger.py's tables): `pending` rows are still to be queried; a queried
row becomes `listed` (its studies recorded, their partition in `partition_studies`),
`split` (cut: its halves inserted as `pending`) or `unresolved` (still cut at the finest
range, or refused: an issue in the ledger). A `listed` partition is `done` once all its
studies are committed. A killed listing resumes at the pending rows.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom import Dataset

from harness import sqlite_db
from harness.errors import ConfigError, EnvironmentProblem
from harness.migration.discovery import (
    DAY_SECONDS,
    FIRST_DAY,
    LAST_DAY,
    TIME_FLOOR_S,
    _range,
    time_range,
)

MODES = ("date", "uid", "none")
DEFAULT_SIZE = 5000  # studies per partition at most: below most archives' C-FIND caps
UID_BUCKETS = 16
MAX_QUERIES = 50_000  # bisection budget: a node cutting every answer must not loop forever

SCHEMA = """
CREATE TABLE IF NOT EXISTS partitions (
    key TEXT PRIMARY KEY, seq INTEGER NOT NULL, query_json TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',  -- pending, split, listed, unresolved, done
    studies INTEGER NOT NULL DEFAULT 0, note TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS partition_studies (
    study_uid TEXT PRIMARY KEY, partition TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS partition_studies_partition ON partition_studies (partition);
"""


@dataclass
class RangeAnswer:
    """A study-level query's answer: its matches, whether the node (or the size) cut it,
    and why the node refused it (a failure without matches, PS3.4 C.4.1.1.4)."""

    matches: list[Dataset]
    cut: bool = False
    refused: str | None = None


# list_range(query keys, at most this many matches or None) -> RangeAnswer
ListRange = Callable[[dict[str, str], int | None], RangeAnswer]
# add_rows(datasets) -> the StudyInstanceUIDs recorded (the ledger's studies table)
AddRows = Callable[[list[Dataset]], list[str]]


@dataclass
class ListingReport:
    """What the partitioned listing did, for the crawl summary."""

    mode: str
    partitions: int = 0
    queries: int = 0
    unresolved: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_mode(mode: str, size: int | None) -> None:
    if mode not in MODES:
        raise ConfigError(f"partition: unknown mode {mode!r} (allowed: {', '.join(MODES)})")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError(f"partition_size: must be a whole number of studies >= 1, got {size!r}")


UNDATED_SHARE = "undated"


def check_study_dates(study_dates: str | None, mode: str) -> None:
    """A share of the node (see the module doc): a one-line ConfigError for a bad value."""
    if study_dates is None:
        return
    if mode != "date":
        raise ConfigError(f"study_dates {study_dates!r}: a share is cut by date ranges; use "
                          "partition 'date' (--partition date)")
    share_root(study_dates)


def share_root(study_dates: str) -> tuple[str, dict[str, str]]:
    """The root partition of a share: (key, study-level query keys)."""
    if study_dates == UNDATED_SHARE:
        return "share:undated", {}
    low_text, dash, high_text = study_dates.partition("-")
    if not dash:
        high_text = low_text
    try:
        low = _day(low_text) if low_text else FIRST_DAY
        high = _day(high_text) if high_text else LAST_DAY
    except ValueError:
        low = high = None
    if low is None or high is None or low > high or not (low_text or high_text):
        raise ConfigError(f"study_dates {study_dates!r}: expected a StudyDate range "
                          "YYYYMMDD-YYYYMMDD (either side may be left open), one day "
                          f"YYYYMMDD, or {UNDATED_SHARE!r}")
    return _date_part(max(low, FIRST_DAY), min(high, LAST_DAY))


def ensure_tables(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)


def _day(text: str) -> dt.date:
    return dt.datetime.strptime(text, "%Y%m%d").date()


def _date_part(low: dt.date, high: dt.date) -> tuple[str, dict[str, str]]:
    a, b = low.strftime("%Y%m%d"), high.strftime("%Y%m%d")
    value = _range(a, b, FIRST_DAY.strftime("%Y%m%d"), LAST_DAY.strftime("%Y%m%d"))
    return f"date:{a}-{b}", {"StudyDate": value}


def _time_part(day: str, low: int, high: int) -> tuple[str, dict[str, str]]:
    """Whole seconds [low, high] of `day` (discovery.time_range)."""
    return f"time:{day}:{low}-{high}", {"StudyDate": day, "StudyTime": time_range(low, high)}


def _halves(key: str) -> list[tuple[str, dict[str, str]]] | None:
    """The two halves of a cut partition, or None when it cannot be split further."""
    kind, _, span = key.partition(":")
    if key == "all":
        kind, span = "date", f"{FIRST_DAY:%Y%m%d}-{LAST_DAY:%Y%m%d}"
    if kind == "date":
        low, high = (_day(part) for part in span.split("-"))
        if low == high:
            day = span.split("-")[0]
            return [_time_part(day, 0, DAY_SECONDS // 2 - 1),
                    _time_part(day, DAY_SECONDS // 2, DAY_SECONDS - 1)]
        middle = low + dt.timedelta(days=(high - low).days // 2)
        return [_date_part(low, middle), _date_part(middle + dt.timedelta(days=1), high)]
    if kind == "time":
        day, _, seconds = span.partition(":")
        low_s, high_s = (int(part) for part in seconds.split("-"))
        if high_s - low_s < TIME_FLOOR_S:
            return None
        middle = (low_s + high_s) // 2
        return [_time_part(day, low_s, middle), _time_part(day, middle + 1, high_s)]
    return None


class PartitionedListing:
    """Lists a node's studies into a ledger partition by partition (see the module doc)."""

    def __init__(self, conn: sqlite3.Connection, mode: str, size: int | None,
                 study_dates: str | None = None) -> None:
        check_mode(mode, size)
        check_study_dates(study_dates, mode)
        self.conn = conn
        self.mode = mode
        self.size = size if mode == "date" else None
        self.root = ("all", {}) if study_dates is None else share_root(study_dates)
        ensure_tables(conn)

    def _insert(self, parts: list[tuple[str, dict[str, str]]], state: str = "pending") -> None:
        seq = self.conn.execute("SELECT coalesce(max(seq), 0) FROM partitions").fetchone()[0]
        self.conn.executemany(
            "INSERT OR IGNORE INTO partitions (key, seq, query_json, state) VALUES (?, ?, ?, ?)",
            [(key, seq + n, json.dumps(query), state) for n, (key, query) in enumerate(parts, 1)])

    def _record(self, key: str, datasets: list[Dataset], add_rows: AddRows,
                state: str = "listed") -> None:
        """Which studies the partition holds, then the studies, then its state: a kill in
        between leaves it pending, and `_forget` removes what it had recorded before it is
        queried again (so no study is recorded twice)."""
        found = {str(ds.get("StudyInstanceUID", "") or "") for ds in datasets} - {""}
        with sqlite_db.transaction(self.conn):
            self.conn.executemany("INSERT OR IGNORE INTO partition_studies VALUES (?, ?)",
                                  [(uid, key) for uid in sorted(found)])
        uids = add_rows(datasets)
        self.conn.execute("UPDATE partitions SET state = ?, studies = ? WHERE key = ?",
                          (state, len(uids), key))

    def _forget(self, key: str) -> None:
        """Studies recorded by an interrupted listing of `key` (none is committed yet)."""
        with sqlite_db.transaction(self.conn):
            self.conn.execute(
                "DELETE FROM studies WHERE state = 'listed' AND study_uid IN "
                "(SELECT study_uid FROM partition_studies WHERE partition = ?)", (key,))
            self.conn.execute("DELETE FROM partition_studies WHERE partition = ?", (key,))

    def run(self, list_range: ListRange, add_rows: AddRows, peer: str) -> ListingReport:
        """Query every pending partition until none is left (resuming a killed listing)."""
        report = ListingReport(self.mode)
        if self.conn.execute("SELECT count(*) FROM partitions").fetchone()[0] == 0:
            # studies of a listing from before partitions (or a killed one) are listed again
            self.conn.execute("DELETE FROM studies WHERE state = 'listed'")
            with sqlite_db.transaction(self.conn):
                self._insert([self.root])
        while True:
            row = self.conn.execute("SELECT key, query_json FROM partitions "
                                    "WHERE state = 'pending' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                break
            key, query = row[0], json.loads(row[1])
            if report.queries >= MAX_QUERIES:
                self._unresolved(key, f"query budget of {MAX_QUERIES} spent", report)
                continue
            self._forget(key)
            report.queries += 1
            # the undated share keeps the whole universal answer (no size cut of our own)
            answer = list_range(query, None if key == "share:undated" else self.size)
            if key == "share:undated":
                self._undated_share(answer, add_rows, report)
            elif answer.refused is not None:
                if key == self.root[0]:
                    raise EnvironmentProblem(f"peer {peer}: study-level C-FIND {answer.refused}")
                self._unresolved(key, f"refused: {answer.refused}", report)
            elif not answer.cut:
                self._record(key, answer.matches, add_rows)
            elif self.mode != "date":
                raise EnvironmentProblem(
                    f"peer {peer}: the study listing was cut at {len(answer.matches)} studies; "
                    "crawl with partition 'date' (--partition date) to list the rest by ranges")
            else:
                self._split(key, answer, add_rows, report)
        if self.mode == "uid":
            self._bucket_by_uid()
        report.partitions = self.conn.execute(
            "SELECT count(*) FROM partitions WHERE state IN ('listed', 'done', 'unresolved')"
        ).fetchone()[0]
        return report

    def _undated_share(self, answer: RangeAnswer, add_rows: AddRows,
                       report: ListingReport) -> None:
        """The share of studies without a StudyDate: only the universal answer lists them."""
        key = "share:undated"
        if answer.refused is not None:
            self._unresolved(key, f"refused: {answer.refused}", report)
            return
        undated = [ds for ds in answer.matches if not str(ds.get("StudyDate", "") or "")]
        self._record(key, undated, add_rows)
        if answer.cut:
            note = ("the universal study query was cut: studies without a StudyDate beyond "
                    f"its {len(answer.matches)} answers cannot be listed over C-FIND")
            self.conn.execute("UPDATE partitions SET note = ? WHERE key = ?", (note, key))
            report.notes.append(note)

    def _split(self, key: str, answer: RangeAnswer, add_rows: AddRows,
               report: ListingReport) -> None:
        halves = _halves(key)
        if halves is None:
            self._unresolved(key, f"still cut at {len(answer.matches)} studies", report)
            return
        if key == "all":
            # no date range matches a study without StudyDate: only this answer lists them
            undated = [ds for ds in answer.matches if not str(ds.get("StudyDate", "") or "")]
            with sqlite_db.transaction(self.conn):
                self._insert([("undated", {})], state="pending")
            self._forget("undated")
            self._record("undated", undated, add_rows)
            note = ("the universal study query was cut: studies without a StudyDate beyond "
                    f"its {len(answer.matches)} answers cannot be listed over C-FIND")
            self.conn.execute("UPDATE partitions SET note = ? WHERE key = 'undated'", (note,))
            report.notes.append(note)
        with sqlite_db.transaction(self.conn):
            self._insert(halves)
            self.conn.execute("UPDATE partitions SET state = 'split', studies = ? WHERE key = ?",
                              (len(answer.matches), key))

    def _unresolved(self, key: str, why: str, report: ListingReport) -> None:
        query = self.conn.execute("SELECT query_json FROM partitions WHERE key = ?",
                                  (key,)).fetchone()[0]
        problem = f"studies matching {query} could not all be listed ({why})"
        with sqlite_db.transaction(self.conn):
            self.conn.execute("UPDATE partitions SET state = 'unresolved', note = ? "
                              "WHERE key = ?", (why, key))
            self.conn.execute("INSERT INTO issues (study_uid, problem) VALUES ('', ?)",
                              (problem,))
        report.unresolved.append(problem)

    def _bucket_by_uid(self) -> None:
        """The universal answer's studies regrouped by a hash of their UID (sample_rank's)."""
        from harness.migration.inventory import sample_rank

        if self.conn.execute("SELECT count(*) FROM partitions WHERE key LIKE 'uid:%'"
                             ).fetchone()[0]:
            return
        width = len(f"{UID_BUCKETS - 1:x}")
        with sqlite_db.transaction(self.conn):
            rows = self.conn.execute("SELECT study_uid FROM partition_studies "
                                     "WHERE partition = 'all'").fetchall()
            moved = [(f"uid:{sample_rank(uid)[:width]}", uid) for (uid,) in rows]
            self._insert(sorted({(bucket, json.dumps({})) for bucket, _ in moved}))
            self.conn.executemany("UPDATE partition_studies SET partition = ? "
                                  "WHERE study_uid = ?", moved)
            self.conn.execute(
                "UPDATE partitions SET state = 'listed', query_json = '{}', studies = "
                "(SELECT count(*) FROM partition_studies p WHERE p.partition = partitions.key) "
                "WHERE key LIKE 'uid:%'")
            self.conn.execute("UPDATE partitions SET state = 'split' WHERE key = 'all'")


def pending_studies(conn: sqlite3.Connection) -> list[tuple[str, bool]]:
    """(StudyInstanceUID, retrieve fully?) not yet committed, partition by partition, so
    partitions finish one after another."""
    return [(uid, bool(retrieve)) for uid, retrieve in conn.execute(
        "SELECT s.study_uid, s.retrieve FROM studies AS s "
        "LEFT JOIN partition_studies AS ps ON ps.study_uid = s.study_uid "
        "LEFT JOIN partitions AS p ON p.key = ps.partition "
        "WHERE s.state = 'listed' ORDER BY p.seq, s.rowid")]


def mark_done(conn: sqlite3.Connection) -> None:
    """Listed partitions all of whose studies are committed become `done`."""
    conn.execute(
        "UPDATE partitions SET state = 'done' WHERE state = 'listed' AND NOT EXISTS ("
        "SELECT 1 FROM partition_studies AS ps JOIN studies AS s ON s.study_uid = ps.study_uid "
        "WHERE ps.partition = partitions.key AND s.state = 'listed')")


def states(conn: sqlite3.Connection) -> dict[str, int]:
    """Partitions by state (what a resumed crawl still has to do)."""
    try:
        return dict(conn.execute("SELECT state, count(*) FROM partitions GROUP BY state"))
    except sqlite3.OperationalError:  # a ledger from before partitions
        return {}

