"""Reconciliation: compare a source and a target ledger; what the rules do not allow is a finding.

Instances are matched by SOP Instance UID, series and studies by their UIDs, patients through
their studies. The heavy lifting is SQL over the ATTACHed ledgers (ledger.py, schema 3):
first the per-series sums of both ledgers are compared (`place_sums`: one row per series and
study), then only in the series that differ the source rows are left-joined to the target and
the target rows anti-joined to the source, keeping the instances that are missing, extra or
whose digests or identities differ beyond the rules; everything after that works on those few
rows, so equal ledgers of 10M instances each reconcile in seconds (docs/verification.md).

Sampling (`--sample N`): `sample_statement` says what N fully compared studies prove about
all of them, with the exact hypergeometric upper bound (`sample_bound`).

Unretrievable instances (listed, but their retrieval failed) are one finding each, on the
side where it failed: not compared, and not missing or extra either.

Split by concept: this module is the SQL comparison of two finished ledgers and knows
nothing of nodes or crawling; rolling the kept rows up so that one defect is one finding is
rollups.py, the findings model findings.py, the files written from it writers.py, and
crawling both nodes then reconciling (`verify`) verify.py, above this module.
"""

from __future__ import annotations

import math
import os
import sqlite3
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.migration.findings import FINDING_TYPES, Finding, Findings
from harness.migration.ledger import _check_schema_version
from harness.migration.normalise import IDENTITY_COLUMNS
from harness.migration.rollups import Rollups
from harness.migration.rules import Rules, load_rules
from harness.sqlite_db import readonly_uri

# ---------------------------------------------------------------------------------------
# sampling confidence


CONFIDENCE = 0.95


def _log_comb(n: int, k: int) -> float:
    if k < 0 or k > n:
        return -math.inf
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _at_most(found: int, sampled: int, bad: int, total: int) -> float:
    """P(at most `found` affected studies in a sample of `sampled` drawn without replacement
    from `total` of which `bad` are affected): the hypergeometric distribution function."""
    log_all = _log_comb(total, sampled)
    return math.fsum(math.exp(_log_comb(bad, i) + _log_comb(total - bad, sampled - i) - log_all)
                     for i in range(found + 1))


def sample_bound(sampled: int, total: int, confidence: float = CONFIDENCE, found: int = 0
                 ) -> float:
    """The largest fraction of `total` studies that can be affected, at `confidence`, when
    `found` of `sampled` studies drawn without replacement were: the exact one-sided upper
    bound of the hypergeometric (the largest count of affected studies under which seeing
    `found` or fewer still has a chance of at least 1 - confidence)."""
    if total <= 0:
        return 0.0
    if sampled >= total:
        return found / total  # every study was compared
    if sampled <= 0:
        return 1.0
    alpha = 1.0 - confidence
    low, high = found, total - (sampled - found) + 1  # P(<= found | low) >= alpha > P(.. | high)
    while high - low > 1:
        mid = (low + high) // 2
        if _at_most(found, sampled, mid, total) >= alpha:
            low = mid
        else:
            high = mid
    return low / total


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.3g}%"


def sample_statement(defects: int, sampled: int, total: int, defect: str,
                     confidence: float = CONFIDENCE) -> dict[str, Any]:
    """What a sample proves about the whole archive, as a sentence and as figures, e.g. "0
    defects in 500 sampled studies of 450,000: at most 0.597% affected at 95% confidence";
    with defects found, the estimate and its upper bound. `defect` says what counts."""
    upper = sample_bound(sampled, total, confidence, defects)
    noun = "defect" if defects == 1 else "defects"
    head = f"{defects} {noun} in {sampled:,} sampled studies of {total:,}"
    level = f"{confidence:.0%} confidence"
    if defects:
        text = (f"{head}: an estimated {_percent(defects / sampled)} affected, at most "
                f"{_percent(upper)} at {level}")
    else:
        text = f"{head}: at most {_percent(upper)} affected at {level}"
    return {"defects": defects, "sampled": sampled, "population": total,
            "estimate": defects / sampled if sampled else None, "upper_bound": upper,
            "confidence": confidence, "defect": defect,
            "method": "exact one-sided hypergeometric upper bound (sampling without replacement)",
            "statement": text}


# ---------------------------------------------------------------------------------------
# reconciliation

_CACHE_KIB = 64 * 1024  # SQLite page cache per attached ledger
#: Above this share of differing places, every row is compared in key order instead of the
#: rows of those places (measured: a place-by-place walk visits rows out of key order)
_DESCEND_SHARE = 0.05


