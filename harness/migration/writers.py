"""The files a reconciliation leaves for people and tools: findings.json (machine-readable,
every finding with its UIDs), findings.csv (one row per finding and attribute, so a
spreadsheet filter on any column works) and summary.txt (counts, findings by type, verdict).

Apart from the model (findings.py) because only the end of a verify writes files; patient
identities are tokenised here, on the way out, when a redactor is given.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from harness.migration.findings import Finding, Findings


def write_findings(findings: Findings, out_dir: str | os.PathLike[str],
                   redactor: Any = None) -> dict[str, Path]:
    """Write findings.json, findings.csv and summary.txt into `out_dir` (identities
    tokenised by `redactor` when given)."""
    if redactor is not None:
        return write_findings(findings.redacted(redactor), out_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "findings.json", "csv": out / "findings.csv",
             "summary": out / "summary.txt"}
    paths["json"].write_text(json.dumps(findings.as_dict(), indent=2, ensure_ascii=False) + "\n",
                             encoding="utf-8")
    write_csv(findings.findings, paths["csv"])
    paths["summary"].write_text(findings.summary_text(), encoding="utf-8")
    return paths


CSV_COLUMNS = ("finding", "type", "level", "patient_id", "issuer", "study_uid", "series_uid",
               "sop_uid", "instances", "attribute", "before", "after", "detail")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def write_csv(findings: Iterable[Finding], path: str | os.PathLike[str]) -> None:
    """One row per finding and attribute, so a spreadsheet filter on any column works."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for number, f in enumerate(findings, start=1):
            base = [number, f.type, f.level, f.patient_id, f.issuer, f.study_uid, f.series_uid,
                    f.sop_uid, f.instances]
            if f.attributes:
                for name, change in f.attributes.items():
                    writer.writerow([*base, name, _cell(change.get("before")),
                                     _cell(change.get("after")), f.detail])
            else:
                writer.writerow([*base, "", "", "", f.detail])

