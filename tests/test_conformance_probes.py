"""The association, retrieval, storage and services probes on the three launched kinds.

Every probe of those areas runs once on the embedded PACS, Orthanc and dcmqrscp (each moving
to the next: embedded -> orthanc -> dcmqrscp -> embedded), and the outcomes asserted are the
ones measured, each checked where it matters against an independent means: DCMTK's tools by
absolute path (echoscu -d for the maximum PDU, storescu -R for a JPEG context, movescu and
getscu for retrieval, findscu -W for the worklist), the A-ASSOCIATE-AC decoded from a raw
socket (not pynetdicom, which the probes use), the files each node stored read with pydicom
(embedded and dcmqrscp folders, Orthanc's REST API), and Orthanc's own --version.
"""

from __future__ import annotations

import re
import socket
import struct
import subprocess
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian

from harness.conformance.model import ProbeContext, all_probes
from harness.dicom import pdu
from harness.dicom.peer import HARNESS_AE_TITLE
from harness.fixtures import pacs_cluster_factory

ECHOSCU, STORESCU = "/usr/bin/echoscu", "/usr/bin/storescu"
MOVESCU, GETSCU, FINDSCU = "/usr/bin/movescu", "/usr/bin/getscu", "/usr/bin/findscu"
ORTHANC = "/usr/sbin/Orthanc"
AREAS = ("association", "retrieve", "storage", "services")
KINDS = ("embedded", "orthanc", "dcmqrscp")
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
CT = "1.2.840.10008.5.1.4.1.1.2"
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"

cluster = pacs_cluster_factory(
    "name: probes\nnodes:\n"
    "  embedded: {kind: embedded, ae_title: PROBEEMB}\n"
    "  orthanc: {kind: orthanc, ae_title: PROBEORTH}\n"
    "  dcmqrscp: {kind: dcmqrscp, ae_title: PROBEDQR}\n",
    scope="module",
    requires=("Orthanc", "dcmqrscp"),
)


@pytest.fixture(scope="module")
def results(cluster):
    """{(probe id, node name): ProbeResult} for every probe of the four areas."""
    names = list(KINDS)
    found = {}
    for probe in all_probes(AREAS):
        for index, name in enumerate(names):
            destination = cluster.node(names[(index + 1) % len(names)])
            context = ProbeContext(cluster.node(name), None, move_destination=destination)
            found[(probe.id, name)] = probe.run(context)
    return found


def outcome(results, probe_id: str, name: str) -> str:
    return results[(probe_id, name)].outcome


def facts(results, probe_id: str, name: str) -> dict:
    return results[(probe_id, name)].facts


def test_every_probe_ran_on_every_node_with_evidence(results):
    probes = all_probes(AREAS)
    assert {p.area for p in probes} == set(AREAS)
    assert all(p.reference for p in probes)
    assert len(results) == len(probes) * len(KINDS)
    for result in results.values():
        # nothing was left untested on launched, writable nodes
        assert result.outcome != "not tested", result.line()
        if result.observed != "the node has no HTTP address":
            assert result.evidence, result.line()


# -- independent means --------------------------------------------------------------------------


def _dcmtk(program: str, node, *args: str, files: tuple[str, ...] = (),
           timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [program, "-aet", HARNESS_AE_TITLE, "-aec", node.ae_title, "-to", "20", *args,
         node.host, str(node.dicom_port), *files],
        capture_output=True, text=True, timeout=timeout)


def _user_subitems(ac_body: bytes) -> list[tuple[int, bytes]]:
    """The user information sub-items of an A-ASSOCIATE-AC body (PS3.8 9.3.3), walked by
    hand: (sub-item type, value)."""
    offset = 68
    while offset < len(ac_body):
        item_type, _, length = struct.unpack_from(">BBH", ac_body, offset)
        value = ac_body[offset + 4: offset + 4 + length]
        if item_type == 0x50:
            subitems, at = [], 0
            while at < len(value):
                sub_type, _, sub_length = struct.unpack_from(">BBH", value, at)
                subitems.append((sub_type, value[at + 4: at + 4 + sub_length]))
                at += 4 + sub_length
            return subitems
        offset += 4 + length
    return []


