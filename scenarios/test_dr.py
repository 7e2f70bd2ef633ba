"""Disaster recovery (phase staged-rollout): back up a node, destroy it, restore, reconcile.

The drill launches its own node (the session's nodes are never touched) for each kind the
machine can run: Orthanc (SQLite index, PostgreSQL index, and as a container when a Docker
engine answers), dcmqrscp and the embedded PACS. It fills the node with synthetic studies,
takes a cold backup (data directories, plus a pg_dump of a PostgreSQL index), destroys the
node, restores into a fresh one at the same path and compares every SOP Instance UID and
pixel sha256 with the manifest: zero lost, zero altered, restore time measured (threshold
`settings.disaster_recovery.restore_time_s`, default 60).
"""

from __future__ import annotations

import glob
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from harness.cluster import Cluster
from harness.config import parse_topology
from harness.launch.tools import find_binary
from harness.nodes import catalog
from harness.resilience.dr import dr_drill, pixel_sha256
from synthetic_data.samples import sample_study

pytestmark = [pytest.mark.phase("staged-rollout"), pytest.mark.scenario("disaster-recovery")]

#: (metric suffix, node definition) per variant; the SQLite Orthanc keeps the plain names.
VARIANTS = {
    "": "{kind: orthanc, index: sqlite}",
    ".postgresql": "{kind: orthanc, index: postgresql}",
    ".docker": "{kind: orthanc, launch: docker}",
    ".dcmqrscp": "{kind: dcmqrscp}",
    ".embedded": "{kind: embedded}",
}


def _skip_reason(suffix: str) -> str | None:
    variant = yaml.safe_load(VARIANTS[suffix])
    if variant.get("launch", "process") == "process":
        for program, hint in catalog.capabilities(variant["kind"]).binaries:
            if not find_binary(program):
                return f"the DR drill of {variant['kind']} needs {program} (install: {hint})"
    if suffix == ".postgresql" and not glob.glob("/usr/lib/postgresql/*/bin/pg_dump"):
        return "PostgreSQL not installed (apt-get install postgresql)"
    if suffix == ".docker":
        from harness.launch.docker import docker_client, image_present
        from harness.launch.images import default_tag

        try:
            client = docker_client()
        except Exception as exc:  # noqa: BLE001 - any failure means: no engine to use
            return f"no Docker engine: {str(exc).splitlines()[0][:160]}"
        if not image_present(client, default_tag("orthanc")):
            return f"image {default_tag('orthanc')} not built (pacs-harness images build orthanc)"
    return None


@pytest.mark.parametrize("suffix", list(VARIANTS), ids=lambda s: s.lstrip(".") or "sqlite")
def test_backup_destroy_restore(suffix, pacs_topology, pacs_metrics):
    reason = _skip_reason(suffix)
    if reason:
        pytest.skip(reason)
    settings = pacs_topology.settings.get("disaster_recovery", {}) or {}
    limit = float(settings.get("restore_time_s", 60))
    studies = int(settings.get("studies", 3))
    topology = parse_topology(f"name: dr-drill\nnodes:\n  vault: {VARIANTS[suffix]}\n")
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
    for key in ("restore_time_s", "backup_s", "lost", "altered", "expected", "restored"):
        pacs_metrics[f"{key}{suffix}"] = result[key]
    assert result["lost"] == 0, f"{result['lost']} instances lost: {result['lost_uids']}"
    assert result["altered"] == 0, f"{result['altered']} altered: {result['altered_uids']}"
    assert result["restore_time_s"] <= limit, (
        f"restore took {result['restore_time_s']} s > {limit} s"
    )
