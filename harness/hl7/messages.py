"""ADT^A08 and ADT^A40 built with hl7apy, and the ACK read back (HL7 v2.5, chapter 3 and 2).

Why hl7apy: it knows the v2.5 message structures (ADT_A01 for A08, ADT_A39 for A40, HL7 v2.5
3.3.8 and 3.3.40) and validates a message against them, so a segment out of place is caught
here, not by the receiver. python-hl7 parses but does not build to a structure.

Names: DICOM PN is family^given^middle^prefix^suffix (PS3.5 6.2); HL7 XPN is
family^given^middle^suffix^prefix (HL7 v2.5 2.A.89): prefix and suffix swap places.
Sex: HL7 table 0001 (F, M, O, U, A, N) against DICOM's M, F, O (PS3.3 C.7.1.1).
"""

from __future__ import annotations

import datetime as dt
import itertools
import os
from dataclasses import dataclass

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

VERSION = "2.5"
SENDING_APPLICATION = "PACSHARNESS"
SENDING_FACILITY = "HARNESS"
#: MSA-1 (HL7 table 0008): AA accepted, AE error, AR rejected
ACK_CODES = ("AA", "AE", "AR")

_control_ids = itertools.count(1)


class HL7MessageError(ValueError):
    """A message the harness cannot build, or an answer that is no ACK; one line."""


@dataclass(frozen=True)
class PatientIdentity:
    """A patient as the ADT feed names it; `name` in DICOM PN form (family^given...)."""

    patient_id: str
    name: str
    birth_date: str = ""  # YYYYMMDD
    sex: str = ""  # DICOM: M, F, O or ''
    issuer: str = ""  # assigning authority (PID-3.4), optional


@dataclass(frozen=True)
class Ack:
    """MSA of an ACK (HL7 v2.5 2.14.8): the code, the message it answers and why."""

    code: str  # AA, AE or AR
    control_id: str  # MSA-2: MSH-10 of the message acknowledged
    text: str  # MSA-3, else ERR-3/ERR-8 text; '' when accepted without a word

    @property
    def accepted(self) -> bool:
        return self.code == "AA"

    def describe(self) -> str:
        return f"{self.code}{': ' + self.text if self.text else ''}"


def synthetic_identity(seed: int, patient_id: str | None = None) -> PatientIdentity:
    """A plausible, reproducible identity (faker through synthetic_data), no real person."""
    from synthetic_data.charsets import DEFAULT, make_name

    sex = "FM"[seed % 2]
    name = make_name(DEFAULT, sex, seed)
    born = dt.date(1940, 1, 1) + dt.timedelta(days=(seed * 7919) % 25000)
    return PatientIdentity(
        patient_id or f"HL7{seed:06d}", f"{name.family}^{name.given}".upper(),
        born.strftime("%Y%m%d"), sex,
    )


