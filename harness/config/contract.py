"""The contract schema: measurable SLA clauses and the workloads that measure them.

::

    name: pilot-contract
    workloads:                       # named workloads: inline, or a path relative to the file
      readers: {duration_s: 20, groups: [{name: retrieve, operation: c-get, users: 20}]}
      ingest: workloads/ingest.yaml
    clauses:
      - id: retrieve-p95
        metric: latency              # latency, throughput or availability
        operation: retrieve          # a group of the workload (or its operation if unique)
        percentile: 95               # latency only
        threshold: "<= 5 s"          # <=, >=, <, > with ms, s, instances/s, MB/s, ops/s, %
        workload: readers
        phase: staged-rollout        # staged-rollout (default) or full

The workloads themselves are checked by the workload schema (harness/config/workload.py);
`resolve_operations` then checks what each clause names in them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator, Field, StrictStr, model_validator

from harness.config.errors import Checker, ConfigModel, Text, choice, fail, validate
from harness.config.numbers import Number, NumberError, quantity
from harness.config.topology import TOPOLOGY_NAME_RE
from harness.config.workload import Group

METRICS = {
    "latency": ("ms", "s"),
    "throughput": ("instances/s", "mb/s", "ops/s"),
    "availability": ("%",),
}
CLAUSE_FIELDS = ("id", "description", "metric", "operation", "percentile", "threshold",
                 "workload", "phase")
PHASES = ("staged-rollout", "full")
#: thresholds beyond this are typing mistakes (and a 400-digit number reads as infinity)
MAX_THRESHOLD = 1e9
COMPARISON_RE = re.compile(r"^\s*(<=|>=|<|>)(.*)$", re.DOTALL)


def _name(value: Any) -> str:
    """The name is part of the default evidence file name: no path separators or newlines."""
    if not isinstance(value, str) or not TOPOLOGY_NAME_RE.fullmatch(value):
        raise fail(f"invalid name {value!r} (allowed: a letter or digit, then letters, digits, "
                   ". _ or -, max 64; it names the evidence file)")
    return value


def _workloads(value: Any) -> Any:
    if not isinstance(value, dict) or not value:
        raise fail("must be a mapping of named workloads")
    for name, raw in value.items():
        if not isinstance(raw, str | dict):
            raise fail("must be a workload {groups, ...} or the path of a workload file", name)
    return value


def _clauses(value: Any) -> Any:
    if not isinstance(value, list) or not value:
        raise fail("must be a non-empty list of clauses")
    return value


Percentile = Number(0, 100, low_open=True)
Metric = choice("metric", tuple(METRICS))
Phase = choice("phase", PHASES)


def parse_threshold(text: str, metric: str) -> tuple[str, float, str]:
    """``<= 5 s`` as ("<=", 5.0, "s"); NumberError says what does not fit the metric."""
    match = COMPARISON_RE.match(text)
    if not match:
        raise NumberError(f"cannot read {text!r} (e.g. '<= 5 s', '>= 50 instances/s')")
    value, unit = quantity(match.group(2), METRICS[metric], MAX_THRESHOLD, f"metric {metric}")
    return match.group(1), value, unit


class ClauseModel(ConfigModel):
    """One clause: a metric of an operation compared with a threshold."""

    shape: ClassVar[str] = "a mapping {id, metric, operation, threshold, workload}"

    id: Text = Field(description="a unique name")
    description: Text = ""
    metric: Metric = Field(
        description=", ".join(METRICS)
    )
    operation: Text = Field(description="a group of the workload, its operation or 'all'")
    percentile: Percentile | None = None
    threshold: Text = Field(description="e.g. '<= 5 s', '>= 50 instances/s'")
    workload: StrictStr = Field(description="a workload of the contract")
    phase: Phase = "staged-rollout"

    @model_validator(mode="after")
    def _fits_metric(self) -> ClauseModel:
        try:
            parse_threshold(self.threshold, self.metric)
        except NumberError as exc:
            raise fail(str(exc), "threshold") from None
        if self.metric == "latency" and self.percentile is None:
            raise fail("latency needs a percentile from 0 to 100, got None", "percentile")
        if self.metric != "latency" and self.percentile is not None:
            raise fail("only latency clauses have a percentile", "percentile")
        return self

    @property
    def comparison_value_unit(self) -> tuple[str, float, str]:
        return parse_threshold(self.threshold, self.metric)


class ContractModel(ConfigModel):
    shape: ClassVar[str] = "a mapping with 'workloads' and 'clauses'"

    name: Annotated[str, BeforeValidator(_name)] | None = None
    description: Text = ""
    #: inline workloads (checked by the workload schema) or paths of workload files
    workloads: Annotated[dict[str, Any], BeforeValidator(_workloads)] = Field(
        None, validate_default=True
    )
    clauses: Annotated[tuple[ClauseModel, ...], BeforeValidator(_clauses)] = Field(
        None, validate_default=True
    )

    @model_validator(mode="after")
    def _unique_ids(self) -> ContractModel:
        seen: set[str] = set()
        for index, clause in enumerate(self.clauses):
            if clause.id in seen:
                raise fail(f"duplicate clause id {clause.id!r}", "clauses", index, "id")
            seen.add(clause.id)
        return self


def parse_contract_data(data: Any, check: Checker) -> ContractModel:
    """The contract as written; ConfigError names file:line: field."""
    if not isinstance(data, dict):
        raise check.fail((), "a contract must be a mapping with 'workloads' and 'clauses'")
    return validate(ContractModel, data, check)


def resolve_operations(
    model: ContractModel, groups: dict[str, tuple[Group, ...]], check: Checker
) -> list[str]:
    """The group each clause measures ('all', a group name, or the only group doing the
    named operation), checked against the contract's workloads."""
    operations = []
    for index, clause in enumerate(model.clauses):
        path = ("clauses", index)
        if clause.workload not in groups:
            raise check.fail((*path, "workload"), f"unknown workload {clause.workload!r} "
                             f"(workloads: {', '.join(groups)})")
        operation = clause.operation
        if operation != "all":
            names = [g.name for g in groups[clause.workload]]
            by_operation = [g.name for g in groups[clause.workload] if g.operation == operation]
            if operation not in names:
                if len(by_operation) != 1:
                    raise check.fail((*path, "operation"),
                                     f"workload {clause.workload} has no single group "
                                     f"{operation!r} (groups: {', '.join(names)}, or 'all')")
                operation = by_operation[0]
        operations.append(operation)
    return operations
