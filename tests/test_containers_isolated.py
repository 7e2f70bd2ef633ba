"""PixelMed and CTN as containers (`launch: docker`): Docker's network mode `none` is their
network namespace, HAProxy relays over Unix sockets reach them (harness/launch/netns.py).

Checked with independent means: `docker inspect` (/usr/bin/docker), `ss` in the root
namespace and in the containers', DCMTK's /usr/bin/echoscu, storescu and findscu, a C-GET
from the embedded process node compared with pydicom's read of the original file.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from harness.cluster import Cluster
from harness.config import parse_topology
from harness.errors import EnvironmentProblem
from harness.launch.docker import harness_containers
from harness.launch.mariadb import socket_directory
from harness.launch.netns import SOCKET_DIR_FILE
from harness.launch.tools import find_binary
from synthetic_data.samples import sample_study
from tests.helpers import (
    processes_mentioning,
    run_cli,
    start_held_session,
    status_json,
    wait_for_no_process_mentioning,
)
from tests.realworld import valid_files
from tests.test_netns import listeners

DOCKER, ECHOSCU = "/usr/bin/docker", "/usr/bin/echoscu"
STORESCU, FINDSCU = "/usr/bin/storescu", "/usr/bin/findscu"
HARNESS_AE = "PACSHARNESS"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOPOLOGY = """\
name: isolated-boxes
nodes:
  pixel: {kind: pixelmed, launch: docker, ae_title: PIXELBOX}
  classic: {kind: ctn, launch: docker, ae_title: CTNBOX}
  pocket: {kind: embedded, ae_title: POCKET}
