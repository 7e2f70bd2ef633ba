"""The `ctn` kind: CTN's archive_server on a throw-away MariaDB, checked with DCMTK's tools.

The real-world corpus (tests/realworld.py) goes in with /usr/bin/storescu, an independent
sender; what archive_server answers to /usr/bin/findscu is held against the files it wrote
(read with pydicom) and the originals; C-MOVE lands in an embedded node, counted by that
node's C-FIND. Access control, the network namespace (`ss` in both), wipe, a fatal start-up
(exit 0!) and stop are checked on the processes themselves (/proc by pid).
"""

from __future__ import annotations

import re
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from pydicom import FileMetaDataset, dcmread
from pydicom.uid import ImplicitVRLittleEndian

from harness.errors import EnvironmentProblem
from harness.fixtures import pacs_cluster_factory
from harness.launch.mariadb import socket_directory
from harness.launch.process import process_start_time
from harness.nodes.ctn import CtnNode
from tests.realworld import valid_files
from tests.test_netns import listeners

STORESCU, FINDSCU = "/usr/bin/storescu", "/usr/bin/findscu"
MOVESCU, ECHOSCU = "/usr/bin/movescu", "/usr/bin/echoscu"
HARNESS_AE = "PACSHARNESS"
REQUIRES = ("archive_server", "mariadbd", "mariadb", "storescu", "findscu", "movescu", "echoscu")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOPOLOGY = "name: ctn\nnodes:\n  archive: {kind: ctn, ae_title: CTNQR}\n  sink: {kind: embedded}\n"
launched = pacs_cluster_factory(TOPOLOGY, scope="module", requires=REQUIRES)
one_node = pacs_cluster_factory("name: ctn1\nnodes:\n  c: {kind: ctn}\n", requires=REQUIRES)

#: uncompressed syntaxes (storescu sends a file as it is, or converted to one of these)
_UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
#: classes CTN's storage service takes (CT, MR, CR, NM Image Storage; PS3.4 B.5); it
#: refuses others, some only at the C-STORE (0xA700), see docs/research/node-kinds-2026-12.md
_CTN_STORES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4",
               "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.20")

def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def _storescu(node, path: Path, calling: str = HARNESS_AE) -> subprocess.CompletedProcess:
    return _run([STORESCU, "-aet", calling, "-aec", node.ae_title, node.host,
                 str(node.dicom_port), str(path)])


def _findscu(node, model: str, keys: dict[str, str]) -> list[dict[str, str]]:
    """/usr/bin/findscu's answers as {keyword: value}, values without padding."""
    argv = [FINDSCU, "-v", model, "-aet", HARNESS_AE, "-aec", node.ae_title]
    for key, value in keys.items():
        argv += ["-k", f"{key}={value}" if value else key]
    proc = _run([*argv, node.host, str(node.dicom_port)])
    assert proc.returncode == 0, proc.stderr[-800:]
    assert "Received Final Find Response (Success)" in proc.stderr, proc.stderr[-800:]
    answers: list[dict[str, str]] = []
    for line in proc.stderr.splitlines():
        if "Find Response:" in line:
            answers.append({})
        match = re.match(r"I: \([0-9a-f]{4},[0-9a-f]{4}\) \w\w \[(.*)\] .*# .*, \d+ (\w+)$", line)
        if match and answers:
            answers[-1][match.group(2)] = match.group(1).rstrip(" \x00")
    return answers


@pytest.fixture(scope="module")
def filled(launched):
    """The archive filled with the corpus by storescu: (cluster, stored files, refused)."""
    node = launched.node("archive")
    stored, refused = [], {}
    for item in valid_files():
        proc = _storescu(node, item.path)
        if proc.returncode == 0 and "E:" not in proc.stderr:
            stored.append(item)
        else:
            refused[item.name] = (item.transfer_syntax_uid, proc.stderr.strip()[-200:])
    return launched, stored, refused


