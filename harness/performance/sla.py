"""Contract SLAs: measurable clauses a vendor and a hospital agree on, checked by running load.

A contract is YAML::

    name: pilot-contract
    workloads:                       # named workloads: inline, or a path relative to the file
      readers: {duration_s: 20, groups: [{name: retrieve, operation: c-get, users: 20}]}
      ingest: workloads/ingest.yaml
    clauses:
      - id: retrieve-p95
        description: p95 time to retrieve a study with 20 concurrent readers
        metric: latency              # latency, throughput or availability
        operation: retrieve          # a group of the workload (or its operation if unique)
        percentile: 95               # latency only
        threshold: "<= 5 s"          # <=, >=, <, > with ms, s, instances/s, MB/s, ops/s, %
        workload: readers
        phase: staged-rollout        # staged-rollout (default) or full

Each clause passes or fails with its measured value; `write_evidence` keeps the verdicts,
the workloads, the node, the harness version and the time in one JSON file with a SHA-256
over its content, so both parties can keep the same evidence and check it was not edited.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.config import TOPOLOGY_NAME_RE, Checker, load_yaml, read_config_text
from harness.errors import ConfigError, HarnessError
from harness.performance.load import Workload, load_workload, workload_from_data
from harness.performance.runner import run_workload

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
THRESHOLD_RE = re.compile(r"^\s*(<=|>=|<|>)\s*([0-9]+(?:\.[0-9]+)?)\s*(\S+)\s*$")
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda a, b: a <= b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
}


@dataclass(frozen=True)
class Clause:
    id: str
    metric: str
    operation: str
    comparison: str
    threshold: float
    unit: str  # lower case: ms, s, instances/s, mb/s, ops/s, %
    workload: str  # a key of Contract.workloads
    percentile: float | None = None
    description: str = ""
    phase: str = "staged-rollout"
    line: int = 0

    @property
    def threshold_text(self) -> str:
        unit = "MB/s" if self.unit == "mb/s" else self.unit
        return f"{self.comparison} {self.threshold:g} {unit}"

    @property
    def title(self) -> str:
        what = f"p{self.percentile:g} " if self.percentile is not None else ""
        return f"{what}{self.metric} of {self.operation} {self.threshold_text}"


@dataclass(frozen=True)
class Contract:
    name: str
    clauses: tuple[Clause, ...]
    workloads: dict[str, Workload]
    source: str = "<string>"


@dataclass
class ClauseResult:
    """One clause's verdict with everything needed to trust it later."""

    clause: str
    title: str
    description: str
    verdict: str  # pass, fail or error
    measured: float | None
    threshold: str
    unit: str
    workload: dict[str, Any]
    node: dict[str, Any]
    harness_version: str
    time: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# Parsing


def _clause(check: Checker, index: int, raw: Any, workloads: dict[str, Workload],
            seen: set[str]) -> Clause:
    path = ("clauses", index)
    if not isinstance(raw, dict):
        raise check.fail(path, "must be a mapping {id, metric, operation, threshold, workload}")
    for key in raw:
        if key not in CLAUSE_FIELDS:
            raise check.fail((*path, key), f"unknown field (allowed: {', '.join(CLAUSE_FIELDS)})")
    for key in ("id", "metric", "operation", "threshold", "workload"):
        if key not in raw:
            raise check.fail((*path, key), "missing")
    clause_id = str(raw["id"])
    if clause_id in seen:
        raise check.fail((*path, "id"), f"duplicate clause id {clause_id!r}")
    seen.add(clause_id)
    metric = raw["metric"]
    if not isinstance(metric, str) or metric not in METRICS:
        raise check.fail((*path, "metric"),
                         f"unknown metric {metric!r} (allowed: {', '.join(METRICS)})")
    match = THRESHOLD_RE.match(str(raw["threshold"]))
    if not match:
        raise check.fail((*path, "threshold"),
                         f"cannot read {raw['threshold']!r} (e.g. '<= 5 s', '>= 50 instances/s')")
    comparison, value, unit = match.group(1), float(match.group(2)), match.group(3).lower()
    if not math.isfinite(value) or value > MAX_THRESHOLD:
        raise check.fail((*path, "threshold"),
                         f"threshold out of range (allowed: 0 to {MAX_THRESHOLD:g})")
    if unit not in METRICS[metric]:
        raise check.fail((*path, "threshold"),
                         f"unit {match.group(3)!r} does not fit metric {metric} "
                         f"(allowed: {', '.join(METRICS[metric])})")
    percentile = raw.get("percentile")
    if metric == "latency":
        if isinstance(percentile, bool) or not isinstance(percentile, int | float) or not (
            0 < percentile <= 100
        ):
            raise check.fail((*path, "percentile"),
                             f"latency needs a percentile from 0 to 100, got {percentile!r}")
    elif percentile is not None:
        raise check.fail((*path, "percentile"), "only latency clauses have a percentile")
    workload_name = raw["workload"]
    if not isinstance(workload_name, str) or workload_name not in workloads:
        raise check.fail((*path, "workload"),
                         f"unknown workload {workload_name!r} (workloads: {', '.join(workloads)})")
    workload = workloads[workload_name]
    operation = str(raw["operation"])
    if operation != "all":
        names = [g.name for g in workload.groups]
        by_operation = [g.name for g in workload.groups if g.operation == operation]
        if operation not in names:
            if len(by_operation) != 1:
                raise check.fail((*path, "operation"),
                                 f"workload {workload_name} has no single group {operation!r} "
                                 f"(groups: {', '.join(names)}, or 'all')")
            operation = by_operation[0]
    phase = raw.get("phase", "staged-rollout")
    if not isinstance(phase, str) or phase not in PHASES:
        raise check.fail((*path, "phase"),
                         f"unknown phase {phase!r} (allowed: {', '.join(PHASES)})")
    return Clause(
        id=clause_id, metric=metric, operation=operation, comparison=comparison,
        threshold=value, unit=unit, workload=workload_name,
        percentile=float(percentile) if percentile is not None else None,
        description=str(raw.get("description", "")), phase=phase,
        line=check.line(path),
    )