def _counts(conn: sqlite3.Connection, alias: str) -> dict[str, int]:
    q = conn.execute
    return {
        "patients": q(f"SELECT count(*) FROM {alias}.patients").fetchone()[0],
        "studies": q(f"SELECT count(*) FROM {alias}.studies").fetchone()[0],
        "series": q(f"SELECT count(*) FROM {alias}.series").fetchone()[0],
        "instances": q(f"SELECT coalesce(sum(instances), 0) FROM {alias}.place_sums"
                       ).fetchone()[0],
    }


def _identity_sql(rules: Rules) -> str:
    """SQL true when source identity x and target identity y (ledger.py `identities` rows)
    agree under the rules; `p` is the prefix of x's issuer (prefix_map)."""
    conds = ["1"]
    for keyword, column in IDENTITY_COLUMNS.items():
        if keyword in rules.ignore:
            continue
        if column == "patient_id":
            prefix = "coalesce(p.prefix, :default_prefix)"
            unchanged = "" if rules.prefix_required else " OR y.patient_id = x.patient_id"
            conds.append(f"(CASE WHEN {prefix} IS NULL THEN y.patient_id = x.patient_id "
                         f"ELSE y.patient_id = {prefix} || x.patient_id{unchanged} END)")
        elif keyword in rules.added:
            conds.append(f"(y.{column} = x.{column} OR x.{column} = '')")
        else:
            conds.append(f"y.{column} = x.{column}")
    if not rules.charset_conversion and "SpecificCharacterSet" not in rules.ignore:
        conds.append("(x.charset IS NULL OR y.charset IS NULL OR x.charset = y.charset)")
    return " AND ".join(conds)


def _identity_same(rules: Rules, a: str, b: str) -> str:
    """SQL true when identity fingerprints `a` (source) and `b` (target) name identities that
    agree under the rules. Only where they differ (or a prefix is required) are the identity
    rules evaluated, on the two `identities` rows."""
    check = (f"EXISTS (SELECT 1 FROM s.identities x JOIN t.identities y ON y.ident = {b} "
             "LEFT JOIN prefix_map p ON p.issuer = x.issuer "
             f"WHERE x.ident = {a} AND {_identity_sql(rules)})")
    if rules.prefix_required:
        return check
    return f"CASE WHEN {a} = {b} THEN 1 ELSE {check} END"  # unchanged passes every other rule


def _same_sql(rules: Rules) -> str:
    """SQL true when source row a and target row b (instance_rows) agree under the rules
    (the prefilter; rollups.py looks at the rows it keeps)."""
    conds = [
        "a.place = b.place",
        "(a.sop_class = b.sop_class OR a.sop_class = '' OR b.sop_class = '')",
        "a.retrieval_error IS NULL AND b.retrieval_error IS NULL",
        "(CASE WHEN a.retrieved = 1 AND b.retrieved = 1 "
        "THEN a.attrs_digest IS b.attrs_digest AND a.pixel_digest IS b.pixel_digest "
        "ELSE a.keys_digest = b.keys_digest END)",
    ]
    return (f"(CASE WHEN {' AND '.join(conds)} THEN {_identity_same(rules, 'a.ident', 'b.ident')}"
            " ELSE 0 END)")


def _place_same_sql(rules: Rules) -> str:
    """SQL true when place_sums rows a and b (ledger.py) say both ledgers hold the same rows
    in that place, with one identity each that agree under the rules."""
    return ("(CASE WHEN a.instances = b.instances AND a.fp_low = b.fp_low "
            "AND a.fp_high = b.fp_high AND a.ident IS NOT NULL AND b.ident IS NOT NULL "
            f"THEN {_identity_same(rules, 'a.ident', 'b.ident')} ELSE 0 END)")