def test_every_storable_file_is_stored_and_written(filled):
    """storescu's Success is true: each stored instance is in CTN's folder, as pydicom reads
    it, with the original's identifiers and pixel bytes; every uncompressed CT, MR, CR and
    NM image of the corpus is among them."""
    cluster, stored, refused = filled
    node = cluster.node("archive")
    print(f"stored {len(stored)}, refused {len(refused)}: {sorted(refused)}")
    storable = [i for i in valid_files()
                if i.transfer_syntax_uid in _UNCOMPRESSED and i.sop_class_uid in _CTN_STORES]
    assert storable and {i.name for i in storable} <= {i.name for i in stored}, refused
    written = {}
    for path in (p for p in node.storage_dir.rglob("*") if p.is_file()):
        ds = dcmread(path, force=True)
        written[str(ds.SOPInstanceUID)] = ds
    for item in stored:
        assert item.sop_instance_uid in written, item.name
        original = dcmread(item.path)
        copy = written[item.sop_instance_uid]
        assert str(copy.StudyInstanceUID) == item.study_uid, item.name
        if "PixelData" in original:  # decoded: CTN rewrites big endian as little endian
            copy.file_meta = FileMetaDataset()
            copy.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian  # what CTN writes
            assert np.array_equal(copy.pixel_array, original.pixel_array), item.name
    # a refused C-STORE may leave its file behind (CTN writes before it indexes): those
    # are the only other files in the folder
    refused_uids = {i.sop_instance_uid for i in valid_files() if i.name in refused}
    left_behind = set(written) - {i.sop_instance_uid for i in stored}
    print(f"refused but written: {sorted(left_behind)}")
    assert left_behind <= refused_uids
    held = node.held_statistics()
    assert held.unreadable == []
    assert held.statistics.instances == len(written)


def test_find_answers_each_level_as_the_files_say(filled):
    """PS3.4 C.6.1/C.6.2: /usr/bin/findscu, patient root at PATIENT level and study root at
    STUDY, SERIES and IMAGE, lists what was stored (compared with pydicom reads)."""
    cluster, stored, _refused = filled
    node = cluster.node("archive")
    by_study: dict[str, set[str]] = defaultdict(set)
    patients, without_patient_id = set(), set()
    for item in stored:
        by_study[item.study_uid].add(item.sop_instance_uid)
        patient_id = str(dcmread(item.path, stop_before_pixels=True).get("PatientID", ""))
        patients.add(patient_id)
        if not patient_id:
            without_patient_id.add(item.study_uid)
    studies = _findscu(node, "-S", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""})
    answered = {a["StudyInstanceUID"] for a in studies}
    # measured: a study without PatientID can be missing from the answer (research notes)
    assert set(by_study) - without_patient_id <= answered <= set(by_study)
    found_patients = _findscu(node, "-P", {"QueryRetrieveLevel": "PATIENT", "PatientID": ""})
    # measured: CTN's index holds PatientID upper-cased ('id11111' is answered 'ID11111')
    assert {a.get("PatientID", "") for a in found_patients} - {""} == {
        p.upper() for p in patients} - {""}
    study_uid, instances = max(by_study.items(), key=lambda kv: len(kv[1]))
    series = _findscu(node, "-S", {"QueryRetrieveLevel": "SERIES",
                                   "StudyInstanceUID": study_uid, "SeriesInstanceUID": ""})
    found = set()
    for one in series:
        images = _findscu(node, "-S", {
            "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": one["SeriesInstanceUID"], "SOPInstanceUID": ""})
        found |= {a["SOPInstanceUID"] for a in images}
    assert found == instances


