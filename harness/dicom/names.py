"""Human names for UIDs in messages: "CT Image Storage", not "1.2.840.10008.5.1.4.1.1.2".

Names come from pydicom's copy of the PS3.6 Annex A UID registry; a UID it does not know
(a private SOP class or transfer syntax) is shown as itself.
"""

from __future__ import annotations

from pydicom.uid import UID


def uid_name(uid: str) -> str:
    """The registry name of `uid` (PS3.6 Annex A), or the UID itself when unknown."""
    uid = str(uid or "").strip()
    if not uid:
        return "(none)"
    name = UID(uid).name
    return name if name and name != uid else uid


def sop_class_name(uid: str) -> str:
    """E.g. "CT Image Storage"."""
    return uid_name(uid)


def transfer_syntax_name(uid: str) -> str:
    """E.g. "Explicit VR Big Endian"."""
    return uid_name(uid)


def syntax_names(uids: list[str] | tuple[str, ...]) -> str:
    """Several transfer syntaxes as one comma-separated list of names."""
    return ", ".join(transfer_syntax_name(uid) for uid in uids) or "none"
