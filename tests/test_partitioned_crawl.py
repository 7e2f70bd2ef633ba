"""Parallel, partitioned crawls against real Orthanc 1.10 nodes: the same ledger whatever the
workers and partitions, every study of an archive that caps C-FIND answers, a stopped or
broken crawl resumed to the same ledger, and the real-world corpus counted.

What a node holds is read independently: Orthanc's REST API (/statistics, /studies,
/instances), never the crawl's own C-FIND or QIDO-RS.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from harness.cluster import Cluster
from harness.config import parse_topology
from harness.errors import EnvironmentProblem
from harness.fixtures import pacs_cluster_factory
from harness.migration.inventory import crawl
from harness.migration.sources import DimseSource
from harness.migration.verify import verify
from synthetic_data.samples import sample_study
from tests.helpers import external_topology, login_env, run_cli
from tests.realworld import valid_files

CAP = 5
DATES = ("19991231", "20190301", "20200615", "20211224", "20240229")
STUDIES = 15  # three per date, at different times

TOPOLOGY = f"""name: crawls
nodes:
  plain:  {{kind: orthanc, ae_title: PLAIN}}
  capped: {{kind: orthanc, ae_title: CAPPED, orthanc_config: {{LimitFindResults: {CAP}}}}}
  world:  {{kind: orthanc, ae_title: WORLD}}
"""

launched = pacs_cluster_factory(TOPOLOGY, scope="module", requires=("Orthanc",))


def dated_studies() -> list:
    """STUDIES small studies spread over DATES, each at its own time of day (one with a
    fraction of a second)."""
    datasets = []
    for number in range(STUDIES):
        for ds in sample_study(seed=1800 + number):
            ds.StudyDate = DATES[number % len(DATES)]
            ds.StudyTime = f"{8 + number % 12:02d}{number:02d}00"
            if number == len(DATES):  # in the last half second before a time split at noon
                ds.StudyTime = "115959.500000"
            datasets.append(ds)
    return datasets


@pytest.fixture(scope="module")
def cluster(launched):
    archive = dated_studies()
    for name in ("plain", "capped"):
        stored = launched.node(name).dimse().store(archive)
        assert stored.ok, [r.error for r in stored.failed]
    return launched


@pytest.fixture(scope="module")
def world(cluster):
    """The `world` node holding what Orthanc's own ingestion (REST POST /instances, not the
    harness) accepts of the real-world corpus; a file it refuses is left out."""
    node = cluster.node("world")
    accepted = 0
    for item in valid_files():
        try:
            node.rest().upload(item.path.read_bytes())
            accepted += 1
        except EnvironmentProblem as exc:
            print(f"Orthanc refused {item.name}: {exc}")
    assert accepted > 20
    return node


def rest_counts(node) -> dict[str, int]:
    """Orthanc's own counts (REST /statistics)."""
    stats = node.rest().get_json("/statistics")
    return {"patients": stats["CountPatients"], "studies": stats["CountStudies"],
            "series": stats["CountSeries"], "instances": stats["CountInstances"]}


def rest_study_uids(node) -> set[str]:
    return {s["MainDicomTags"]["StudyInstanceUID"]
            for s in node.rest().get_json("/studies", expand="")}


