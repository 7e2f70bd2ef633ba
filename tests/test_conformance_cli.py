"""`pacs-harness conformance` as a user runs it: exit codes, the JSON, the table, the files,
and the nodes it launched stopped afterwards (also when interrupted); `run --phase
planning` includes the conformance scenario.

The probes are this module's own (C-ECHO, print management negotiation), put into the
registry for one test at a time with monkeypatch; the command then runs in this process
through `harness.cli.app.main`, with its real exit codes.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from harness.cli.app import main
from harness.conformance import model
from harness.conformance.model import Probe, conforms, not_supported
from harness.conformance.runner import move_destination
from harness.dicom.peer import HARNESS_AE_TITLE, DimseConnectionError
from tests.helpers import processes_mentioning, run_cli, status_json

#: Basic Grayscale Print Management Meta SOP Class (PS3.4 H): no PACS kind here offers it
BASIC_PRINT = ("1.2.840.10008.5.1.1.9", "1.2.840.10008.1.2")


def _echo(ctx):
    answer = ctx.node.dimse(timeout_s=10).echo()
    ctx.record("C-ECHO", f"status {answer.status}")
    return conforms("answered")


def _print(ctx):
    try:
        accepted = ctx.node.dimse(timeout_s=10).negotiate([BASIC_PRINT])
    except DimseConnectionError:  # its only context refused: no association
        accepted = {BASIC_PRINT: False}
    if accepted[BASIC_PRINT]:
        return conforms("accepted")
    return not_supported("Basic Grayscale Print Management refused")


def _interrupted(ctx):
    raise KeyboardInterrupt  # as Ctrl-C arriving while a probe runs


ECHO = Probe("services.test-cli-echo", "services", "C-ECHO", "answers", "PS3.4 A.4", _echo)
PRINT = Probe("services.test-cli-print", "services", "Print", "offers print", "PS3.4 H",
              _print)
INTERRUPT = Probe("services.test-cli-interrupt", "services", "Ctrl-C", "-", "-", _interrupted)


@pytest.fixture
def registered(monkeypatch):
    """The test probes in the registry for this test only."""
    for probe in (ECHO, PRINT, INTERRUPT):
        monkeypatch.setitem(model._registry, probe.id, probe)


@pytest.fixture
def topology(tmp_path, monkeypatch, request):
    """A topology of an embedded PACS and a dcmqrscp when installed, with a state directory
    of its own; its name is unique, so its processes can be found."""
    from harness.launch.tools import find_binary

    monkeypatch.setenv("PACS_HARNESS_STATE_DIR", str(tmp_path / "state"))
    name = f"conf-cli-{request.node.name[5:25]}".replace("_", "-")
    nodes = "  embedded: {kind: embedded, ae_title: EMBEDDED}\n"
    if find_binary("dcmqrscp"):
        nodes += "  dcmqrscp: {kind: dcmqrscp, ae_title: DCMQRSCP}\n"
    path = tmp_path / "topology.yaml"
    path.write_text(f"name: {name}\nnodes:\n{nodes}")
    return path, name


def _main(*args: str) -> int:
    with pytest.raises(SystemExit) as ended:
        main(list(args))
    return ended.value.code


def test_unknown_probe_or_node_is_a_usage_error_naming_it(topology):
    path, name = topology
    for args, named in ((("--probe", "query.no-such-probe"), "query.no-such-probe"),
                        (("--node", "no-such-node"), "no-such-node"),
                        (("--probe", "nonsense"), "nonsense")):
        proc = run_cli("conformance", "-t", str(path), *args)
        assert proc.returncode == 2, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and named in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr
    assert processes_mentioning(f"pacs-harness-{name}-") == []  # nothing was launched


def test_json_matrix_and_output_then_the_launched_nodes_are_stopped(
        topology, registered, capsys, tmp_path):
    path, name = topology
    output = tmp_path / "out"
    code = _main("conformance", "-t", str(path), "--probe", ECHO.id, "--probe", PRINT.id,
                 "--json", "--output", str(output))
    captured = capsys.readouterr()
    assert code == 0, captured.err

    printed = json.loads(captured.out)
    assert set(printed) == {"nodes", "probes", "results", "risks"}
    names = [n["name"] for n in printed["nodes"]]
    assert names[0] == "embedded" and all(n["writable"] for n in printed["nodes"])
    assert [p["id"] for p in printed["probes"]] == [ECHO.id, PRINT.id]
    cells = {(r["probe"], r["node"]): r for r in printed["results"]}
    assert len(cells) == len(printed["results"]) == 2 * len(names)
    for node in names:
        assert cells[(ECHO.id, node)]["outcome"] == "conforms"
        assert cells[(ECHO.id, node)]["evidence"][0]["request"] == "C-ECHO"
        assert cells[(PRINT.id, node)]["outcome"] == "not supported"
    assert printed["risks"] == []
    assert json.loads((output / "conformance.json").read_text()) == printed
    if importlib.util.find_spec("harness.report.interop") is None:
        assert "no interop page" in captured.err
    else:  # the page names every node and probe
        page = (output / "interop.html").read_text()
        assert all(text in page for text in (*names, ECHO.id, PRINT.id))
    assert processes_mentioning(f"pacs-harness-{name}-") == []


def test_human_matrix_lists_probes_by_area_and_nodes(topology, registered, capsys):
    path, _name = topology
    code = _main("conformance", "-t", str(path), "--probe", ECHO.id,
                 "--probe", PRINT.id, "--node", "embedded")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "embedded" in captured.out and "dcmqrscp" not in captured.out
    row = next(line for line in captured.out.splitlines() if PRINT.id in line)
    assert "n-s" in row and "Print (PS3.4 H)" in row  # 80 columns leave room for a title
    assert "conforms" in next(line for line in captured.out.splitlines() if ECHO.id in line)
    assert "migration risks: none" in captured.out


def _stand_in_risks(remedy: str) -> ModuleType:
    """A stand-in for harness/conformance/risks.py: every node that refuses Modality
    Print is a risk towards every other node, with `remedy` ("" for none)."""
    stand_in = ModuleType("harness.conformance.risks")

    class Risk:
        def __init__(self, source: str, target: str, probe: str) -> None:
            self.fields = {"source": source, "target": target, "probe": probe,
                           "risk": "print refused", "remedy": remedy,
                           "remedy_id": remedy.replace(" ", "-") or None}

        def as_dict(self) -> dict:
            return self.fields

    stand_in.migration_risks = lambda results, nodes: [
        Risk(r.node, other["name"], r.probe) for r in results if r.outcome == "not supported"
        for other in nodes if other["name"] != r.node]
    return stand_in


def pytest_configure(config):
    """Only when this module is loaded as a plugin (`-p tests.test_conformance_cli`, the
    child pytest of test_the_planning_gate_...): the test probes registered and the risks
    from the stand-in, its remedy from the environment."""
    import os

    model._registry[PRINT.id] = PRINT
    sys.modules["harness.conformance.risks"] = _stand_in_risks(
        os.environ.get("CONFORMANCE_TEST_REMEDY", ""))


def test_migration_risks_are_printed_per_pair_and_exit_1(topology, registered, capsys,
                                                         monkeypatch):
    """The risks module's answer decides the exit code; its lines name pair and remedy."""
    monkeypatch.setitem(sys.modules, "harness.conformance.risks", _stand_in_risks(""))
    path, _name = topology
    if "dcmqrscp" not in path.read_text():
        pytest.skip("dcmqrscp is not installed: one node, no pair")
    code = _main("conformance", "-t", str(path), "--probe", PRINT.id)
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "embedded -> dcmqrscp:" in captured.out
    assert f"{PRINT.id}: print refused\n      remedy: no known remedy" in captured.out