def _raw_associate(node, pairs, extra_subitems: bytes = b"", **user) -> bytes:
    """Send an A-ASSOCIATE-RQ (pdu.py, plus raw `extra_subitems` in its user information)
    on a plain socket and return the A-ASSOCIATE-AC's body; the association is aborted."""
    contexts = tuple(pdu.ProposedContext(2 * i + 1, sop, (ts,))
                     for i, (sop, ts) in enumerate(pairs))
    rq = pdu.AAssociateRQ(node.ae_title, HARNESS_AE_TITLE, contexts,
                          pdu.UserInformation(max_length=0, **user)).encode()
    if extra_subitems:  # the user information item is the last one: grow it and the PDU
        user_at = rq.rindex(b"\x50\x00")
        (user_length,) = struct.unpack_from(">H", rq, user_at + 2)
        assert user_at + 4 + user_length == len(rq)
        rq = (rq[:2] + struct.pack(">I", len(rq) - 6 + len(extra_subitems)) + rq[6:user_at + 2]
              + struct.pack(">H", user_length + len(extra_subitems)) + rq[user_at + 4:]
              + extra_subitems)
    with socket.create_connection((node.host, node.dicom_port), timeout=20) as sock:
        sock.sendall(rq)
        header = _recv(sock, 6)
        pdu_type, length = struct.unpack(">BxI", header)
        body = _recv(sock, length)
        sock.sendall(pdu.AAbort().encode())
    assert pdu_type == pdu.A_ASSOCIATE_AC, pdu.decode_pdu(header + body)
    return body


def _recv(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


def _stored_files(node, sop_instance_uid: str) -> list[pydicom.Dataset]:
    """The files `node` stored for one SOP instance, read with pydicom: from its folder
    (embedded, dcmqrscp) or its REST API (Orthanc)."""
    if node.kind == "orthanc":
        auth = node.generated_credentials
        found = []
        for match in node.rest().lookup(sop_instance_uid):
            raw = requests.get(f"{node.http_url}{match['Path']}/file", auth=auth, timeout=60)
            raw.raise_for_status()
            found.append(pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw.content)))
        return found
    folder = node.storage_dir if node.kind == "embedded" else node.database_dir
    found = []
    for path in Path(folder).rglob("*"):
        if not path.is_file():
            continue
        try:
            head = pydicom.dcmread(path, stop_before_pixels=True,
                                   specific_tags=["SOPInstanceUID"])
        except Exception:  # noqa: BLE001 - index files and the like
            continue
        if str(head.get("SOPInstanceUID", "")) == sop_instance_uid:
            found.append(pydicom.dcmread(path))
    return found


# -- association ----------------------------------------------------------------------------------


def test_storage_syntaxes_dcmqrscp_takes_uncompressed_only(results, cluster):
    for name in KINDS:
        assert outcome(results, "association.storage-syntaxes", name) == "conforms"
    assert facts(results, "association.storage-syntaxes", "dcmqrscp")["other_syntaxes"] == [
        "Explicit VR Big Endian"]
    for name in ("embedded", "orthanc"):
        accepted = facts(results, "association.storage-syntaxes", name)["accepted"]
        assert "JPEG Baseline (Process 1)" in accepted["Secondary Capture Image Storage"]
    # DCMTK's storescu, proposing only the file's own JPEG Baseline context, agrees
    jpeg = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")
    for name, stored in (("embedded", 0), ("orthanc", 0), ("dcmqrscp", 1)):
        assert _dcmtk(STORESCU, cluster.node(name), "-R", "-xy",
                      files=(jpeg,)).returncode == stored


def test_max_pdu_is_what_dcmtk_sees(results, cluster):
    measured = {name: facts(results, "association.max-pdu", name)["max_pdu"] for name in KINDS}
    assert measured == {"embedded": 65536, "orthanc": 16384, "dcmqrscp": 65536}
    for name in KINDS:
        assert outcome(results, "association.max-pdu", name) == "conforms"
        debug = _dcmtk(ECHOSCU, cluster.node(name), "-d")
        theirs = re.findall(r"Their Max PDU Receive Size:\s+(\d+)", debug.stdout + debug.stderr)
        assert int(theirs[-1]) == measured[name]


def test_no_kind_answers_an_asynchronous_window(results, cluster):
    for name in KINDS:
        assert outcome(results, "association.async-window", name) == "not supported"
        body = _raw_associate(cluster.node(name), [(CT, ImplicitVRLittleEndian)],
                              async_ops_window=(5, 5))
        assert 0x53 not in [t for t, _ in _user_subitems(body)]


def test_every_kind_grants_the_scp_role_for_c_get(results, cluster):
    for name in KINDS:
        assert outcome(results, "association.get-scp-role", name) == "conforms"
        body = _raw_associate(
            cluster.node(name), [(STUDY_ROOT_GET, ImplicitVRLittleEndian),
                                 (CT, ImplicitVRLittleEndian)],
            role_selections=(pdu.RoleSelection(CT, scu_role=False, scp_role=True),))
        roles = [v for t, v in _user_subitems(body) if t == 0x54]
        assert len(roles) == 1 and roles[0][2:-2].rstrip(b"\0") == CT.encode()
        assert roles[0][-1] == 1  # SCP role granted


