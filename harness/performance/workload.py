"""A workload: what one load run does to a node, read from YAML and checked before it runs.

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
Its schema (every field, its range, one file:line message per mistake) is
harness/config/workload.py; harness/performance/runner.py runs it.

"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.config.errors import Checker
from harness.config.workload import (  # noqa: F401 - the schema's names, used here and by callers
    DATASET_FIELDS,
    FIND_LEVELS,
    GROUP_FIELDS,
    OPERATIONS,
    SCALES,
    TOP_FIELDS,
    DatasetSpec,
    Group,
    parse_workload_data,
)
from harness.config.yaml import load_yaml, read_config_text

WEB_OPERATIONS = ("wado-rs", "qido-rs", "stow-rs")
STORING_OPERATIONS = ("c-store", "stow-rs")  # write synthetic studies into the node
RETRIEVING_OPERATIONS = ("c-get", "c-move", "wado-rs")  # need the stored dataset's UIDs
QUERY_OPERATIONS = ("c-find", "qido-rs")  # read the dataset when stored, else match nothing


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
# Parsing: the schema is harness/config/workload.py


def workload_from_data(
    data: Any, lines: dict[tuple, int], source: str, prefix: tuple = ()
) -> Workload:
    """Validate an already parsed workload, found at `prefix` of the file `source` (also
    used for workloads inline in a contract)."""
    model = parse_workload_data(data, Checker(source, lines), prefix)
    return Workload(
        name=model.name if model.name is not None else Path(source).stem,
        groups=model.groups,
        duration_s=float(model.duration_s),
        warmup_s=float(model.warmup_s),
        max_operations=model.max_operations,
        dataset=model.dataset,
        description=model.description,
        source=source,
    )


def parse_workload(text: str, source: str = "<string>") -> Workload:
    data, lines = load_yaml(text, source)
    return workload_from_data(data, lines, source)


def load_workload(path: str | os.PathLike[str]) -> Workload:
    return parse_workload(read_config_text(path, "workload"), str(path))