def test_move_lands_in_an_embedded_node(filled):
    """PS3.4 C.4.2: /usr/bin/movescu asks CTN to send a study to the embedded node; that
    node's own C-FIND then lists every instance of it."""
    cluster, stored, _refused = filled
    node, sink = cluster.node("archive"), cluster.node("sink")
    item = stored[0]
    expected = {i.sop_instance_uid for i in stored if i.study_uid == item.study_uid}
    proc = _run([MOVESCU, "-v", "-S", "-aet", HARNESS_AE, "-aec", node.ae_title,
                 "-aem", sink.ae_title, "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"StudyInstanceUID={item.study_uid}", node.host, str(node.dicom_port)])
    assert proc.returncode == 0 and "Final Move Response (Success)" in proc.stderr, proc.stderr
    series = sink.dimse().find("SERIES", {"StudyInstanceUID": item.study_uid,
                                          "SeriesInstanceUID": None})
    landed = set()
    for one in series.matches:
        images = sink.dimse().find("IMAGE", {"StudyInstanceUID": item.study_uid,
                                             "SeriesInstanceUID": one.SeriesInstanceUID,
                                             "SOPInstanceUID": None})
        landed |= {str(m.SOPInstanceUID) for m in images.matches}
    assert landed == expected


def test_unknown_move_destination_delivers_nothing(filled):
    """A destination that is no topology peer gets nothing; CTN answers a failed
    sub-operation (0xB000) where PS3.4 C.4.2.1.4 has 0xA801 (measured, see the research)."""
    cluster, stored, _refused = filled
    moved = cluster.node("archive").dimse().move(
        "NOSUCHAE", "STUDY", {"StudyInstanceUID": stored[0].study_uid})
    assert not moved.ok or moved.failed
    assert moved.completed == 0


def test_unknown_calling_ae_is_refused(launched):
    """Only topology peers associate (SecurityMatrix): an unknown calling AE title is
    rejected, for echo and for store, and nothing it sent is written."""
    node = launched.node("archive")
    assert _run([ECHOSCU, "-aet", HARNESS_AE, "-aec", node.ae_title, node.host,
                 str(node.dicom_port)]).returncode == 0
    refused = _run([ECHOSCU, "-aet", "STRANGER", "-aec", node.ae_title, node.host,
                    str(node.dicom_port)])
    assert refused.returncode != 0 and "Association Rejected" in refused.stderr
    before = node.held_statistics().statistics.instances
    item = next(i for i in valid_files() if i.transfer_syntax_uid == "1.2.840.10008.1.2.1")
    assert _storescu(node, item.path, calling="STRANGER").returncode != 0
    wrong_called = _run([ECHOSCU, "-aet", HARNESS_AE, "-aec", "NOTCTN", node.host,
                         str(node.dicom_port)])
    assert wrong_called.returncode != 0
    assert node.held_statistics().statistics.instances == before


def test_wipe_empties_index_and_folder(one_node):
    """wipe: the DIM tables and the files go; C-FIND then finds nothing."""
    node = one_node.node("c")
    item = next(i for i in valid_files() if i.transfer_syntax_uid == "1.2.840.10008.1.2.1")
    assert _storescu(node, item.path).returncode == 0
    assert node.held_statistics().statistics.instances == 1
    node.wipe()
    assert node.held_statistics().statistics.instances == 0
    assert _findscu(node, "-S", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""}) == []


def _gone(pid: int, start_time: int) -> bool:
    return process_start_time(pid) != start_time


def test_stop_leaves_no_process(one_node):
    """After stop, neither archive_server (nor a forked child) nor mariadbd runs, checked by
    pid and start time; MariaDB's socket directory is gone."""
    node = one_node.node("c")
    assert _run([ECHOSCU, "-aet", HARNESS_AE, "-aec", node.ae_title, node.host,
                 str(node.dicom_port)]).returncode == 0
    mariadb = node.sidecars["mariadb"]
    assert Path(f"/proc/{mariadb.pid}/exe").resolve().name == "mariadbd"
    assert Path(f"/proc/{node.handle.pid}/exe").resolve().name == "archive_server"
    group = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
             and _pgid(int(p.name)) == node.handle.pid]
    watched = [(pid, process_start_time(pid)) for pid in {node.handle.pid, mariadb.pid, *group}]
    sockets = socket_directory(node.workdir / "mariadb")
    relay_sockets = Path((node.workdir / "netns-socket-dir").read_text().strip())
    assert sockets.is_dir() and relay_sockets.is_dir()
    node.stop()
    # a forked child's zombie is reaped by init once its parent is gone: wait for that
    deadline = time.monotonic() + 60
    running = watched
    while running and time.monotonic() < deadline:
        running = [(pid, start) for pid, start in watched if start and not _gone(pid, start)]
        time.sleep(0.1)
    assert running == [], [(pid, Path(f"/proc/{pid}/stat").read_text()) for pid, _ in running]
    assert not sockets.exists() and not relay_sockets.exists()