def test_no_kind_negotiates_relational_queries(results, cluster):
    uid = STUDY_ROOT_FIND.encode()
    relational = struct.pack(">BBHH", 0x56, 0, 2 + len(uid) + 1, len(uid)) + uid + b"\x01"
    for name in KINDS:
        assert outcome(results, "association.relational-queries", name) == "not supported"
        body = _raw_associate(cluster.node(name), [(STUDY_ROOT_FIND, ImplicitVRLittleEndian)],
                              relational)
        assert 0x56 not in [t for t, _ in _user_subitems(body)]


# -- retrieval --------------------------------------------------------------------------------


def _getscu_count(node, study: str, tmp_path: Path) -> int:
    folder = tmp_path / f"get-{node.name}-{study[-8:]}"
    folder.mkdir()
    done = _dcmtk(GETSCU, node, "-S", "-od", str(folder), "-k", "QueryRetrieveLevel=STUDY",
                  "-k", f"StudyInstanceUID={study}")
    assert done.returncode == 0, done.stderr
    return len(list(folder.iterdir()))


def test_move_to_a_known_destination_arrives(results, cluster, tmp_path):
    for index, name in enumerate(KINDS):
        found = facts(results, "retrieve.move-known", name)
        assert outcome(results, "retrieve.move-known", name) == "conforms"
        assert (found["completed"], found["failed"], found["arrived"]) == (2, 0, 2)
        destination = cluster.node(KINDS[(index + 1) % len(KINDS)])
        assert found["destination"] == destination.name
        assert _getscu_count(destination, found["study"], tmp_path) == 2


def test_move_to_an_unknown_destination(results, cluster):
    """A801 from the embedded PACS and dcmqrscp, C000 from Orthanc 1.10; movescu agrees."""
    words = {"embedded": "MoveDestinationUnknown", "dcmqrscp": "MoveDestinationUnknown",
             "orthanc": "UnableToProcess"}
    for name in KINDS:
        found = facts(results, "retrieve.move-unknown", name)
        expected = "0xC000" if name == "orthanc" else "0xA801"
        assert found["status"] == expected
        assert outcome(results, "retrieve.move-unknown", name) == (
            "differs" if name == "orthanc" else "conforms")
        moved = _dcmtk(MOVESCU, cluster.node(name), "-v", "-S", "-aem", "NOWHERE",
                       "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={found['study']}")
        assert f"Final Move Response ({'Refused' if expected == '0xA801' else 'Failed'}: " \
               f"{words[name]})" in moved.stdout + moved.stderr


def test_c_get_of_a_study(results, cluster, tmp_path):
    for name in KINDS:
        found = facts(results, "retrieve.get-study", name)
        assert outcome(results, "retrieve.get-study", name) == "conforms"
        assert (found["completed"], found["received"]) == (3, 3)
        assert _getscu_count(cluster.node(name), found["study"], tmp_path) == 3


def test_failed_uid_list_after_a_refused_sub_operation(results):
    """Each kind counts the refused C-STORE (0xB000, 1 completed, 1 failed); Orthanc
    1.10 leaves the Failed SOP Instance UID List out."""
    for name in KINDS:
        found = facts(results, "retrieve.failed-uid-list", name)
        assert (found["status"], found["completed"], found["failed"]) == ("0xB000", 1, 1)
        listed = [found["refused_uid"]] if name != "orthanc" else []
        assert found["failed_uids"] == listed
        assert outcome(results, "retrieve.failed-uid-list", name) == (
            "differs" if name == "orthanc" else "conforms")


def test_move_to_a_destination_that_refuses(results):
    """dcmqrscp: A702 with both instances failed and listed; Orthanc: C000; the embedded
    PACS: A801, as if the destination it knows were unknown. Each did try to connect."""
    measured = {name: facts(results, "retrieve.destination-refuses", name) for name in KINDS}
    assert {n: f["status"] for n, f in measured.items()} == {
        "embedded": "0xA801", "orthanc": "0xC000", "dcmqrscp": "0xA702"}
    assert measured["dcmqrscp"]["failed"] == 2 and measured["dcmqrscp"]["all_listed"]
    assert all(f["association_requests"] >= 1 for f in measured.values())
    assert [n for n in KINDS if outcome(results, "retrieve.destination-refuses", n)
            == "conforms"] == ["dcmqrscp"]


# -- storage fidelity -----------------------------------------------------------------------------


def _one_stored(cluster, name: str, found: dict) -> pydicom.Dataset:
    stored = _stored_files(cluster.node(name), found["sop_instance_uid"])
    assert len(stored) == 1, f"{name}: {len(stored)} stored files"
    return stored[0]


