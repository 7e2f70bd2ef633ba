"""Identity reconciliation for cross-facility merges.

Before migrating: patients whose ID collides across facilities (same PatientID, different
issuer or demographics) and likely duplicates (same person under different IDs), each with
what the rule set does to it. After migrating: no two source patients merged into one
target patient. (A study that changed patient is a reconciliation finding already.)

Works on inventory ledgers (harness/migration/ledger.py), so it applies to any node kind.
"""

from __future__ import annotations

import os
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from harness import sqlite_db
from harness.migration.rules import Rules

PatientKey = tuple[str, str]  # (PatientID, IssuerOfPatientID)


def _fold(name: str) -> str:
    """Name reduced to what survives typical variants: accents, case, separators."""
    text = unicodedata.normalize("NFKD", name)
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = text.replace("ue", "u").replace("oe", "o").replace("ae", "a")  # Müller/Mueller
    return "".join(c for c in text.casefold() if c.isalnum())


def _family(name: str) -> str:
    return _fold(name.split("^", 1)[0])


@dataclass
class IdentityReport:
    collisions: list[dict[str, Any]] = field(default_factory=list)
    likely_duplicates: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "collisions": self.collisions,
            "likely_duplicates": self.likely_duplicates,
            "unresolved_collisions": sum(1 for c in self.collisions if not c["resolved_by_rules"]),
        }


def _patients(ledger: str | os.PathLike[str]) -> list[dict[str, str]]:
    conn = sqlite_db.connect_readonly(ledger)
    try:
        # per instance, not per patient row: a PACS that indexes patients by PatientID
        # alone keeps one name for two colliding people, while each study keeps its own;
        # the ledger keeps each distinct identity once (ledger.py `identities`), the charset
        # being the only other column there
        rows = conn.execute(
            "SELECT DISTINCT patient_id, issuer, patient_name, birth_date, sex FROM identities"
        ).fetchall()
    finally:
        conn.close()
    keys = ("patient_id", "issuer", "name", "birth_date", "sex")
    return [dict(zip(keys, r, strict=True)) for r in rows]


def identity_report(ledger: str | os.PathLike[str], rules: Rules | None = None) -> IdentityReport:
    """Collisions and likely duplicates among a source ledger's patients."""
    rules = rules or Rules()
    patients = _patients(ledger)
    report = IdentityReport()

    by_id: dict[str, list[dict[str, str]]] = defaultdict(list)
    for p in patients:
        by_id[p["patient_id"]].append(p)
    for patient_id, records in sorted(by_id.items()):
        people = {(r["issuer"], _fold(r["name"]), r["birth_date"]) for r in records}
        if len(records) < 2 or len(people) < 2:
            continue
        migrated_ids = {
            (rules.patient_id_prefix(r["issuer"]) or "") + patient_id for r in records
        }
        report.collisions.append({
            "patient_id": patient_id,
            "records": records,
            "ids_after_rules": sorted(migrated_ids),
            "resolved_by_rules": len(migrated_ids) == len(records),
        })

    by_person: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for p in patients:
        by_person[(_family(p["name"]), p["birth_date"][:4])].append(p)
    for (family, year), records in sorted(by_person.items()):
        keys = {(r["patient_id"], r["issuer"]) for r in records}
        if len(keys) < 2 or not family:
            continue
        report.likely_duplicates.append({
            "family_name": records[0]["name"].split("^", 1)[0],
            "birth_year": year,
            "records": records,
            "note": "same family name and birth year under different IDs: review before "
                    "linking; the migration keeps them apart",
        })
    return report


def merged_patients(
    source_ledger: str | os.PathLike[str], target_ledger: str | os.PathLike[str],
    rules: Rules | None = None,
) -> list[dict[str, Any]]:
    """Target patients holding studies of more than one source patient (a wrong merge); a
    merge the rules declare (`patient_merges`, an HL7 ADT^A40 the target applied) is none."""
    rules = rules or Rules()
    conn = sqlite_db.connect_readonly(source_ledger)
    try:
        conn.execute("ATTACH DATABASE ? AS target", (sqlite_db.readonly_uri(target_ledger),))
        rows = conn.execute(
            """
            SELECT t.patient_id, t.issuer, s.patient_id, s.issuer, COUNT(*)
            FROM main.studies s JOIN target.studies t ON t.study_uid = s.study_uid
            GROUP BY t.patient_id, t.issuer, s.patient_id, s.issuer
            """
        ).fetchall()
    finally:
        conn.close()
    sources: dict[PatientKey, list[dict[str, Any]]] = defaultdict(list)
    for t_id, t_issuer, s_id, s_issuer, studies in rows:
        survivor = rules.merged_into(s_id)
        if survivor is not None and rules.patient_id_allowed(survivor, s_issuer, t_id):
            continue  # declared: counted with the survivor's own studies, not a second patient
        sources[(t_id, t_issuer)].append(
            {"patient_id": s_id, "issuer": s_issuer, "studies": studies}
        )
    return [
        {"target_patient": {"patient_id": k[0], "issuer": k[1]}, "source_patients": v}
        for k, v in sorted(sources.items())
        if len(v) > 1
    ]
