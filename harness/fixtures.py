"""The plugin's fixtures: the session's nodes, and clusters of a test's own.

`pacs_cluster` attaches to what `pacs-harness up` runs for the topology or launches it;
`pacs_node`, `pacs_nodes`, `pacs_janitor`, `pacs_link`, `pacs_fault_schedule` and
`pacs_metrics` build on it. `pacs_launch(topology)` and `pacs_cluster_factory(topology)`
(in the style of pytest-postgresql's `factories`) launch clusters of a test's own, which a
`ClusterJanitor` stops by run id at teardown, whatever the test did. Loaded by
harness/plugin.py (its `pytest_plugins`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from harness.plugin import (
    _cluster_key,
    _environment_error_key,
    _launched_key,
    _metrics_key,
    _setting,
    _topology_key,
)

if TYPE_CHECKING:
    from harness.cluster import Cluster
    from harness.config import Topology
    from harness.nodes import Node


@pytest.fixture(scope="session")
def pacs_topology(pytestconfig: pytest.Config):
    """The validated Topology (from --pacs-topology / ini, or the default one)."""
    from harness.config import resolve_topology
    from harness.errors import HarnessError

    path = _setting(pytestconfig, "pacs_topology")
    try:
        topology, choices = resolve_topology(path)
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None
    for choice in choices:
        print(f"pacs-harness: default topology: {choice.node} = {choice.kind} ({choice.reason})")
    return topology


@pytest.fixture(scope="session")
def pacs_cluster(pytestconfig: pytest.Config, pacs_topology, tmp_path_factory):
    """The running nodes: attached when `pacs-harness up` runs them, else launched here."""
    from harness.cluster import Cluster
    from harness.errors import HarnessError
    from harness.launch.state import state_dir_for, state_lock

    keep = bool(_setting(pytestconfig, "pacs_keep"))
    state_dir = state_dir_for(pacs_topology)
    try:
        with state_lock(state_dir):
            cluster = Cluster.from_state(pacs_topology, state_dir)
            if cluster is not None and not cluster.all_processes_alive():
                cluster.stop()
                cluster = None
            if cluster is None:
                cluster = Cluster.launch(
                    pacs_topology,
                    detached=keep,
                    state_dir=state_dir if keep else None,
                )
                cluster.owned = not keep
    except HarnessError as exc:
        pytestconfig.stash[_environment_error_key] = str(exc)
        pytest.fail(str(exc), pytrace=False)
    pytestconfig.stash[_cluster_key] = cluster
    pytestconfig.stash[_topology_key] = {
        "name": cluster.topology.name,
        "source": cluster.topology.source,
        "nodes": [{**n.describe(), "version": n.version()} for n in cluster.nodes.values()],
    }
    run_audit = _start_run_audit(cluster)
    try:
        yield cluster
    finally:
        if run_audit:
            from harness.security.audit_trail import stop_run_audit

            stop_run_audit()
    report_json = _setting(pytestconfig, "pacs_report_json")
    if report_json:
        cluster.collect_logs(Path(report_json).parent / "logs")
    if cluster.owned:
        cluster.stop()


def _start_run_audit(cluster: Cluster) -> bool:
    """Audited nodes: their trail is heard, and the harness's operations on them journalled,
    for the whole session ("every access is audited", harness/security/audit_trail.py)."""
    if not any(n.spec.audit is not None for n in cluster.nodes.values()):
        return False
    from harness.security.audit_trail import start_run_audit

    return start_run_audit(list(cluster.nodes.values())) is not None


@pytest.fixture(scope="session")
def pacs_node(pacs_cluster) -> Callable[[str], Node]:
    """A function returning a node by its topology name: `pacs_node("legacy")`."""
    return pacs_cluster.node


@pytest.fixture(scope="session")
def pacs_nodes(pacs_cluster) -> list[Node]:
    """Every node of the topology, in declaration order."""
    return list(pacs_cluster.nodes.values())


@pytest.fixture
def pacs_janitor(pacs_cluster):
    """Wipe every disposable node before and after the test; non-disposable ones are left."""
    disposable = [n for n in pacs_cluster.nodes.values() if n.disposable]
    for node in disposable:
        node.wipe()
    yield pacs_cluster
    for node in disposable:
        if node.alive():
            node.wipe()


@pytest.fixture(scope="session")
def pacs_link(pacs_cluster):
    """A function returning the fault proxy of a declared link: `pacs_link("legacy->central")`."""
    from harness.errors import ConfigError

    def link(name: str):
        try:
            return pacs_cluster.links[name]
        except KeyError:
            known = ", ".join(pacs_cluster.links) or "none declared"
            raise ConfigError(f"no link {name!r} in the topology (links: {known})") from None

    return link


@pytest.fixture
def pacs_fault_schedule(pacs_cluster, pacs_topology, pacs_metrics):
    """Run the topology's `settings.faults` schedule during the test; its events go to the
    test's metrics as `fault_events` (the report draws them on the timelines)."""
    from harness.resilience.schedule import FaultSchedule

    schedule = FaultSchedule.from_settings(pacs_topology.settings.get("faults"))
    schedule.start(pacs_cluster.nodes, pacs_cluster.links)
    yield schedule
    schedule.stop()
    pacs_metrics["fault_events"] = schedule.events