def test_only_the_loopback_relay_listens_outside(launched):
    """archive_server binds 0.0.0.0, but only in its own network namespace; outside, its
    port is held by the relay on 127.0.0.1 alone (`ss` in both namespaces), and MariaDB
    listens on no TCP port at all."""
    node = launched.node("archive")
    server, relay = node.handle.pid, node.sidecars["netns-relay"].pid
    inside = listeners(in_namespace_of=server)
    assert ("tcp", "0.0.0.0", node.dicom_port) in {
        (x.protocol, x.address, x.port) for x in inside if server in x.pids}
    outside = [x for x in listeners() if x.port == node.dicom_port]
    assert [(x.address, x.pids) for x in outside] == [("127.0.0.1", frozenset({relay}))]
    mariadb = node.sidecars["mariadb"].pid
    assert not [x for x in listeners() if mariadb in x.pids]


def _pgid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[2])


class _WithoutDatabase(CtnNode):
    """archive_server started with its MariaDB stopped (no `kind`: not a catalog kind)."""

    def start_sidecars(self, *, detached: bool) -> None:
        pass


def test_a_fatal_start_up_is_reported_though_it_exits_0(one_node):
    """archive_server exits 0 when it cannot open its control database; the node reports
    that exit with the log's reason instead of waiting for a C-ECHO that never comes."""
    node = one_node.node("c")
    node.stop()
    broken = _WithoutDatabase(node.spec, node.workdir)
    broken.prepare([])
    broken.start()
    try:
        with pytest.raises(EnvironmentProblem, match="exited during start-up") as raised:
            broken.wait_ready(timeout_s=60)
        assert "Could not open control database" in str(raised.value)
        broken._popen.wait(timeout=30)
        assert broken._popen.returncode == 0  # what makes the exit code useless
    finally:
        broken.stop()



def test_an_apostrophe_in_a_name_aborts_the_store_but_not_the_server(one_node, tmp_path):
    """Measured CTN quirks with a quote in a value (its SQL is built from the values): a
    PatientName with an apostrophe kills the association's child (no C-STORE response);
    one in StudyDescription is dropped from the index. The server keeps serving."""
    node = one_node.node("c")
    patient, study = dcmread(_corpus_file("CT_small.dcm")), dcmread(_corpus_file("MR_small.dcm"))
    patient.PatientName = "O'Sullivan^Samuel"
    study.StudyDescription = "Knee 'left'"
    patient.save_as(tmp_path / "patient.dcm")
    study.save_as(tmp_path / "study.dcm")
    assert _storescu(node, tmp_path / "patient.dcm").returncode != 0
    assert _storescu(node, tmp_path / "study.dcm").returncode == 0
    answers = _findscu(node, "-S", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "",
                                    "StudyDescription": ""})
    assert [a.get("StudyDescription") for a in answers] == ["Knee left"]
    assert _run([ECHOSCU, "-aet", HARNESS_AE, "-aec", node.ae_title, node.host,
                 str(node.dicom_port)]).returncode == 0


def _corpus_file(name: str) -> Path:
    return next(i.path for i in valid_files() if i.path.name == name)
