"""The ledger: what one PACS node holds, crawled once into SQLite and compared later.

One file per crawl. Tables (see SCHEMA): `meta` (node, depth, sample, crawl state),
`patients`, `studies` (also the crawl progress: `state` is `listed` until the study's
instances are committed, so a killed crawl resumes at the first unfinished study),
`series`, `instances` (key attributes and digests, kept narrow so a 1M x 1M reconciliation
is a fast join) and `instance_attrs` (the normalised attributes as JSON, read only for the
few instances whose digests differ), plus `issues` (what the crawl could not read).

An instance that was listed but could not be retrieved keeps its listing-level row
(`retrieved` 0) with the reason in `retrieval_error`: it is never dropped, so counts at depth
full equal those at depth attributes and reconciliation reports it as unretrievable.

A ledger of a node that may hold real patients (external, not declared `synthetic: true`)
holds no identity: meta `identities` = `tokens` and every identity column, the study keys and
the identifying attributes in `instance_attrs` are keyed tokens (harness/report/identities.py,
LedgerTokens; the key stays in the state directory). Digests are computed before, over the
clear values, so equal data still has equal digests.

The file's schema version is meta `schema_version`, where ledgers have always kept it
(PRAGMA user_version stays 0); a ledger of another version is refused in one line (exit 2)
before anything in it changes. Connections and transactions are harness/sqlite_db.py's.

What a row holds, and why it means the same whichever node it came from (normalised
attributes, digests), is harness/migration/normalise.py.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import sqlite_db
from harness.errors import ConfigError
from harness.migration.normalise import (
    IDENTITY_COLUMNS,
    INSTANCE_COLUMNS,
    InstanceRow,
    SeriesRow,
    StudyRow,
    text_value,
)

SCHEMA_VERSION = 2  # in meta `schema_version`; 2: instances.retrieval_error

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS patients (
    patient_id TEXT NOT NULL, issuer TEXT NOT NULL DEFAULT '',
    patient_name TEXT NOT NULL DEFAULT '', birth_date TEXT NOT NULL DEFAULT '',
    sex TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (patient_id, issuer)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL DEFAULT '', issuer TEXT NOT NULL DEFAULT '',
    study_date TEXT NOT NULL DEFAULT '', accession TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    reported_series INTEGER, reported_instances INTEGER,
    keys_json TEXT NOT NULL DEFAULT '{}',
    retrieve INTEGER NOT NULL DEFAULT 0,   -- 1: instances retrieved (full depth or sample)
    state TEXT NOT NULL DEFAULT 'listed'   -- listed -> done once its instances are committed
);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL,
    modality TEXT NOT NULL DEFAULT '', series_number TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL, study_uid TEXT NOT NULL,
    patient_id TEXT NOT NULL, issuer TEXT NOT NULL, patient_name TEXT NOT NULL,
    birth_date TEXT NOT NULL, sex TEXT NOT NULL,
    sop_class TEXT NOT NULL, transfer_syntax TEXT, charset TEXT,
    keys_digest TEXT NOT NULL, attrs_digest TEXT, pixel_digest TEXT, pixel_mode TEXT,
    retrieved INTEGER NOT NULL,
    retrieval_error TEXT  -- listed but not retrievable (depth full): the reason
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS instance_attrs (sop_uid TEXT PRIMARY KEY, attrs_json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS issues (
    study_uid TEXT NOT NULL DEFAULT '', sop_uid TEXT NOT NULL DEFAULT '', problem TEXT NOT NULL
);
"""
#: Built when a crawl finishes (cheaper than maintaining them row by row).
INDEXES = """
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_uid);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_uid);
CREATE INDEX IF NOT EXISTS instances_content ON instances (attrs_digest, pixel_digest)
    WHERE attrs_digest IS NOT NULL;
CREATE INDEX IF NOT EXISTS studies_patient ON studies (patient_id, issuer);
"""