class _Reconciler(Rollups):
    """One reconciliation: the SQL passes, then the rollups (rollups.py) and the rest."""

    # -- SQL passes -------------------------------------------------------------------
    def differences(self) -> None:
        """The instances to look at, in three steps that each read only what may differ:
        `places` (series and study, ledger.py) whose sums or identities differ, then in those
        places `cand` (source rows missing from the target or not the same) and `extra`
        (target rows the source lacks). Equal ledgers cost one pass over place_sums."""
        conn, rules = self.conn, self.rules
        conn.execute("CREATE TEMP TABLE prefix_map (issuer TEXT PRIMARY KEY, prefix TEXT)")
        conn.executemany("INSERT INTO prefix_map VALUES (?, ?)",
                         list(rules.prefix_by_issuer.items()))
        params = {"default_prefix": rules.prefix_default}
        conn.execute("CREATE TEMP TABLE places (place INTEGER PRIMARY KEY)")
        conn.execute(
            "INSERT INTO places SELECT a.place FROM s.place_sums a "
            "LEFT JOIN t.place_sums b ON b.place = a.place "
            f"WHERE b.place IS NULL OR NOT coalesce({_place_same_sql(rules)}, 0)", params)
        conn.execute("INSERT OR IGNORE INTO places SELECT b.place FROM t.place_sums b "
                     "WHERE NOT EXISTS (SELECT 1 FROM s.place_sums a WHERE a.place = b.place)")
        kept = conn.execute("SELECT count(*) FROM temp.places").fetchone()[0]
        total = conn.execute("SELECT count(*) FROM s.place_sums").fetchone()[0]
        if kept <= total * _DESCEND_SHARE:  # the rows of the kept places, by place
            rows_a = "temp.places d CROSS JOIN s.instance_rows a ON a.place = d.place"
            rows_b = "temp.places d CROSS JOIN t.instance_rows b ON b.place = d.place"
        else:  # most places differ: every row, in SOP Instance UID order (cheaper)
            rows_a, rows_b = "s.instance_rows a", "t.instance_rows b"
        conn.execute(
            "CREATE TEMP TABLE cand AS SELECT a.sop_uid AS sop_uid, b.sop_uid IS NULL AS missing "
            f"FROM {rows_a} LEFT JOIN t.instance_rows b ON b.sop_uid = a.sop_uid "
            f"WHERE b.sop_uid IS NULL OR NOT coalesce({_same_sql(rules)}, 0)", params)
        conn.execute(
            f"CREATE TEMP TABLE extra AS SELECT b.sop_uid AS sop_uid FROM {rows_b} "
            "WHERE NOT EXISTS (SELECT 1 FROM s.instance_rows a WHERE a.sop_uid = b.sop_uid)")

    # -- unretrievable ------------------------------------------------------------------
    def unretrievable(self) -> int:
        """One finding per listed instance that could not be retrieved, on its side: its
        content is unknown, so it is neither missing nor compared (see inventory.py)."""
        number = 0
        for alias, side in (("s", "source"), ("t", "target")):
            for sop, series, study, pid, issuer, error in self.conn.execute(
                    f"SELECT i.sop_uid, p.series_uid, p.study_uid, d.patient_id, d.issuer, "
                    f"i.retrieval_error FROM {alias}.instance_rows AS i "
                    "INDEXED BY instance_rows_unretrievable "
                    f"CROSS JOIN {alias}.places p ON p.place = i.place "
                    f"CROSS JOIN {alias}.identities d ON d.ident = i.ident "
                    "WHERE i.retrieval_error IS NOT NULL ORDER BY i.sop_uid"):
                number += 1
                self.findings.append(Finding(
                    "unretrievable", "instance", *self.patient_of(alias, study, (pid, issuer)),
                    study_uid=study, series_uid=series, sop_uid=sop, sop_uids=[sop],
                    related={"side": side, "error": error},
                    detail=f"instance {sop} is listed by the {side} but could not be "
                           f"retrieved: {error}"))
        return number

    # -- sample and warnings ------------------------------------------------------------
    def sample(self, meta: dict[str, dict[str, str]]) -> dict[str, Any] | None:
        """The confidence a sampled full-depth comparison gives about every study: a sampled
        study is a defect when content was altered or could not be retrieved."""
        if not (meta["s"].get("sample") or meta["t"].get("sample")):
            return None
        total = self.conn.execute("SELECT count(*) FROM s.studies").fetchone()[0]
        sampled = {uid for (uid,) in self.conn.execute(
            "SELECT a.study_uid FROM s.studies a JOIN t.studies b ON b.study_uid = a.study_uid "
            "WHERE a.retrieve = 1 AND b.retrieve = 1")}
        unretrievable = {f.study_uid for f in self.findings if f.type == "unretrievable"}
        bad = len(sampled & (self.altered_studies | unretrievable))
        stated = sample_statement(bad, len(sampled), total,
                                  "a defect: a sampled study with altered attributes or pixels, "
                                  "or an instance that could not be retrieved")
        return {**stated, "studies_compared_fully": len(sampled), "studies_total": total,
                "studies_altered": bad, "max_altered_fraction_95": stated["upper_bound"]}

    def crawl_warnings(self, meta: dict[str, dict[str, str]]) -> None:
        for alias, name in (("s", "source"), ("t", "target")):
            issues = self.conn.execute(
                f"SELECT study_uid, sop_uid, problem FROM {alias}.issues LIMIT 20").fetchall()
            total = self.conn.execute(f"SELECT count(*) FROM {alias}.issues").fetchone()[0]
            for study, sop, problem in issues:
                self.warnings.append(f"{name} crawl: {sop or study}: {problem}")
            if total > len(issues):
                self.warnings.append(f"{name} crawl: {total - len(issues)} more issues "
                                     "(see the ledger's issues table)")
        for alias, name in (("s", "source"), ("t", "target")):
            if meta[alias].get("transfer_syntax") == "unknown" and \
                    meta[alias].get("depth") == "full":
                self.warnings.append(
                    f"stored transfer syntaxes unknown: the {name} node "
                    f"({meta[alias].get('kind')}) may convert instances on retrieval (pixels "
                    "were compared decoded; a lossy recompression shows as altered pixels "
                    "unless LossyImageCompression says so)")
        if meta["s"].get("depth") != meta["t"].get("depth"):
            self.warnings.append(
                f"ledgers crawled at different depths (source {meta['s'].get('depth')}, target "
                f"{meta['t'].get('depth')}): only key attributes were compared")


