"""pytest plugin: topology options, node fixtures, phase and scenario markers, report.json.

Registered through the `pytest11` entry point, so any project that installs pacs-harness can
write PACS tests::

    @pytest.mark.phase("pilot")
    @pytest.mark.scenario("ingest")
    def test_store(pacs_node, pacs_janitor):
        legacy = pacs_node("legacy")
        assert legacy.dimse().echo().status.ok

Settings resolve command line > ini > default, as in pytest-postgresql. Nodes start once per
session on first use (or are attached to when `pacs-harness up` already runs them) and are
stopped at the end unless `--pacs-keep`. A test needing nodes of its own takes `pacs_launch`
(`pacs_launch(topology)`), or a module declares `name = pacs_cluster_factory(topology,
scope="module")`, like pytest-postgresql's `factories`; either stops what it launched.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from harness.phases import PHASES
from harness.report.model import build_report

#: the fixtures live in their own module (harness/fixtures.py), loaded with this plugin
pytest_plugins = ("harness.fixtures",)

if TYPE_CHECKING:
    pass


_cluster_key = pytest.StashKey["Cluster | None"]()
_environment_error_key = pytest.StashKey[str]()
_results_key = pytest.StashKey[dict]()
_metrics_key = pytest.StashKey[dict]()
_started_key = pytest.StashKey[str]()
_topology_key = pytest.StashKey[dict]()
_launched_key = pytest.StashKey[dict]()  # run id -> Cluster launched by a ClusterJanitor


def pytest_addoption(parser: pytest.Parser) -> None:
    """Every option is `--pacs-*` (the short old name stays an alias) and settable in ini."""
    group = parser.getgroup("pacs-harness", "PACS validation harness")
    group.addoption(
        "--pacs-topology",
        dest="pacs_topology",
        default=None,
        metavar="FILE",
        help="topology YAML naming the PACS nodes (default: a legacy and a target node)",
    )
    group.addoption(
        "--pacs-phase",
        "--phase",
        dest="pacs_phase",
        default=None,
        metavar="NAME",
        help=f"run what gates this rollout phase and the ones before it ({', '.join(PHASES)})",
    )
    group.addoption(
        "--pacs-scenario",
        dest="pacs_scenario",
        action="append",
        default=None,
        metavar="NAME",
        help="run only this scenario (repeatable)",
    )
    group.addoption(
        "--pacs-keep",
        dest="pacs_keep",
        action="store_true",
        default=None,
        help="leave launched nodes running after the session (stop them with pacs-harness down)",
    )
    group.addoption(
        "--pacs-report-json",
        dest="pacs_report_json",
        default=None,
        metavar="FILE",
        help="write the run's report.json (verdict, scenarios, metrics) to FILE",
    )
    parser.addini("pacs_topology", "topology YAML file for the PACS nodes", default=None)
    parser.addini("pacs_phase", "rollout phase to gate", default=None)
    parser.addini("pacs_scenario", "scenarios to run (one per line)", type="linelist",
                  default=[])
    parser.addini("pacs_keep", "leave nodes running after the session", type="bool", default=False)
    parser.addini("pacs_report_json", "file to write the run's report.json to", default=None)


def _setting(config: pytest.Config, name: str) -> Any:
    """The option `name` from the command line, else from ini, else None."""
    value = config.getoption(name)
    if value is None:
        value = config.getini(name)
    return value or None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"phase(name): the rollout phase this test gates ({', '.join(PHASES)})",
    )
    config.addinivalue_line("markers", "scenario(name): the scenario this test belongs to")
    phase = _setting(config, "pacs_phase")
    if phase and phase not in PHASES:
        where = "--pacs-phase" if config.getoption("pacs_phase") else "ini pacs_phase ="
        raise pytest.UsageError(
            f"{where} {phase!r}: unknown phase (allowed: {', '.join(PHASES)})"
        )
    config.stash[_results_key] = {}
    config.stash[_metrics_key] = {}
    config.stash[_cluster_key] = None
    config.stash[_launched_key] = {}
    config.stash[_started_key] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _tear_down_on_signals()


def _tear_down_on_signals() -> None:
    """SIGINT and SIGTERM end the session through pytest's teardown, so nodes are stopped.

    SIGTERM (CI cancelling a job) would otherwise kill the process and leave nodes. SIGINT
    arrives ignored in a job a non-interactive shell started with `&` (POSIX: background
    jobs ignore SIGINT, and exec keeps an ignored signal ignored): Python then installs no
    KeyboardInterrupt and a `kill -INT` is lost, leaving the session and its nodes up.
    """
    wanted = {
        signal.SIGINT: (signal.SIG_IGN, signal.default_int_handler),
        signal.SIGTERM: (signal.SIG_DFL, _raise_keyboard_interrupt),
    }
    for signum, (inherited, handler) in wanted.items():
        if signal.getsignal(signum) is inherited:
            try:
                signal.signal(signum, handler)
            except ValueError:  # not in the main thread
                pass


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def item_phase(item: pytest.Item) -> str | None:
    marker = item.get_closest_marker("phase")
    return str(marker.args[0]) if marker and marker.args else None


def item_scenario(item: pytest.Item) -> str:
    marker = item.get_closest_marker("scenario")
    if marker and marker.args:
        return str(marker.args[0])
    module = Path(str(item.fspath)).stem
    return module.removeprefix("test_")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    phase = _setting(config, "pacs_phase")
    scenarios = _setting(config, "pacs_scenario")
    selected, deselected = [], []
    for item in items:
        item_ph = item_phase(item)
        if item_ph is not None and item_ph not in PHASES:
            raise pytest.UsageError(
                f"{item.nodeid}: phase marker {item_ph!r} unknown (allowed: {', '.join(PHASES)})"
            )
        keep = True
        if phase and item_ph and PHASES.index(item_ph) > PHASES.index(phase):
            keep = False
        if scenarios and item_scenario(item) not in scenarios:
            keep = False
        (selected if keep else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize `pacs_node_name` over the topology's nodes, `pacs_node_pair` over pairs."""
    wanted = {"pacs_node_name", "pacs_node_pair"} & set(metafunc.fixturenames)
    if not wanted:
        return
    from harness.config import resolve_topology
    from harness.errors import HarnessError

    try:
        topology, _ = resolve_topology(_setting(metafunc.config, "pacs_topology"))
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None
    if "pacs_node_name" in wanted:
        metafunc.parametrize("pacs_node_name", list(topology.nodes))
    if "pacs_node_pair" in wanted:
        writable = [name for name, spec in topology.nodes.items() if spec.disposable]
        pairs = [(a, b) for a in writable for b in writable if a != b]
        metafunc.parametrize("pacs_node_pair", pairs, ids=[f"{a}->{b}" for a, b in pairs])


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop the clusters whose fixture teardown never ran (and the run's audit receivers)."""
    if "harness.security.audit_trail" in sys.modules:
        sys.modules["harness.security.audit_trail"].stop_run_audit()
    for cluster in list(config.stash.get(_launched_key, {}).values()):
        try:
            cluster.stop()
        except Exception:  # noqa: BLE001 - the others must still be stopped
            pass
    config.stash[_launched_key] = {}


# ---------------------------------------------------------------------------------------
# Outcomes, node logs on failure, report.json


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    from harness.dicom.dicomweb import AuthenticationFailed

    outcome = yield
    report = outcome.get_result()
    results = item.config.stash[_results_key]
    entry = results.setdefault(
        item.nodeid,
        {
            "nodeid": item.nodeid,
            "scenario": item_scenario(item),
            "phase": item_phase(item),
            "outcome": "passed",
            "duration_s": 0.0,
        },
    )
    entry["duration_s"] += report.duration
    if call.excinfo is not None and isinstance(call.excinfo.value, AuthenticationFailed):
        # a refused login fails every scenario alike: the run is an environment error (exit 3)
        item.config.stash.setdefault(_environment_error_key, str(call.excinfo.value))
    if report.when == "call":
        _attach_metrics(item.config.stash[_metrics_key].get(item.nodeid))
    if report.failed:
        entry["outcome"] = "failed" if report.when == "call" else "error"
        entry.setdefault("message", _short(report.longreprtext))
        _attach_node_logs(item, report)
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"
        if isinstance(report.longrepr, tuple):
            entry["message"] = str(report.longrepr[2])


def _attach_metrics(metrics: dict[str, Any] | None) -> None:
    """The test's metrics as a JSON attachment of its Allure result."""
    if not metrics:
        return
    try:
        import allure

        allure.attach(
            json.dumps(metrics, indent=2, default=str),
            name="metrics",
            attachment_type=allure.attachment_type.JSON,
        )
    except Exception:  # noqa: BLE001 - allure not active in this run
        pass


def _short(text: str, limit: int = 2000) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    tail = "\n".join(lines[-12:])
    return tail[-limit:]


def _attach_node_logs(item: pytest.Item, report: pytest.TestReport) -> None:
    cluster = item.config.stash.get(_cluster_key, None)
    if cluster is None:
        return
    for node in cluster.nodes.values():
        tail = node.log_tail(40)
        if not tail:
            continue
        report.sections.append((f"pacs node {node.name} ({node.kind}) log", tail))
        try:
            import allure

            allure.attach(
                tail, name=f"{node.name} log", attachment_type=allure.attachment_type.TEXT
            )
        except Exception:  # noqa: BLE001 - allure not active in this run
            pass


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = _setting(session.config, "pacs_report_json")
    if not path:
        return
    config = session.config
    report = build_report(
        config.stash[_results_key],
        config.stash[_metrics_key],
        started=config.stash[_started_key],
        phase=_setting(config, "pacs_phase"),
        topology=config.stash.get(_topology_key, {}),
        exitstatus=int(exitstatus),
        environment_error=config.stash.get(_environment_error_key, None),
    )
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(target)