def parse_contract(text: str, source: str = "<string>") -> Contract:
    data, lines = load_yaml(text, source)
    check = Checker(source, lines)
    if not isinstance(data, dict):
        raise check.fail((), "a contract must be a mapping with 'workloads' and 'clauses'")
    for key in data:
        if key not in ("name", "description", "workloads", "clauses"):
            raise check.fail((key,), "unknown field (allowed: name, description, workloads, "
                             "clauses)")
    raw_workloads = data.get("workloads")
    if not isinstance(raw_workloads, dict) or not raw_workloads:
        raise check.fail(("workloads",), "must be a mapping of named workloads")
    workloads: dict[str, Workload] = {}
    base = Path(source).parent if source != "<string>" else Path.cwd()
    for name, raw in raw_workloads.items():
        if isinstance(raw, str):
            path = Path(raw) if os.path.isabs(raw) else base / raw
            if not path.exists():
                raise check.fail(("workloads", name), f"workload file {path} not found")
            workloads[name] = load_workload(path)
        else:
            sub_lines = {k[2:]: v for k, v in lines.items()
                         if k[:2] == ("workloads", name)}
            if isinstance(raw, dict):
                raw = {"name": name, **raw}
            workloads[name] = workload_from_data(raw, sub_lines, source)
    raw_clauses = data.get("clauses")
    if not isinstance(raw_clauses, list) or not raw_clauses:
        raise check.fail(("clauses",), "must be a non-empty list of clauses")
    seen: set[str] = set()
    clauses = tuple(_clause(check, i, raw, workloads, seen) for i, raw in enumerate(raw_clauses))
    return Contract(_contract_name(check, data, source), clauses, workloads, source)


def _contract_name(check: Checker, data: dict[str, Any], source: str) -> str:
    """The name is part of the default evidence file name: no path separators or newlines."""
    if "name" not in data:
        stem = re.sub(r"[^A-Za-z0-9._-]", "-", Path(source).stem).lstrip("._-")[:64]
        return stem or "contract"
    name = data["name"]
    if not isinstance(name, str) or not TOPOLOGY_NAME_RE.fullmatch(name):
        raise check.fail(("name",), f"invalid name {name!r} (allowed: a letter or digit, then "
                         "letters, digits, . _ or -, max 64; it names the evidence file)")
    return name


def load_contract(path: str | os.PathLike[str]) -> Contract:
    return parse_contract(read_config_text(path, "contract"), str(path))


# ---------------------------------------------------------------------------------------
# Evaluation