@pytest.mark.parametrize("remedy", ["", "query by UID lists"])
def test_the_planning_gate_fails_only_on_a_risk_without_remedy(topology, tmp_path, remedy):
    """The scenario in a child pytest (as `run` starts it), with this module as a plugin."""
    import os
    import subprocess

    from harness.report.gate import evaluate_gate
    from tests.helpers import CHILD_PYTEST

    path, _name = topology
    if "dcmqrscp" not in path.read_text():
        pytest.skip("dcmqrscp is not installed: one node, no pair")
    path.write_text(path.read_text()
                    + f"settings:\n  conformance: {{probes: [{PRINT.id}]}}\n")
    repository = Path(__file__).resolve().parents[1]
    scenarios = repository / "scenarios"
    report_json = tmp_path / "run" / "report.json"
    subprocess.run([*CHILD_PYTEST, "-p", "tests.test_conformance_cli",
                    str(scenarios / "test_conformance.py"), "-c", str(scenarios / "pytest.ini"),
                    "--rootdir", str(repository), "--pacs-topology", str(path),
                    "--pacs-report-json", str(report_json)],
                   cwd=repository, capture_output=True, timeout=600,
                   env={**os.environ, "CONFORMANCE_TEST_REMEDY": remedy})
    report = json.loads(report_json.read_text())
    (scenario,) = report["scenarios"]
    assert len(scenario["metrics"]["conformance"]["risks"]) == 2  # each way
    outcomes = {t["nodeid"].split("::")[-1]: t["outcome"] for t in scenario["tests"]}
    gate = evaluate_gate(report, "planning")
    assert outcomes["test_every_node_answers_the_probes"] == "passed"
    if remedy:
        assert outcomes["test_every_migration_risk_has_a_remedy"] == "passed"
        assert gate.ready
    else:
        assert outcomes["test_every_migration_risk_has_a_remedy"] == "failed"
        assert not gate.ready
        assert any("2 migration risks without a remedy" in r for r in gate.reasons), gate.reasons


