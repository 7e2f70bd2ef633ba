"""C-FIND SCP of the embedded PACS: the query model over the index (PS3.4 C.4.1, C.6).

Patient Root and Study Root models; levels PATIENT (Patient Root only), STUDY, SERIES, IMAGE.
Matching (PS3.4 C.2.2.2, see matching.py) is lenient/relational: any supported key at or above
the query level is a matching key; keys below the level are returned empty. An unknown level,
or PATIENT level in Study Root, gives 0xA900; an identifier that does not decode 0xC310.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
)

from harness.embedded_pacs.matching import has_wildcard, match_one
from harness.embedded_pacs.storage import connect

LOG = logging.getLogger("harness.embedded_pacs")

LEVELS: tuple[str, ...] = ("PATIENT", "STUDY", "SERIES", "IMAGE")
PATIENT, STUDY, SERIES, IMAGE = range(4)


@dataclass(frozen=True)
class Attr:
    column: str | None  # None: computed from the entity's rows
    level: int
    kind: str  # uid, date, time, pn, int, str, list (computed CS list), count, const


ATTRS: dict[str, Attr] = {
    "PatientID": Attr("patient_id", PATIENT, "str"),
    "PatientName": Attr("patient_name", PATIENT, "pn"),
    "PatientBirthDate": Attr("patient_birth_date", PATIENT, "date"),
    "PatientSex": Attr("patient_sex", PATIENT, "str"),
    "IssuerOfPatientID": Attr("issuer_of_patient_id", PATIENT, "str"),
    "NumberOfPatientRelatedStudies": Attr(None, PATIENT, "count"),
    "NumberOfPatientRelatedSeries": Attr(None, PATIENT, "count"),
    "NumberOfPatientRelatedInstances": Attr(None, PATIENT, "count"),
    "StudyInstanceUID": Attr("study_instance_uid", STUDY, "uid"),
    "StudyDate": Attr("study_date", STUDY, "date"),
    "StudyTime": Attr("study_time", STUDY, "time"),
    "AccessionNumber": Attr("accession_number", STUDY, "str"),
    "StudyDescription": Attr("study_description", STUDY, "str"),
    "StudyID": Attr("study_id", STUDY, "str"),
    "ReferringPhysicianName": Attr("referring_physician_name", STUDY, "pn"),
    "ModalitiesInStudy": Attr(None, STUDY, "list"),
    "SOPClassesInStudy": Attr(None, STUDY, "list"),
    "NumberOfStudyRelatedSeries": Attr(None, STUDY, "count"),
    "NumberOfStudyRelatedInstances": Attr(None, STUDY, "count"),
    "SeriesInstanceUID": Attr("series_instance_uid", SERIES, "uid"),
    "Modality": Attr("modality", SERIES, "str"),
    "SeriesNumber": Attr("series_number", SERIES, "int"),
    "SeriesDescription": Attr("series_description", SERIES, "str"),
    "NumberOfSeriesRelatedInstances": Attr(None, SERIES, "count"),
    "SOPInstanceUID": Attr("sop_instance_uid", IMAGE, "uid"),
    "SOPClassUID": Attr("sop_class_uid", IMAGE, "uid"),
    "InstanceNumber": Attr("instance_number", IMAGE, "int"),
    "AvailableTransferSyntaxUID": Attr("transfer_syntax_uid", IMAGE, "uid"),
}

# Unique key of each level, used for grouping rows into entities and for retrieval.
_LEVEL_KEY = {
    PATIENT: ("patient_id", "issuer_of_patient_id"),
    STUDY: ("study_instance_uid",),
    SERIES: ("series_instance_uid",),
    IMAGE: ("sop_instance_uid",),
}
UNIQUE_KEYWORD = {
    PATIENT: "PatientID",
    STUDY: "StudyInstanceUID",
    SERIES: "SeriesInstanceUID",
    IMAGE: "SOPInstanceUID",
}

_PATIENT_ROOT = {
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
}


class InvalidIdentifier(ValueError):
    """The request identifier cannot be served (status 0xA900)."""


@dataclass
class Query:
    level: int
    keys: dict[str, list[str]]  # keyword -> non-empty query values (matching keys only)


def query_values(value: Any) -> list[str]:
    """The non-empty values of an identifier attribute (a backslash list is several)."""
    if value is None:
        return []
    if isinstance(value, MultiValue | list | tuple):
        items = [str(v) for v in value]
    elif isinstance(value, bytes):
        return []
    else:
        items = str(value).split("\\")
    return [s.strip() for s in items if s is not None and s.strip() != ""]


def query_level(identifier: Dataset, model: UID) -> int:
    """The identifier's Query/Retrieve Level, valid for the information model (PS3.4 C.6)."""
    level_name = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level_name not in LEVELS:
        raise InvalidIdentifier(f"QueryRetrieveLevel {level_name!r} not supported")
    level = LEVELS.index(level_name)
    if level == PATIENT and model not in _PATIENT_ROOT:
        raise InvalidIdentifier("PATIENT level requires the Patient Root model")
    return level


