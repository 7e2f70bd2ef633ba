"""Merge partition ledgers into one: a crawl spread over several machines, reconciled once.

Why: reconcile (reconcile.py) compares one source ledger with one target ledger. A crawl of
a very large archive is split into partitions (date ranges or UID ranges, docs/scale.md),
each crawled by its own machine into its own ledger; this module puts them back together so
the comparison, its rollups and its findings are exactly those of a one-shot crawl.

The partitions must be finished crawls of the same node (AE title, kind), at the same depth,
sample, source (via), identity mode and identity prefixes; a tokenised ledger's tokens are
keyed by the state directory's key (harness/report/identities.py), so machines that crawl
tokenised partitions share that key file. Each partition is ATTACHed read-only and copied
with INSERT ... SELECT, one transaction per partition. A study or an instance found in two
partitions (overlapping ranges) is kept once and reported in the merged ledger's `issues`,
as the crawl reports an instance seen twice.

    pacs-harness merge-ledgers merged.sqlite part-2019.sqlite part-2020.sqlite
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from harness import sqlite_db
from harness.errors import ConfigError
from harness.migration.ledger import Ledger, ledger_info

#: what partitions of one crawl have in common (meta keys)
SAME = ("ae_title", "kind", "depth", "sample", "via", "identities", "identity_prefixes",
        "transfer_syntax", "schema_version")
#: meta that belongs to one partition's crawl, not to the merged ledger
_OWN = ("created", "finished", "summary", "listing", "schema_version", "study_dates")


def merge_ledgers(parts: Sequence[str | os.PathLike[str]],
                  merged_path: str | os.PathLike[str]) -> dict[str, int]:
    """Write the union of the finished partition ledgers `parts` into `merged_path` (replaced
    if it is a ledger) and return its counts."""
    paths = [Path(p) for p in parts]
    out = Path(merged_path)
    if not paths:
        raise ConfigError("merge: name at least one partition ledger")
    if out.resolve() in {p.resolve() for p in paths}:
        raise ConfigError(f"{out}: the merged ledger cannot be one of the partitions")
    metas = [ledger_info(p).meta for p in paths]  # ConfigError for a file that is no ledger
    for path, meta in zip(paths, metas, strict=True):
        if "finished" not in meta:
            raise ConfigError(f"{path}: the crawl of this partition did not finish; run it "
                              "again (it resumes where it stopped)")
        different = [k for k in SAME if meta.get(k) != metas[0].get(k)]
        if different:
            what = ", ".join(f"{k} {meta.get(k)!r} (in {paths[0]}: {metas[0].get(k)!r})"
                             for k in different)
            raise ConfigError(f"{path}: not a partition of the same crawl: {what}")
    ledger = Ledger.create(out, {k: v for k, v in metas[0].items() if k not in _OWN})
    try:
        for path in paths:
            _copy_partition(ledger, path)
        ledger.finish(listing="complete", partitions=[
            {"ledger": str(p), "study_dates": m.get("study_dates") or "all",
             "created": m.get("created"), "finished": m.get("finished")}
            for p, m in zip(paths, metas, strict=True)])
        return ledger.counts()
    finally:
        ledger.close()


def _copy_partition(ledger: Ledger, path: Path) -> None:
    """One partition into the merged ledger, in one transaction; overlaps become issues."""
    conn = ledger.conn
    conn.execute("ATTACH DATABASE ? AS part", (sqlite_db.readonly_uri(path),))
    try:
        with sqlite_db.transaction(conn):
            conn.execute(
                "INSERT INTO issues (study_uid, problem) SELECT study_uid, ? FROM part.studies "
                "WHERE study_uid IN (SELECT study_uid FROM main.studies)",
                (f"study listed by more than one partition (again in {path.name}): "
                 "overlapping partitions",))
            conn.execute(
                "INSERT INTO issues (study_uid, sop_uid, problem) SELECT study_uid, sop_uid, ? "
                "FROM part.instances WHERE sop_uid IN (SELECT sop_uid FROM main.instance_rows)",
                (f"SOP Instance UID seen twice on the node (again in partition {path.name})",))
            # `instances` is a view over instance_rows, places and identities (ledger.py);
            # place_sums are built again by finish() over the merged rows
            for table in ("patients", "studies", "series", "places", "identities",
                          "instance_rows", "instance_attrs"):
                conn.execute(f"INSERT OR IGNORE INTO main.{table} SELECT * FROM part.{table}")
            conn.execute("INSERT INTO main.issues SELECT * FROM part.issues")
    finally:
        conn.execute("DETACH DATABASE part")