def test_ctrl_c_during_the_probes_stops_the_launched_nodes(topology, registered, capsys):
    path, name = topology
    code = _main("conformance", "-t", str(path), "--probe", INTERRUPT.id)
    assert code == 130
    assert processes_mentioning(f"pacs-harness-{name}-") == []


def test_nodes_of_up_are_used_and_left_running_a_dead_one_is_exit_3(topology, registered,
                                                                    capsys):
    from harness.cluster import Cluster
    from harness.config import load_topology
    from harness.launch.state import state_dir_for

    path, _name = topology
    assert run_cli("up", "-t", str(path)).returncode == 0
    try:
        code = _main("conformance", "-t", str(path), "--probe", ECHO.id, "--json")
        printed = json.loads(capsys.readouterr().out)
        assert code == 0
        assert {r["outcome"] for r in printed["results"]} == {"conforms"}
        assert all(row["alive"] for row in status_json("-t", str(path)))

        loaded = load_topology(path)
        attached = Cluster.from_state(loaded, state_dir_for(loaded))
        # its nodes' peer tables given back as launch wrote them: the move destinations
        embedded = attached.node("embedded")
        assert {p.ae_title for p in embedded.peers} == {
            HARNESS_AE_TITLE, *(n.ae_title for n in attached.nodes.values() if n is not embedded)}
        harness = next(p for p in embedded.peers if p.ae_title == HARNESS_AE_TITLE)
        assert harness.port == attached.harness_port
        others = [n for n in attached.nodes.values() if n is not embedded]
        assert move_destination(embedded, list(attached.nodes.values())) is (
            others[0] if others else None)
        embedded.stop()
        code = _main("conformance", "-t", str(path), "--probe", ECHO.id, "--json")
        captured = capsys.readouterr()
        assert code == 3
        cells = {r["node"]: r for r in json.loads(captured.out)["results"]}
        assert cells["embedded"]["outcome"] == "not tested"
        assert "did not answer" in cells["embedded"]["observed"]
        assert "not probed (did not answer): embedded" in captured.err
    finally:
        assert run_cli("down", "-t", str(path)).returncode == 0


def test_run_phase_planning_includes_the_conformance_scenario(tmp_path):
    """The scenario runs in the planning phase and records the matrix in report.json."""
    topology = tmp_path / "planning.yaml"
    topology.write_text("name: conf-planning\nnodes:\n  pacs: {kind: embedded}\n"
                        "settings:\n  conformance: {probes: [services]}\n")
    report_dir = tmp_path / "report"
    proc = run_cli("run", "-t", str(topology), "--phase", "planning", "--scenario",
                   "conformance", "--report-dir", str(report_dir), "-q", timeout=900,
                   env=_state_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads((report_dir / "report.json").read_text())
    (scenario,) = [s for s in report["scenarios"] if s["name"] == "conformance"]
    assert scenario["phase"] == "planning" and scenario["outcome"] == "passed"
    matrix = scenario["metrics"]["conformance"]
    assert set(matrix) == {"nodes", "probes", "results", "risks"}
    assert [n["name"] for n in matrix["nodes"]] == ["pacs"]
    expected = [p.id for p in model.all_probes(("services",))]
    assert [p["id"] for p in matrix["probes"]] == expected
    assert len(matrix["results"]) == len(expected)


def _state_env(tmp_path):
    import os

    return {**os.environ, "PACS_HARNESS_STATE_DIR": str(tmp_path / "state")}


def test_a_bad_probe_setting_fails_the_scenario_naming_it(tmp_path):
    topology = tmp_path / "bad.yaml"
    topology.write_text("name: conf-bad-setting\nnodes:\n  pacs: {kind: embedded}\n"
                        "settings:\n  conformance: {probes: [query.no-such-probe]}\n")
    report_dir = tmp_path / "report"
    proc = run_cli("run", "-t", str(topology), "--scenario", "conformance",
                   "--report-dir", str(report_dir), "-q", timeout=900, env=_state_env(tmp_path))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    report = json.loads((report_dir / "report.json").read_text())
    (scenario,) = report["scenarios"]
    assert {t["outcome"] for t in scenario["tests"]} == {"error"}
    message = scenario["tests"][0]["message"]
    assert "settings.conformance.probes: 'query.no-such-probe'" in message
    assert "Traceback" not in message
