"""Patient identities in reports: redacted unless every node involved holds synthetic data.

A site's own archive holds real patients; an assessment or a verify against it must not copy
their ID, name, birth date or sex (PS3.15 Annex E, Basic Profile: these are identifying)
into report.json, index.html, findings.* or attachments that travel by e-mail. Each value is
replaced by a token: kind prefix + first 12 hex of HMAC-SHA256(value) under a random key
made per process (one `run` or `verify` writes one report). A plain SHA-256 of an ID would
be reversed by hashing every plausible MRN; the secret key, never written, prevents that,
while the same value keeps the same token within the report, so a collision (one `pt-`
token, distinct `nm-` tokens) stays visible. Sex, with three values, is blanked instead.
`--show-identities` opts out.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from typing import Any

#: set by `pacs-harness run --show-identities` for the pytest child
SHOW_IDENTITIES_ENV = "PACS_HARNESS_SHOW_IDENTITIES"

# keys (harness dicts and DICOM keywords) whose values identify a patient, by token prefix
_KINDS: dict[str, str] = {
    "patient_id": "pt", "PatientID": "pt", "OtherPatientIDs": "pt", "ids_after_rules": "pt",
    "name": "nm", "patient_name": "nm", "family_name": "nm", "PatientName": "nm",
    "OtherPatientNames": "nm", "PatientBirthName": "nm", "PatientMotherBirthName": "nm",
    "birth_date": "dob", "birth_year": "dob", "PatientBirthDate": "dob",
    "sex": "sex", "PatientSex": "sex", "PatientAddress": "addr",
    "PatientTelephoneNumbers": "tel",
}
_UID = re.compile(r"^[0-9.]+$")
_MIN_FREE_TEXT = 3  # shorter values are not replaced inside free text (they would hit counts)


class Redactor:
    """Replaces identifying values by stable keyed tokens; learns them to clean free text."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)
        self._seen: dict[str, str] = {}  # clear value -> token, for free-text replacement

    def token(self, kind: str, value: str) -> str:
        if kind == "sex":  # three values: a token would only group patients by it
            return "sex-redacted"
        digest = hmac.new(self._key, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()
        return f"{kind}-{digest[:12]}"

    def redact(self, data: Any) -> Any:
        """A copy of JSON-like `data` with identifying values tokenised, also inside text."""
        self._learn(data, None)
        return self._apply(data, None)

    def text(self, value: str) -> str:
        """Free text with every identifying value learned so far replaced by its token."""
        if _UID.match(value):
            return value
        for clear in sorted(self._seen, key=len, reverse=True):
            if clear in value:
                value = value.replace(clear, self._seen[clear])
        return value

    def _learn(self, data: Any, kind: str | None) -> None:
        if isinstance(data, dict):
            for key, value in data.items():
                self._learn(value, _KINDS.get(str(key), kind))
        elif isinstance(data, list | tuple):
            for value in data:
                self._learn(value, kind)
        elif kind and isinstance(data, str) and data:
            for form in {data, data.replace("^", " ").strip()}:
                if len(form) >= _MIN_FREE_TEXT:
                    self._seen.setdefault(form, self.token(kind, data))

    def _apply(self, data: Any, kind: str | None) -> Any:
        if isinstance(data, dict):
            return {key: self._apply(value, _KINDS.get(str(key), kind))
                    for key, value in data.items()}
        if isinstance(data, list | tuple):
            return [self._apply(value, kind) for value in data]
        if isinstance(data, str) and data:
            return self.token(kind, data) if kind else self.text(data)
        if kind and isinstance(data, int | float) and not isinstance(data, bool):
            return self.token(kind, str(data))
        return data


_shared: Redactor | None = None


def shared_redactor() -> Redactor:
    """One redactor per process, so one report uses one key (same patient, same token)."""
    global _shared
    if _shared is None:
        _shared = Redactor()
    return _shared


def show_identities() -> bool:
    return os.environ.get(SHOW_IDENTITIES_ENV, "") not in ("", "0")


def redactor_for(*nodes: Any, show: bool = False) -> Redactor | None:
    """None when every node holds synthetic data only (launched, or external declared
    `synthetic: true`) or identities were asked for; else the process's redactor."""
    if show or show_identities() or all(node.spec.holds_synthetic_only for node in nodes):
        return None
    return shared_redactor()


def for_report(data: Any, *nodes: Any) -> Any:
    """`data` as a report read from `nodes` may hold it (see `redactor_for`)."""
    redactor = redactor_for(*nodes)
    return data if redactor is None else redactor.redact(data)
