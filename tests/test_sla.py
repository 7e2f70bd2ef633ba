"""SLA contracts: parsing with file:line errors, a passing and an impossible clause, evidence."""

from __future__ import annotations

import json
import os

import pytest

from harness.errors import ConfigError
from harness.fixtures import pacs_cluster_factory
from harness.launch.tools import find_binary
from harness.performance.sla import evaluate, parse_contract, verify_evidence, write_evidence
from tests.helpers import run_cli

CONTRACT = """
name: ci
workloads:
  read:
    duration_s: 3
    warmup_s: 1
    dataset: {studies: 2, instances_per_study: 3, scale: tiny}
    groups:
      - {name: find, operation: c-find, level: STUDY, users: 1}
      - {name: store, operation: c-store, users: 1, instances: 2}
clauses:
  - {id: find-p99, metric: latency, percentile: 99, operation: find, threshold: "<= 10 s",
     workload: read}
  - {id: impossible, metric: throughput, operation: store, threshold: ">= 1000000 instances/s",
     workload: read, description: deliberately impossible}
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (CONTRACT.replace('"<= 10 s"', '"<= 10 parsecs"'), "c.yaml:12: clauses.0.threshold: unit"),
        (CONTRACT.replace("percentile: 99, ", ""), "c.yaml:12: clauses.0.percentile: latency"),
        (CONTRACT.replace("operation: find,", "operation: fnd,"), "c.yaml:12: clauses.0.operation"),
        (CONTRACT.replace("workload: read}", "workload: raed}"), "c.yaml:13: clauses.0.workload"),
        (CONTRACT.replace("users: 1}", "users: x}", 1), "c.yaml:9: workloads.read.groups.0.users"),
    ],
)
def test_contract_errors_name_file_line_field(text, message):
    with pytest.raises(ConfigError) as caught:
        parse_contract(text, "c.yaml")
    assert str(caught.value).startswith(message), str(caught.value)


cluster = pacs_cluster_factory("name: sla\nnodes:\n  t: {kind: orthanc, ae_title: SLA}\n",
                               scope="module", requires=("Orthanc",))


def test_passing_and_impossible_clause_with_evidence(cluster, tmp_path):
    contract = parse_contract(CONTRACT, "c.yaml")
    verdicts = evaluate(contract, cluster.node("t"))
    by_id = {v.clause: v for v in verdicts}
    assert by_id["find-p99"].verdict == "pass", by_id["find-p99"].message
    impossible = by_id["impossible"]
    assert impossible.verdict == "fail"
    assert 0 < impossible.measured < 1_000_000
    assert "required >= 1e+06 instances/s: fail" in impossible.message
    document = write_evidence(tmp_path / "evidence.json", contract, verdicts)
    saved = json.loads((tmp_path / "evidence.json").read_text())
    assert saved == json.loads(json.dumps(document)) and saved["verdict"] == "fail"
    assert verify_evidence(saved)
    clause = saved["clauses"][1]
    assert clause["node"]["name"] == "t" and clause["harness_version"] and clause["time"]
    assert clause["workload"]["name"] == "read"
    saved["clauses"][1]["measured"] = 2_000_000  # an edited verdict no longer verifies
    assert not verify_evidence(saved)


def test_sla_cli_exits_1_on_a_failed_clause(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from harness.cli.load import sla_command

    if not find_binary("Orthanc"):
        pytest.skip("Orthanc not installed")
    topology = tmp_path / "topo.yaml"
    topology.write_text("name: slacli\nnodes:\n  t: {kind: orthanc, ae_title: SLACLI}\n")
    contract = tmp_path / "contract.yaml"
    contract.write_text(CONTRACT)
    env = {**os.environ, "PACS_HARNESS_STATE_DIR": str(tmp_path / "state")}
    monkeypatch.setenv("PACS_HARNESS_STATE_DIR", env["PACS_HARNESS_STATE_DIR"])
    up = run_cli("up", "--topology", str(topology), env=env)
    assert up.returncode == 0, up.stderr
    try:
        evidence = tmp_path / "ev.json"
        result = CliRunner().invoke(sla_command, [
            "--contract", str(contract), "--node", "t", "--topology", str(topology),
            "--evidence", str(evidence)])
        assert result.exit_code == 1, result.output
        assert "FAIL impossible" in result.output and "PASS find-p99" in result.output
        assert json.loads(evidence.read_text())["verdict"] == "fail"
        bad = CliRunner().invoke(sla_command, [
            "--contract", str(tmp_path / "nope.yaml"), "--node", "t"])
        assert isinstance(bad.exception, ConfigError)
    finally:
        run_cli("down", "--topology", str(topology), env=env)
