"""DICOM audit messages (PS3.15 A.5): parsed from a syslog body, validated, read into fields.

The XML is parsed by lxml with no network, no DTD, no entity expansion and a size bound (an
audit source is a network peer, not a trusted file), then validated against the RELAX NG
schema ``audit_message.rng`` beside this module, written for the harness from PS3.15 A.5.1:
EventIdentification with EventID, ActiveParticipant+, AuditSourceIdentification,
ParticipantObjectIdentification*. Any problem is an AuditMessageError whose text names it.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from dataclasses import dataclass, field
from functools import cache
from io import BytesIO
from pathlib import Path

from lxml import etree
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

SCHEMA_FILE = Path(__file__).with_name("audit_message.rng")
MAX_XML_BYTES = 64 * 1024

# Event IDs (PS3.16 CID 400) and the participant object ID types (CID 404) the harness reads
DICOM_INSTANCES_TRANSFERRED = "110104"  # PS3.15 A.5.3.4
QUERY = "110112"  # PS3.15 A.5.3.10
SECURITY_ALERT = "110113"  # PS3.15 A.5.3.11
USER_AUTHENTICATION = "110114"  # PS3.15 A.5.3.12
STUDY_INSTANCE_UID = "110180"
SOP_CLASS_UID = "110181"

OUTCOMES = {0: "success", 4: "minor failure", 8: "serious failure", 12: "major failure"}


class AuditMessageError(ValueError):
    """A body that is not a valid DICOM audit message; the text says why."""


@dataclass(frozen=True)
class ActiveParticipant:
    user_id: str
    user_is_requestor: bool
    role_codes: tuple[str, ...] = ()
    network_access_point: str = ""
    alternative_user_id: str = ""

    @property
    def ae_titles(self) -> set[str]:
        """AE titles naming this participant: UserID, and AETITLES= in AlternativeUserID
        (PS3.15 A.5.2.1 puts a process's AE titles there, the UserID may be its process)."""
        titles = {self.user_id.strip()}
        for part in self.alternative_user_id.split(";"):
            if part.strip().upper().startswith("AETITLES="):
                titles |= {t.strip() for t in part.split("=", 1)[1].split(",") if t.strip()}
        return titles


@dataclass(frozen=True)
class ParticipantObject:
    object_id: str
    id_type_code: str
    type_code: str = ""
    role: str = ""
    query: bytes = b""  # ParticipantObjectQuery, decoded from base64
    details: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditEvent:
    """The parts of PS3.15 A.5.1 the harness joins on."""

    event_id: str
    action: str  # C R U D E, '' when absent
    event_time: dt.datetime
    outcome: int  # 0, 4, 8, 12
    participants: tuple[ActiveParticipant, ...]
    objects: tuple[ParticipantObject, ...]
    source_id: str
    event_types: tuple[str, ...] = ()

    @property
    def requestor_ae_titles(self) -> set[str]:
        return {t for p in self.participants if p.user_is_requestor for t in p.ae_titles}

    def study_uids(self) -> set[str]:
        """Studies the event concerns: Study Instance UID objects, and the StudyInstanceUID
        of a query's identifier (PS3.15 A.5.3.10 carries the C-FIND identifier, not a study)."""
        uids = {o.object_id for o in self.objects if o.id_type_code == STUDY_INSTANCE_UID}
        for obj in self.objects:
            if obj.id_type_code == SOP_CLASS_UID and obj.query:
                uids |= query_study_uids(obj)
        return uids


def query_study_uids(obj: ParticipantObject) -> set[str]:
    """StudyInstanceUID values of a Query object's identifier, read in the transfer syntax
    its 'TransferSyntax' detail names (implicit VR little endian when absent)."""
    syntax = obj.details.get("TransferSyntax", b"").decode("ascii", "replace").strip("\0 ")
    syntax = syntax or str(ImplicitVRLittleEndian)
    try:
        identifier = read_dataset(
            BytesIO(obj.query),
            is_implicit_VR=syntax == ImplicitVRLittleEndian,
            is_little_endian=syntax != ExplicitVRBigEndian,
        )
        value = identifier.get("StudyInstanceUID")
    except Exception:  # noqa: BLE001 - an undecodable query concerns no known study
        return set()
    if not value:
        return set()
    return {str(v).strip() for v in str(value).split("\\") if str(v).strip()}


@cache
def _schema() -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(SCHEMA_FILE)))


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
        huge_tree=False, remove_comments=True, remove_pis=True,
    )


