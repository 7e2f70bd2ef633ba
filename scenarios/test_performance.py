"""Performance (phases staged-rollout and full): the contract's SLA clauses, one test each.

The contract is the topology's `settings.performance.contract` (a path relative to the
topology file), else `$PACS_HARNESS_CONTRACT`, else the shipped scenarios/contracts/default.yaml.
Clauses are collected from `$PACS_HARNESS_CONTRACT` or the default file (collection happens
before the topology is known); a clause of the collected file that the run's contract lacks
is skipped, and a clause of the run's contract that was not collected fails
`test_every_clause_collected`, so no clause is silently dropped.

Each workload runs once against the node `settings.performance.node` (default: the last
disposable node), which is wiped afterwards. Every verdict goes to report.json (metrics) and
to sla-evidence.json beside it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from harness.performance.sla import Contract, WorkloadCache, judge, load_contract, write_evidence

pytestmark = [pytest.mark.scenario("performance")]

DEFAULT_CONTRACT = Path(__file__).parent / "contracts" / "default.yaml"
COLLECTED = load_contract(os.environ.get("PACS_HARNESS_CONTRACT") or DEFAULT_CONTRACT)


def _settings(topology) -> dict:
    return (topology.settings or {}).get("performance", {}) or {}


@pytest.fixture(scope="module")
def contract(pacs_topology) -> Contract:
    configured = _settings(pacs_topology).get("contract")
    if configured:
        path = Path(configured)
        if not path.is_absolute() and not pacs_topology.is_default:
            path = Path(pacs_topology.source).parent / path
        return load_contract(path)
    return COLLECTED


@pytest.fixture(scope="module")
def load_node(pacs_cluster, pacs_topology):
    name = _settings(pacs_topology).get("node")
    if name is None:
        disposable = [n for n in pacs_cluster.nodes.values() if n.disposable]
        if not disposable:
            pytest.skip("no disposable node: the load stores studies, so it needs one")
        node = disposable[-1]
    else:
        node = pacs_cluster.node(name)
    if not node.disposable:
        pytest.skip(f"{node.name} is not disposable: the load would store studies into it")
    yield node
    if node.alive():
        node.wipe()


@pytest.fixture(scope="module")
def workloads(pacs_cluster, load_node) -> WorkloadCache:
    return WorkloadCache(load_node, move_port=pacs_cluster.harness_port)


@pytest.fixture(scope="module")
def evidence_log(pytestconfig, contract):
    """Verdicts so far; rewritten to sla-evidence.json after every clause."""
    report = pytestconfig.getoption("pacs_report_json")
    folder = Path(report).parent if report else Path(tempfile.mkdtemp(prefix="pacs-sla-"))
    return {"path": folder / "sla-evidence.json", "verdicts": [], "contract": contract}


@pytest.mark.parametrize(
    "clause_id",
    [pytest.param(c.id, marks=pytest.mark.phase(c.phase), id=c.id) for c in COLLECTED.clauses],
)
def test_sla_clause(clause_id, contract, workloads, evidence_log, pacs_metrics):
    clause = next((c for c in contract.clauses if c.id == clause_id), None)
    if clause is None:
        pytest.skip(f"clause {clause_id} is not in the contract {contract.source}")
    results = workloads.get(contract, clause.workload)
    verdict = judge(clause, results)
    evidence_log["verdicts"].append(verdict)
    write_evidence(evidence_log["path"], contract, evidence_log["verdicts"])
    op = results["operations"].get(clause.operation, {})
    pacs_metrics[f"sla.{clause.id}"] = {
        "verdict": verdict.verdict,
        "measured": verdict.measured,
        "unit": verdict.unit,
        "threshold": verdict.threshold,
        "workload": clause.workload,
        "node": results["node"]["name"],
        "evidence": str(evidence_log["path"]),
    }
    if op:
        pacs_metrics[f"load.{clause.workload}.{clause.operation}"] = {
            k: op[k] for k in ("count", "errors", "instances_per_s", "mb_per_s", "latency_ms",
                               "errors_by_status")
        }
    pacs_metrics[f"load.{clause.workload}.totals"] = results["totals"]
    pacs_metrics[f"load.{clause.workload}.harness"] = results["harness"]
    pacs_metrics[f"load.{clause.workload}.timeline"] = results["timeline"]
    for warning in results["warnings"]:
        print(f"warning: {warning}")
    assert verdict.verdict == "pass", verdict.message


@pytest.mark.phase("staged-rollout")
def test_every_clause_collected(contract):
    missing = [c.id for c in contract.clauses if c.id not in {x.id for x in COLLECTED.clauses}]
    assert not missing, (
        f"clauses of {contract.source} not collected: {', '.join(missing)} "
        f"(set PACS_HARNESS_CONTRACT={contract.source} so each becomes a test)"
    )
