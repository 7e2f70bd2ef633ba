"""The availability monitor against real (embedded) nodes: samples of source and target
while a migration runs, an outage of the source shows, and the thread bounds itself."""

from __future__ import annotations

import threading
import time

import pytest

from harness.config import NodeSpec
from harness.fixtures import pacs_cluster_factory
from harness.launch.ports import free_port
from harness.migration.migrator import Migrator
from harness.migration.monitor import AvailabilityMonitor
from harness.nodes import make_node
from synthetic_data.samples import sample_study

STUDIES = 8


launched = pacs_cluster_factory(
    "name: mon\nnodes:\n  pocket: {kind: embedded, ae_title: POCKET}\n"
    "  sink: {kind: embedded, ae_title: SINK}\n"
)


@pytest.fixture
def pair(launched):
    batch = [ds for n in range(STUDIES) for ds in sample_study(seed=500 + n)]
    assert launched.node("pocket").dimse().store(batch).ok
    return launched.node("pocket"), launched.node("sink")


def _wait(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_monitor_samples_both_nodes_and_sees_the_source_go_down(pair, tmp_path):
    source, target = pair
    migrator = Migrator(
        source,
        target,
        "move",
        state_path=tmp_path / "s.sqlite",
        workers=1,
        rate_limit=1.5,
        retries=0,
    )
    studies = migrator.plan()
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("result", migrator.run()))
    monitor = AvailabilityMonitor(
        source,
        target,
        studies,
        interval_s=0.05,
        seed=1,
        is_migrated=migrator.is_confirmed,
        timeline_points=20,
    )
    try:
        with monitor:
            runner.start()
            _wait(lambda: any(s.node == "target" for s in monitor.samples))
            assert runner.is_alive(), "migration ended before the source could be stopped"
            source.stop()  # mid-run: the rest of the migration fails, the monitor sees it
            _wait(lambda: sum(s.node == "source" and not s.ok for s in monitor.samples) >= 3)
    finally:
        runner.join(60)
        migrator.close()
    summary = monitor.summary()

    assert summary["probes"]["source"]["total"] > 0 and summary["probes"]["target"]["total"] > 0
    assert (
        summary["samples"]
        == summary["probes"]["source"]["total"] + summary["probes"]["target"]["total"]
    )
    assert 0 < summary["inaccessible_share"]["source"] < 1
    assert summary["inaccessible_share"]["target"] == 0
    for role in ("source", "target"):
        latency = summary["latency_s"][role]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["max"]
    assert summary["errors"]["source"], "the outage's error is recorded"
    assert 0 < len(summary["timeline"]) <= 20
    assert any(node == "source" and not ok for _t, node, ok, _lat in summary["timeline"])
    assert 1 <= summary["studies_probed"] <= STUDIES
    assert not outcome["result"].ok  # studies left when the source went down


def test_monitor_bounds_itself_and_never_raises(pair):
    _source, target = pair

    def broken(_study: str) -> bool:
        raise RuntimeError("callback bug")

    with AvailabilityMonitor(
        target, target, ["1.2.3.4"], interval_s=0.01, max_samples=4, is_migrated=broken
    ) as monitor:
        _wait(lambda: not monitor.running, 120)
        assert len(monitor.samples) == 4  # stopped by itself at max_samples
    summary = monitor.summary()
    assert summary["inaccessible_share"] == {"source": 1.0, "target": None}  # no such study
    assert "C-FIND: 0 matches" in next(iter(summary["errors"]["source"]))
    assert target.alive()  # the node answered all along: the study is what was missing

    ghost = make_node(
        NodeSpec(name="ghost", kind="external", ae_title="GHOST", dicom_port=free_port()), None
    )
    with AvailabilityMonitor(ghost, None, ["1.2.3"], interval_s=0.05, max_duration_s=0.5) as dead:
        _wait(lambda: not dead.running, 120)  # stopped by itself at max_duration_s
    summary = dead.summary()
    assert summary["samples"] >= 1
    assert summary["inaccessible_share"]["source"] == 1.0
    assert summary["latency_s"]["source"] is None
    assert "association" in next(iter(summary["errors"]["source"]))
