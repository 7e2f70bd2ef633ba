"""The assessment scenario's count of what a node holds, made without its query service,
against real nodes: it agrees with C-FIND on a sound node and tells a file lost behind the
archive's back (still in its index, still answered for by C-FIND) as a finding."""

from __future__ import annotations

import pytest

from harness.config import parse_topology
from harness.fixtures import pacs_cluster_factory
from harness.migration.inventory import crawl
from harness.nodes import make_node
from synthetic_data.samples import sample_study

STUDIES, PER_STUDY = 3, 2


launched = pacs_cluster_factory(
    "name: counted\nnodes:\n"
    "  legacy: {kind: dcmqrscp, ae_title: LEGACY}\n"
    "  central: {kind: orthanc, ae_title: CENTRAL}\n"
    "  pocket: {kind: embedded, ae_title: POCKET}\n",
    scope="module",
    requires=("Orthanc", "dcmqrscp"),
)


@pytest.fixture(scope="module")
def cluster(launched):
    archive = [ds for n in range(STUDIES) for ds in sample_study(seed=600 + n,
                                                                  instances=PER_STUDY)]
    for node in launched.nodes.values():
        assert node.dimse().store(archive).ok
    return launched


@pytest.mark.parametrize("name", ["legacy", "central", "pocket"])
def test_count_agrees_with_the_query_service_on_a_sound_node(cluster, name, tmp_path):
    node = cluster.node(name)
    held = node.held_statistics()
    assert held is not None and held.unreadable == []
    assert (held.statistics.studies, held.statistics.instances) == (STUDIES, STUDIES * PER_STUDY)
    answered = crawl(node, tmp_path / "ledger.sqlite").counts
    assert held.disagreements(name, answered) == []


def test_file_lost_from_dcmqrscp_storage_is_a_finding(cluster, tmp_path):
    node = cluster.node("legacy")
    victim = sorted(p for p in node.database_dir.iterdir() if p.name != "index.dat")[0]
    junk = node.database_dir / "junk.dcm"
    kept = victim.read_bytes()
    victim.unlink()  # gone from disk; index.dat still lists it
    junk.write_bytes(b"not dicom")
    try:
        held = node.held_statistics()
        answered = crawl(node, tmp_path / "ledger.sqlite", via="dimse").counts
    finally:  # the node as it was, for the other tests
        victim.write_bytes(kept)
        junk.unlink()
    assert answered["instances"] == STUDIES * PER_STUDY  # C-FIND still answers for it
    findings = held.disagreements("legacy", answered)
    assert findings[0].startswith(
        f"instances: legacy holds {STUDIES * PER_STUDY - 1} (files of dcmqrscp's storage area"
    )
    assert findings[0].endswith(f"but its query service answers for {STUDIES * PER_STUDY}")
    assert findings[-1].startswith("legacy: unreadable stored file junk.dcm: ")


def test_a_node_without_an_independent_means_is_not_counted(cluster):
    """The same dcmqrscp reached as an external node (no REST API, no known storage):
    only C-FIND could count it, so nothing is compared (the scenario skips)."""
    topology = parse_topology(
        "name: ext\nnodes:\n"
        "  site: {kind: external, ae_title: LEGACY, host: 127.0.0.1, "
        f"dicom_port: {cluster.node('legacy').dicom_port}}}\n"
    )
    assert make_node(topology.node("site"), None).held_statistics() is None