def test_private_tags_kept_by_every_kind(results, cluster):
    for name in KINDS:
        found = facts(results, "storage.private-tags", name)
        assert outcome(results, "storage.private-tags", name) == "conforms"
        assert found["private_elements_returned"] == found["private_elements"] > 100
        stored = _one_stored(cluster, name, found)
        block = stored.private_block(0x0099, "PACSHARNESS PROBE")
        assert block[0x01].value == "probe private value"


def test_odd_length_values_padded_except_by_the_embedded_pacs(results, cluster):
    expected = {"embedded": ("kept odd", 3), "orthanc": ("padded", 4),
                "dcmqrscp": ("padded", 4)}
    for name, (policy, length) in expected.items():
        found = facts(results, "storage.odd-length", name)
        assert found["policy"] == policy
        assert set(found["lengths"].values()) == {length}
        stored = _one_stored(cluster, name, found)
        raw = stored.get_item(0x0008103E)
        assert raw.length == length  # the stored file itself, not the C-GET
    assert [n for n in KINDS if outcome(results, "storage.odd-length", n) == "differs"] == [
        "embedded"]


def test_text_and_character_sets_kept(results, cluster):
    for name in KINDS:
        for probe_id in ("storage.long-text", "storage.charset-latin1",
                         "storage.charset-iso2022", "storage.un-vr",
                         "storage.retired-element", "storage.group-length"):
            assert outcome(results, probe_id, name) == "conforms", results[(probe_id, name)]
        long_text = facts(results, "storage.long-text", name)
        assert long_text["returned_ReasonForVisit_chars"] == 70_000
        assert len(_one_stored(cluster, name, long_text).ReasonForVisit) == 70_000
        japanese = facts(results, "storage.charset-iso2022", name)
        stored = _one_stored(cluster, name, japanese)
        assert str(stored.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
        latin = _one_stored(cluster, name, facts(results, "storage.charset-latin1", name))
        assert str(latin.PatientName) == "Müller^Jürgen"
        lengths = facts(results, "storage.group-length", name)["group_lengths"]
        assert set(lengths.values()) == {"dropped"}


def test_large_object_and_transcoding(results, cluster):
    for name in KINDS:
        large = facts(results, "storage.large-object", name)
        assert outcome(results, "storage.large-object", name) == "conforms"
        assert large["pixel_bytes"] == 20 * 1024 * 1024 and large["pixels_identical"]
        assert len(_one_stored(cluster, name, large).PixelData) == 20 * 1024 * 1024
        coded = facts(results, "storage.transcoding", name)
        assert outcome(results, "storage.transcoding", name) == "conforms"
        assert coded["implicit_only"]["returned_syntax"] == ImplicitVRLittleEndian
        assert coded["implicit_only"]["fidelity"] == "coerced"


def test_duplicate_sop_instance_overwrites(results, cluster):
    """Every launched kind replaces the first object (Orthanc: the harness sets
    OverwriteInstances); one stored file holds the second version."""
    for name in KINDS:
        found = facts(results, "storage.duplicate-uid", name)
        assert found["duplicate_policy"] == "overwrite" and found["matches"] == 1
        assert str(_one_stored(cluster, name, found).ImageComments) == "PROBE SECOND VERSION"


# -- services ----------------------------------------------------------------------------------


def test_services_offered(results, cluster):
    offered = {name: {probe_id.split(".", 1)[1] for (probe_id, n), r in results.items()
                      if n == name and probe_id.startswith("services.")
                      and r.outcome == "conforms"}
               for name in KINDS}
    # worklist and MPPS (issue 17): dcmqrscp's worklist is wlmscpfs on a port of its own
    assert offered == {
        "embedded": {"storage-commitment", "worklist", "mpps"},
        "dcmqrscp": set(),
        "orthanc": {"storage-commitment", "qido-rs", "wado-rs", "stow-rs", "orthanc-rest",
                    "worklist"},
    }
    assert {r.outcome for (p, n), r in results.items()
            if p.startswith("services.") and n == "dcmqrscp"} == {"not supported"}
    # raw A-ASSOCIATE-AC: the Storage Commitment context is accepted by Orthanc and the
    # embedded PACS only
    for name in KINDS:
        body = _raw_associate(cluster.node(name), [(STORAGE_COMMITMENT,
                                                    ImplicitVRLittleEndian)])
        decoded = pdu.decode_pdu(struct.pack(">BBI", 2, 0, len(body)) + body)
        assert (decoded.contexts[0].result == 0) == (name in ("orthanc", "embedded"))
        # DCMTK's worklist query: on the DICOM port of the kinds that serve it there
        worklist = _dcmtk(FINDSCU, cluster.node(name), "-W", "-k", "PatientName")
        assert (worklist.returncode == 0) == (name != "dcmqrscp")
    version = subprocess.run([ORTHANC, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    assert facts(results, "services.orthanc-rest", "orthanc")["version"] in version