def parse_audit_message(body: bytes | str) -> AuditEvent:
    """The audit event in a syslog message body (AuditMessageError when it is not one)."""
    data = body.encode("utf-8") if isinstance(body, str) else body
    data = data.removeprefix(b"\xef\xbb\xbf").strip()
    if not data:
        raise AuditMessageError("empty message body (no AuditMessage)")
    if len(data) > MAX_XML_BYTES:
        raise AuditMessageError(f"audit message of {len(data)} bytes (limit {MAX_XML_BYTES})")
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        raise AuditMessageError(f"not well-formed XML: {exc}") from None
    if root.getroottree().docinfo.doctype:
        raise AuditMessageError("a DOCTYPE is not allowed in an audit message")
    schema = _schema()
    if not schema.validate(root):
        errors = list(dict.fromkeys(f"line {e.line}: {e.message}" for e in schema.error_log))
        text = "; ".join([*_missing_parts(root), *errors[:2]]) or "invalid"
        raise AuditMessageError(f"not a DICOM audit message (PS3.15 A.5.1): {text}")
    return _event(root)


REQUIRED_PARTS = ("EventIdentification", "EventIdentification/EventID", "ActiveParticipant",
                  "AuditSourceIdentification")
ALLOWED_VALUES = {
    ("EventIdentification", "EventOutcomeIndicator"): ("0", "4", "8", "12"),
    ("EventIdentification", "EventActionCode"): ("C", "R", "U", "D", "E", None),
    ("ActiveParticipant", "UserIsRequestor"): ("true", "false", "1", "0"),
}
REQUIRED_ATTRIBUTES = (
    ("EventIdentification", "EventDateTime"), ("EventIdentification", "EventOutcomeIndicator"),
    ("ActiveParticipant", "UserID"), ("ActiveParticipant", "UserIsRequestor"),
    ("AuditSourceIdentification", "AuditSourceID"),
    ("ParticipantObjectIdentification", "ParticipantObjectID"),
)


def _missing_parts(root: etree._Element) -> list[str]:
    """What a required part of A.5.1 lacks, in words (libxml2's RELAX NG errors name the
    element that failed, seldom what is missing or which value is wrong)."""
    if root.tag != "AuditMessage":
        return [f"root element is {root.tag}, not AuditMessage"]
    problems = [f"{part} missing" for part in REQUIRED_PARTS if root.find(part) is None]
    for tag, attribute in REQUIRED_ATTRIBUTES:
        for element in root.findall(tag):
            if not (element.get(attribute) or "").strip():
                problems.append(f"{tag} without {attribute}")
    for (tag, attribute), allowed in ALLOWED_VALUES.items():
        for element in root.findall(tag):
            value = element.get(attribute)
            if value not in allowed and not (value is None and tag == "ActiveParticipant"):
                problems.append(f"{tag} {attribute}={value!r} (allowed: "
                                f"{', '.join(v for v in allowed if v)})")
    return list(dict.fromkeys(problems))


def check_audit_message(body: bytes | str) -> tuple[AuditEvent | None, str]:
    """(event, '') or (None, why it is invalid): never raises for a bad body."""
    try:
        return parse_audit_message(body), ""
    except AuditMessageError as exc:
        return None, str(exc)


def _codes(element: etree._Element, tag: str) -> tuple[str, ...]:
    return tuple(child.get("csd-code", "") for child in element.findall(tag))


def _event_time(text: str) -> dt.datetime:
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _base64(text: str | None) -> bytes:
    try:
        return base64.b64decode((text or "").strip(), validate=False)
    except (binascii.Error, ValueError):
        return b""


def _event(root: etree._Element) -> AuditEvent:
    ident = root.find("EventIdentification")
    try:
        event_time = _event_time(ident.get("EventDateTime", ""))
    except ValueError:
        raise AuditMessageError(
            f"EventDateTime {ident.get('EventDateTime')!r} is not an ISO 8601 date-time"
        ) from None
    participants = tuple(
        ActiveParticipant(
            user_id=p.get("UserID", ""),
            user_is_requestor=p.get("UserIsRequestor", "").strip() in ("true", "1"),
            role_codes=_codes(p, "RoleIDCode"),
            network_access_point=p.get("NetworkAccessPointID", ""),
            alternative_user_id=p.get("AlternativeUserID", ""),
        )
        for p in root.findall("ActiveParticipant")
    )
    objects = tuple(
        ParticipantObject(
            object_id=o.get("ParticipantObjectID", "").strip(),
            id_type_code=o.find("ParticipantObjectIDTypeCode").get("csd-code", ""),
            type_code=o.get("ParticipantObjectTypeCode", ""),
            role=o.get("ParticipantObjectTypeCodeRole", ""),
            query=_base64(o.findtext("ParticipantObjectQuery")),
            details={d.get("type", ""): _base64(d.get("value")) for d in
                     o.findall("ParticipantObjectDetail")},
        )
        for o in root.findall("ParticipantObjectIdentification")
    )
    return AuditEvent(
        event_id=ident.find("EventID").get("csd-code", ""),
        action=ident.get("EventActionCode", ""),
        event_time=event_time,
        outcome=int(ident.get("EventOutcomeIndicator")),
        participants=participants,
        objects=objects,
        source_id=root.find("AuditSourceIdentification").get("AuditSourceID", ""),
        event_types=_codes(ident, "EventTypeCode"),
    )
