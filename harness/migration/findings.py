"""The findings of one reconciliation: the model the reconciler fills and everything else reads.

Kept apart from the SQL that produces it (reconcile.py) and the files written from it
(writers.py), so the CLI, the report and the scenarios read findings without importing the
reconciler. Levels and types are fixed lists: the order of FINDING_TYPES is the order
findings are reported in, and `by_type` counts in that order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from harness.errors import EXIT_FINDINGS, EXIT_PASS

LEVELS = ("patient", "study", "series", "instance")
FINDING_TYPES = (
    "missing_patient", "missing_study", "missing_series", "missing_instance",
    "extra_patient", "extra_study", "extra_series", "extra_instance",
    "unretrievable", "altered_attributes", "altered_pixels", "recompressed_lossy",
    "duplicate_instance", "patient_reassignment", "study_reassignment",
)


@dataclass
class Finding:
    """One difference the rules do not allow (rolled up: see harness/migration/rollups.py)."""

    type: str
    level: str
    patient_id: str = ""
    issuer: str = ""
    study_uid: str = ""
    series_uid: str = ""
    sop_uid: str = ""
    instances: int = 1
    sop_uids: list[str] = field(default_factory=list)
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)
    related: dict[str, Any] = field(default_factory=dict)
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Findings:
    """The result of one reconciliation and its writers."""

    source: str
    target: str
    counts: dict[str, dict[str, int]]
    findings: list[Finding]
    missing: int  # source instances absent from the target
    extra: int  # target instances absent from the source (duplicates included)
    altered: int  # instances present on both sides that differ beyond the rules
    rules: dict[str, Any]
    unretrievable: int = 0  # listed instances that could not be retrieved (either side)
    sample: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def verdict(self) -> str:
        return "fail" if self.findings else "pass"

    @property
    def exit_code(self) -> int:
        return EXIT_FINDINGS if self.findings else EXIT_PASS

    def by_type(self) -> dict[str, int]:
        counted = Counter(f.type for f in self.findings)
        return {t: counted[t] for t in FINDING_TYPES if counted[t]}

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "counts": self.counts,
            "missing": self.missing,
            "extra": self.extra,
            "altered": self.altered,
            "unretrievable": self.unretrievable,
            "by_type": self.by_type(),
            "source": self.source,
            "target": self.target,
            "rules": self.rules,
            "sample": self.sample,
            "warnings": self.warnings,
            "elapsed_s": self.elapsed_s,
            "findings": [f.as_dict() for f in self.findings],
        }

    def summary_text(self) -> str:
        """A few lines for a person: verdict first."""
        src, tgt = self.counts["source"], self.counts["target"]

        def line(c: dict[str, int]) -> str:
            return (f"{c['patients']} patients, {c['studies']} studies, {c['series']} series, "
                    f"{c['instances']} instances")

        out = [
            f"verdict: {self.verdict.upper()} ({len(self.findings)} findings)",
            f"source: {line(src)}  [{self.source}]",
            f"target: {line(tgt)}  [{self.target}]",
            f"instances missing: {self.missing}, extra: {self.extra}, altered: {self.altered}"
            f", unretrievable: {self.unretrievable}",
        ]
        if self.findings:
            out.append("findings: " + ", ".join(f"{t} {n}" for t, n in self.by_type().items()))
            for f in self.findings[:10]:
                out.append(f"  - {f.type} ({f.level}, {f.instances} instance(s)): {f.detail}")
            if len(self.findings) > 10:
                out.append(f"  ... {len(self.findings) - 10} more in findings.json/findings.csv")
        if self.sample:
            out.append(f"sample: {self.sample['statement']}")
        out.append(f"rules: {self.rules.get('source', '<none>')}")
        for warning in self.warnings[:10]:
            out.append(f"warning: {warning}")
        return "\n".join(out) + "\n"

    def redacted(self, redactor: Any) -> Findings:
        """A copy with patient identities tokenised (harness/report/identities.py)."""
        # one call: every value is learned before any free text is cleaned
        findings, warnings = redactor.redact([[f.as_dict() for f in self.findings],
                                              self.warnings])
        return replace(self, findings=[Finding(**f) for f in findings], warnings=warnings)
