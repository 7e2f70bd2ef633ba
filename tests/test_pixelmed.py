"""The pixelmed kind: PixelMed's real DicomAndWebStorageServer in its network namespace,
beside an embedded node.

Checked with independent means: DCMTK's /usr/bin/findscu (C-FIND answers extracted to files),
pydicom reads of the original files and of PixelMed's image folder, `/usr/bin/ss` in the
root namespace and in the server's own (tests/test_netns.py `listeners`), /proc for processes.
"""

from __future__ import annotations

import subprocess
import uuid
from io import BytesIO
from pathlib import Path

import pytest
import requests
from pydicom import dcmread
from pydicom.uid import UID

from harness.cluster import Cluster
from harness.config import parse_topology
from harness.errors import EnvironmentProblem
from harness.fixtures import pacs_cluster_factory
from harness.nodes import make_node
from harness.nodes import pixelmed as pixelmed_module
from harness.resilience.node_faults import restart
from synthetic_data.samples import sample_study
from tests.helpers import processes_mentioning
from tests.realworld import valid_files
from tests.test_netns import listeners, wait_for

FINDSCU = "/usr/bin/findscu"
pytestmark = [
    pytest.mark.skipif(not pixelmed_module.JAR.is_file(),
                       reason="apt-get install libpixelmed-java"),
    pytest.mark.skipif(not Path(FINDSCU).exists(), reason="DCMTK findscu not installed"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

launched = pacs_cluster_factory(
    "name: pixelmed\nnodes:\n  px: {kind: pixelmed, ae_title: PIXELMED}\n"
    "  emb: {kind: embedded, ae_title: EMBEDDED}\n",
    scope="module", requires=("java",),
)


def findscu(node, level: str, keys: dict[str, str], tmp_path: Path, model: str = "-S") -> list:
    """C-FIND with DCMTK's findscu; every answer is extracted to a file and read by pydicom."""
    out = tmp_path / f"find-{uuid.uuid4().hex[:8]}"
    out.mkdir()
    argv = [FINDSCU, model, "-aet", "PACSHARNESS", "-aec", node.ae_title, "-X", "-od", str(out),
            "-k", f"QueryRetrieveLevel={level}"]
    for key, value in keys.items():
        argv += ["-k", f"{key}={value}"]
    proc = subprocess.run([*argv, node.host, str(node.dicom_port)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]


def instances_found(node, study_uid: str, tmp_path: Path) -> set[str]:
    """The SOP Instance UIDs of a study, walked SERIES then IMAGE with findscu."""
    found = set()
    for series in findscu(node, "SERIES", {"StudyInstanceUID": study_uid,
                                           "SeriesInstanceUID": ""}, tmp_path):
        for image in findscu(node, "IMAGE", {"StudyInstanceUID": study_uid,
                                             "SeriesInstanceUID": series.SeriesInstanceUID,
                                             "SOPInstanceUID": ""}, tmp_path):
            found.add(str(image.SOPInstanceUID))
    return found


@pytest.fixture(scope="module")
def realworld(launched):
    """pydicom's and pynetdicom's real-world files stored into the pixelmed node, each in
    its own syntax only (no conversion): (stored files, refused files)."""
    files = valid_files()
    report = launched.node("px").dimse().store([f.path for f in files], convert=False)
    outcome = {str(r.source): r.ok for r in report.results}
    stored = [f for f in files if outcome.get(str(f.path))]
    refused = [f for f in files if not outcome.get(str(f.path))]
    return stored, refused


def test_realworld_files_are_found_by_findscu(launched, realworld, tmp_path):
    """Every uncompressed file is stored and found again, instance by instance, by DCMTK's
    findscu; every compressed one is refused (PixelMed accepts uncompressed syntaxes only)."""
    stored, refused = realworld
    assert stored and all(not UID(f.transfer_syntax_uid).is_compressed for f in stored)
    assert refused and all(UID(f.transfer_syntax_uid).is_compressed for f in refused)
    px = launched.node("px")
    studies = {str(ds.StudyInstanceUID) for ds in
               findscu(px, "STUDY", {"StudyInstanceUID": ""}, tmp_path)}
    assert {f.study_uid for f in stored} <= studies
    for study_uid in {f.study_uid for f in stored}:
        expected = {f.sop_instance_uid for f in stored if f.study_uid == study_uid}
        assert instances_found(px, study_uid, tmp_path) == expected, study_uid


def test_files_keep_the_syntax_they_came_in(launched, realworld):
    """PixelMed's image folder (read by pydicom) holds each file in its original syntax."""
    stored, _ = realworld
    on_disk = {}
    for path in launched.node("px").images_dir.rglob("*"):
        if path.is_file():
            ds = dcmread(path, stop_before_pixels=True)
            on_disk[str(ds.SOPInstanceUID)] = str(ds.file_meta.TransferSyntaxUID)
    assert {f.sop_instance_uid: f.transfer_syntax_uid for f in stored}.items() <= on_disk.items()


def test_patient_root_query(launched, realworld, tmp_path):
    stored, _ = realworld
    patients = {str(ds.PatientID) for ds in
                findscu(launched.node("px"), "PATIENT", {"PatientID": ""}, tmp_path, "-P")}
    ct = next(f for f in stored if f.name == "pydicom/CT_small.dcm")
    assert str(dcmread(ct.path).PatientID) in patients


def test_c_move_to_the_embedded_node_and_back(launched, realworld, tmp_path):
    """PS3.4 C.4.2: a study moved from PixelMed to the embedded node (found there by
    findscu), and a study moved from the embedded node to PixelMed (found there)."""
    px, emb = launched.node("px"), launched.node("emb")
    stored, _ = realworld
    ct = next(f for f in stored if f.name == "pydicom/CT_small.dcm")
    moved = px.dimse().move(emb.ae_title, "STUDY", {"StudyInstanceUID": ct.study_uid})
    assert moved.ok and moved.completed == 1, moved.status
    assert instances_found(emb, ct.study_uid, tmp_path) == {ct.sop_instance_uid}

    study = sample_study(seed=1601, instances=3)
    assert emb.dimse().store(study).ok
    study_uid = study[0].StudyInstanceUID
    back = emb.dimse().move(px.ae_title, "STUDY", {"StudyInstanceUID": study_uid})
    assert back.ok and back.completed == 3, back.status
    assert instances_found(px, study_uid, tmp_path) == {ds.SOPInstanceUID for ds in study}


def test_unknown_move_destination_is_a801(launched, realworld):
    """PS3.4 C.4.2.1.5: a destination not among its RemoteAEs is refused with A801."""
    stored, _ = realworld
    moved = launched.node("px").dimse().move(
        "NOSUCHAE", "STUDY", {"StudyInstanceUID": stored[0].study_uid})
    assert not moved.ok and moved.status.code == 0xA801


def test_c_get_returns_the_stored_instances(launched, realworld):
    stored, _ = realworld
    for item in stored[:3]:
        got = launched.node("px").dimse().get("STUDY", {"StudyInstanceUID": item.study_uid})
        expected = {f.sop_instance_uid for f in stored if f.study_uid == item.study_uid}
        assert got.ok and {i.sop_instance_uid for i in got.instances} == expected


def test_wado_uri_through_the_relay(launched, realworld):
    """PS3.18 9 (URI service) on its web server, relayed to 127.0.0.1:wado_uri_port."""
    px = launched.node("px")
    ct = next(f for f in realworld[0] if f.name == "pydicom/CT_small.dcm")
    original = dcmread(ct.path)
    answer = requests.get(
        f"http://127.0.0.1:{px.wado_uri_port}/", timeout=60,
        params={"requestType": "WADO", "studyUID": ct.study_uid,
                "seriesUID": original.SeriesInstanceUID, "objectUID": ct.sop_instance_uid,
                "contentType": "application/dicom"},
    )
    assert answer.status_code == 200
    assert dcmread(BytesIO(answer.content)).SOPInstanceUID == ct.sop_instance_uid


def _node_pids(node) -> dict[str, int]:
    """java (the node's process), the HAProxy in its namespace (java's child), the relay."""
    java = node.handle.pid
    children = Path(f"/proc/{java}/task/{java}/children").read_text().split()
    return {"java": java, "inside": int(children[0]),
            "relay": node.sidecars["netns-relay"].pid}


def test_only_loopback_relays_listen_outside(launched):
    """In the root namespace the node's processes listen on 127.0.0.1 only (the relay, on its
    DICOM and web ports); java listens on `*` and has UDP 5353 (mDNS) only in its own."""
    px = launched.node("px")
    pids = _node_pids(px)
    inside = listeners(in_namespace_of=pids["java"])
    assert {("tcp", "*", px.dicom_port), ("tcp", "*", px.wado_uri_port),
            ("udp", "*", 5353)} <= {(x.protocol, x.address, x.port) for x in inside
                                     if pids["java"] in x.pids}
    outside = listeners()
    mine = [x for x in outside if x.pids & set(pids.values())]
    assert sorted((x.protocol, x.address, x.port, x.pids) for x in mine) == sorted(
        ("tcp", "127.0.0.1", port, frozenset({pids["relay"]}))
        for port in (px.dicom_port, px.wado_uri_port))
    assert [x for x in outside if x.port in (px.dicom_port, px.wado_uri_port)] == \
        [x for x in mine if x.port in (px.dicom_port, px.wado_uri_port)]
    assert not [x for x in outside if x.protocol == "udp" and x.port == 5353]


def test_wipe_empties_it_and_it_answers_again(launched, tmp_path):
    px = launched.node("px")
    study = sample_study(seed=1602, instances=2)
    assert px.dimse().store(study).ok
    assert findscu(px, "STUDY", {"StudyInstanceUID": ""}, tmp_path)
    px.wipe()
    assert findscu(px, "STUDY", {"StudyInstanceUID": ""}, tmp_path) == []
    assert px.held_statistics().statistics.instances == 0
    assert px.dimse().store(study).ok  # and takes data again


def test_restart_keeps_its_data(launched, tmp_path):
    """A restart (stop, start on the same ports: harness/resilience/node_faults.py) right
    after a store makes a new namespace and relay; the HSQLDB index still lists what was
    stored (with HSQLDB's default write delay it did not)."""
    px = launched.node("px")
    study = sample_study(seed=1603, instances=1)
    assert px.dimse().store(study).ok
    old_java = px.handle.pid
    restart(px)
    assert px.handle.pid != old_java
    assert instances_found(px, study[0].StudyInstanceUID, tmp_path) == {study[0].SOPInstanceUID}


def test_stop_leaves_no_process_and_no_socket_directory(tmp_path):
    """SIGTERM: the JVM exits by itself (0 measured here, 143 in the research notes; not
    SIGKILLed after the grace period) and releases its index's lock (database.lck); java,
    both HAProxys and the socket directory are gone."""
    topology = parse_topology("name: pxstop\nnodes:\n  p: {kind: pixelmed}\n")
    cluster = Cluster.launch(topology, root=tmp_path / "run")
    try:
        node = cluster.node("p")
        pids = _node_pids(node)
        socket_dir = node._isolation().socket_dir
        assert socket_dir.is_dir() and (node.database_dir / "database.lck").exists()
        node.stop()
        assert node._popen.returncode in (0, 143)
        assert not (node.database_dir / "database.lck").exists()
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() and _running(p)
                                 for p in pids.values()), "the node's processes gone")
        assert processes_mentioning(str(node.workdir)) == []
        assert not socket_dir.exists()
    finally:
        cluster.stop()


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_missing_jar_is_one_line_exit_3(tmp_path, monkeypatch):
    monkeypatch.setattr(pixelmed_module, "JAR", tmp_path / "pixelmed.jar")
    spec = parse_topology("name: x\nnodes:\n  p: {kind: pixelmed}\n").node("p")
    node = make_node(spec, tmp_path)
    with pytest.raises(EnvironmentProblem) as raised:
        node.prepare([])
    assert raised.value.exit_code == 3
    assert str(raised.value) == (f"node p: {tmp_path / 'pixelmed.jar'} not found "
                                 "(install: apt-get install libpixelmed-java)")