def measure(clause: Clause, results: dict[str, Any]) -> float:
    """The clause's metric from a load run's results, in the clause's unit."""
    operations = results["operations"]
    chosen = list(operations.values()) if clause.operation == "all" else [
        operations[clause.operation]]
    if clause.metric == "latency":
        if clause.operation == "all":
            raise ConfigError(f"clause {clause.id}: latency needs one operation, not 'all'")
        from hdrh.histogram import HdrHistogram

        encoded = chosen[0]["hdr_histogram"]
        histogram = HdrHistogram.decode(encoded)
        if not histogram.get_total_count():
            raise _NoData(f"no {clause.operation} operation completed in the measured time")
        micro = histogram.get_value_at_percentile(clause.percentile)
        return micro / 1000.0 if clause.unit == "ms" else micro / 1e6
    if clause.metric == "throughput":
        key = {"instances/s": "instances", "mb/s": "bytes", "ops/s": "count"}[clause.unit]
        total = sum(op[key] for op in chosen)
        value = total / results["measured_s"]
        return value / 1e6 if clause.unit == "mb/s" else value
    count = sum(op["count"] for op in chosen)
    if not count:
        raise _NoData(f"no {clause.operation} operation completed in the measured time")
    errors = sum(op["errors"] for op in chosen)
    return 100.0 * (count - errors) / count


class _NoData(HarnessError):
    """Nothing measured: the clause cannot pass."""


def judge(clause: Clause, results: dict[str, Any]) -> ClauseResult:
    """Compare the measured value with the threshold: pass, fail or error (nothing measured)."""
    from harness import __version__

    try:
        measured: float | None = measure(clause, results)
        ok = _COMPARE[clause.comparison](measured, clause.threshold)
        verdict = "pass" if ok else "fail"
        unit = "MB/s" if clause.unit == "mb/s" else clause.unit
        message = (f"{clause.id}: measured {measured:.4g} {unit}, required "
                   f"{clause.threshold_text}: {verdict}")
    except _NoData as exc:
        measured, verdict, message = None, "fail", f"{clause.id}: {exc}"
    op = results["operations"].get(clause.operation, {})
    if op.get("errors"):
        message += f" ({op['errors']} errors: {op['errors_by_status']})"
    return ClauseResult(
        clause=clause.id, title=clause.title, description=clause.description, verdict=verdict,
        measured=None if measured is None else round(measured, 6),
        threshold=clause.threshold_text, unit=clause.unit,
        workload=results["workload"], node=results["node"], harness_version=__version__,
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), message=message,
    )


class WorkloadCache:
    """Runs each workload of a contract once, however many clauses measure it."""

    def __init__(self, node: Any, *, move_port: int | None = None,
                 on_progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.node = node
        self.move_port = move_port
        self.on_progress = on_progress
        self.results: dict[str, dict[str, Any]] = {}

    def get(self, contract: Contract, name: str) -> dict[str, Any]:
        if name not in self.results:
            self.results[name] = run_workload(contract.workloads[name], self.node,
                                              move_port=self.move_port,
                                              on_progress=self.on_progress)
        return self.results[name]


def evaluate(contract: Contract, node: Any, *, move_port: int | None = None,
             on_progress: Callable[[dict[str, Any]], None] | None = None,
             on_clause: Callable[[ClauseResult], None] | None = None) -> list[ClauseResult]:
    """Run the contract's workloads against `node` and judge every clause."""
    # every workload a clause runs is checked before the first one starts: a contract
    # refused for one storing workload has sent nothing at all (docs/safety.md)
    for name in dict.fromkeys(clause.workload for clause in contract.clauses):
        contract.workloads[name].require_permissions(node)
    cache = WorkloadCache(node, move_port=move_port, on_progress=on_progress)
    verdicts = []
    for clause in contract.clauses:
        result = judge(clause, cache.get(contract, clause.workload))
        verdicts.append(result)
        if on_clause:
            on_clause(result)
    return verdicts


def evidence(contract: Contract, verdicts: list[ClauseResult]) -> dict[str, Any]:
    """The evidence document: verdicts plus a SHA-256 of its canonical JSON."""
    from harness import __version__

    body = {
        "kind": "pacs-harness SLA evidence",
        "contract": contract.name,
        "contract_file": contract.source,
        "contract_sha256": _file_digest(contract.source),
        "verdict": "pass" if all(v.verdict == "pass" for v in verdicts) else "fail",
        "harness_version": __version__,
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "clauses": [v.as_dict() for v in verdicts],
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return {**body, "sha256": hashlib.sha256(canonical.encode()).hexdigest()}


def verify_evidence(document: dict[str, Any]) -> bool:
    """True when the evidence was not changed after it was written."""
    body = {k: v for k, v in document.items() if k != "sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest() == document.get("sha256")


def write_evidence(path: str | os.PathLike[str], contract: Contract,
                   verdicts: list[ClauseResult]) -> dict[str, Any]:
    """Write the evidence JSON file (atomically) and return its content."""
    document = evidence(contract, verdicts)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, default=str))
    tmp.replace(target)
    return document


def _file_digest(source: str) -> str | None:
    try:
        return hashlib.sha256(Path(source).read_bytes()).hexdigest()
    except OSError:
        return None
