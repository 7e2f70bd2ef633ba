"""verify = crawl the source, crawl the target, reconcile the two ledgers, write the findings.

The orchestration sits above the comparison: reconcile.py compares two finished ledgers and
knows nothing of nodes or crawling, so it can run on ledgers from anywhere (an earlier run,
another machine); this module is the one place that drives nodes (inventory.py) to make them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.migration.findings import Findings
from harness.migration.inventory import crawl
from harness.migration.reconcile import _attach_ro, reconcile
from harness.migration.rules import Rules, load_rules
from harness.migration.writers import write_findings
from harness.report.identities import redactor_for

VerifyProgress = Callable[[str, int, int], None]


@dataclass
class VerifyResult:
    """Both crawls and their reconciliation; `as_json()` is what the CLI prints."""

    findings: Findings
    source_crawl: Any  # inventory.CrawlSummary
    target_crawl: Any
    paths: dict[str, str]

    @property
    def verdict(self) -> str:
        return self.findings.verdict

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        return self.findings.counts

    @property
    def missing(self) -> int:
        return self.findings.missing

    @property
    def extra(self) -> int:
        return self.findings.extra

    @property
    def altered(self) -> int:
        return self.findings.altered

    @property
    def unretrievable(self) -> int:
        return self.findings.unretrievable

    @property
    def exit_code(self) -> int:
        return self.findings.exit_code

    def as_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "counts": self.counts, "missing": self.missing,
                "extra": self.extra, "altered": self.altered,
                "unretrievable": self.unretrievable}


def verify(
    source: Any,
    target: Any,
    workdir: str | os.PathLike[str],
    depth: str = "attributes",
    rules: Rules | str | os.PathLike[str] | None = None,
    progress: VerifyProgress | None = None,
    *,
    sample: int | None = None,
    resume: bool = False,
    redactor: Any = None,
    workers: int = 1,
    partition: str = "date",
    partition_size: int | None = None,
    study_dates: str | None = None,
) -> VerifyResult:
    """Crawl `source` and `target` (Nodes) into `workdir`, reconcile, write the findings.

    `progress(side, done, total)` with side `source` or `target`, in studies. Ledgers from
    an earlier run in `workdir` are replaced unless `resume=True`. `workers`, `partition`,
    `partition_size` and `study_dates` (verify one share, e.g. a year) are each crawl's
    (inventory.crawl).
    """
    if not isinstance(rules, Rules):
        rules = load_rules(rules)  # fail on a bad rules file before crawling for an hour
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    summaries = {}
    # both ledgers alike: tokens unless both nodes hold synthetic data only (or identities
    # were asked for), with the rules' prefixes kept in clear so prefix rules still hold
    identities = "clear" if redactor_for(source, target) is None else "tokens"
    prefixes = tuple({*rules.prefix_by_issuer.values(), rules.prefix_default or ""} - {""})
    for side, node in (("source", source), ("target", target)):
        report = (lambda d, t, s=side: progress(s, d, t)) if progress else None
        summaries[side] = crawl(node, out / f"{side}.ledger.sqlite", depth=depth, sample=sample,
                                progress=report, resume=resume, identities=identities,
                                identity_prefixes=prefixes, workers=workers,
                                partition=partition, partition_size=partition_size,
                                study_dates=study_dates)
    findings = reconcile(out / "source.ledger.sqlite", out / "target.ledger.sqlite", rules)
    paths = {k: str(v) for k, v in write_findings(findings, out, redactor).items()}
    paths["source_ledger"] = str(out / "source.ledger.sqlite")
    paths["target_ledger"] = str(out / "target.ledger.sqlite")
    return VerifyResult(findings, summaries["source"], summaries["target"], paths)


def migrated_instances(result: VerifyResult) -> list[tuple[str, str]]:
    """(SOP Class UID, SOP Instance UID), as the target holds them, of every instance found
    on the target that the source ledger has: what the target is asked to commit (PS3.4 J)
    before the source is retired (`verify --commit`)."""
    conn = _attach_ro(Path(result.paths["source_ledger"]), Path(result.paths["target_ledger"]))
    try:
        return [(str(sop_class), str(sop_uid)) for sop_class, sop_uid in conn.execute(
            "SELECT t.sop_class, t.sop_uid FROM t.instances AS t JOIN s.instances AS s "
            "ON s.sop_uid = t.sop_uid ORDER BY t.study_uid, t.series_uid, t.sop_uid")]
    finally:
        conn.close()
