"""Reconciliation: compare a source and a target ledger; what the rules do not allow is a finding.

Instances are matched by SOP Instance UID, series and studies by their UIDs, patients through
their studies. The heavy lifting is two SQL passes over the ATTACHed ledgers (source left-
joined to target; target anti-joined to source) that keep only the instances that are missing,
extra or whose digests or identity columns differ beyond the rules; everything after that
works on those few rows, so equal ledgers of 1M instances each reconcile in seconds.

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
from harness.migration.normalise import IDENTITY_COLUMNS
from harness.migration.rollups import Rollups
from harness.migration.rules import Rules, load_rules
from harness.sqlite_db import readonly_uri

# ---------------------------------------------------------------------------------------
# sampling confidence


def sample_bound(sampled: int, total: int, confidence: float = 0.95) -> float:
    """The largest fraction of studies that could be altered, at `confidence`, when none of
    `sampled` studies drawn without replacement from `total` was (hypergeometric)."""
    if total <= 0 or sampled >= total:
        return 0.0
    if sampled <= 0:
        return 1.0
    alpha = 1.0 - confidence

    def log_p_none(bad: int) -> float:  # P(no altered study in the sample | `bad` of them)
        if total - bad < sampled:
            return -math.inf
        return (math.lgamma(total - bad + 1) - math.lgamma(total - bad - sampled + 1)
                - math.lgamma(total + 1) + math.lgamma(total - sampled + 1))

    low, high = 0, total  # P(0 | low) >= alpha > P(0 | high)
    while high - low > 1:
        mid = (low + high) // 2
        if log_p_none(mid) >= math.log(alpha):
            low = mid
        else:
            high = mid
    return low / total


# ---------------------------------------------------------------------------------------
# reconciliation


def _counts(conn: sqlite3.Connection, alias: str) -> dict[str, int]:
    q = conn.execute
    return {
        "patients": q(f"SELECT count(*) FROM {alias}.patients").fetchone()[0],
        "studies": q(f"SELECT count(*) FROM {alias}.studies").fetchone()[0],
        "series": q(f"SELECT count(*) FROM {alias}.series").fetchone()[0],
        "instances": q(f"SELECT count(*) FROM {alias}.instances").fetchone()[0],
    }


def _same_sql(rules: Rules) -> str:
    """SQL true when source row a and target row b agree under the rules (prefilter)."""
    conds = [
        "a.series_uid = b.series_uid",
        "a.study_uid = b.study_uid",
        "(a.sop_class = b.sop_class OR a.sop_class = '' OR b.sop_class = '')",
        "a.retrieval_error IS NULL AND b.retrieval_error IS NULL",
        "(CASE WHEN a.retrieved = 1 AND b.retrieved = 1 "
        "THEN a.attrs_digest IS b.attrs_digest AND a.pixel_digest IS b.pixel_digest "
        "ELSE a.keys_digest = b.keys_digest END)",
    ]
    for keyword, column in IDENTITY_COLUMNS.items():
        if keyword in rules.ignore:
            continue
        if column == "patient_id":
            prefix = "coalesce(p.prefix, :default_prefix)"
            unchanged = "" if rules.prefix_required else " OR b.patient_id = a.patient_id"
            conds.append(f"(CASE WHEN {prefix} IS NULL THEN b.patient_id = a.patient_id "
                         f"ELSE b.patient_id = {prefix} || a.patient_id{unchanged} END)")
        elif keyword in rules.added:
            conds.append(f"(b.{column} = a.{column} OR a.{column} = '')")
        else:
            conds.append(f"b.{column} = a.{column}")
    if not rules.charset_conversion and "SpecificCharacterSet" not in rules.ignore:
        conds.append("(a.charset IS NULL OR b.charset IS NULL OR a.charset = b.charset)")
    return "(" + " AND ".join(conds) + ")"


class _Reconciler(Rollups):
    """One reconciliation: the SQL passes, then the rollups (rollups.py) and the rest."""

    # -- SQL passes -------------------------------------------------------------------
    def differences(self) -> None:
        conn, rules = self.conn, self.rules
        conn.execute("CREATE TEMP TABLE prefix_map (issuer TEXT PRIMARY KEY, prefix TEXT)")
        conn.executemany("INSERT INTO prefix_map VALUES (?, ?)",
                         list(rules.prefix_by_issuer.items()))
        conn.execute(
            "CREATE TEMP TABLE cand AS SELECT a.sop_uid AS sop_uid, b.sop_uid IS NULL AS missing "
            "FROM s.instances a LEFT JOIN t.instances b ON b.sop_uid = a.sop_uid "
            "LEFT JOIN prefix_map p ON p.issuer = a.issuer "
            f"WHERE b.sop_uid IS NULL OR NOT coalesce({_same_sql(rules)}, 0)",
            {"default_prefix": rules.prefix_default},
        )
        conn.execute(
            "CREATE TEMP TABLE extra AS SELECT b.sop_uid AS sop_uid FROM t.instances b "
            "WHERE NOT EXISTS (SELECT 1 FROM s.instances a WHERE a.sop_uid = b.sop_uid)"
        )

    # -- unretrievable ------------------------------------------------------------------
    def unretrievable(self) -> int:
        """One finding per listed instance that could not be retrieved, on its side: its
        content is unknown, so it is neither missing nor compared (see inventory.py)."""
        number = 0
        for alias, side in (("s", "source"), ("t", "target")):
            for sop, series, study, pid, issuer, error in self.conn.execute(
                    f"SELECT sop_uid, series_uid, study_uid, patient_id, issuer, "
                    f"retrieval_error FROM {alias}.instances "
                    "WHERE retrieval_error IS NOT NULL ORDER BY sop_uid"):
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
        if not (meta["s"].get("sample") or meta["t"].get("sample")):
            return None
        total = self.conn.execute("SELECT count(*) FROM s.studies").fetchone()[0]
        sampled = [uid for (uid,) in self.conn.execute(
            "SELECT a.study_uid FROM s.studies a JOIN t.studies b ON b.study_uid = a.study_uid "
            "WHERE a.retrieve = 1 AND b.retrieve = 1")]
        bad = len(set(sampled) & self.altered_studies)
        bound = sample_bound(len(sampled), total) if not bad else None
        if bad:
            statement = (f"{bad} of {len(sampled)} fully compared studies have altered content "
                         f"(of {total} studies)")
        else:
            statement = (f"no altered content in {len(sampled)} fully compared studies of "
                         f"{total}: with 95% confidence at most {bound:.2%} of the studies "
                         "have altered attributes or pixels")
        return {"studies_compared_fully": len(sampled), "studies_total": total,
                "studies_altered": bad, "max_altered_fraction_95": bound,
                "statement": statement}

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
    conn.execute("PRAGMA temp_store = MEMORY")
    for alias, path in (("s", source), ("t", target)):
        if not path.is_file():
            conn.close()
            raise ConfigError(f"{path}: no such ledger file")
        conn.execute(f"ATTACH DATABASE ? AS {alias}", (readonly_uri(path),))
        try:
            meta = dict(conn.execute(f"SELECT key, value FROM {alias}.meta"))
        except sqlite3.DatabaseError:
            conn.close()
            raise ConfigError(f"{path}: not a ledger") from None
        if "finished" not in meta:
            conn.close()
            raise ConfigError(f"{path}: the crawl of this ledger did not finish; run it again "
                              "(it resumes where it stopped)")
    return conn