@pytest.fixture
def pacs_metrics(request: pytest.FixtureRequest) -> dict[str, Any]:
    """A dict whose content goes to the test's scenario metrics in report.json (and, as a
    JSON attachment, to the Allure results)."""
    metrics: dict[str, Any] = {}
    request.config.stash[_metrics_key][request.node.nodeid] = metrics
    return metrics


# ---------------------------------------------------------------------------------------
# Clusters of a test's own (fixture factory and launcher), stopped by the janitor


class ClusterJanitor:
    """Launches clusters and stops each one by its run id at teardown, whatever the test
    did; what a teardown never reached (an interrupted session) pytest_unconfigure stops."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.running: dict[str, Cluster] = {}

    def launch(self, topology: Topology | str | dict | Path, **options: Any) -> Cluster:
        """Cluster.launch(topology, **options), registered to be stopped."""
        from harness.cluster import Cluster

        cluster = Cluster.launch(_as_topology(topology), **options)
        self.running[cluster.run_id] = cluster
        self.config.stash[_launched_key][cluster.run_id] = cluster
        return cluster

    def stop(self, run_id: str) -> None:
        cluster = self.running.pop(run_id, None)
        self.config.stash[_launched_key].pop(run_id, None)
        if cluster is not None:
            cluster.stop()

    def stop_all(self) -> None:
        errors = []
        for run_id in list(self.running):
            try:
                self.stop(run_id)
            except Exception as exc:  # noqa: BLE001 - stop the other clusters too
                errors.append(f"{run_id}: {exc}")
        if errors:
            raise RuntimeError("could not stop: " + "; ".join(errors))


def _as_topology(topology: Topology | str | dict | Path) -> Topology:
    """A Topology from itself, YAML text, the same as a dict, or a YAML file."""
    import yaml

    from harness.config import Topology, load_topology, parse_topology

    if isinstance(topology, Topology):
        return topology
    if isinstance(topology, Path):
        return load_topology(topology)
    if isinstance(topology, dict):
        return parse_topology(yaml.safe_dump(topology, sort_keys=False), "<fixture>")
    return parse_topology(topology, "<fixture>")


def _skip_unless_installed(binaries: tuple[str, ...]) -> None:
    from harness.launch.tools import find_binary

    missing = [b for b in binaries if not find_binary(b)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (install: apt-get install orthanc dcmtk)")


def pacs_cluster_factory(
    topology: Topology | str | dict | Path,
    scope: str = "function",
    *,
    requires: tuple[str, ...] = (),
    **launch_options: Any,
) -> Callable[..., Any]:
    """A fixture launching `topology` (a Topology, YAML text, a dict or a file) for each
    `scope`, stopped at its teardown even when a test failed or the run was interrupted;
    skipped when a binary of `requires` is missing. In a test module or conftest::

        cluster = pacs_cluster_factory("name: t\\nnodes:\\n  a: {kind: orthanc}\\n",
                                       scope="module", requires=("Orthanc",))
    """

    @pytest.fixture(scope=scope)
    def launched_cluster(request: pytest.FixtureRequest):
        from harness.errors import HarnessError

        _skip_unless_installed(requires)
        janitor = ClusterJanitor(request.config)
        try:
            try:
                cluster = janitor.launch(topology, **launch_options)
            except HarnessError as exc:  # a clear line, not a traceback into the harness
                pytest.fail(str(exc), pytrace=False)
            yield cluster
        finally:
            janitor.stop_all()

    return launched_cluster


@pytest.fixture
def pacs_launch(request: pytest.FixtureRequest) -> Iterator[Callable[..., Cluster]]:
    """A function launching a cluster in the test, `pacs_launch(topology, **options)`;
    every cluster it launched is stopped after the test, passed, failed or interrupted."""
    janitor = ClusterJanitor(request.config)
    yield janitor.launch
    janitor.stop_all()