def pn_to_xpn(name: str) -> str:
    """DICOM PN (alphabetic group) as HL7 XPN components (prefix and suffix swapped)."""
    parts = (name.split("=", 1)[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = parts
    return "^".join((family, given, middle, suffix, prefix)).rstrip("^")


def _escaped(value: str) -> str:
    """HL7 escape sequences (v2.5 2.7.4) for the delimiters inside one component value."""
    return (value.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
            .replace("&", "\\T\\").replace("~", "\\R\\"))


def unescaped(value: str) -> str:
    """The text of a field value with HL7 delimiter escapes (v2.5 2.7.4) resolved; other
    escapes (highlighting, hexadecimal) are dropped."""
    parts = value.split("\\")
    if len(parts) < 3:
        return value
    known = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}
    return "".join(part if i % 2 == 0 else known.get(part, "") for i, part in enumerate(parts))


def _xpn(name: str) -> str:
    return "^".join(_escaped(part) for part in pn_to_xpn(name).split("^"))


def _cx(identity: PatientIdentity, patient_id: str) -> str:
    """PID-3 / MRG-1 (CX): ID^^^assigning authority."""
    return _escaped(patient_id) + (f"^^^{_escaped(identity.issuer)}" if identity.issuer else "")


def _sex(dicom_sex: str) -> str:
    return {"M": "M", "F": "F", "O": "O"}.get(dicom_sex, "U" if dicom_sex == "" else "O")


def _header(message: Message, event: str, structure: str, receiving: tuple[str, str],
            control_id: str | None) -> str:
    now = dt.datetime.now().strftime("%Y%m%d%H%M%S")
    control = control_id or f"H{os.getpid()}{next(_control_ids):06d}"
    msh = message.msh
    msh.msh_3 = SENDING_APPLICATION
    msh.msh_4 = SENDING_FACILITY
    msh.msh_5 = _escaped(receiving[0])
    msh.msh_6 = _escaped(receiving[1])
    msh.msh_7 = now
    msh.msh_9 = f"ADT^{event}^{structure}"
    msh.msh_10 = control
    msh.msh_11 = "P"
    msh.msh_12 = VERSION
    msh.msh_18 = "UNICODE UTF-8"  # HL7 table 0211
    message.evn.evn_1 = event
    message.evn.evn_2 = now
    return control


def _pid(segment, identity: PatientIdentity) -> None:
    segment.pid_3 = _cx(identity, identity.patient_id)
    segment.pid_5 = _xpn(identity.name)
    if identity.birth_date:
        segment.pid_7 = identity.birth_date
    segment.pid_8 = _sex(identity.sex)


def build_a08(identity: PatientIdentity, receiving: tuple[str, str] = ("PACS", "SITE"),
              control_id: str | None = None) -> tuple[str, str]:
    """ADT^A08 (HL7 v2.5 3.3.8, structure ADT_A01): the patient's demographics are now these.
    Returns (ER7 text, MSH-10 control id)."""
    try:
        message = Message("ADT_A01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
        control = _header(message, "A08", "ADT_A01", receiving, control_id)
        _pid(message.pid, identity)
        message.pv1.pv1_2 = "N"  # patient class: not applicable (PV1 is required in ADT_A01)
        message.validate()
        return message.to_er7(), control
    except HL7apyException as exc:
        raise HL7MessageError(f"ADT^A08 for patient {identity.patient_id!r}: {exc}") from None


def build_a40(survivor: PatientIdentity, prior_patient_id: str,
              receiving: tuple[str, str] = ("PACS", "SITE"),
              control_id: str | None = None) -> tuple[str, str]:
    """ADT^A40 (HL7 v2.5 3.3.40, structure ADT_A39): `prior_patient_id` (MRG-1) is merged into
    the surviving patient of PID. Returns (ER7 text, MSH-10 control id)."""
    try:
        message = Message("ADT_A39", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
        control = _header(message, "A40", "ADT_A39", receiving, control_id)
        group = message.add_group("ADT_A39_PATIENT")
        _pid(group.pid, survivor)
        group.mrg.mrg_1 = _cx(survivor, prior_patient_id)
        message.validate()
        return message.to_er7(), control
    except HL7apyException as exc:
        raise HL7MessageError(
            f"ADT^A40 merging {prior_patient_id!r} into {survivor.patient_id!r}: {exc}"
        ) from None


def parse_ack(raw: bytes, peer: str) -> Ack:
    """The MSA (and ERR) of an ACK received from `peer`; HL7MessageError when it is none."""
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\r").replace("\n", "\r")
    try:
        ack = parse_message(text.strip("\r"), find_groups=False)
        code = ack.msa.msa_1.value
        control = ack.msa.msa_2.value
        reason = ack.msa.msa_3.value if ack.msa.msa_3 else ""  # ST, at most 80 characters
        if ack.children.get("ERR") and ack.err.err_8:
            reason = ack.err.err_8.value  # the user message in full (TX)
        reason = unescaped(reason)
    except (HL7apyException, AttributeError, IndexError) as exc:
        raise HL7MessageError(f"HL7 peer {peer}: the answer is no ACK ({exc})") from None
    if code not in ACK_CODES:
        raise HL7MessageError(f"HL7 peer {peer}: MSA-1 {code!r} is not one of {ACK_CODES}")
    return Ack(code, control, reason)
