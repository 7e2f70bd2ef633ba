"""The rules schema: the changes a migration is allowed to make (harness/migration/rules.py).

::

    prefix:                        # PatientID gets the facility's prefix
      by_issuer: {NGH01.MRN: "NGH-", SAMC02.MRN: "SAMC-"}
      default: "EXT-"              # any other issuer (leave out: no prefix for them)
      required: true               # false: an unchanged PatientID is accepted as well
    added: [IssuerOfPatientID]     # may be absent in the source and present in the target
    charset_conversion: true       # SpecificCharacterSet may change (the text must not)
    ignore: [StationName, "(0009,1001)"]    # never compared
    patient_merges:                # HL7 A40 merges the target applied (source PatientIDs)
      - {prior: "MRN-OLD", survivor: "MRN-NEW"}

Attributes are DICOM keywords or (gggg,eeee) tags (PS3.6 6), kept as the ledger names them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator, model_validator
from pydicom.datadict import tag_for_keyword

from harness.config.errors import Checker, ConfigModel, fail, validate
from harness.migration.normalise import attr_name

FIELDS = {
    "prefix": "{by_issuer: {ISSUER: PREFIX}, default: PREFIX, required: true|false}",
    "added": "a list of attribute keywords or (gggg,eeee) tags",
    "charset_conversion": "true or false",
    "lossless_transfer_syntax_change": "true or false",
    "ignore": "a list of attribute keywords or (gggg,eeee) tags",
    "patient_merges": "a list of {prior: PATIENTID, survivor: PATIENTID}",
}
PREFIX_FIELDS = ("by_issuer", "default", "required")
_TAG_RE = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")


def attribute_name(value: Any) -> str:
    """The ledger's name of an attribute given as a keyword or a (gggg,eeee) tag."""
    if isinstance(value, str):
        text = value.strip()
        match = _TAG_RE.match(text)
        if match:
            return attr_name(int(match.group(1) + match.group(2), 16))
        if tag_for_keyword(text) is not None:
            return text
    raise ValueError(f"unknown attribute {value!r} (allowed: a DICOM keyword such as "
                     "IssuerOfPatientID, or a tag such as (0009,1001))")


def _attributes(value: Any) -> frozenset[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list):
        raise fail(f"must be {FIELDS['added']}")
    names = set()
    for index, item in enumerate(value):
        try:
            names.add(attribute_name(item))
        except ValueError as exc:
            raise fail(str(exc), index) from None
    return frozenset(names)


def _flag(value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise fail(f"invalid value {value!r} (allowed: true or false)")
    return value


def _prefix_text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise fail(f"must be a non-empty text prefix, got {value!r}")
    return value


def _by_issuer(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise fail("must map IssuerOfPatientID to a prefix")
    return value


def _prefix(value: Any) -> Any:
    if value is not None and (not isinstance(value, dict) or not value):
        raise fail(f"must be {FIELDS['prefix']}")
    return value


def _patient_id(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise fail(f"must be a PatientID, got {value!r}")
    return value.strip()


def _merges(value: Any) -> Any:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise fail(f"must be {FIELDS['patient_merges']}")
    return value


Flag = Annotated[bool, BeforeValidator(_flag)]
Attributes = Annotated[frozenset[str], BeforeValidator(_attributes)]
PrefixText = Annotated[str, BeforeValidator(_prefix_text)]


class PrefixModel(ConfigModel):
    shape: ClassVar[str] = FIELDS["prefix"]

    by_issuer: Annotated[dict[str, PrefixText], BeforeValidator(_by_issuer)] = {}
    default: PrefixText | None = None
    required: Flag = False

    @model_validator(mode="after")
    def _says_something(self) -> PrefixModel:
        if not self.by_issuer and self.default is None:
            raise fail("needs by_issuer or default (or leave prefix out)")
        return self


PatientId = Annotated[str, BeforeValidator(_patient_id)]


class MergeModel(ConfigModel):
    """One declared merge (HL7 ADT^A40): the prior PatientID's studies now the survivor's."""

    shape: ClassVar[str] = "{prior: PATIENTID, survivor: PATIENTID}"

    prior: PatientId
    survivor: PatientId

    @model_validator(mode="after")
    def _two_patients(self) -> MergeModel:
        if self.prior == self.survivor:
            raise fail(f"prior and survivor are both {self.prior!r}")
        return self


class RulesModel(ConfigModel):
    """A rules file; every field is optional and an empty file allows no change."""

    shape: ClassVar[str] = "a mapping (fields: " + ", ".join(FIELDS) + ")"
    unknown_word: ClassVar[str] = "rule"

    prefix: Annotated[PrefixModel | None, BeforeValidator(_prefix)] = None
    added: Attributes = frozenset()
    charset_conversion: Flag = False
    lossless_transfer_syntax_change: Flag = False
    ignore: Attributes = frozenset()
    patient_merges: Annotated[tuple[MergeModel, ...], BeforeValidator(_merges)] = ()


def parse_rules_data(data: Any, check: Checker) -> RulesModel:
    """The rules as written (None: an empty file); ConfigError names file:line: field."""
    if data is None:
        return RulesModel()
    if not isinstance(data, dict):
        raise check.fail((), f"a rules file must be a mapping (fields: {', '.join(FIELDS)})")
    return validate(RulesModel, data, check)