def reconcile(source_ledger: str | os.PathLike[str], target_ledger: str | os.PathLike[str],
              rules: Rules | str | os.PathLike[str] | None = None) -> Findings:
    """Compare two finished ledgers; every difference the rules do not allow is a finding."""
    started = time.perf_counter()
    if not isinstance(rules, Rules):
        rules = load_rules(rules)
    source, target = Path(source_ledger), Path(target_ledger)
    conn = _attach_ro(source, target)
    try:
        meta = {alias: dict(conn.execute(f"SELECT key, value FROM {alias}.meta"))
                for alias in ("s", "t")}
        counts = {"source": _counts(conn, "s"), "target": _counts(conn, "t")}
        rec = _Reconciler(conn, _rules_for_tokens(rules, meta, source, target))
        rec.differences()
        missing, extra = rec.missing_and_extra()
        altered = rec.altered()
        unretrievable = rec.unretrievable()
        rec.crawl_warnings(meta)
        sample = rec.sample(meta)
    finally:
        conn.close()
    order = {t: i for i, t in enumerate(FINDING_TYPES)}
    findings = sorted(rec.findings, key=lambda f: (order[f.type], f.patient_id, f.study_uid,
                                                   f.series_uid, f.sop_uid))
    return Findings(
        source=str(source), target=str(target), counts=counts, findings=findings,
        missing=missing, extra=extra, altered=altered, unretrievable=unretrievable,
        rules=rules.as_dict(), sample=sample,
        warnings=rec.warnings, elapsed_s=round(time.perf_counter() - started, 3),
    )


def _rules_for_tokens(rules: Rules, meta: dict[str, dict[str, str]], source: Path,
                      target: Path) -> Rules:
    """The rules as they apply to the ledgers: with tokenised identities (ledger.py), the
    issuers of the prefix map are tokens too. Two ledgers written differently (one in clear,
    one tokenised) cannot be compared. Declared merges name PatientIDs: tokens too."""
    modes = {alias: meta[alias].get("identities", "clear") for alias in ("s", "t")}
    if modes["s"] != modes["t"]:
        raise ConfigError(
            f"{source} holds patient identities {modes['s']!r}, {target} {modes['t']!r}: "
            "crawl both the same way (verify does; --show-identities for both in clear)"
        )
    if modes["s"] != "tokens" or not (rules.prefix_by_issuer or rules.patient_merges):
        return rules
    from harness.report.identities import LedgerTokens, ledger_key

    tokens = LedgerTokens(ledger_key())
    return replace(rules, prefix_by_issuer={
        tokens.column("IssuerOfPatientID", issuer): prefix
        for issuer, prefix in rules.prefix_by_issuer.items()},
        patient_merges=tuple((tokens.column("PatientID", prior),
                              tokens.column("PatientID", survivor))
                             for prior, survivor in rules.patient_merges))


def _attach_ro(source: Path, target: Path) -> sqlite3.Connection:
    """An in-memory connection with both ledgers attached read-only as `s` and `t`."""
    conn = sqlite3.connect("file::memory:", uri=True, isolation_level=None)
    conn.execute("PRAGMA temp_store = MEMORY")  # only the rows that differ
    # each pass reads both files once in key order: a page cache of 64 MiB per file keeps the
    # B-tree's inner pages; the rest comes from the OS's file cache (no mmap: mapped pages
    # would count in this process's memory, 500 MB for 10M x 10M)
    conn.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
    for alias, path in (("s", source), ("t", target)):
        if not path.is_file():
            conn.close()
            raise ConfigError(f"{path}: no such ledger file")
        conn.execute(f"ATTACH DATABASE ? AS {alias}", (readonly_uri(path),))
        conn.execute(f"PRAGMA {alias}.cache_size = -{_CACHE_KIB}")
        try:
            meta = dict(conn.execute(f"SELECT key, value FROM {alias}.meta"))
        except sqlite3.DatabaseError:
            conn.close()
            raise ConfigError(f"{path}: not a ledger") from None
        try:
            _check_schema_version(path, meta.get("schema_version"))
        except ConfigError:
            conn.close()
            raise
        if "finished" not in meta:
            conn.close()
            raise ConfigError(f"{path}: the crawl of this ledger did not finish; run it again "
                              "(it resumes where it stopped)")
    return conn
