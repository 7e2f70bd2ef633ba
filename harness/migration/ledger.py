"""The ledger: what one PACS node holds, crawled once into SQLite and compared later.

One file per crawl. Tables (see SCHEMA): `meta` (node, depth, sample, crawl state),
`patients`, `studies` (also the crawl progress: `state` is `listed` until the study's
instances are committed, so a killed crawl resumes at the first unfinished study),
`series`, and per instance one narrow row in `instance_rows` (schema 3, for a 10M x 10M
reconciliation in seconds: digests as 16-byte BLOBs; where the instance is filed and whose it
is as 64-bit fingerprints into the small `places` and `identities` tables, so equal texts are
equal integers in both ledgers; clustered by SOP Instance UID, so the source/target join
walks both tables in the same order); `place_sums`, written by finish(), holds per place the
count and sums of its rows' content fingerprints, so reconcile skips every series that is
equal on both sides without reading its instances. The view `instances` gives the wide row
(INSTANCE_COLUMNS, digests in hex) to every other reader. `instance_attrs` holds the
normalised attributes as zlib-compressed JSON, read only for the few instances whose digests
differ; plus `issues` (what the crawl could not read).

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

import hashlib
import json
import os
import sqlite3
import time
import zlib
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

SCHEMA_VERSION = 3  # in meta `schema_version`; 3: compact instance_rows (see module doc)

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
-- where an instance is filed; `place` is fingerprint() of (series_uid, study_uid)
CREATE TABLE IF NOT EXISTS places (
    place INTEGER PRIMARY KEY, series_uid TEXT NOT NULL, study_uid TEXT NOT NULL
);
-- whose an instance is; `ident` is fingerprint() of the other columns
CREATE TABLE IF NOT EXISTS identities (
    ident INTEGER PRIMARY KEY, patient_id TEXT NOT NULL, issuer TEXT NOT NULL,
    patient_name TEXT NOT NULL, birth_date TEXT NOT NULL, sex TEXT NOT NULL, charset TEXT
);
CREATE TABLE IF NOT EXISTS instance_rows (
    sop_uid TEXT PRIMARY KEY, place INTEGER NOT NULL, ident INTEGER NOT NULL,
    fp INTEGER NOT NULL,  -- content_fingerprint() of the row
    sop_class TEXT NOT NULL, transfer_syntax TEXT,
    keys_digest BLOB NOT NULL, attrs_digest BLOB, pixel_digest BLOB, pixel_mode TEXT,
    retrieved INTEGER NOT NULL,
    retrieval_error TEXT  -- listed but not retrievable (depth full): the reason
) WITHOUT ROWID;
-- the wide row of INSTANCE_COLUMNS, digests in hex, for every reader but the reconciler
CREATE VIEW IF NOT EXISTS instances AS SELECT
    i.sop_uid, p.series_uid, p.study_uid, d.patient_id, d.issuer, d.patient_name,
    d.birth_date, d.sex, i.sop_class, i.transfer_syntax, d.charset,
    lower(hex(i.keys_digest)) AS keys_digest,
    nullif(lower(hex(i.attrs_digest)), '') AS attrs_digest,
    nullif(lower(hex(i.pixel_digest)), '') AS pixel_digest,
    i.pixel_mode, i.retrieved, i.retrieval_error
    FROM instance_rows i JOIN places p ON p.place = i.place JOIN identities d ON d.ident = i.ident;
-- attrs: the normalised attributes as JSON, zlib-compressed (a BLOB) when that is shorter
CREATE TABLE IF NOT EXISTS instance_attrs (sop_uid TEXT PRIMARY KEY, attrs NOT NULL)
    WITHOUT ROWID;
-- per place, written by finish(): how many instances, the sums of the two 32-bit halves of
-- their `fp` (equal multisets of rows have equal sums), and their identity when it is one
CREATE TABLE IF NOT EXISTS place_sums (
    place INTEGER PRIMARY KEY, instances INTEGER NOT NULL, fp_low INTEGER NOT NULL,
    fp_high INTEGER NOT NULL, ident INTEGER  -- NULL: more than one identity in the place
);
CREATE TABLE IF NOT EXISTS issues (
    study_uid TEXT NOT NULL DEFAULT '', sop_uid TEXT NOT NULL DEFAULT '', problem TEXT NOT NULL
);
"""
#: Built when a crawl finishes (cheaper than maintaining them row by row).
INDEXES = """
CREATE INDEX IF NOT EXISTS instance_rows_place ON instance_rows (place, ident, fp);
CREATE INDEX IF NOT EXISTS instance_rows_content ON instance_rows (attrs_digest, pixel_digest)
    WHERE attrs_digest IS NOT NULL;
CREATE INDEX IF NOT EXISTS instance_rows_unretrievable ON instance_rows (retrieval_error)
    WHERE retrieval_error IS NOT NULL;
CREATE INDEX IF NOT EXISTS places_series ON places (series_uid);
CREATE INDEX IF NOT EXISTS places_study ON places (study_uid);
CREATE INDEX IF NOT EXISTS studies_patient ON studies (patient_id, issuer);
"""

