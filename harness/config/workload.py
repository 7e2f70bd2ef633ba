"""The workload schema: groups of users or arrivals doing DIMSE or DICOMweb operations.

::

    name: small-mix
    duration_s: 20          # measured time after the warm-up; the run stops by itself
    warmup_s: 3             # operations that start during the warm-up are not recorded
    max_operations: 5000    # hard bound on the number of operations, whatever the rates
    dataset: {studies: 4, instances_per_study: 10, scale: small, modality: CT}
    groups:
      - {name: modalities, operation: c-store, users: 2, instances: 5}
      - {name: queries, operation: c-find, level: STUDY, rate: 5}   # open model

`Group` and `DatasetSpec` are used as they are by the load engine
(harness/performance/workload.py), which builds its `Workload` from `WorkloadModel`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator, Field, model_validator

from harness.config.errors import Checker, ConfigModel, Text, choice, fail, validate
from harness.config.numbers import Number
from harness.config.topology import AE_TITLE_RE

OPERATIONS = ("c-echo", "c-store", "c-find", "c-move", "c-get", "wado-rs", "qido-rs", "stow-rs")
FIND_LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
SCALES = ("tiny", "small", "realistic")
TOP_FIELDS = {
    "name": "a short name",
    "description": "free text",
    "duration_s": "seconds measured after the warm-up (0 < s <= 3600)",
    "warmup_s": "seconds not recorded at the start (0 <= s <= 600)",
    "max_operations": "a whole number 1-1000000: the run stops after that many operations",
    "dataset": "{studies, instances_per_study, scale, modality}",
    "groups": "a list of {name, operation, users | rate, ...}",
}
DATASET_FIELDS = ("studies", "instances_per_study", "scale", "modality")
GROUP_FIELDS = {
    "name": "a unique name",
    "operation": ", ".join(OPERATIONS),
    "users": "closed model: concurrent users (1-256)",
    "rate": "open model: arrivals per second (0 < r <= 10000)",
    "max_in_flight": "open model: operations in flight at most (default 64)",
    "level": "C-FIND level: " + ", ".join(FIND_LEVELS),
    "instances": "c-store/stow-rs: instances per operation (one new study each time)",
    "associations": "c-store: parallel associations per operation (default 1)",
    "destination": "c-move: AE title to move to (default: the harness's own receiver)",
    "think_s": "closed model: pause between a user's operations (default 0)",
}


def _operation(value: Any) -> str:
    if not isinstance(value, str) or value not in OPERATIONS:
        raise fail(f"unknown operation {value!r} (allowed: {GROUP_FIELDS['operation']})")
    return value


def _level(value: Any) -> str:
    level = str(value).upper()
    if level not in FIND_LEVELS:
        raise fail(f"unknown level {level!r} (allowed: {', '.join(FIND_LEVELS)})")
    return level


def _group_name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise fail("must be a non-empty string")
    return value


def _destination(value: Any) -> str:
    if not isinstance(value, str) or not AE_TITLE_RE.fullmatch(value):
        raise fail("must be an AE title (1-16 characters)")
    return value


def _modality(value: Any) -> str:
    from synthetic_data.modalities import MODALITIES

    if not isinstance(value, str) or value not in MODALITIES:
        raise fail(f"unknown modality {value!r} (allowed: {', '.join(MODALITIES)})")
    return value


def _groups(value: Any) -> Any:
    if not isinstance(value, list) or not value:
        raise fail("must be a non-empty list of groups")
    return value


def _dataset(value: Any) -> Any:
    return {} if value is None else value


Scale = choice("scale", SCALES)
Users = Number(1, 256, whole=True)
Rate = Number(0, 10_000, low_open=True)
InFlight = Number(1, 1024, whole=True)
Instances = Number(1, 10_000, whole=True)
Associations = Number(1, 64, whole=True)
ThinkSeconds = Number(0, 60)
Studies = Number(1, 1000, whole=True)
InstancesPerStudy = Number(1, 5000, whole=True)
DurationSeconds = Number(0, 3600, low_open=True)
WarmupSeconds = Number(0, 600)
MaxOperations = Number(1, 1_000_000, whole=True)


class Group(ConfigModel):
    """Users (closed model) or arrivals (open model) doing one operation."""

    shape: ClassVar[str] = "a mapping {name, operation, users | rate}"

    name: Annotated[str, BeforeValidator(_group_name)]
    operation: Annotated[str, BeforeValidator(_operation)] = Field(
        description=GROUP_FIELDS["operation"]
    )
    users: Users | None = None
    rate: Rate | None = None
    max_in_flight: InFlight = 64
    level: Annotated[str, BeforeValidator(_level)] = "STUDY"
    instances: Instances = 1
    associations: Associations = 1
    destination: Annotated[str, BeforeValidator(_destination)] | None = None
    think_s: ThinkSeconds = 0.0

    @model_validator(mode="before")
    @classmethod
    def _named_after_operation(cls, data: Any) -> Any:
        if isinstance(data, dict) and "name" not in data and isinstance(data.get("operation"), str):
            return {"name": data["operation"], **data}
        return data

    @model_validator(mode="after")
    def _one_model(self) -> Group:
        if (self.users is None) == (self.rate is None):
            raise fail("give exactly one of users (closed model) or rate (open model)")
        return self

    @property
    def model(self) -> str:
        return "open" if self.rate is not None else "closed"


class DatasetSpec(ConfigModel):
    """The synthetic studies stored before a run, read by the reading groups."""

    shape: ClassVar[str] = "a mapping {" + ", ".join(DATASET_FIELDS) + "}"

    studies: Studies = 2
    instances_per_study: InstancesPerStudy = 5
    scale: Scale = "small"
    modality: Annotated[str, BeforeValidator(_modality)] = "CT"


class WorkloadModel(ConfigModel):
    """A workload file (or a workload inline in a contract)."""

    shape: ClassVar[str] = "a mapping with at least 'groups'"

    name: Text | None = None
    description: Text = ""
    duration_s: DurationSeconds = 10.0
    warmup_s: WarmupSeconds = 2.0
    max_operations: MaxOperations = 100_000
    dataset: Annotated[DatasetSpec, BeforeValidator(_dataset)] = DatasetSpec()
    groups: Annotated[tuple[Group, ...], BeforeValidator(_groups)] = Field(
        description=TOP_FIELDS["groups"]
    )

    @model_validator(mode="after")
    def _unique_names(self) -> WorkloadModel:
        seen: set[str] = set()
        for index, group in enumerate(self.groups):
            if group.name in seen:
                raise fail(f"duplicate group name {group.name!r}", "groups", index, "name")
            seen.add(group.name)
        return self


def parse_workload_data(data: Any, check: Checker, prefix: tuple = ()) -> WorkloadModel:
    """The workload found at `prefix` in a checked file; ConfigError names file:line: field."""
    if not isinstance(data, dict):
        raise check.fail(prefix, "a workload must be a mapping with at least 'groups'")
    return validate(WorkloadModel, data, check, prefix)
