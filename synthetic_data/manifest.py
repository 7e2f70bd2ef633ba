"""The ground-truth manifest: one JSON line per instance, plus a small JSON summary.

Lines are written as objects are written, so an archive of any size needs no more memory
than one object. Keys are sorted and nothing depends on the clock, so manifests are
byte-identical between runs with the same options.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

MANIFEST_LINES = "manifest.jsonl"
MANIFEST_SUMMARY = "manifest.json"
FORMAT_VERSION = 1


class ManifestWriter:
    """Append instance records to manifest.jsonl and keep running counts for the summary."""

    def __init__(self, folder: Path) -> None:
        self._fh: IO[str] = open(folder / MANIFEST_LINES, "w", encoding="utf-8", newline="\n")
        self.instances = 0
        self.bytes = 0
        self.by_modality: Counter[str] = Counter()
        self.by_syntax: Counter[str] = Counter()
        self.by_charset: Counter[str] = Counter()
        self.by_quirk: Counter[str] = Counter()
        self.quirky = 0
        # objects arrive study by study, series by series: count changes, keep no UID sets
        self.studies = 0
        self.series = 0
        self._last_study = self._last_series = ""
        self.records: set[str] = set()
        self.persons: set[str] = set()
        self.trap_groups: dict[str, str] = {}

    def add(self, record: dict) -> None:
        self._fh.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
        self.instances += 1
        self.bytes += record["size"]
        self.by_modality[record["series"]["modality"]] += 1
        self.by_syntax[record["transfer_syntax_name"]] += 1
        self.by_charset[record["character_set"]] += 1
        if record["quirks"]:
            self.quirky += 1
            self.by_quirk.update(record["quirks"])
        if record["study"]["uid"] != self._last_study:
            self._last_study = record["study"]["uid"]
            self.studies += 1
        if record["series"]["uid"] != self._last_series:
            self._last_series = record["series"]["uid"]
            self.series += 1
        self.records.add(record["patient"]["record_id"])
        self.persons.add(record["patient"]["person_id"])
        for trap in record["traps"]:
            self.trap_groups[trap["group"]] = trap["kind"]

    def close(self) -> None:
        self._fh.close()

    def counts(self) -> dict:
        return {
            "instances": self.instances,
            "bytes": self.bytes,
            "studies": self.studies,
            "series": self.series,
            "patient_records": len(self.records),
            "persons": len(self.persons),
            "quirky_instances": self.quirky,
            "by_modality": dict(sorted(self.by_modality.items())),
            "by_transfer_syntax": dict(sorted(self.by_syntax.items())),
            "by_charset": dict(sorted(self.by_charset.items())),
            "by_quirk": dict(sorted(self.by_quirk.items())),
            "traps": dict(sorted(Counter(self.trap_groups.values()).items())),
        }


def write_summary(folder: Path, options: dict, counts: dict) -> None:
    summary = {"format": "pacs-harness synthetic manifest", "version": FORMAT_VERSION,
               "options": options, "seed": options["seed"], "counts": counts,
               "instances_file": MANIFEST_LINES}
    (folder / MANIFEST_SUMMARY).write_text(
        json.dumps(summary, sort_keys=True, indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8")


def read_manifest(folder: str | Path) -> list[dict]:
    """Load all instance records (for tests and small archives)."""
    path = Path(folder) / MANIFEST_LINES
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def colliding_patient_ids(datasets: Iterable[Any]) -> set[str]:
    """PatientIDs the generator gave to different people (issuer + name): the identity
    traps a migration must report, as ground truth to hold a report against."""
    people: dict[str, set[tuple[str, str]]] = {}
    for ds in datasets:
        people.setdefault(ds.PatientID, set()).add(
            (str(ds.get("IssuerOfPatientID", "")), str(ds.PatientName))
        )
    return {patient_id for patient_id, who in people.items() if len(who) > 1}