def ledger_content(path: Path) -> dict[str, list]:
    """Everything a ledger says about the node, read with plain sqlite3, in a fixed order
    (not the crawl's state columns, nor its timings)."""
    conn = sqlite3.connect(path)
    try:
        content = {table: sorted(conn.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
                   for table in ("patients", "series", "instances", "instance_attrs", "issues")}
        content["studies"] = sorted(conn.execute(
            "SELECT study_uid, patient_id, issuer, study_date, accession, description, "
            "reported_series, reported_instances, keys_json, retrieve FROM studies"))
        content["unfinished"] = conn.execute(
            "SELECT count(*) FROM studies WHERE state != 'done'").fetchall()
    finally:
        conn.close()
    return content


def partition_rows(path: Path) -> dict[str, tuple[str, int]]:
    conn = sqlite3.connect(path)
    try:
        return {key: (state, studies) for key, state, studies in conn.execute(
            "SELECT key, state, studies FROM partitions")}
    finally:
        conn.close()


@pytest.mark.parametrize(("via", "size"), [("dimse", 2), ("dicomweb", 4)])
def test_four_workers_over_date_partitions_write_the_ledger_of_one(cluster, tmp_path, via,
                                                                    size):
    node = cluster.node("plain")
    one = crawl(node, tmp_path / "one.sqlite", depth="full", via=via, workers=1,
                partition="none")
    four = crawl(node, tmp_path / "four.sqlite", depth="full", via=via, workers=4,
                 partition="date", partition_size=size)
    assert one.counts == four.counts == rest_counts(node)
    assert four.issues == 0 and four.instances_retrieved == four.counts["instances"]
    assert ledger_content(tmp_path / "four.sqlite") == ledger_content(tmp_path / "one.sqlite")
    parts = partition_rows(tmp_path / "four.sqlite")
    assert {state for state, _ in parts.values()} == {"split", "done"}, parts
    done = {key: n for key, (state, n) in parts.items() if state == "done" and n}
    assert len(done) >= len(DATES) and all(n <= size for n in done.values()), parts
    assert sum(done.values()) == STUDIES
    assert parts["all"][0] == "split"
    if size < STUDIES // len(DATES):  # a day holding more than `size` is split by time
        assert any(key.startswith("time:") for key in done), parts


def test_uid_partitions_bucket_every_study(cluster, tmp_path):
    node = cluster.node("plain")
    summary = crawl(node, tmp_path / "uid.sqlite", via="dimse", workers=2, partition="uid")
    assert summary.counts == rest_counts(node)
    parts = partition_rows(tmp_path / "uid.sqlite")
    buckets = {key: n for key, (state, n) in parts.items() if key.startswith("uid:")}
    assert len(buckets) > 1 and sum(buckets.values()) == STUDIES
    assert all(parts[key][0] == "done" for key in buckets)


def test_a_capped_archive_is_listed_whole_by_date_partitions(cluster, tmp_path):
    node = cluster.node("capped")
    assert len(rest_study_uids(node)) == STUDIES > CAP
    with pytest.raises(EnvironmentProblem, match="--partition date"):
        crawl(node, tmp_path / "none.sqlite", via="dimse", partition="none")

    summary = crawl(node, tmp_path / "date.sqlite", via="dimse", workers=3, partition="date")
    assert summary.counts == rest_counts(node)
    conn = sqlite3.connect(tmp_path / "date.sqlite")
    listed = {uid for (uid,) in conn.execute("SELECT study_uid FROM studies")}
    conn.close()
    assert listed == rest_study_uids(node)
    parts = partition_rows(tmp_path / "date.sqlite")
    assert parts["all"][0] == "split" and "unresolved" not in {s for s, _ in parts.values()}


def test_the_migrators_discovery_lists_the_same_capped_archive_whole(cluster):
    """The migration plan's listing (discovery.py) halves ranges with the same bounds
    (discovery.time_range), down to times of day: every study is listed, the one in the
    last half second before noon included."""
    from harness.migration.discovery import discover_studies

    node = cluster.node("capped")
    listing = discover_studies(node.dimse(), silent_limit=2)  # days split by time too
    assert listing.split and listing.unresolved == []
    assert set(listing.uids) == rest_study_uids(node)


def test_a_silent_qido_cap_is_passed_with_a_smaller_partition_size(cluster, tmp_path):
    """Orthanc's QIDO-RS applies LimitFindResults without saying so (HTTP 200, a short
    list): only a partition size below the cap shows the cut, and splits past it."""
    node = cluster.node("capped")
    short = crawl(node, tmp_path / "short.sqlite", via="dicomweb", partition="none")
    assert short.counts["studies"] < STUDIES  # what a single QIDO-RS listing believes
    whole = crawl(node, tmp_path / "whole.sqlite", via="dicomweb", workers=2,
                  partition_size=CAP - 1)
    assert whole.counts == rest_counts(node)


def test_a_stopped_then_broken_crawl_resumes_to_the_one_shot_ledger(cluster, tmp_path):
    node = cluster.node("plain")
    ledger = tmp_path / "resumed.sqlite"
    stop = threading.Event()

    def stop_after_three(done: int, total: int) -> None:
        if done >= 3:
            stop.set()

    first = crawl(node, ledger, depth="full", workers=2, partition_size=4,
                  progress=stop_after_three, stop=stop)
    assert "stopped" in " ".join(first.notes)
    unfinished = ledger_content(ledger)["unfinished"][0][0]
    assert 0 < unfinished <= STUDIES - 3
    conn = sqlite3.connect(ledger)
    assert conn.execute("SELECT value FROM meta WHERE key = 'finished'").fetchone() is None
    conn.close()

    def broken(done: int, total: int) -> None:
        if done >= 8:
            raise RuntimeError("operator pulled the plug")

    with pytest.raises(RuntimeError, match="pulled the plug"):
        crawl(node, ledger, depth="full", workers=3, partition_size=4, progress=broken)
    assert ledger_content(ledger)["unfinished"][0][0] <= STUDIES - 8

    resumed = crawl(node, ledger, depth="full", workers=4, partition_size=4)
    assert resumed.studies_resumed >= 8
    assert resumed.studies_crawled == STUDIES - resumed.studies_resumed
    crawl(node, tmp_path / "oneshot.sqlite", depth="full", workers=1, partition_size=4)
    assert ledger_content(ledger) == ledger_content(tmp_path / "oneshot.sqlite")
    assert {state for state, _ in partition_rows(ledger).values()} <= {"split", "done"}


def test_real_world_corpus_crawled_by_three_workers_matches_orthanc(world, tmp_path):
    node = world
    summary = crawl(node, tmp_path / "world.sqlite", depth="full", workers=3)
    assert summary.counts == rest_counts(node)
    conn = sqlite3.connect(tmp_path / "world.sqlite")
    sops = {uid for (uid,) in conn.execute("SELECT sop_uid FROM instances")}
    conn.close()
    held = {i["MainDicomTags"]["SOPInstanceUID"]
            for i in node.rest().get_json("/instances", expand="")}
    assert sops == held


def test_cli_inventory_with_workers_and_partitions(cluster, tmp_path):
    node = cluster.node("capped")
    topology = external_topology(tmp_path / "topology.yaml", "crawlcli", [node], "CRAWL")
    env = login_env(cluster, "CRAWL", tmp_path / "state")
    proc = run_cli("inventory", "--node", "capped", "-t", str(topology), "--json",
                   "--workers", "2", "--partition", "date", "--partition-size", str(CAP - 1),
                   "--ledger",
                   str(tmp_path / "cli.sqlite"), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = json.loads(proc.stdout)
    assert printed["counts"] == rest_counts(node)
    assert printed["workers"] == 2 and printed["partition"] == "date"

    bad = run_cli("inventory", "--node", "capped", "-t", str(topology), "--workers", "0",
                  env=env)
    assert bad.returncode == 2 and "--workers" in bad.stderr


def dimse_only(node) -> str:
    """A topology declaring `node` as a site's external PACS reached over DIMSE alone."""
    return (f"name: ext\nnodes:\n  n: {{kind: external, ae_title: {node.ae_title}, "
            f"host: 127.0.0.1, dicom_port: {node.dicom_port}, synthetic: true}}\n")


def test_ctrl_c_during_a_parallel_crawl_leaves_a_resumable_ledger(cluster, tmp_path):
    """SIGINT (Ctrl-C) while three workers read: the process ends (no worker thread keeps
    it alive), the committed studies stay, and a resumed crawl equals a one-shot one."""
    topology = dimse_only(cluster.node("plain"))
    ledger = tmp_path / "interrupted.sqlite"
    script = textwrap.dedent("""
        import sys, time
        from harness.cluster import Cluster
        from harness.config import parse_topology
        from harness.migration.inventory import crawl
        node = Cluster.launch(parse_topology(sys.argv[2])).node("n")
        def progress(done, total):
            print(done, total, flush=True)
            if done >= 2:
                time.sleep(120)  # interrupted here, with workers reading further studies
        crawl(node, sys.argv[1], depth="full", workers=3, partition_size=4, progress=progress)
    """)
    child = subprocess.Popen([sys.executable, "-c", script, str(ledger), topology],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in child.stdout:
            if int(line.split()[0]) >= 2:
                break
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=60) != 0
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
    assert 2 <= STUDIES - ledger_content(ledger)["unfinished"][0][0] < STUDIES
    external = Cluster.launch(parse_topology(topology))
    try:
        node = external.node("n")
        resumed = crawl(node, ledger, depth="full", workers=2, partition_size=4)
        assert resumed.studies_resumed >= 2
        crawl(node, tmp_path / "oneshot.sqlite", depth="full", partition_size=4)
    finally:
        external.stop()
    assert ledger_content(ledger) == ledger_content(tmp_path / "oneshot.sqlite")


def test_verify_of_a_capped_target_passes_with_parallel_partitioned_crawls(cluster, tmp_path):
    """The same archive on both sides, the target capping its answers: `verify` with two
    workers and partitions below the cap finds nothing missing."""
    source, target = cluster.node("plain"), cluster.node("capped")
    result = verify(source, target, tmp_path / "verify", workers=2, partition_size=CAP - 1)
    assert result.counts == {"source": rest_counts(source), "target": rest_counts(target)}
    assert result.verdict == "pass", result.findings.summary_text()
    assert result.source_crawl.workers == result.target_crawl.workers == 2


def test_a_listing_broken_off_resumes_at_its_pending_partitions(cluster, tmp_path,
                                                                 monkeypatch):
    """Ctrl-C after a few partition queries of the capped archive: the partitions already
    listed are not queried again, and the crawl ends with the one-shot ledger."""
    node = cluster.node("capped")
    ledger = tmp_path / "listing.sqlite"
    real = DimseSource.list_range
    asked: list[dict] = []

    def interrupted(self, query, limit):
        if len(asked) == 6:
            raise KeyboardInterrupt
        asked.append(query)
        return real(self, query, limit)

    monkeypatch.setattr(DimseSource, "list_range", interrupted)
    with pytest.raises(KeyboardInterrupt):
        crawl(node, ledger, via="dimse", partition_size=2)
    listed = {key for key, (state, _) in partition_rows(ledger).items()
              if state in ("listed", "split")}
    assert "all" in listed and len(listed) >= 2

    resumed_queries: list[dict] = []

    def counted(self, query, limit):
        resumed_queries.append(query)
        return real(self, query, limit)

    monkeypatch.setattr(DimseSource, "list_range", counted)
    crawl(node, ledger, via="dimse", partition_size=2)
    assert {} not in resumed_queries  # the universal query is not asked again
    assert not [q for q in resumed_queries if q in asked]
    crawl(node, tmp_path / "oneshot.sqlite", via="dimse", partition_size=2)
    assert ledger_content(ledger) == ledger_content(tmp_path / "oneshot.sqlite")
