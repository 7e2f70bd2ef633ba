"""Container nodes for real: images built from Debian packages, Orthanc on PostgreSQL, a
topology mixing containers and processes, and nothing left behind afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from harness.cluster import Cluster
from harness.config import parse_topology
from harness.errors import EnvironmentProblem
from harness.launch.docker import harness_containers
from harness.launch.tools import find_binary
from synthetic_data.samples import sample_study
from tests.helpers import (
    processes_mentioning,
    run_cli,
    start_held_session,
    status_json,
    wait_for_no_process_mentioning,
)


@pytest.fixture(scope="module")
def docker_engine():
    from harness.launch.docker import docker_client

    try:
        return docker_client()
    except EnvironmentProblem as exc:
        pytest.skip(f"no Docker engine: {exc}")


@pytest.fixture(scope="module")
def images(docker_engine):
    """The harness's images, built once from Debian packages (cached across runs)."""
    from harness.launch.images import build_image

    return {name: build_image(name)[0] for name in ("orthanc", "dcmqrscp", "embedded")}


def _containers_of(cluster: Cluster) -> list:
    return harness_containers(cluster.run_id)


def test_image_build_is_cached(images):
    proc = run_cli("images", "build", "dcmqrscp")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == images["dcmqrscp"]
    assert "up to date (cached)" in proc.stderr


def test_unknown_image_is_a_usage_error():
    proc = run_cli("images", "build", "pacs9000")
    assert proc.returncode == 2
    assert "unknown image (allowed: ctn, dcmqrscp, embedded, orthanc, pixelmed)" in proc.stderr


MIXED = """\
name: mixed
nodes:
  central: {kind: orthanc, launch: docker, index: postgresql, ae_title: CENTRAL}
  legacy: {kind: dcmqrscp, launch: docker, ae_title: LEGACY}
  pocket: {kind: embedded, ae_title: POCKET}
  boxed: {kind: embedded, launch: docker, ae_title: BOXED}
"""


def test_mixed_topology_stores_finds_and_moves(images, docker_engine):
    cluster = Cluster.launch(parse_topology(MIXED))
    try:
        containers = _containers_of(cluster)
        assert sorted(c.labels["pacs-harness.node"] for c in containers) == [
            "boxed", "central", "legacy"]
        for container in containers:
            assert container.attrs["HostConfig"]["NetworkMode"] == "host"
        assert "postgres" in cluster.node("central").sidecars
        config = json.loads((cluster.node("central").workdir / "orthanc.json").read_text())
        assert config["PostgreSQL"]["EnableIndex"] is True

        study = sample_study(seed=41, instances=3)
        assert cluster.node("legacy").dimse().store(study).ok
        # container -> container, container -> process, process -> container
        for source, destination in [("legacy", "central"), ("central", "pocket"),
                                    ("pocket", "boxed")]:
            moved = cluster.node(source).dimse().move(
                cluster.node(destination).ae_title, "STUDY",
                {"StudyInstanceUID": study[0].StudyInstanceUID},
            )
            assert moved.ok and moved.completed == 3, (source, destination, moved.status)
            got = cluster.node(destination).dimse().get(
                "STUDY", {"StudyInstanceUID": study[0].StudyInstanceUID})
            assert sorted(i.sop_instance_uid for i in got.instances) == sorted(
                ds.SOPInstanceUID for ds in study)
        assert cluster.node("central").statistics().instances == 3
        # the index really is in PostgreSQL: Orthanc's SQLite index stays empty
        assert not (cluster.node("central").workdir / "index" / "index").exists()
    finally:
        root = cluster.root
        cluster.stop()
    assert _containers_of(cluster) == []
    assert not root.exists()
    assert processes_mentioning(str(root)) == []


TLS_CONTAINERS = """\
name: tls-boxes
nodes:
  central: {kind: orthanc, launch: docker, ae_title: CENTRAL, tls: {generate: true}}
  legacy: {kind: dcmqrscp, launch: docker, ae_title: LEGACY, tls: {generate: true}}
  boxed: {kind: embedded, launch: docker, ae_title: BOXED, tls: {generate: true}}
"""
ECHOSCU = "/usr/bin/echoscu"


