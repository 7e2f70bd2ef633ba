"""Load engine: DIMSE and DICOMweb workloads against one node, measured with HdrHistogram.

A workload is YAML (checked with file:line errors like a topology)::

    name: small-mix
    duration_s: 20          # measured time after the warm-up; the run stops by itself
    warmup_s: 3             # operations that start during the warm-up are not recorded
    max_operations: 5000    # hard bound on the number of operations, whatever the rates
    dataset:                # studies stored before the run, read by the reading groups
      studies: 4
      instances_per_study: 10
      scale: small          # tiny, small (64x64) or realistic (512x512 CT)
      modality: CT
    groups:
      - {name: modalities, operation: c-store, users: 2, instances: 5}
      - {name: readers, operation: c-get, users: 3}
      - {name: queries, operation: c-find, level: STUDY, rate: 5}   # open model

A group with `users: N` is a closed model (N concurrent users, each one operation after the
other); with `rate: R` it is an open model (R arrivals per second whatever the PACS does,
at most `max_in_flight` at once). Open-model latency is measured from each operation's
*scheduled* start, which corrects coordinated omission: a PACS that stalls shows its stall.

Why threads: each operation blocks on the network, and pynetdicom is thread-safe per
association. The harness measures its own CPU (os.times) and says when it, not the PACS,
was the limit (Python runs ~1 core of bytecode at a time).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.config import AE_TITLE_RE, Checker, load_yaml, read_config_text

OPERATIONS = ("c-echo", "c-store", "c-find", "c-move", "c-get", "wado-rs", "qido-rs", "stow-rs")
WEB_OPERATIONS = ("wado-rs", "qido-rs", "stow-rs")
STORING_OPERATIONS = ("c-store", "stow-rs")  # write synthetic studies into the node
RETRIEVING_OPERATIONS = ("c-get", "c-move", "wado-rs")  # need the stored dataset's UIDs
QUERY_OPERATIONS = ("c-find", "qido-rs")  # read the dataset when stored, else match nothing
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


@dataclass(frozen=True)
class Group:
    """Users (closed) or arrivals (open) doing one operation."""

    name: str
    operation: str
    users: int | None = None
    rate: float | None = None
    max_in_flight: int = 64
    level: str = "STUDY"
    instances: int = 1
    associations: int = 1
    destination: str | None = None
    think_s: float = 0.0

    @property
    def model(self) -> str:
        return "open" if self.rate is not None else "closed"


@dataclass(frozen=True)
class DatasetSpec:
    studies: int = 2
    instances_per_study: int = 5
    scale: str = "small"
    modality: str = "CT"


@dataclass(frozen=True)
class Workload:
    name: str
    groups: tuple[Group, ...]
    duration_s: float = 10.0
    warmup_s: float = 2.0
    max_operations: int = 100_000
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    description: str = ""
    source: str = "<string>"

    def groups_doing(self, operations: tuple[str, ...]) -> list[str]:
        return [g.name for g in self.groups if g.operation in operations]

    def stores_dataset(self, writable: bool) -> bool:
        """Whether the untimed dataset is stored first: always for retrieving groups, for
        querying groups only where the node may be written; never for echo or store alone."""
        if self.groups_doing(RETRIEVING_OPERATIONS):
            return True
        return writable and bool(self.groups_doing(QUERY_OPERATIONS))

    def require_permissions(self, node: Any) -> None:
        """Refuse (exit 2), before anything is sent, a workload that would store synthetic
        data into a node without write permission (docs/safety.md, Permissions)."""
        storing = self.groups_doing(STORING_OPERATIONS)
        if storing:
            node.require_writable(
                f"run workload {self.name}: groups {', '.join(storing)} store synthetic studies"
            )
        retrieving = self.groups_doing(RETRIEVING_OPERATIONS)
        if retrieving:
            node.require_writable(
                f"run workload {self.name}: groups {', '.join(retrieving)} retrieve the "
                "synthetic dataset it stores first"
            )

    def describe(self) -> dict[str, Any]:
        """The workload as written into results and SLA evidence."""
        return {
            "name": self.name,
            "source": self.source,
            "description": self.description,
            "duration_s": self.duration_s,
            "warmup_s": self.warmup_s,
            "max_operations": self.max_operations,
            "dataset": self.dataset.__dict__,
            "groups": [{k: v for k, v in g.__dict__.items() if v is not None} for g in self.groups],
        }


# ---------------------------------------------------------------------------------------
# Parsing


def _number(check: Checker, path: tuple, value: Any, low: float, high: float,
            *, whole: bool = False, low_open: bool = False) -> float:
    kind = "a whole number" if whole else "a number"
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and whole and not isinstance(value, int):
        ok = False
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        raise check.fail(path, f"must be {kind} {bound} and <= {high}, got {value!r}")
    return value


def _group(check: Checker, index: int, raw: Any, seen: set[str]) -> Group:
    path = ("groups", index)
    if not isinstance(raw, dict):
        raise check.fail(path, "must be a mapping {name, operation, users | rate}")
    for key in raw:
        if key not in GROUP_FIELDS:
            raise check.fail((*path, key), f"unknown field (allowed: {', '.join(GROUP_FIELDS)})")
    operation = raw.get("operation")
    if operation not in OPERATIONS:
        raise check.fail((*path, "operation"),
                         f"unknown operation {operation!r} (allowed: {GROUP_FIELDS['operation']})")
    name = raw.get("name", operation)
    if not isinstance(name, str) or not name:
        raise check.fail((*path, "name"), "must be a non-empty string")
    if name in seen:
        raise check.fail((*path, "name"), f"duplicate group name {name!r}")
    seen.add(name)
    if ("users" in raw) == ("rate" in raw):
        raise check.fail(path, "give exactly one of users (closed model) or rate (open model)")
    users = rate = None
    if "users" in raw:
        users = int(_number(check, (*path, "users"), raw["users"], 1, 256, whole=True))
    else:
        rate = float(_number(check, (*path, "rate"), raw["rate"], 0, 10_000, low_open=True))
    level = str(raw.get("level", "STUDY")).upper()
    if level not in FIND_LEVELS:
        raise check.fail((*path, "level"),
                         f"unknown level {level!r} (allowed: {', '.join(FIND_LEVELS)})")
    destination = raw.get("destination")
    if destination is not None and (
        not isinstance(destination, str) or not AE_TITLE_RE.fullmatch(destination)
    ):
        raise check.fail((*path, "destination"), "must be an AE title (1-16 characters)")
    return Group(
        name=name,
        operation=operation,
        users=users,
        rate=rate,
        max_in_flight=int(_number(check, (*path, "max_in_flight"), raw.get("max_in_flight", 64),
                                  1, 1024, whole=True)),
        level=level,
        instances=int(_number(check, (*path, "instances"), raw.get("instances", 1), 1, 10_000,
                              whole=True)),
        associations=int(_number(check, (*path, "associations"), raw.get("associations", 1),
                                 1, 64, whole=True)),
        destination=destination,
        think_s=float(_number(check, (*path, "think_s"), raw.get("think_s", 0), 0, 60)),
    )


def workload_from_data(data: Any, lines: dict[tuple, int], source: str) -> Workload:
    """Validate an already parsed workload (also used for workloads inline in a contract)."""
    check = Checker(source, lines)
    if not isinstance(data, dict):
        raise check.fail((), "a workload must be a mapping with at least 'groups'")
    for key in data:
        if key not in TOP_FIELDS:
            raise check.fail((key,), f"unknown field (allowed: {', '.join(TOP_FIELDS)})")
    groups_raw = data.get("groups")
    if not isinstance(groups_raw, list) or not groups_raw:
        raise check.fail(("groups",), "must be a non-empty list of groups")
    seen: set[str] = set()
    groups = tuple(_group(check, i, raw, seen) for i, raw in enumerate(groups_raw))
    ds_raw = data.get("dataset", {}) or {}
    if not isinstance(ds_raw, dict):
        raise check.fail(("dataset",), f"must be a mapping {{{', '.join(DATASET_FIELDS)}}}")
    for key in ds_raw:
        if key not in DATASET_FIELDS:
            raise check.fail(("dataset", key),
                             f"unknown field (allowed: {', '.join(DATASET_FIELDS)})")
    scale = ds_raw.get("scale", "small")
    if not isinstance(scale, str) or scale not in SCALES:
        raise check.fail(("dataset", "scale"),
                         f"unknown scale {scale!r} (allowed: {', '.join(SCALES)})")
    from synthetic_data.modalities import MODALITIES

    modality = ds_raw.get("modality", "CT")
    if not isinstance(modality, str) or modality not in MODALITIES:
        raise check.fail(("dataset", "modality"),
                         f"unknown modality {modality!r} (allowed: {', '.join(MODALITIES)})")
    dataset = DatasetSpec(
        studies=int(_number(check, ("dataset", "studies"), ds_raw.get("studies", 2), 1, 1000,
                            whole=True)),
        instances_per_study=int(_number(check, ("dataset", "instances_per_study"),
                                        ds_raw.get("instances_per_study", 5), 1, 5000, whole=True)),
        scale=scale,
        modality=modality,
    )
    name = data.get("name", Path(source).stem)
    return Workload(
        name=str(name),
        groups=groups,
        duration_s=float(_number(check, ("duration_s",), data.get("duration_s", 10), 0, 3600,
                                 low_open=True)),
        warmup_s=float(_number(check, ("warmup_s",), data.get("warmup_s", 2), 0, 600)),
        max_operations=int(_number(check, ("max_operations",), data.get("max_operations", 100_000),
                                   1, 1_000_000, whole=True)),
        dataset=dataset,
        description=str(data.get("description", "")),
        source=source,
    )


def parse_workload(text: str, source: str = "<string>") -> Workload:
    data, lines = load_yaml(text, source)
    return workload_from_data(data, lines, source)


def load_workload(path: str | os.PathLike[str]) -> Workload:
    return parse_workload(read_config_text(path, "workload"), str(path))
