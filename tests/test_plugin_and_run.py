"""The pytest plugin (phases, scenarios, janitor, report.json) and `pacs-harness run`."""

from __future__ import annotations

import json
import os

import pytest

from harness.launch.ports import free_port, port_in_use
from tests.helpers import run_cli

pytest_plugins = ["pytester"]

PHASED = """
import pytest

@pytest.mark.phase("planning")
def test_plan(): pass

@pytest.mark.phase("infrastructure")
@pytest.mark.scenario("wiring")
def test_infra(pacs_metrics):
    pacs_metrics["cables"] = 3

@pytest.mark.phase("pilot")
def test_pilot(): pass

@pytest.mark.phase("full")
def test_full(): pass

def test_unphased(): pass
"""


def test_phase_runs_that_phase_and_the_ones_before(pytester):
    pytester.makepyfile(test_phased=PHASED)
    result = pytester.runpytest_subprocess("--phase", "pilot", "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, deselected=1)
    result.stdout.fnmatch_lines(["*test_pilot PASSED*"])
    assert "test_full" not in result.stdout.str().replace("deselected", "")


def test_unknown_phase_is_a_usage_error(pytester):
    pytester.makepyfile(test_phased=PHASED)
    result = pytester.runpytest_subprocess("--phase", "go-live")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--pacs-phase 'go-live': unknown phase (allowed: planning,*"])


def test_old_option_name_is_an_alias_of_the_pacs_one(pytester):
    pytester.makepyfile(test_phased=PHASED)
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(["*--pacs-phase=NAME, --phase=NAME*"])
    for option in ("--pacs-phase", "--phase"):
        result = pytester.runpytest_subprocess(option, "infrastructure", "-p", "no:cacheprovider")
        result.assert_outcomes(passed=3, deselected=2)


def test_ini_settings_apply_and_the_command_line_wins(pytester):
    pytester.makepyfile(test_phased=PHASED)
    pytester.makeini(
        "[pytest]\n"
        "pacs_phase = infrastructure\n"
        "pacs_scenario =\n    wiring\n    phased\n"
        "pacs_report_json = from-ini/report.json\n"
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, deselected=2)  # planning, infrastructure, unphased
    data = json.loads((pytester.path / "from-ini" / "report.json").read_text())
    assert {s["name"] for s in data["scenarios"]} == {"wiring", "phased"}

    report = pytester.path / "from-cli" / "report.json"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--pacs-phase", "pilot", "--pacs-scenario", "phased",
        "--pacs-report-json", str(report),
    )
    result.assert_outcomes(passed=3, deselected=2)  # planning, pilot, unphased
    assert {s["name"] for s in json.loads(report.read_text())["scenarios"]} == {"phased"}

    pytester.makeini("[pytest]\npacs_phase = go-live\n")
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ini pacs_phase = 'go-live': unknown phase*"])


def test_report_json_groups_tests_by_scenario_with_metrics(pytester):
    pytester.makepyfile(test_phased=PHASED)
    report = pytester.path / "out" / "report.json"
    result = pytester.runpytest_subprocess(
        "--pacs-report-json", str(report), "--pacs-scenario", "wiring"
    )
    result.assert_outcomes(passed=1, deselected=4)
    data = json.loads(report.read_text())
    assert data["verdict"] == "pass"
    (scenario,) = data["scenarios"]
    assert (scenario["name"], scenario["phase"], scenario["outcome"]) == (
        "wiring", "infrastructure", "passed")
    assert scenario["metrics"] == {"cables": 3}


def test_janitor_wipes_disposable_nodes_between_tests(pytester, tmp_path):
    topo = tmp_path / "t.yaml"
    topo.write_text("name: jan\nnodes:\n  box: {kind: embedded, ae_title: BOX}\n")
    pytester.makepyfile(
        test_jan="""
from synthetic_data.samples import sample_study

def test_fill(pacs_node, pacs_janitor):
    assert pacs_node("box").dimse().store(sample_study(seed=5, instances=2)).ok
    assert pacs_node("box").statistics().instances == 2

def test_starts_empty(pacs_node, pacs_janitor):
    assert pacs_node("box").statistics().instances == 0
"""
    )
    result = pytester.runpytest_subprocess("--pacs-topology", str(topo), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


LAUNCHING = """
import json, os
import pytest
from harness.fixtures import pacs_cluster_factory

box = pacs_cluster_factory({"name": "fac", "nodes": {"box": {"kind": "embedded"}}},
                           scope="module")

def _note(cluster):
    with open(os.environ["LAUNCHED"], "a") as out:
        for node in cluster.nodes.values():
            out.write(json.dumps([node.handle.pid, node.handle.start_time, node.dicom_port])
                      + "\\n")

def test_factory_cluster_answers(box):
    _note(box)
    assert box.node("box").dimse().echo().status.ok

def test_launched_then_failed(pacs_launch):
    _note(pacs_launch("name: one\\nnodes:\\n  a: {kind: embedded}\\n"))
    _note(pacs_launch("name: two\\nnodes:\\n  b: {kind: embedded}\\n"))
    assert False, "the test fails with two clusters running"

def test_launched_then_interrupted(pacs_launch):
    _note(pacs_launch("name: three\\nnodes:\\n  c: {kind: embedded}\\n"))
    raise KeyboardInterrupt
"""


AT_SESSION_FINISH = """
import json, os
import pytest
from harness.launch.ports import PortReservation
from harness.launch.process import ProcessHandle

@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    # after every fixture teardown, before the process ends (its death would stop the nodes)
    seen = []
    with open(os.environ["LAUNCHED"]) as launched:
        for line in launched:
            pid, start_time, port = json.loads(line)
            claim = PortReservation.try_claim(port)
            seen.append({"alive": ProcessHandle(pid, start_time).alive(),
                         "port_reserved": claim is None})
            if claim is not None:
                claim.release()
    with open(os.environ["LAUNCHED"] + ".finish", "w") as out:
        json.dump(seen, out)
"""


def test_clusters_of_the_factory_and_launcher_stop_after_failure_and_interrupt(
    pytester, tmp_path, monkeypatch
):
    pytester.makepyfile(test_launching=LAUNCHING)
    pytester.makeconftest(AT_SESSION_FINISH)
    launched = tmp_path / "launched.jsonl"
    monkeypatch.setenv("LAUNCHED", str(launched))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v")
    result.stdout.fnmatch_lines(["*test_factory_cluster_answers PASSED*",
                                 "*test_launched_then_failed FAILED*", "*KeyboardInterrupt*"])
    assert result.ret == pytest.ExitCode.INTERRUPTED
    nodes = [json.loads(line) for line in launched.read_text().splitlines()]
    assert len(nodes) == 4
    at_finish = json.loads((tmp_path / "launched.jsonl.finish").read_text())
    assert at_finish == [{"alive": False, "port_reserved": False}] * 4
    for _pid, _start_time, port in nodes:
        assert not port_in_use("127.0.0.1", port)


@pytest.mark.timeout(1800)
def test_run_on_default_topology_is_the_main_job(default_run):
    report_dir, proc = default_run
    assert "default topology: legacy =" in proc.stderr
    for name in ("junit.xml", "report.json", "allure-results", "index.html"):
        assert (report_dir / name).exists(), name
    assert any((report_dir / "allure-results").glob("*-result.json"))
    report = json.loads((report_dir / "report.json").read_text())
    assert report["verdict"] == "pass", proc.stdout[-3000:] + proc.stderr[-3000:]
    # the exit is the report's: 1 when the phase its headline shows is not ready
    headline = report["exit"]["require_ready"]
    (row,) = [r for r in report["readiness"] if r["phase"] == headline]
    assert proc.returncode == report["exit"]["code"] == (0 if row["ready"] else 1)
    assert f"phase {headline}: {'ready' if row['ready'] else 'NOT READY'}" in proc.stderr
    assert (f"{'READY' if row['ready'] else 'NOT READY'} for <span>{headline}</span>"
            in (report_dir / "index.html").read_text())
    assert {n["name"] for n in report["topology"]["nodes"]} == {"legacy", "target"}
    (connectivity,) = [s for s in report["scenarios"] if s["name"] == "connectivity"]
    assert connectivity["phase"] == "infrastructure"
    assert connectivity["outcome"] == "passed"
    assert "CT Image Storage" in connectivity["metrics"]["accepted.target"]
    assert set(report["scenarios"][0]) >= {"name", "phase", "outcome", "duration_s", "metrics"}
    # Allure: steps and attachments (metrics, the findings CSV) for teams that use it
    allure_results = [
        json.loads(p.read_text())
        for p in (report_dir / "allure-results").glob("*-result.json")
    ]
    migration = [r for r in allure_results if "test_migration_pilot" in r.get("fullName", "")
                 and r.get("status") == "passed"]
    assert migration, "no passed migration test in the Allure results"
    assert any(step["name"].startswith("reconcile") for step in migration[0]["steps"])
    names = {a["name"] for r in migration for a in r.get("attachments", [])}
    assert {"findings.csv", "metrics"} <= names


def test_run_with_unknown_scenario_exits_2(tmp_path):
    proc = run_cli("run", "--scenario", "teleport", "--report-dir", str(tmp_path))
    assert proc.returncode == 2
    assert (
        "--scenario 'teleport': unknown scenario (allowed: assessment, conformance, "
        "connectivity, disaster-recovery"
        in proc.stderr
    )


def test_run_with_no_matching_test_does_not_pass_silently(tmp_path):
    # connectivity gates infrastructure, which comes after planning: nothing is left to run
    proc = run_cli("run", "--phase", "planning", "--scenario", "connectivity",
                   "--report-dir", str(tmp_path), timeout=300)
    assert proc.returncode == 2
    assert "no scenario ran" in proc.stderr


def test_run_against_an_unreachable_node_is_an_environment_error(tmp_path):
    topo = tmp_path / "ghost.yaml"
    topo.write_text(
        f"name: ghost\nnodes:\n  ghost: {{kind: external, host: 127.0.0.1, "
        f"dicom_port: {free_port()}}}\n"
    )
    proc = run_cli("run", "--topology", str(topo), "--report-dir", str(tmp_path / "r"),
                   "--scenario", "connectivity", timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert "environment error: node ghost (external)" in proc.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["verdict"] == "fail"


def test_run_on_embedded_nodes_only(tmp_path):
    """What a machine without Orthanc or DCMTK runs: both nodes embedded."""
    topo = tmp_path / "zero-install.yaml"
    topo.write_text(
        "name: zero-install\nnodes:\n  legacy: {kind: embedded}\n  target: {kind: embedded}\n"
    )
    # up to pilot: the staged-rollout scenarios start Orthanc pairs of their own
    proc = run_cli("run", "--topology", str(topo), "--report-dir", str(tmp_path / "r"), "-q",
                   "--phase", "pilot", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "phase pilot: ready" in proc.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["verdict"] == "pass"
    assert {n["kind"] for n in report["topology"]["nodes"]} == {"embedded"}
    moves = [t for s in report["scenarios"] for t in s["tests"] if "move_between" in t["nodeid"]]
    assert len(moves) == 2 and all(t["outcome"] == "passed" for t in moves)


KEEP_TEST = """
def test_uses_node(pacs_node):
    assert pacs_node("box").alive()
"""


def test_pacs_keep_leaves_nodes_for_status_and_down(pytester, tmp_path):
    topo = tmp_path / "keep.yaml"
    topo.write_text("name: keep\nnodes:\n  box: {kind: embedded, ae_title: KEEPBOX}\n")
    pytester.makepyfile(test_keep=KEEP_TEST)
    pytester.makeini(f"[pytest]\npacs_topology = {topo}\n")  # the ini setting works too
    result = pytester.runpytest_subprocess("--pacs-keep", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    try:
        (row,) = json.loads(run_cli("status", "--json", "--topology", str(topo)).stdout)
        assert row["alive"], "--pacs-keep must leave the node running"
    finally:
        assert run_cli("down", "--topology", str(topo)).returncode == 0
    (row,) = json.loads(run_cli("status", "--json", "--topology", str(topo)).stdout)
    assert not row["alive"]


def test_run_attaches_to_nodes_that_up_started(tmp_path):
    topo = tmp_path / "attached.yaml"
    topo.write_text(
        "name: attached\nnodes:\n  legacy: {kind: embedded}\n  target: {kind: embedded}\n"
    )
    assert run_cli("up", "--topology", str(topo)).returncode == 0
    try:
        before = json.loads(run_cli("status", "--json", "--topology", str(topo)).stdout)
        proc = run_cli("run", "--topology", str(topo), "--report-dir", str(tmp_path / "r"),
                       "--scenario", "connectivity", "-q", timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        report = json.loads((tmp_path / "r" / "report.json").read_text())
        ports = {n["name"]: n["dicom_port"] for n in report["topology"]["nodes"]}
        assert ports == {r["name"]: r["dicom_port"] for r in before}
        after = json.loads(run_cli("status", "--json", "--topology", str(topo)).stdout)
        assert all(r["alive"] for r in after), "run must not stop nodes that up started"
    finally:
        assert run_cli("down", "--topology", str(topo)).returncode == 0


def test_failing_scenario_fails_the_phase_gate_and_the_report_says_why(tmp_path):
    """A real failure: a threshold no migration can meet (share of failed probes < 0)."""
    topo = tmp_path / "strict.yaml"
    topo.write_text(
        "name: strict\nnodes:\n  legacy: {kind: embedded}\n  target: {kind: embedded}\n"
        "settings:\n  migration: {max_inaccessible_share: -1, pilot_patients: 2}\n"
    )
    proc = run_cli("run", "--topology", str(topo), "--phase", "pilot", "--scenario",
                   "migration", "--report-dir", str(tmp_path / "r"), "-q", timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "phase pilot: NOT READY" in proc.stderr
    page = (tmp_path / "r" / "index.html").read_text()
    assert "NOT READY" in page and "of source probes failed" in page
    gate = run_cli("gate", "--report", str(tmp_path / "r"), "--phase", "pilot")
    assert gate.returncode == 1


@pytest.fixture(scope="module")
def connectivity_runs(tmp_path_factory):
    """`run --scenario connectivity` on embedded nodes twice: by default (the phase it gates,
    infrastructure, must be ready) signed with a key from the environment, and with
    `--require-ready full`, a phase such a run cannot show ready."""
    home = tmp_path_factory.mktemp("honest")
    topo = home / "pair.yaml"
    topo.write_text("name: honest\nnodes:\n  legacy: {kind: embedded}\n"
                    "  target: {kind: embedded}\n")
    made = run_cli("keygen", str(home / "key"))
    assert made.returncode == 0, made.stderr
    env = {**os.environ, "PACS_HARNESS_SIGNING_KEY": str(home / "key")}
    runs = {}
    for name, extra in (("default", []), ("strict", ["--require-ready", "full"])):
        runs[name] = run_cli("run", "--topology", str(topo), "--scenario", "connectivity",
                             "--report-dir", str(home / name), "-q", *extra, timeout=900,
                             env=env if name == "default" else None)
    return home, made.stdout.strip(), runs


def test_run_prints_each_phase_readiness_and_the_switch_decides_the_exit(connectivity_runs):
    home, _, runs = connectivity_runs
    for name, expected in (("default", 0), ("strict", 1)):
        proc = runs[name]
        assert proc.returncode == expected, proc.stdout[-3000:] + proc.stderr[-3000:]
        report = json.loads((home / name / "report.json").read_text())
        assert report["verdict"] == "pass"
        assert report["exit"]["code"] == proc.returncode  # the report says what the exit did
        for phase in ("planning", "infrastructure", "pilot", "staged-rollout", "full"):
            assert f"phase {phase}: " in proc.stderr
        assert "phase infrastructure: ready" in proc.stderr
        assert "phase full: NOT READY\n  - the run was limited to --scenario connectivity " \
               "(up to phase infrastructure)" in proc.stderr
        # the gate command, run on its own, agrees with what run printed
        assert run_cli("gate", "--report", str(home / name), "--phase", "full").returncode == 1
    assert "exit 0: verdict pass; phase infrastructure ready" in runs["default"].stderr
    assert "exit 1: verdict pass; phase full NOT READY (--require-ready full" \
           in runs["strict"].stderr


def test_run_signs_its_report_and_report_verify_catches_an_edit(connectivity_runs):
    home, public_b64, runs = connectivity_runs
    assert f"signed (Ed25519, public key {public_b64})" in runs["default"].stderr
    good = run_cli("report", "verify", str(home / "default"), "--public-key", public_b64)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "integrity and origin" in good.stdout
    report = json.loads((home / "default" / "report.json").read_text())
    (row,) = [r for r in report["readiness"] if r["phase"] == "full"]
    row["ready"], row["reasons"] = True, []  # a vendor claiming readiness for full
    (home / "claimed.json").write_text(json.dumps(report))
    bad = run_cli("report", "verify", str(home / "claimed.json"), "--public-key", public_b64)
    assert bad.returncode == 1
    assert "changed after it was signed" in bad.stdout
    assert "readiness.full: recorded True, recomputed False" in bad.stdout
    # the unsigned report of the second run: `report` signs it, then it verifies
    unsigned = run_cli("report", "verify", str(home / "strict"))
    assert unsigned.returncode == 2 and "unsigned" in unsigned.stderr
    signed = run_cli("report", "--report", str(home / "strict"),
                     "--signing-key", str(home / "key"))
    assert signed.returncode == 0, signed.stderr
    assert run_cli("report", "verify", str(home / "strict"),
                   "--public-key", str(home / "key.pub")).returncode == 0
