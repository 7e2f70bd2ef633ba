"""Disaster recovery (phase staged-rollout): back up an Orthanc, destroy it, restore, reconcile.

The drill launches its own Orthanc (the session's nodes are never touched), fills it with
synthetic studies, takes a cold backup (storage + SQLite index, or a pg_dump of the
PostgreSQL index), destroys the node, restores into a fresh one and compares every SOP
Instance UID and pixel sha256 with the manifest: zero lost, zero altered, restore time
measured (threshold `settings.disaster_recovery.restore_time_s`, default 60).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from harness.cluster import Cluster
from harness.config import parse_topology
from harness.dr import dr_drill, pixel_sha256
from harness.tools import find_binary
from scenarios.helpers import sample_study

pytestmark = [pytest.mark.phase("staged-rollout"), pytest.mark.scenario("disaster-recovery")]


@pytest.mark.parametrize("index", ["sqlite", "postgresql"])
def test_backup_destroy_restore(index, pacs_topology, pacs_metrics):
    if not find_binary("Orthanc"):
        pytest.skip("the DR drill needs Orthanc (apt-get install orthanc)")
    if index == "postgresql":
        import glob

        if not glob.glob("/usr/lib/postgresql/*/bin/pg_dump"):
            pytest.skip("PostgreSQL not installed (apt-get install postgresql)")
    settings = pacs_topology.settings.get("disaster_recovery", {}) or {}
    limit = float(settings.get("restore_time_s", 60))
    studies = int(settings.get("studies", 3))
    topology = parse_topology(
        f"name: dr-drill\nnodes:\n  vault: {{kind: orthanc, ae_title: DRVAULT, index: {index}}}\n"
    )
    # not pytest's tmp_path: its parents are private and PostgreSQL runs as another user
    work = Path(tempfile.mkdtemp(prefix="pacs-harness-dr-"))
    work.chmod(0o711)
    cluster = Cluster.launch(topology, root=work / "original")
    try:
        data = []
        for seed in range(studies):
            data += sample_study(seed=8100 + seed, instances=15)
        stored = cluster["vault"].dimse().store(data, associations=2)
        assert stored.ok, f"filling the node failed: {stored.failed[0].error}"
        manifest = {str(d.SOPInstanceUID): pixel_sha256(d) for d in data}
        series = {(str(d.StudyInstanceUID), str(d.SeriesInstanceUID)) for d in data}
        result = dr_drill(cluster, "vault", manifest, series, work)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    suffix = "" if index == "sqlite" else f".{index}"
    for key in ("restore_time_s", "backup_s", "lost", "altered", "expected", "restored"):
        pacs_metrics[f"{key}{suffix}"] = result[key]
    assert result["lost"] == 0, f"{result['lost']} instances lost: {result['lost_uids']}"
    assert result["altered"] == 0, f"{result['altered']} altered: {result['altered_uids']}"
    assert result["restore_time_s"] <= limit, (
        f"restore took {result['restore_time_s']} s > {limit} s"
    )