def test_tls_containers_store_and_move_over_tls_only(images, docker_engine):
    """The run's certificates reach the servers inside their containers (the work directory
    and the CA folder are mounted at the same path); dcmqrscp's HAProxy terminator runs on
    the host in front of its container. DCMTK's echoscu is the independent TLS client."""
    cluster = Cluster.launch(parse_topology(TLS_CONTAINERS))
    try:
        assert len(_containers_of(cluster)) == 3
        for node in cluster.nodes.values():
            harness = node.harness_tls_material
            address = ["127.0.0.1", str(node.dicom_port), "-aec", node.ae_title,
                       "-aet", "PACSHARNESS", "-to", "10", "-ta", "10", "-td", "10"]
            secure = subprocess.run(
                [ECHOSCU, "+tls", str(harness.key_file), str(harness.certificate_file),
                 "+cf", str(harness.ca_file), *address], capture_output=True, text=True,
                timeout=60)
            assert secure.returncode == 0, (node.name, secure.stderr)
            plain = subprocess.run([ECHOSCU, *address], capture_output=True, text=True,
                                   timeout=60)
            assert plain.returncode != 0, f"{node.name} answered C-ECHO without TLS"
        study = sample_study(seed=43, instances=2)
        assert cluster.node("boxed").dimse().store(study).ok
        for source, destination in [("boxed", "central"), ("central", "legacy")]:
            moved = cluster.node(source).dimse().move(
                cluster.node(destination).ae_title, "STUDY",
                {"StudyInstanceUID": study[0].StudyInstanceUID},
            )
            assert moved.ok and moved.completed == 2, (source, destination, moved.status)
        got = cluster.node("legacy").dimse().get(
            "STUDY", {"StudyInstanceUID": study[0].StudyInstanceUID})
        assert {i.sop_instance_uid: i.dataset.PixelData for i in got.instances} == {
            ds.SOPInstanceUID: ds.PixelData for ds in study}
    finally:
        root = cluster.root
        cluster.stop()
    assert _containers_of(cluster) == []
    assert processes_mentioning(str(root)) == []


def test_orthanc_process_on_postgresql():
    if not (find_binary("Orthanc") and Path("/usr/share/orthanc/plugins/"
                                            "libOrthancPostgreSQLIndex.so").exists()):
        pytest.skip("orthanc-postgresql not installed")
    cluster = Cluster.launch(parse_topology(
        "name: pg\nnodes:\n  pg: {kind: orthanc, index: postgresql}\n"))
    try:
        node = cluster.node("pg")
        postgres = node.sidecars["postgres"]
        assert postgres.alive()
        assert node.dimse().store(sample_study(seed=42, instances=2)).ok
        assert node.statistics().instances == 2
        node.wipe()
        assert node.statistics().instances == 0
    finally:
        cluster.stop()
    assert not postgres.alive()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_container_session_leaves_nothing(images, tmp_path, sig):
    topo = tmp_path / "mixed.yaml"
    topo.write_text(MIXED)
    proc, held = start_held_session(topo, tmp_path)
    try:
        assert len(harness_containers(held["run_id"])) == 3
        proc.send_signal(sig)
        try:  # generous: the session ends within seconds; this only bounds a hung one
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the session did not end within 300 s of signal {sig}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGKILL:
        # a killed harness cannot clean up: the next run's sweep (or down --all) does
        assert run_cli("down", "--all").returncode == 0
    assert harness_containers(held["run_id"]) == []
    wait_for_no_process_mentioning(held["root"])
    assert processes_mentioning(held["root"]) == []


def test_up_and_down_with_containers(images, tmp_path):
    topo = tmp_path / "mixed.yaml"
    topo.write_text(MIXED)
    before = {c.id for c in harness_containers()}
    proc = run_cli("up", "--topology", str(topo), timeout=300)
    assert proc.returncode == 0, proc.stderr
    started = {c.id for c in harness_containers()} - before
    try:
        rows = status_json("--topology", str(topo))
        assert all(r["alive"] for r in rows), rows
    finally:
        assert run_cli("down", "--topology", str(topo)).returncode == 0
    # the containers `up` started are gone (parallel sessions on the machine have theirs)
    assert started and not started & {c.id for c in harness_containers()}
    assert not any(r["alive"] for r in status_json("--topology", str(topo)))


def test_down_all_leaves_another_state_directorys_live_containers(images, docker_engine, tmp_path):
    """`down --all` of one state directory must not remove another live run's containers."""
    runs = {}
    for run in ("first", "second"):
        topo = tmp_path / f"{run}.yaml"
        topo.write_text(f"name: {run}\nnodes:\n  boxed: {{kind: embedded, launch: docker}}\n")
        env = {**os.environ, "PACS_HARNESS_STATE_DIR": str(tmp_path / f"state-{run}")}
        runs[run] = (topo, env)

    def running_container_names() -> set[str]:
        # independent of the harness: the Docker SDK's own listing of running containers
        return {c.name for c in docker_engine.containers.list(
            filters={"label": "pacs-harness.run", "status": "running"})}

    before = running_container_names()
    try:
        for topo, env in runs.values():
            proc = run_cli("up", "--topology", str(topo), env=env, timeout=300)
            assert proc.returncode == 0, proc.stderr
        started = running_container_names() - before
        assert len(started) == 2, started
        first_topo, first_env = runs["first"]
        first_names = {c.name for c in docker_engine.containers.list(
            filters={"label": f"pacs-harness.state-dir={tmp_path / 'state-first'}"})}
        assert len(first_names) == 1, first_names

        proc = run_cli("down", "--all", env=first_env)
        assert proc.returncode == 0, proc.stderr
        assert running_container_names() - before == started - first_names
        assert docker_engine.containers.list(
            all=True, filters={"name": next(iter(first_names))}) == []
    finally:
        for _topo, env in runs.values():
            run_cli("down", "--all", env=env)
    assert running_container_names() - before == set()


