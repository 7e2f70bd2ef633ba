"""Rollout-phase gates: the rule, its reasons, and the `gate` command's exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli.report import gate_command
from harness.errors import ConfigError
from harness.report.gate import evaluate_gate


def _test(name: str, outcome: str = "passed", message: str | None = None) -> dict:
    entry = {"nodeid": f"scenarios/test_x.py::{name}", "outcome": outcome, "duration_s": 0.1}
    if message:
        entry["message"] = message
    return entry


def _scenario(name: str, phase: str | None, *outcomes: str) -> dict:
    tests = [
        _test(f"test_{name}_{i}", o, "E   AssertionError: 3 instances missing" if o == "failed"
              else None)
        for i, o in enumerate(outcomes or ("passed",))
    ]
    rank = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
    outcome = max((t["outcome"] for t in tests), key=rank.__getitem__)
    return {"name": name, "phase": phase, "outcome": outcome, "duration_s": 1.0,
            "metrics": {}, "tests": tests}


def _report(*scenarios: dict, phase: str | None = None, **extra) -> dict:
    return {"verdict": "pass", "phase": phase, "scenarios": list(scenarios),
            "topology": {}, **extra}


def test_ready_when_every_scenario_up_to_the_phase_passed():
    report = _report(_scenario("connectivity", "infrastructure"), _scenario("ingest", "pilot"))
    result = evaluate_gate(report, "pilot")
    assert result.ready
    assert result.scenarios == ["connectivity", "ingest"]
    assert "connectivity" in result.reasons[0] and "ingest" in result.reasons[0]


def test_a_failed_scenario_blocks_its_phase_and_later_ones_not_earlier_ones():
    report = _report(_scenario("connectivity", "infrastructure"),
                     _scenario("ingest", "pilot", "passed", "failed"))
    assert evaluate_gate(report, "infrastructure").ready
    for phase in ("pilot", "staged-rollout", "full"):
        result = evaluate_gate(report, phase)
        assert not result.ready
        assert any("ingest" in r and "1 of 2" in r and "3 instances missing" in r
                   for r in result.reasons), result.reasons


def test_errors_count_as_failures():
    report = _report(_scenario("connectivity", "infrastructure", "error"))
    result = evaluate_gate(report, "infrastructure")
    assert not result.ready and "connectivity" in result.reasons[0]


def test_a_phase_with_no_scenario_is_not_ready_and_says_why():
    report = _report(_scenario("ingest", "pilot"))
    result = evaluate_gate(report, "infrastructure")
    assert not result.ready
    assert "no scenario gates phase infrastructure" in result.reasons[0]
    assert not evaluate_gate(_report(), "full").ready


def test_a_scenario_without_phase_gates_every_phase():
    report = _report(_scenario("smoke", None, "failed"), _scenario("ingest", "pilot"))
    assert not evaluate_gate(report, "planning").ready
    assert not evaluate_gate(report, "full").ready


def test_a_scenario_whose_tests_were_all_skipped_did_not_run():
    report = _report(_scenario("connectivity", "infrastructure", "skipped", "skipped"))
    result = evaluate_gate(report, "infrastructure")
    assert not result.ready and "skipped" in result.reasons[0]
    partly = _report(_scenario("connectivity", "infrastructure", "passed", "skipped"))
    assert evaluate_gate(partly, "infrastructure").ready


def test_a_run_of_an_earlier_phase_does_not_gate_a_later_one():
    report = _report(_scenario("connectivity", "infrastructure"), phase="infrastructure")
    assert evaluate_gate(report, "infrastructure").ready
    result = evaluate_gate(report, "pilot")
    assert not result.ready and "only covered phase infrastructure" in result.reasons[0]


def test_an_environment_error_is_not_ready():
    report = _report(_scenario("connectivity", "infrastructure", "error"),
                     environment_error="Orthanc not found")
    result = evaluate_gate(report, "infrastructure")
    assert not result.ready and any("Orthanc not found" in r for r in result.reasons)


def test_bad_input_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown phase"):
        evaluate_gate(_report(), "golive")
    with pytest.raises(ConfigError, match="scenarios"):
        evaluate_gate({"verdict": "pass"}, "pilot")


def _write(tmp_path: Path, report: dict) -> Path:
    (tmp_path / "report.json").write_text(json.dumps(report))
    return tmp_path


def test_gate_command_exit_codes(tmp_path):
    runner = CliRunner()
    good = tmp_path / "good"
    good.mkdir()
    _write(good, _report(_scenario("connectivity", "infrastructure")))
    bad = tmp_path / "bad"
    bad.mkdir()
    _write(bad, _report(_scenario("connectivity", "infrastructure"),
                        _scenario("ingest", "pilot", "failed")))

    result = runner.invoke(gate_command, ["--report", str(good), "--phase", "infrastructure"])
    assert result.exit_code == 0, result.output
    assert "READY" in result.output

    result = runner.invoke(gate_command, ["--report", str(bad), "--phase", "pilot"])
    assert result.exit_code == 1
    assert "NOT READY" in result.output and "ingest" in result.output

    result = runner.invoke(gate_command,
                           ["--report", str(bad / "report.json"), "--phase", "pilot", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.output)["ready"] is False

    result = runner.invoke(gate_command, ["--report", str(tmp_path / "nope"), "--phase", "pilot"])
    assert isinstance(result.exception, ConfigError)
    assert result.exception.exit_code == 2 and "no report.json" in str(result.exception)

    result = runner.invoke(gate_command, ["--report", str(good), "--phase", "golive"])
    assert result.exit_code == 2  # click's usage error for an unknown phase


def test_gate_command_through_pacs_harness(tmp_path):
    """Through the real entry point, as CI calls it."""
    from tests.helpers import run_cli

    _write(tmp_path, _report(_scenario("connectivity", "infrastructure"),
                             _scenario("ingest", "pilot", "failed")))
    assert run_cli("gate", "--report", str(tmp_path), "--phase", "infrastructure").returncode == 0
    proc = run_cli("gate", "--report", str(tmp_path), "--phase", "pilot")
    assert proc.returncode == 1 and "ingest" in proc.stdout
    proc = run_cli("gate", "--report", str(tmp_path / "missing"), "--phase", "pilot")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no report.json" in proc.stderr


def test_a_scenario_filtered_run_does_not_gate_later_phases():
    report = _report(_scenario("connectivity", "infrastructure"), scenario_filter=["connectivity"])
    assert evaluate_gate(report, "infrastructure").ready
    result = evaluate_gate(report, "full")
    assert not result.ready
    assert "limited to --scenario connectivity (up to phase infrastructure)" in result.reasons[0]


def test_exit_decision_follows_the_verdict_and_the_required_phase():
    from harness.report.gate import exit_decision

    report = _report(_scenario("connectivity", "infrastructure"), scenario_filter=["connectivity"])
    assert exit_decision(report, "infrastructure")["code"] == 0
    assert exit_decision(report, "full")["code"] == 1
    assert exit_decision(report, "none")["code"] == 0
    failed = _report(_scenario("connectivity", "infrastructure", "failed"), verdict="fail")
    assert exit_decision(failed, "none")["code"] == 1
    assert exit_decision(_report(environment_error="x"), "none")["code"] == 3


def test_check_report_names_each_figure_that_does_not_recompute():
    from harness.report.gate import check_report, exit_decision, readiness

    report = _report(_scenario("connectivity", "infrastructure"), _scenario("ingest", "pilot"))
    report["readiness"] = [{"phase": g.phase, "ready": g.ready} for g in readiness(report)]
    report["exit"] = exit_decision(report, "pilot")
    assert check_report(report) == []
    report["scenarios"][1]["tests"][0]["outcome"] = "failed"  # the verdict still says pass
    problems = check_report(report)
    assert problems[0] == "verdict: 'pass' but the test outcomes give 'fail'"
    assert any(p.startswith("readiness.pilot: recorded True, recomputed False") for p in problems)
    assert any(p.startswith("exit.code: recorded 0, recomputed 1") for p in problems)