def connect(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """The ledger's connection (harness/sqlite_db.py: WAL, autocommit, busy timeout) with
    plain tuple rows, which the crawl and its readers compare and unpack."""
    conn = sqlite_db.connect(path)
    conn.row_factory = None
    return conn


def _check_schema_version(path: Path, stored: str | None) -> None:
    """Refuse, in one line (ConfigError, exit 2), a ledger this harness does not read: one
    written by a newer or an older harness, or a file without a version."""
    try:
        found = int(stored or "")
    except ValueError:
        found = 0
    if found == SCHEMA_VERSION:
        return
    if found <= 0:
        raise ConfigError(f"{path}: ledger schema {stored!r}, this harness reads "
                          f"{str(SCHEMA_VERSION)!r}")
    try:
        sqlite_db.check_version(found, SCHEMA_VERSION, what=f"{path}: ledger")
    except sqlite_db.SchemaVersionError as exc:
        raise ConfigError(str(exc)) from None


class Ledger:
    """Writer and reader of one ledger file; each study is committed as one transaction."""

    def __init__(self, path: str | os.PathLike[str], conn: sqlite3.Connection) -> None:
        self.path = Path(path)
        self.conn = conn
        self._tokens: Any = False  # LedgerTokens | None once read from meta

    @property
    def tokens(self) -> Any:
        """LedgerTokens when this ledger holds identities as tokens (meta `identities`)."""
        if self._tokens is False:
            meta = self.meta()
            self._tokens = None
            if meta.get("identities") == "tokens":
                from harness.report.identities import LedgerTokens, ledger_key

                prefixes = json.loads(meta.get("identity_prefixes") or "[]")
                self._tokens = LedgerTokens(ledger_key(), tuple(prefixes))
        return self._tokens

    def _study_row(self, row: StudyRow) -> StudyRow:
        tokens = self.tokens
        if tokens is None:
            return row
        return StudyRow(
            study_uid=row.study_uid,
            **{col: tokens.column(kw, getattr(row, col)) for kw, col in IDENTITY_COLUMNS.items()},
            keys=tokens.attrs(row.keys), reported_series=row.reported_series,
            reported_instances=row.reported_instances, retrieve=row.retrieve,
        )

    def _instance_row(self, row: InstanceRow) -> InstanceRow:
        tokens = self.tokens
        if tokens is None:
            return row
        values = asdict(row)
        for kw, col in IDENTITY_COLUMNS.items():
            values[col] = tokens.column(kw, values[col])
        values["attrs_json"] = json.dumps(tokens.attrs(json.loads(row.attrs_json)),
                                          sort_keys=True, ensure_ascii=False)
        return InstanceRow(**values)

    def __repr__(self) -> str:
        return f"Ledger({self.path})"

    @classmethod
    def create(cls, path: str | os.PathLike[str], meta: dict[str, Any]) -> Ledger:
        """A new, empty ledger (an existing file at `path` is replaced)."""
        p = Path(path)
        if p.exists():
            try:
                cls.open(p).close()
            except ConfigError as exc:
                raise ConfigError(f"{exc}; refusing to replace it with a new ledger") from None
        p.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm"):
            Path(str(p) + suffix).unlink(missing_ok=True)
        ledger = cls(p, connect(p))
        ledger.conn.executescript(SCHEMA)
        ledger.set_meta(schema_version=SCHEMA_VERSION, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                        **meta)
        return ledger

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Ledger:
        """An existing ledger; ConfigError when it is missing or not a ledger."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such ledger file")
        # the version is read before anything is written (even the journal mode), so a file
        # that is not a ledger, or a newer harness's, is refused as it was found
        conn = sqlite_db.connect(p, journal_mode=None, synchronous=None)
        try:
            version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError:
            raise ConfigError(f"{p}: not a ledger (no meta table)") from None
        finally:
            conn.close()
        _check_schema_version(p, version and version[0])
        return cls(p, connect(p))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- meta -------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta"))

    def set_meta(self, **values: Any) -> None:
        self.conn.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in values.items()],
        )

    # -- writing ----------------------------------------------------------------------
    def mark_for_retrieval(self, study_uids: Iterable[str]) -> None:
        """The studies a full-depth crawl retrieves (all, or the sample), in one transaction."""
        with sqlite_db.transaction(self.conn):
            self.conn.executemany("UPDATE studies SET retrieve = 1 WHERE study_uid = ?",
                                  [(uid,) for uid in study_uids])

    def add_studies(self, rows: Iterable[StudyRow]) -> int:
        """Record listed studies (and their patients); returns how many are new."""
        before = self.conn.total_changes
        rows = [self._study_row(row) for row in rows]
        with sqlite_db.transaction(self.conn):
            for row in rows:
                self.conn.execute(
                    "INSERT OR IGNORE INTO patients VALUES (?, ?, ?, ?, ?)",
                    (row.patient_id, row.issuer, row.patient_name, row.birth_date, row.sex),
                )
                cur = self.conn.execute(
                    "INSERT OR IGNORE INTO studies (study_uid, patient_id, issuer, study_date, "
                    "accession, description, reported_series, reported_instances, keys_json, "
                    "retrieve) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (row.study_uid, row.patient_id, row.issuer,
                     text_value(row.keys.get("StudyDate")),
                     text_value(row.keys.get("AccessionNumber")),
                     text_value(row.keys.get("StudyDescription")),
                     row.reported_series, row.reported_instances,
                     json.dumps(row.keys, sort_keys=True, ensure_ascii=False), int(row.retrieve)),
                )
                if not cur.rowcount:
                    self.conn.execute(
                        "INSERT INTO issues (study_uid, problem) VALUES (?, ?)",
                        (row.study_uid, f"study listed more than once (also under patient "
                                        f"{row.patient_id!r})"),
                    )
        return self.conn.total_changes - before

    def commit_study(self, study_uid: str, series: Iterable[SeriesRow],
                     instances: Iterable[InstanceRow], issues: Iterable[tuple[str, str]] = ()
                     ) -> int:
        """Write one study's series, instances and issues and mark it done, atomically."""
        instances = [self._instance_row(row) for row in instances]
        with sqlite_db.transaction(self.conn):
            self.conn.executemany(
                "INSERT OR IGNORE INTO series VALUES (?, ?, ?, ?, ?)",
                [(s.series_uid, s.study_uid, s.modality, s.series_number, s.description)
                 for s in series],
            )
            placeholders = ", ".join("?" * len(INSTANCE_COLUMNS))
            issues = list(issues)
            for row in instances:
                cur = self.conn.execute(
                    f"INSERT OR IGNORE INTO instances VALUES ({placeholders})", row.values()
                )
                if cur.rowcount:
                    self.conn.execute("INSERT INTO instance_attrs VALUES (?, ?)",
                                      (row.sop_uid, row.attrs_json))
                else:
                    issues.append((row.sop_uid, "SOP Instance UID seen twice on the node "
                                                f"(again in study {row.study_uid})"))
            self.conn.executemany(
                "INSERT INTO issues (study_uid, sop_uid, problem) VALUES (?, ?, ?)",
                [(study_uid, sop, problem) for sop, problem in issues],
            )
            self.conn.execute("UPDATE studies SET state = 'done' WHERE study_uid = ?",
                              (study_uid,))
        return len(instances)

    def finish(self, **meta: Any) -> None:
        """Build the indexes reconciliation needs and mark the crawl complete."""
        self.conn.executescript(INDEXES)
        self.set_meta(finished=time.strftime("%Y-%m-%dT%H:%M:%S"), **meta)
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- reading ----------------------------------------------------------------------
    def pending_studies(self) -> list[tuple[str, bool]]:
        """(StudyInstanceUID, retrieve fully?) of the studies not yet committed."""
        return [(uid, bool(r)) for uid, r in self.conn.execute(
            "SELECT study_uid, retrieve FROM studies WHERE state = 'listed' ORDER BY rowid")]

    def study_keys(self, study_uid: str) -> dict[str, Any]:
        row = self.conn.execute("SELECT keys_json FROM studies WHERE study_uid = ?",
                                (study_uid,)).fetchone()
        return json.loads(row[0]) if row else {}

    def counts(self) -> dict[str, int]:
        """Patients and studies as listed, series and instances as listed (retrievable or
        not: the listing is what the node holds)."""
        q = self.conn.execute
        return {
            "patients": q("SELECT count(*) FROM patients").fetchone()[0],
            "studies": q("SELECT count(*) FROM studies").fetchone()[0],
            "series": q("SELECT count(*) FROM series").fetchone()[0],
            "instances": q("SELECT count(*) FROM instances").fetchone()[0],
        }

    def unretrievable(self) -> int:
        """Listed instances whose retrieval failed (depth full)."""
        return self.conn.execute("SELECT count(*) FROM instances "
                                 "WHERE retrieval_error IS NOT NULL").fetchone()[0]

    def issues(self) -> list[dict[str, str]]:
        return [{"study_uid": s, "sop_uid": i, "problem": p}
                for s, i, p in self.conn.execute("SELECT study_uid, sop_uid, problem FROM issues")]

    def iter_instances(self) -> Iterator[dict[str, Any]]:
        cur = self.conn.execute(f"SELECT {', '.join(INSTANCE_COLUMNS)} FROM instances")
        for values in cur:
            yield dict(zip(INSTANCE_COLUMNS, values, strict=True))


@dataclass
class LedgerInfo:
    """What `ledger_info` reports about a file (for summaries)."""

    path: str
    meta: dict[str, str]
    counts: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ledger_info(path: str | os.PathLike[str]) -> LedgerInfo:
    with Ledger.open(path) as ledger:
        return LedgerInfo(str(path), ledger.meta(), ledger.counts())