def test_no_docker_engine_is_exit_3_with_how_to_start_it(tmp_path):
    topo = tmp_path / "d.yaml"
    topo.write_text("name: d\nnodes:\n  a: {kind: embedded, launch: docker}\n")
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-such.sock"}
    proc = run_cli("up", "--topology", str(topo), env=env)
    assert proc.returncode == 3
    assert "Docker engine not reachable" in proc.stderr
    assert "dockerd --bridge=none" in proc.stderr


def test_dcm4chee_absent_images_are_reported_honestly(docker_engine, tmp_path):
    from harness.launch.docker import image_present
    from harness.nodes.dcm4chee import ARCHIVE_IMAGE, DB_IMAGE, LDAP_IMAGE

    present = all(image_present(docker_engine, i) for i in (LDAP_IMAGE, DB_IMAGE, ARCHIVE_IMAGE))
    topo = tmp_path / "dcm.yaml"
    topo.write_text("name: dcm\nnodes:\n  arc: {kind: dcm4chee, ae_title: DCM4CHEE}\n")
    if present:
        pytest.skip("dcm4chee images present: test_dcm4chee_node exercises them")
    proc = run_cli("up", "--topology", str(topo))
    assert proc.returncode == 3
    assert "dcm4chee images not present" in proc.stderr
    assert harness_containers() == []


def test_dcm4chee_node(docker_engine):
    from harness.launch.docker import image_present
    from harness.nodes.dcm4chee import ARCHIVE_IMAGE, DB_IMAGE, LDAP_IMAGE

    missing = [i for i in (LDAP_IMAGE, DB_IMAGE, ARCHIVE_IMAGE)
               if not image_present(docker_engine, i)]
    if missing:
        pytest.skip(f"dcm4chee images not present here (no registry): {', '.join(missing)}")
    cluster = Cluster.launch(parse_topology(
        "name: dcm\nnodes:\n  arc: {kind: dcm4chee, ae_title: DCM4CHEE}\n"))
    try:
        node = cluster.node("arc")
        study = sample_study(seed=43, instances=2)
        assert node.dimse().store(study).ok
        found = node.dimse().find("STUDY", {"StudyInstanceUID": study[0].StudyInstanceUID})
        assert len(found.matches) == 1
    finally:
        cluster.stop()
    assert harness_containers(cluster.run_id) == []


def test_connectivity_and_migration_scenarios_on_a_mixed_topology(images, tmp_path):
    """Orthanc container on PostgreSQL as the target, dcmqrscp container as the legacy
    archive, an embedded process beside them: the shipped scenarios pass unchanged."""
    topo = tmp_path / "mixed-run.yaml"
    topo.write_text(
        "name: mixed-run\nnodes:\n"
        "  legacy: {kind: dcmqrscp, launch: docker}\n"
        "  target: {kind: orthanc, launch: docker, index: postgresql}\n"
        "  pocket: {kind: embedded}\n"
    )
    proc = run_cli("run", "--topology", str(topo), "--scenario", "connectivity",
                   "--scenario", "migration", "--phase", "pilot",
                   "--report-dir", str(tmp_path / "r"), "-q", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "phase pilot: ready" in proc.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    scenarios = {s["name"]: s for s in report["scenarios"]}
    assert scenarios["connectivity"]["outcome"] == "passed"
    moves = [t for t in scenarios["connectivity"]["tests"] if "move_between" in t["nodeid"]]
    assert len(moves) == 6 and all(t["outcome"] == "passed" for t in moves)
    ran = [t for t in scenarios["migration"]["tests"] if t["outcome"] == "passed"]
    results = [m for t in ran for m in t["metrics"].values()]
    assert {m["method"] for m in results} == {"move", "get"}
    assert all(m["verdict"] == "pass" for m in results)
    assert {n["kind"] for n in report["topology"]["nodes"]} == {"dcmqrscp", "orthanc", "embedded"}
    assert harness_containers() == []
