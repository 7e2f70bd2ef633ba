"""Migration rules: the changes a migration is allowed to make; anything else is a finding.

A rules file is YAML; every field is optional and an empty file allows no change at all::

    # what the migration to the central archive does on purpose
    prefix:                        # PatientID gets the facility's prefix
      by_issuer:                   # IssuerOfPatientID (source value) -> prefix
        NGH01.MRN: "NGH-"
        SAMC02.MRN: "SAMC-"
      default: "EXT-"              # any other issuer (leave out: no prefix for them)
      required: true               # false: an unchanged PatientID is accepted as well
    added: [IssuerOfPatientID]     # may be absent in the source and present in the target
    charset_conversion: true       # SpecificCharacterSet may change (the text must not)
    ignore: [StationName, "(0009,1001)"]    # never compared

A transfer syntax change is never a finding by itself (content is compared decoded, see
docs/verification.md); a lossy recompression always is (`recompressed_lossy`). The old field
`lossless_transfer_syntax_change` is still accepted and has no effect.

Mistakes are one ConfigError line naming file, line and field, like topology files:
``rules.yaml:4: prefix.by_issuer.NGH01.MRN: must be a text prefix, got 12``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import tag_for_keyword

from harness.config import Checker, load_yaml, read_config_text
from harness.migration.ledger import attr_name

FIELDS = {
    "prefix": "{by_issuer: {ISSUER: PREFIX}, default: PREFIX, required: true|false}",
    "added": "a list of attribute keywords or (gggg,eeee) tags",
    "charset_conversion": "true or false",
    "lossless_transfer_syntax_change": "true or false",
    "ignore": "a list of attribute keywords or (gggg,eeee) tags",
}
PREFIX_FIELDS = ("by_issuer", "default", "required")
_TAG_RE = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")

#: Transfer syntaxes that keep every pixel value (anything else may be lossy, PS3.5 8).
LOSSLESS_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2",  # Implicit VR Little Endian
        "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
        "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
        "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 Lossless
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    }
)


@dataclass(frozen=True)
class Rules:
    """Allowed changes; `Rules()` allows none."""

    prefix_by_issuer: dict[str, str] = field(default_factory=dict)
    prefix_default: str | None = None
    prefix_required: bool = False
    added: frozenset[str] = frozenset()
    ignore: frozenset[str] = frozenset()
    charset_conversion: bool = False
    lossless_transfer_syntax_change: bool = False
    source: str = "<none>"

    def patient_id_prefix(self, issuer: str) -> str | None:
        """The prefix the migration puts before this issuer's PatientIDs, if any."""
        return self.prefix_by_issuer.get(issuer, self.prefix_default)

    def patient_id_allowed(self, before: str, issuer: str, after: str) -> bool:
        prefix = self.patient_id_prefix(issuer)
        if prefix:
            return after == prefix + before or (not self.prefix_required and after == before)
        return after == before

    def source_patient_ids(self, target_id: str) -> set[str]:
        """Source PatientIDs that a target PatientID may come from (prefix removed)."""
        candidates = {target_id}
        for prefix in {*self.prefix_by_issuer.values(), self.prefix_default or ""}:
            if prefix and target_id.startswith(prefix):
                candidates.add(target_id[len(prefix):])
        return candidates

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "prefix": {"by_issuer": self.prefix_by_issuer, "default": self.prefix_default,
                       "required": self.prefix_required},
            "added": sorted(self.added),
            "ignore": sorted(self.ignore),
            "charset_conversion": self.charset_conversion,
            "lossless_transfer_syntax_change": self.lossless_transfer_syntax_change,
        }


def _attribute(check: Checker, path: tuple, value: Any) -> str:
    if isinstance(value, str):
        text = value.strip()
        match = _TAG_RE.match(text)
        if match:
            return attr_name(int(match.group(1) + match.group(2), 16))
        if tag_for_keyword(text) is not None:
            return text
    raise check.fail(path, f"unknown attribute {value!r} (allowed: a DICOM keyword such as "
                           "IssuerOfPatientID, or a tag such as (0009,1001))")


def _attributes(check: Checker, path: tuple, value: Any) -> frozenset[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list):
        raise check.fail(path, f"must be {FIELDS[path[-1]]}")
    return frozenset(_attribute(check, (*path, i), v) for i, v in enumerate(value))


def _flag(check: Checker, path: tuple, value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise check.fail(path, f"invalid value {value!r} (allowed: true or false)")
    return value


def _prefix_text(check: Checker, path: tuple, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise check.fail(path, f"must be a non-empty text prefix, got {value!r}")
    return value


def parse_rules(text: str, source: str = "<string>") -> Rules:
    """Validate rules YAML text; raise ConfigError naming file, line and field."""
    data, lines = load_yaml(text, source)
    check = Checker(source, lines)
    if data is None:
        return Rules(source=source)
    if not isinstance(data, dict):
        raise check.fail((), f"a rules file must be a mapping (fields: {', '.join(FIELDS)})")
    for key in data:
        if key not in FIELDS:
            raise check.fail((key,), f"unknown rule (allowed: {', '.join(FIELDS)})")

    by_issuer: dict[str, str] = {}
    default = None
    required = False
    prefix = data.get("prefix")
    if prefix is not None:
        if not isinstance(prefix, dict) or not prefix:
            raise check.fail(("prefix",), f"must be {FIELDS['prefix']}")
        for key in prefix:
            if key not in PREFIX_FIELDS:
                raise check.fail(("prefix", key),
                                 f"unknown field (allowed: {', '.join(PREFIX_FIELDS)})")
        raw_map = prefix.get("by_issuer") or {}
        if not isinstance(raw_map, dict):
            raise check.fail(("prefix", "by_issuer"), "must map IssuerOfPatientID to a prefix")
        for issuer, value in raw_map.items():
            by_issuer[str(issuer)] = _prefix_text(check, ("prefix", "by_issuer", issuer), value)
        if prefix.get("default") is not None:
            default = _prefix_text(check, ("prefix", "default"), prefix["default"])
        if not by_issuer and default is None:
            raise check.fail(("prefix",), "needs by_issuer or default (or leave prefix out)")
        required = _flag(check, ("prefix", "required"), prefix.get("required"))

    return Rules(
        prefix_by_issuer=by_issuer,
        prefix_default=default,
        prefix_required=required,
        added=_attributes(check, ("added",), data.get("added")),
        ignore=_attributes(check, ("ignore",), data.get("ignore")),
        charset_conversion=_flag(check, ("charset_conversion",), data.get("charset_conversion")),
        lossless_transfer_syntax_change=_flag(
            check, ("lossless_transfer_syntax_change",),
            data.get("lossless_transfer_syntax_change"),
        ),
        source=source,
    )


def load_rules(path: str | os.PathLike[str] | None) -> Rules:
    """Read and validate a rules file; None means no change is allowed."""
    if path is None:
        return Rules()
    return parse_rules(read_config_text(path, "rules file"), str(path))
