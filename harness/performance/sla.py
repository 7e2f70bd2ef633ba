"""Contract SLAs: measurable clauses a vendor and a hospital agree on, checked by running load.

A contract is YAML (its schema, with an example: harness/config/contract.py).

Each clause passes or fails with its measured value; `write_evidence` keeps the verdicts,
the workloads, the node, the harness version and the time in one JSON file. Signed with an
Ed25519 key (harness/report/signing.py), neither party can edit a figure unseen; unsigned,
the document says so, and its SHA-256 is only a content digest anyone can recompute.
`check_figures` recomputes every verdict from the recorded values, so a signed document whose
verdicts do not follow from its figures is caught too.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config.contract import ContractModel, parse_contract_data, resolve_operations
from harness.config.errors import Checker
from harness.config.yaml import load_yaml, read_config_text
from harness.errors import ConfigError, HarnessError
from harness.performance.runner import run_workload
from harness.performance.workload import Workload, load_workload, workload_from_data
from harness.report.signing import canonical_bytes, sign_document

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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
    comparison: str  # <=, >=, < or >: with threshold_value, what `check_figures` recomputes
    threshold_value: float
    workload: dict[str, Any]
    node: dict[str, Any]
    harness_version: str
    time: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# Parsing: the schema is harness/config/contract.py


def parse_contract(text: str, source: str = "<string>") -> Contract:
    """Validate contract YAML text and its workloads; ConfigError names file:line: field."""
    data, lines = load_yaml(text, source)
    check = Checker(source, lines)
    model = parse_contract_data(data, check)
    workloads: dict[str, Workload] = {}
    base = Path(source).parent if source != "<string>" else Path.cwd()
    for name, raw in model.workloads.items():
        if isinstance(raw, str):
            path = Path(raw) if os.path.isabs(raw) else base / raw
            if not path.exists():
                raise check.fail(("workloads", name), f"workload file {path} not found")
            workloads[name] = load_workload(path)
        else:
            workloads[name] = workload_from_data({"name": name, **raw}, lines, source,
                                                 ("workloads", name))
    groups = {name: workload.groups for name, workload in workloads.items()}
    operations = resolve_operations(model, groups, check)
    clauses = []
    for index, (raw_clause, operation) in enumerate(zip(model.clauses, operations, strict=True)):
        comparison, value, unit = raw_clause.comparison_value_unit
        clauses.append(Clause(
            id=raw_clause.id, metric=raw_clause.metric, operation=operation,
            comparison=comparison, threshold=value, unit=unit, workload=raw_clause.workload,
            percentile=raw_clause.percentile, description=raw_clause.description,
            phase=raw_clause.phase, line=check.line(("clauses", index)),
        ))
    return Contract(_contract_name(model, source), tuple(clauses), workloads, source)


def _contract_name(model: ContractModel, source: str) -> str:
    """The name is part of the default evidence file name: from the file name if not given."""
    if model.name is not None:
        return model.name
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", Path(source).stem).lstrip("._-")[:64]
    return stem or "contract"


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
        # judged on the value as recorded, so anyone can recompute the verdict from the file
        measured: float | None = round(measure(clause, results), 6)
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
        measured=measured, threshold=clause.threshold_text, unit=clause.unit,
        comparison=clause.comparison, threshold_value=clause.threshold,
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


UNSIGNED = ("none: unsigned evidence; its sha256 is a content digest anyone can recompute "
            "after an edit, not protection (sign with --signing-key or PACS_HARNESS_SIGNING_KEY)")


def evidence(contract: Contract, verdicts: list[ClauseResult],
             signing_key: Ed25519PrivateKey | None = None) -> dict[str, Any]:
    """The evidence document: verdicts, a SHA-256 content digest, and a signature if keyed."""
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
    document = {**body, "sha256": _content_digest(body)}
    if signing_key is None:
        return {**document, "signature": UNSIGNED}
    return sign_document(document, signing_key)


def _content_digest(document: dict[str, Any]) -> str:
    body = {k: v for k, v in document.items() if k not in ("sha256", "signature")}
    return hashlib.sha256(canonical_bytes(body)).hexdigest()


def verify_evidence(document: dict[str, Any]) -> bool:
    """True when the content digest matches: catches accidents, not edits (see signing)."""
    return _content_digest(document) == document.get("sha256")


def check_figures(document: dict[str, Any]) -> list[str]:
    """Every clause's verdict recomputed from its measured value and threshold, and the
    overall verdict from the clauses: one line per disagreement (empty when consistent)."""
    problems = []
    clauses = document.get("clauses")
    if document.get("kind") != "pacs-harness SLA evidence" or not isinstance(clauses, list):
        return ["not pacs-harness SLA evidence (no 'kind' or 'clauses')"]
    if not verify_evidence(document):
        problems.append("sha256: the content digest does not match the content")
    recomputed_all = []
    for index, clause in enumerate(clauses):
        name = clause.get("clause", f"#{index}") if isinstance(clause, dict) else f"#{index}"
        try:
            recomputed = _clause_verdict(clause)
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"clause {name}: cannot recompute its verdict ({exc})")
            recomputed_all.append("fail")
            continue
        recomputed_all.append(recomputed)
        if clause.get("verdict") != recomputed:
            problems.append(f"clause {name}: verdict {clause.get('verdict')!r} but measured "
                            f"{clause.get('measured')} against {clause.get('threshold')} "
                            f"gives {recomputed!r}")
    overall = "pass" if clauses and all(v == "pass" for v in recomputed_all) else "fail"
    if document.get("verdict") != overall:
        problems.append(f"verdict: {document.get('verdict')!r} but the clauses give {overall!r}")
    return problems


def _clause_verdict(clause: dict[str, Any]) -> str:
    measured = clause["measured"]
    if measured is None:
        return "fail"
    if "comparison" in clause:
        comparison, threshold = clause["comparison"], float(clause["threshold_value"])
    else:  # evidence written before the threshold was recorded as a number
        comparison, number = str(clause["threshold"]).split()[:2]
        threshold = float(number)
    if comparison not in _COMPARE:
        raise ValueError(f"comparison {comparison!r}")
    return "pass" if _COMPARE[comparison](float(measured), threshold) else "fail"


def write_evidence(path: str | os.PathLike[str], contract: Contract,
                   verdicts: list[ClauseResult],
                   signing_key: Ed25519PrivateKey | None = None) -> dict[str, Any]:
    """Write the evidence JSON file (atomically) and return its content."""
    document = evidence(contract, verdicts, signing_key)
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
