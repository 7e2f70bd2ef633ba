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
    patient_merges:                # merges (HL7 ADT^A40) the target applied, by source IDs:
      - {prior: "MRN-OLD", survivor: "MRN-NEW"}   # the prior's studies under the survivor,
                                                  # with its demographics, are no finding

A transfer syntax change is never a finding by itself (content is compared decoded, see
docs/verification.md); a lossy recompression always is (`recompressed_lossy`). The old field
`lossless_transfer_syntax_change` is still accepted and has no effect.

Mistakes are one ConfigError line naming file, line and field, like topology files:
``rules.yaml:4: prefix.by_issuer.NGH01.MRN: must be a text prefix, got 12``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from harness.config.errors import Checker
from harness.config.rules import parse_rules_data
from harness.config.yaml import load_yaml, read_config_text

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
    patient_merges: tuple[tuple[str, str], ...] = ()  # (prior, survivor) source PatientIDs
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

    def merged_into(self, prior_id: str) -> str | None:
        """The surviving PatientID a declared merge (HL7 ADT^A40) moved `prior_id` to."""
        return next((survivor for prior, survivor in self.patient_merges
                     if prior == prior_id), None)

    def merge_allowed(self, before_id: str, issuer: str, after_id: str) -> bool:
        """True when a declared merge explains a study of `before_id` filed under `after_id`
        (the survivor, with the prefix the rules give its issuer, if any)."""
        survivor = self.merged_into(before_id)
        return survivor is not None and self.patient_id_allowed(survivor, issuer, after_id)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "prefix": {"by_issuer": self.prefix_by_issuer, "default": self.prefix_default,
                       "required": self.prefix_required},
            "added": sorted(self.added),
            "ignore": sorted(self.ignore),
            "charset_conversion": self.charset_conversion,
            "lossless_transfer_syntax_change": self.lossless_transfer_syntax_change,
            "patient_merges": [{"prior": p, "survivor": s} for p, s in self.patient_merges],
        }


def parse_rules(text: str, source: str = "<string>") -> Rules:
    """Validate rules YAML text (schema: harness/config/rules.py); raise ConfigError naming
    file, line and field."""
    data, lines = load_yaml(text, source)
    model = parse_rules_data(data, Checker(source, lines))
    prefix = model.prefix
    return Rules(
        prefix_by_issuer=dict(prefix.by_issuer) if prefix else {},
        prefix_default=prefix.default if prefix else None,
        prefix_required=prefix.required if prefix else False,
        added=model.added,
        ignore=model.ignore,
        charset_conversion=model.charset_conversion,
        lossless_transfer_syntax_change=model.lossless_transfer_syntax_change,
        patient_merges=tuple((m.prior, m.survivor) for m in model.patient_merges),
        source=source,
    )


def load_rules(path: str | os.PathLike[str] | None) -> Rules:
    """Read and validate a rules file; None means no change is allowed."""
    if path is None:
        return Rules()
    return parse_rules(read_config_text(path, "rules file"), str(path))
