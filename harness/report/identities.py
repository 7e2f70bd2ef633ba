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

Ledgers (the SQLite files of `inventory` and `verify`) are artifacts too, kept on disk and
resumed across runs, so they hold `LedgerTokens` instead: the same HMAC with a key that
outlives one process, kept outside every artifact in the harness state directory
(`identity-token.key`, mode 0600, made once). Equal values give equal tokens and different
values different ones, so a resumed crawl, the source/target comparison and the collision
report still work on tokens; a PatientID with a migration prefix keeps the prefix in clear
before the token so prefix rules still hold.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path
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
#: ledgers also tokenise the issuer (PS3.15 Annex E removes it too); reports keep it
_LEDGER_KINDS: dict[str, str] = {**_KINDS, "IssuerOfPatientID": "iss", "issuer": "iss"}
_UID = re.compile(r"^[0-9.]+$")
_LEDGER_HEX = 16  # 64 bits: no accidental collision among millions of patients
#: a ledger token, possibly after a migration prefix (see LedgerTokens)
LEDGER_TOKEN = re.compile(rf"^.*(pt|iss|nm|dob|sex|addr|tel|tx)-[0-9a-f]{{{_LEDGER_HEX}}}$")
#: value representations that can carry a name or free text (PS3.5 6.2): a tokenised
#: ledger keeps them as "tx" tokens wherever they occur; UIDs, codes, dates, times, ages
#: and numbers stay in clear (they are what reconciliation reports and rolls up on)
_FREE_TEXT_VRS = frozenset({"PN", "LO", "LT", "SH", "ST", "UT", "UC", "UN", "OB", "OW"})
KEY_FILE = "identity-token.key"
_KEY_BYTES = 32
_MIN_FREE_TEXT = 3  # shorter values are not replaced inside free text (they would hit counts)


class Redactor:
    """Replaces identifying values by stable keyed tokens; learns them to clean free text."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)
        self._seen: dict[str, str] = {}  # clear value -> token, for free-text replacement

    def token(self, kind: str, value: str) -> str:
        if kind == "sex":  # three values: a token would only group patients by it
            return "sex-redacted"
        if LEDGER_TOKEN.match(value):  # read from a tokenised ledger: already no identity
            return value
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


# ---------------------------------------------------------------------------------------
# Ledgers


def _read_key(path: Path) -> bytes:
    from harness.errors import EnvironmentProblem

    key = path.read_bytes()
    if len(key) != _KEY_BYTES:
        raise EnvironmentProblem(f"{path}: identity token key of {len(key)} bytes, expected "
                                 f"{_KEY_BYTES} (remove it to make a new one: earlier ledgers "
                                 "then no longer compare with new ones)")
    return key


def ledger_key() -> bytes:
    """The key of ledger tokens: in the state directory, never in an artifact; made once
    (written aside, then linked into place, so concurrent crawls agree on one key)."""
    from harness.launch.state import state_root

    path = state_root() / KEY_FILE
    if path.exists():
        return _read_key(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(f"{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(_KEY_BYTES))
        try:
            os.link(aside, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
    finally:
        aside.unlink(missing_ok=True)
    return _read_key(path)


class LedgerTokens:
    """Identifying values as keyed tokens for ledgers: equal tokens iff equal values.

    Unlike the report's Redactor, sex is tokenised too (a changed sex must stay a finding)
    and free text is left alone (a ledger row must not depend on what was seen before).
    A PatientID starting with one of `prefixes` (the migration's) keeps that prefix in clear:
    the longest one, so the mapping stays one to one.
    """

    def __init__(self, key: bytes, prefixes: tuple[str, ...] = ()) -> None:
        self._key = key
        self.prefixes = tuple(sorted({p for p in prefixes if p}, key=len, reverse=True))

    def value(self, kind: str, clear: str) -> str:
        if not clear or LEDGER_TOKEN.match(clear):
            return clear
        if kind == "pt":
            for prefix in self.prefixes:
                if clear.startswith(prefix) and len(clear) > len(prefix):
                    return prefix + self._hmac(kind, clear[len(prefix):])
        return self._hmac(kind, clear)

    def _hmac(self, kind: str, clear: str) -> str:
        digest = hmac.new(self._key, f"{kind}\0{clear}".encode(), hashlib.sha256).hexdigest()
        return f"{kind}-{digest[:_LEDGER_HEX]}"

    def column(self, keyword: str, clear: str) -> str:
        """An identity column (PatientID, PatientName, ...) by its DICOM keyword."""
        kind = _LEDGER_KINDS.get(keyword)
        return self.value(kind, clear) if kind else clear

    def attrs(self, data: Any, kind: str | None = None) -> Any:
        """Normalised attributes (JSON-like) with every identifying value tokenised, also in
        sequence items (e.g. OtherPatientIDsSequence); free text, names and private or
        unknown elements too (a site writes patients' names into comments and private
        tags: found by the canary check, harness/security/canaries.py)."""
        if isinstance(data, dict):
            return {key: self.attrs(value, _LEDGER_KINDS.get(str(key)) or _text_kind(str(key))
                                    or kind)
                    for key, value in data.items()}
        if isinstance(data, list):
            return [self.attrs(value, kind) for value in data]
        if kind and isinstance(data, str):
            return self.value(kind, data)
        if kind and isinstance(data, int | float) and not isinstance(data, bool):
            return self.value(kind, str(data))
        return data


def _text_kind(key: str) -> str | None:
    """"tx" for an attrs_json key whose value may be free text: a keyword of such a VR, or a
    private or unknown element (GGGGEEEE, its VR unknown here)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(key)
    if tag is None:
        return "tx" if re.fullmatch(r"[0-9A-F]{8}", key) else None
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "tx"
    return "tx" if vr in _FREE_TEXT_VRS else None


def ledger_tokens(*nodes: Any, prefixes: tuple[str, ...] = ()) -> LedgerTokens | None:
    """Tokens for a ledger of `nodes`, None when they are written in clear (see
    `redactor_for`: every node synthetic, or identities asked for)."""
    if redactor_for(*nodes) is None:
        return None
    return LedgerTokens(ledger_key(), prefixes)
