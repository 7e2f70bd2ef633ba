"""Migration under faults (phase staged-rollout): zero loss, no duplicates, retries counted.

The reference migrator (harness.migration.migrator.Migrator, method `get`) copies a source
to an Orthanc
target reached through a FaultProxy (the link harness->target), while a fault schedule kills
the target several times and cuts and slows the link. Runs resume from the state file until
every study is confirmed (at most `max_runs`). The scenario launches its own nodes. The
schedule can be set in `settings.migration_under_faults.faults` (list of
{at_s, fault, target, duration_s}; targets: `target` and the link `harness->target`).
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest

from harness.cluster import Cluster
from harness.config import parse_topology
from harness.launch.tools import find_binary
from harness.migration.migrator import Migrator
from harness.resilience.proxy import FaultProxy
from harness.resilience.schedule import FaultSchedule
from synthetic_data.samples import sample_study

pytestmark = [
    pytest.mark.phase("staged-rollout"),
    pytest.mark.scenario("migration-under-faults"),
]

LINK = "harness->target"
DEFAULT_FAULTS = [
    {"at_s": 1.0, "fault": "kill", "target": "target", "duration_s": 1.5},
    {"at_s": 4.0, "fault": "cut", "target": LINK, "duration_s": 1.5},
    {"at_s": 6.0, "fault": "latency", "target": LINK, "duration_s": 3.0, "latency_s": 0.05},
    {"at_s": 7.0, "fault": "kill", "target": "target", "duration_s": 1.0},
    {"at_s": 9.5, "fault": "reset", "target": LINK, "duration_s": 0.5},
    {"at_s": 10.0, "fault": "bandwidth", "target": LINK, "duration_s": 2.0, "bps": 8e6},
    {"at_s": 11.0, "fault": "kill", "target": "target", "duration_s": 1.0},
]


def _image_uids(node, series) -> list[str]:
    client = node.dimse(timeout_s=30)
    uids = []
    for study, one in sorted(series):
        found = client.find(
            "IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID": one, "SOPInstanceUID": None}
        )
        uids += [str(m.SOPInstanceUID) for m in found.matches]
    return uids


def test_migration_survives_faults(pacs_topology, pacs_metrics, tmp_path):
    if not find_binary("Orthanc"):
        pytest.skip("the target of this scenario is an Orthanc (apt-get install orthanc)")
    settings = pacs_topology.settings.get("migration_under_faults", {}) or {}
    schedule = FaultSchedule.from_settings(
        settings.get("faults", DEFAULT_FAULTS), "settings.migration_under_faults.faults"
    )
    studies = int(settings.get("studies", 12))
    max_runs = int(settings.get("max_runs", 4))
    topology = parse_topology(
        "name: migration-faults\nnodes:\n"
        "  source: {kind: embedded, ae_title: MIGSRC}\n"
        "  target: {kind: orthanc, ae_title: MIGDST}\n"
    )
    cluster = Cluster.launch(topology, root=tmp_path / "nodes")
    proxy = None
    try:
        source, target = cluster["source"], cluster["target"]
        data = []
        for seed in range(studies):
            data += sample_study(seed=9100 + seed, instances=8)
        assert source.dimse().store(data, associations=2).ok
        series = {(str(d.StudyInstanceUID), str(d.SeriesInstanceUID)) for d in data}

        proxy = FaultProxy(0, target.host, target.dicom_port, name=LINK).start()
        through_link = copy.copy(target)  # the same node, reached through the fault proxy
        through_link.dicom_port = proxy.port

        runs, retries, results = 0, 0, []
        schedule.start({"target": target}, {LINK: proxy})
        try:
            migrator = Migrator(
                source, through_link, "get",
                state_path=tmp_path / "migration.sqlite",
                workers=2, rate_limit=1.0, retries=6, backoff_s=0.3, confirm_timeout_s=5,
            )
            with migrator:
                while runs < max_runs:
                    runs += 1
                    result = migrator.run()
                    retries += result.retries_used
                    results.append(result.as_dict())
                    if result.ok:
                        break
        finally:
            schedule.join(120)
            schedule.stop()
        target.wait_ready(120)
        source_uids = _image_uids(source, series)
        target_uids = _image_uids(target, series)  # directly, not through the proxy
        duplicates = sorted(u for u, n in Counter(target_uids).items() if n > 1)
        lost = sorted(set(source_uids) - set(target_uids))
        stats = target.statistics()
    finally:
        if proxy is not None:
            proxy.close()
        cluster.stop()

    pacs_metrics.update(
        {
            "runs": runs,
            "retries": retries,
            "studies": studies,
            "instances": len(source_uids),
            "lost": len(lost),
            "duplicates": len(duplicates),
            "target_instances": stats.instances,
            "fault_events": schedule.events,
            "fault_errors": schedule.errors,
            "results": results,
        }
    )
    assert not schedule.errors, f"faults did not apply: {schedule.errors}"
    assert len(schedule.events) >= len(schedule.faults), "not every fault fired"
    assert not lost, f"{len(lost)} instances never reached the target, e.g. {lost[:3]}"
    assert not duplicates, f"duplicate SOP Instance UIDs on the target: {duplicates[:3]}"
    assert stats.instances == len(set(source_uids)) == len(data)
    assert results[-1]["ok"], f"still failing after {runs} runs: {results[-1]['errors']}"