PLACE_SUMS = """
INSERT INTO place_sums SELECT place, count(*), sum(fp & 4294967295), sum((fp >> 32) & 4294967295),
    CASE WHEN min(ident) = max(ident) THEN min(ident) END
FROM instance_rows GROUP BY place
"""


def fingerprint(*values: str | None) -> int:
    """A signed 64-bit integer naming `values`, the same in every ledger: two ledgers'
    `place` (or `ident`) are equal exactly when the texts are (a collision among a million
    distinct values has a chance of about 1 in 10^7), so reconcile compares integers."""
    text = json.dumps(values, ensure_ascii=False, separators=(",", ":"))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big",
                          signed=True)


def content_fingerprint(sop_uid: str, sop_class: str, retrieved: int, retrieval_error: str | None,
                        keys: bytes, attrs: bytes | None, pixels: bytes | None) -> int:
    """A signed 64-bit integer naming what reconcile compares of an instance besides where it
    is filed and whose it is (`place`, `ident`): summed per place (`place_sums`), two
    ledgers whose sums for a place are equal hold the same rows there."""
    text = "\x1f".join([sop_uid, sop_class, str(int(retrieved)), retrieval_error or "",
                        keys.hex(), (attrs or b"").hex(), (pixels or b"").hex()])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big",
                          signed=True)


def identity_values(row: InstanceRow) -> tuple[str, str, str, str, str, str | None]:
    """The `identities` columns of an instance row (after tokenisation)."""
    return (row.patient_id, row.issuer, row.patient_name, row.birth_date, row.sex, row.charset)


def stored_attrs(attrs_json: str) -> str | bytes:
    """What `instance_attrs.attrs` holds: the JSON, zlib-compressed when that is shorter."""
    packed = zlib.compress(attrs_json.encode(), 6)
    return packed if len(packed) < len(attrs_json) else attrs_json


def attrs_text(stored: str | bytes) -> str:
    """The JSON text of an `instance_attrs.attrs` value (stored_attrs' inverse)."""
    return zlib.decompress(stored).decode() if isinstance(stored, bytes) else stored


def _blob(hex_digest: str | None) -> bytes | None:
    return None if hex_digest is None else bytes.fromhex(hex_digest)


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
            issues = list(issues)
            self.conn.executemany("INSERT OR IGNORE INTO places VALUES (?, ?, ?)", {
                (fingerprint(r.series_uid, r.study_uid), r.series_uid, r.study_uid)
                for r in instances})
            self.conn.executemany("INSERT OR IGNORE INTO identities VALUES (?, ?, ?, ?, ?, ?, ?)",
                                  {(fingerprint(*identity_values(r)), *identity_values(r))
                                   for r in instances})
            for row in instances:
                keys, attrs = _blob(row.keys_digest), _blob(row.attrs_digest)
                pixels = _blob(row.pixel_digest)
                cur = self.conn.execute(
                    "INSERT OR IGNORE INTO instance_rows VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (row.sop_uid, fingerprint(row.series_uid, row.study_uid),
                     fingerprint(*identity_values(row)),
                     content_fingerprint(row.sop_uid, row.sop_class, row.retrieved,
                                         row.retrieval_error, keys, attrs, pixels),
                     row.sop_class, row.transfer_syntax, keys, attrs, pixels,
                     row.pixel_mode, int(row.retrieved), row.retrieval_error))
                if cur.rowcount:
                    self.conn.execute("INSERT INTO instance_attrs VALUES (?, ?)",
                                      (row.sop_uid, stored_attrs(row.attrs_json)))
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
        """Build the indexes and the per-place sums reconciliation needs and mark the crawl
        complete."""
        self.conn.executescript(INDEXES)
        with sqlite_db.transaction(self.conn):
            self.conn.execute("DELETE FROM place_sums")
            self.conn.execute(PLACE_SUMS)
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
            "instances": q("SELECT count(*) FROM instance_rows").fetchone()[0],
        }

    def unretrievable(self) -> int:
        """Listed instances whose retrieval failed (depth full)."""
        return self.conn.execute("SELECT count(*) FROM instance_rows "
                                 "WHERE retrieval_error IS NOT NULL").fetchone()[0]

    def sample_counts(self) -> tuple[int, int, int]:
        """(defects, sampled, total) of a sampled full-depth crawl: studies retrieved fully,
        of all listed, and those of them with an instance that could not be retrieved."""
        q = self.conn.execute
        total = q("SELECT count(*) FROM studies").fetchone()[0]
        sampled = q("SELECT count(*) FROM studies WHERE retrieve = 1").fetchone()[0]
        defects = q("SELECT count(DISTINCT p.study_uid) FROM instance_rows AS i "
                    "INDEXED BY instance_rows_unretrievable "
                    "JOIN places p ON p.place = i.place "
                    "JOIN studies st ON st.study_uid = p.study_uid AND st.retrieve = 1 "
                    "WHERE i.retrieval_error IS NOT NULL").fetchone()[0]
        return defects, sampled, total

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