def parse_query(identifier: Dataset, model: UID) -> Query:
    level = query_level(identifier, model)
    keys: dict[str, list[str]] = {}
    for elem in identifier:
        attr = ATTRS.get(elem.keyword)
        if attr is None or attr.level > level or elem.VR == "SQ":
            continue
        if attr.kind in ("count", "const"):
            continue
        values = query_values(elem.value)
        if values and not all(v == "*" for v in values):
            keys[elem.keyword] = values
    return Query(level, keys)


@dataclass
class Entity:
    """One patient, study, series or instance: the index rows (instances) it holds."""

    level: int
    rows: list[sqlite3.Row] = field(default_factory=list)

    @property
    def rep(self) -> sqlite3.Row:
        """The most recently received row: its values answer for the entity."""
        return self.rows[-1]

    def distinct(self, column: str) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            if row[column]:
                seen.setdefault(row[column], None)
        return list(seen)

    def computed(self, keyword: str) -> str | list[str]:
        if keyword in ("NumberOfPatientRelatedStudies",):
            return str(len(self.distinct("study_instance_uid")))
        if keyword in ("NumberOfPatientRelatedSeries", "NumberOfStudyRelatedSeries"):
            return str(len(self.distinct("series_instance_uid")))
        if keyword.endswith("RelatedInstances"):
            return str(len(self.rows))
        if keyword == "ModalitiesInStudy":
            return sorted(self.distinct("modality"))
        if keyword == "SOPClassesInStudy":
            return sorted(self.distinct("sop_class_uid"))
        raise KeyError(keyword)

    def matches(self, keys: dict[str, list[str]]) -> bool:
        for keyword, queries in keys.items():
            attr = ATTRS[keyword]
            if attr.column is None:
                values = list(self.computed(keyword))
                kind = "str"
            else:
                values = self.distinct(attr.column) or [""]
                kind = attr.kind
            if not any(match_one(kind, q, v) for q in queries for v in values):
                return False
        return True


def _prefilter(query: Query) -> tuple[str, list[str]]:
    """SQL narrowing on exact keys at or above the level; exact matching is done in Python."""
    clauses: list[str] = []
    params: list[str] = []
    for keyword, values in query.keys.items():
        attr = ATTRS[keyword]
        if attr.column is None or any(has_wildcard(v) for v in values):
            continue
        if attr.kind == "uid" or keyword == "PatientID":
            clauses.append(f"{attr.column} IN ({','.join('?' * len(values))})")
            params.extend(values)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    return where, params


def search(conn: sqlite3.Connection, query: Query) -> list[Entity]:
    """Group index rows into entities of the query level and keep those that match."""
    where, params = _prefilter(query)
    rows = conn.execute(
        f"SELECT * FROM instances {where} ORDER BY received_at, sop_instance_uid", params
    ).fetchall()
    groups: dict[tuple[str, ...], Entity] = {}
    key_cols = _LEVEL_KEY[query.level]
    for row in rows:
        key = tuple(row[c] for c in key_cols)
        groups.setdefault(key, Entity(query.level)).rows.append(row)
    return [e for e in groups.values() if e.matches(query.keys)]


def response(identifier: Dataset, entity: Entity, ae_title: str) -> Dataset:
    """The C-FIND response identifier: every requested attribute, valued where known."""
    resp = Dataset()
    resp.SpecificCharacterSet = "ISO_IR 192"
    resp.QueryRetrieveLevel = LEVELS[entity.level]
    for elem in identifier:
        keyword = elem.keyword
        if keyword in ("SpecificCharacterSet", "QueryRetrieveLevel") or elem.tag.is_private:
            continue
        if elem.VR == "SQ":
            resp.add_new(elem.tag, "SQ", [])
            continue
        attr = ATTRS.get(keyword)
        value: Any = None
        if keyword == "RetrieveAETitle":
            value = ae_title
        elif keyword == "InstanceAvailability":
            value = "ONLINE"
        elif attr is not None and attr.level <= entity.level:
            value = entity.computed(keyword) if attr.column is None else entity.rep[attr.column]
        if value in ("", []):
            value = None
        try:
            resp.add_new(elem.tag, elem.VR, value)
        except Exception:  # a bad stored value must not break the response
            LOG.debug("cannot encode stored value for %s; returned empty", keyword)
            resp.add_new(elem.tag, elem.VR, None)
    if "RetrieveAETitle" not in resp:
        resp.RetrieveAETitle = ae_title
    return resp


def handle_find(
    event: Any, db_file: Path, ae_title: str, note: Callable[[str], None]
) -> Iterator[tuple[int, Dataset | None]]:
    """C-FIND over the index: one pending response per matching entity (PS3.4 C.4.1.3)."""
    model = UID(event.request.AffectedSOPClassUID)
    try:
        identifier = event.identifier
        query = parse_query(identifier, model)
    except InvalidIdentifier as exc:
        note(f"invalid identifier: {exc}")
        yield 0xA900, None
        return
    except Exception as exc:
        note(f"undecodable identifier: {type(exc).__name__}")
        yield 0xC310, None
        return
    try:
        conn = connect(db_file)
        try:
            entities = search(conn, query)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        note(f"index error: {exc}")
        yield 0xC311, None
        return
    note(f"level={LEVELS[query.level]} matches={len(entities)}")
    for entity in entities:
        if event.is_cancelled:
            yield 0xFE00, None
            return
        yield 0xFF00, response(identifier, entity, ae_title)