"""


@pytest.fixture(scope="module")
def images():
    """The two images, built once from Debian packages (cached across runs by recipe)."""
    from harness.launch.docker import docker_client
    from harness.launch.images import build_image

    try:
        docker_client()
    except EnvironmentProblem as exc:
        pytest.skip(f"no Docker engine: {exc}")
    missing = [p for p in ("mariadbd", "mariadb", "haproxy", "echoscu", "storescu", "findscu")
               if not find_binary(p)]
    if missing:
        pytest.skip(f"not installed here: {', '.join(missing)}")
    return {name: build_image(name)[0] for name in ("pixelmed", "ctn")}


def _real_ct_file():
    """A real-world uncompressed CT image: both servers take it (CTN: CT, MR, CR, NM)."""
    for item in valid_files():
        if (item.sop_class_uid == CT_IMAGE_STORAGE
                and item.transfer_syntax_uid == EXPLICIT_LITTLE_ENDIAN):
            return item
    pytest.skip("no uncompressed CT image in the real-world corpus")


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def _address(node) -> list[str]:
    return ["-aet", HARNESS_AE, "-aec", node.ae_title, node.host, str(node.dicom_port)]


def _findscu_study(node, study_uid: str) -> list[str]:
    """The StudyInstanceUIDs /usr/bin/findscu is answered (study root, STUDY level)."""
    proc = _run([FINDSCU, "-v", "-S", "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"StudyInstanceUID={study_uid}", *_address(node)])
    assert proc.returncode == 0, proc.stderr[-800:]
    assert "Received Final Find Response (Success)" in proc.stderr, proc.stderr[-800:]
    answers = proc.stderr.split("Find Response:")[1:]  # -v echoes the request first
    return [uid for answer in answers
            for uid in re.findall(r"\(0020,000d\) UI \[([0-9.]+)[ \x00]*\]", answer)]


def _inspect(container_id: str) -> dict:
    proc = _run([DOCKER, "inspect", container_id])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)[0]


def _container_pids(container_id: str) -> set[int]:
    """Host pids of every process in the container (`docker top`)."""
    proc = _run([DOCKER, "top", container_id, "-eo", "pid"])
    assert proc.returncode == 0, proc.stderr
    return {int(line) for line in proc.stdout.split()[1:]}


def test_isolated_containers_echo_store_find_and_move(images):
    cluster = Cluster.launch(parse_topology(TOPOLOGY))
    containers: dict[str, str] = {}
    socket_dirs: list[Path] = []
    try:
        pocket = cluster.node("pocket")
        for container in harness_containers(cluster.run_id):
            containers[container.labels["pacs-harness.node"]] = container.id
        assert sorted(containers) == ["classic", "pixel"]
        for name in ("pixel", "classic"):
            node = cluster.node(name)
            socket_dirs.append(Path((node.workdir / SOCKET_DIR_FILE).read_text().strip()))
            inspected = _inspect(containers[name])
            assert inspected["HostConfig"]["NetworkMode"] == "none", name
            assert not inspected["HostConfig"]["PortBindings"], name
            assert not inspected["NetworkSettings"]["Ports"], name
            assert inspected["Config"]["Image"] == images[node.kind]
        socket_dirs.append(socket_directory(cluster.node("classic").workdir / "mariadb"))
        assert "container" in cluster.node("pixel").version()
        # its host name resolves inside (PixelMed's mDNS looks it up at start-up)
        assert "UnknownHostException" not in cluster.node("pixel").log_tail(400)

        # the servers listen on every address, but only inside their containers; in the
        # root namespace only the relays listen, on 127.0.0.1
        outside = listeners()
        for name, container_id in containers.items():
            pids = _container_pids(container_id)
            assert not [s for s in outside if s.pids & pids], name
            inside = listeners(in_namespace_of=min(pids))  # every pid shares one namespace
            port = cluster.node(name).dicom_port
            assert {s.address for s in inside if s.port == port} - {"127.0.0.1"}, (
                f"{name}: the server's own wildcard listener not seen inside: {inside}")
        ports = {cluster.node(n).dicom_port for n in containers}
        ports.add(cluster.node("pixel").wado_uri_port)
        ours = [s for s in outside if s.port in ports]
        assert {s.port for s in ours} == ports
        assert {s.address for s in ours} == {"127.0.0.1"}, ours

        real = _real_ct_file()
        original = dcmread(real.path)
        for name in ("pixel", "classic"):
            node = cluster.node(name)
            assert _run([ECHOSCU, *_address(node)]).returncode == 0, name
            stored = _run([STORESCU, *_address(node), str(real.path)])
            assert stored.returncode == 0 and "E:" not in stored.stderr, stored.stderr[-800:]
            assert _findscu_study(node, real.study_uid) == [real.study_uid], name
            # to the embedded process node: the same pixels as the original file
            moved = node.dimse().move(pocket.ae_title, "STUDY",
                                      {"StudyInstanceUID": real.study_uid})
            assert moved.ok and moved.completed == 1, (name, moved.status)
            got = pocket.dimse().get("STUDY", {"StudyInstanceUID": real.study_uid})
            assert [i.sop_instance_uid for i in got.instances] == [real.sop_instance_uid]
            assert got.instances[0].dataset.PixelData == original.PixelData, name
            pocket.wipe()
            # and back: a study only the embedded node has, moved into the container
            study = sample_study(seed=61 + len(name), instances=2)
            assert pocket.dimse().store(study).ok
            back = pocket.dimse().move(node.ae_title, "STUDY",
                                       {"StudyInstanceUID": study[0].StudyInstanceUID})
            assert back.ok and back.completed == 2, (name, back.status)
            assert _findscu_study(node, study[0].StudyInstanceUID) == [
                study[0].StudyInstanceUID], name
            held = node.held_statistics()
            assert held.unreadable == [] and held.statistics.instances == 3, name

        # PixelMed's wipe restarts its container (the same one: state.json's id holds) on
        # empty folders
        pixel = cluster.node("pixel")
        started = _inspect(containers["pixel"])["State"]["StartedAt"]
        pixel.wipe()
        assert pixel.handle.container_id == containers["pixel"]
        assert _inspect(containers["pixel"])["State"]["StartedAt"] != started
        assert _findscu_study(pixel, real.study_uid) == []
        assert pixel.held_statistics().statistics.instances == 0
    finally:
        root = cluster.root
        cluster.stop()
    assert harness_containers(cluster.run_id) == []
    for container_id in containers.values():
        assert _run([DOCKER, "ps", "-aq", "--filter", f"id={container_id}"]).stdout == ""
    assert processes_mentioning(str(root)) == []  # no HAProxy relay, MariaDB or server
    assert [d for d in socket_dirs if d.exists()] == []


def test_image_build_of_an_isolated_kind_is_cached(images):
    proc = run_cli("images", "build", "pixelmed")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == images["pixelmed"]
    assert "up to date (cached)" in proc.stderr


def test_restart_makes_a_new_isolated_container_that_keeps_the_data(images):
    """harness/resilience/node_faults.restart (stop, start on the same ports): a new
    container, again with network mode none, and CTN's index (MariaDB on the host) and
    files still answer for what was stored."""
    from harness.resilience.node_faults import restart

    cluster = Cluster.launch(parse_topology(
        "name: isolated-restart\nnodes:\n  classic: {kind: ctn, launch: docker}\n"))
    try:
        node = cluster.node("classic")
        study = sample_study(seed=71, instances=1)
        assert node.dimse().store(study).ok
        before = node.handle.container_id
        restart(node)
        assert node.handle.container_id != before
        assert _inspect(node.handle.container_id)["HostConfig"]["NetworkMode"] == "none"
        assert _findscu_study(node, study[0].StudyInstanceUID) == [study[0].StudyInstanceUID]
    finally:
        root = cluster.root
        cluster.stop()
    assert harness_containers(cluster.run_id) == []
    assert processes_mentioning(str(root)) == []


def test_killed_session_leaves_no_isolated_container_nor_relay(images, tmp_path):
    """A pytest session holding both kinds as containers is SIGKILLed: `down --all` removes
    the containers (their owner is dead); the relays and MariaDB die with the session; the
    socket directories nobody listens in any more go when the next one is made."""
    topology = tmp_path / "isolated.yaml"
    topology.write_text(TOPOLOGY)
    proc, held = start_held_session(topology, tmp_path)
    try:
        assert len(harness_containers(held["run_id"])) == 2
        left = [Path((Path(held["root"]) / name / SOCKET_DIR_FILE).read_text().strip())
                for name in ("pixel", "classic")]
        left.append(socket_directory(Path(held["root"]) / "classic" / "mariadb"))
        assert all(d.is_dir() for d in left)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert run_cli("down", "--all").returncode == 0
    assert harness_containers(held["run_id"]) == []
    wait_for_no_process_mentioning(held["root"])
    assert processes_mentioning(held["root"]) == []
    # their socket directories are swept by the next isolated server that starts
    cluster = Cluster.launch(parse_topology(
        "name: isolated-next\nnodes:\n  next: {kind: ctn, launch: docker}\n"))
    cluster.stop()
    assert [d for d in left if d.exists()] == []


def test_up_status_and_down_with_isolated_containers(images, tmp_path):
    """`up` leaves both containers running (detached) behind their relays, `status` finds
    them alive, `down` removes them, their relays and their socket directories."""
    topology = tmp_path / "isolated.yaml"
    topology.write_text(TOPOLOGY)
    before = {c.id for c in harness_containers()}
    proc = run_cli("up", "--topology", str(topology), timeout=300)
    assert proc.returncode == 0, proc.stderr
    started = {c.id for c in harness_containers()} - before
    try:
        assert len(started) == 2
        rows = status_json("--topology", str(topology))
        assert all(r["alive"] for r in rows), rows
        socket_dirs = [Path(m["Source"]) for c in started for m in _inspect(c)["Mounts"]
                       if Path(m["Source"]).name.startswith("pacs-")
                       and Path(m["Source"]).parent == Path("/tmp")]
        # each its relays' directory, CTN also MariaDB's
        assert len(socket_dirs) == 3 and all(d.is_dir() for d in socket_dirs)
    finally:
        assert run_cli("down", "--topology", str(topology)).returncode == 0
    assert not started & {c.id for c in harness_containers()}
    assert not any(r["alive"] for r in status_json("--topology", str(topology)))
    assert [d for d in socket_dirs if d.exists()] == []
