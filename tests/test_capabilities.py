"""Every kind's declared capabilities hold against the real server, so they cannot drift.

One cluster holds one node of each launched kind installed here (plus an embedded `sink`,
the C-MOVE destination). Each declaration is probed with the protocol it claims: C-FIND at
each level, C-GET, C-MOVE, Orthanc REST, DICOMweb, the syntax a C-GET returns, SOP Classes
in Study, the association limit, TLS, storage commitment, Modality Worklist and MPPS; an
undeclared one is probed to be absent. A kind defined in a test is picked up by the catalog
and the topology checks, and launches.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import ssl
import subprocess
import time
from io import BytesIO
from pathlib import Path

import pytest
import requests
from pydicom import Dataset, dcmread
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.sop_class import Verification

from harness.cluster import Cluster
from harness.config import parse_topology
from harness.dicom.commitment import STORAGE_COMMITMENT, commit_on_node
from harness.dicom.mpps import MppsClient
from harness.dicom.pdu import (
    AAssociateAC,
    AAssociateRJ,
    associate_rq,
    decode_pdu_body,
    decode_pdu_header,
)
from harness.dicom.peer import HARNESS_AE_TITLE, DimseConnectionError
from harness.dicom.worklist import WorklistClient, worklist_identifier
from harness.errors import ConfigError
from harness.launch.tools import find_binary
from harness.nodes import catalog, make_node
from harness.nodes.capabilities import LAUNCHES, QUERY_LEVELS, Capabilities
from harness.nodes.embedded import EmbeddedNode
from harness.workflow.orders import make_order, schedule
from harness.workflow.providers import worklist_client
from synthetic_data.samples import sample_study

#: kinds probed here: those the harness can run as a process (dcm4chee exists only as
#: containers whose images need a registry; its declarations are not probed on this machine)
LAUNCHED = [name for name, cls in catalog.kinds().items() if "process" in cls.capabilities.launches]


def _installed(kind: str) -> bool:
    return all(find_binary(program) for program, _hint in catalog.capabilities(kind).binaries)


@pytest.fixture(scope="module")
def cluster():
    """One node per launched kind that runs as a process here, and the move destination."""
    kinds = [k for k in LAUNCHED if _installed(k)]
    nodes = "".join(f"  {k}: {{kind: {k}}}\n" for k in kinds)
    topology = parse_topology(f"name: caps\nnodes:\n{nodes}  sink: {{kind: embedded}}\n")
    launched = Cluster.launch(topology)
    yield launched
    launched.stop()


@pytest.fixture(params=LAUNCHED)
def node(request, cluster):
    kind = request.param
    if kind not in cluster.nodes:
        caps = catalog.capabilities(kind)
        needs = [hint for _program, hint in caps.binaries] or [f"launch: {caps.default_launch}"]
        pytest.skip(f"{kind}: not launched here (needs {', '.join(needs)})")
    return cluster.node(kind)


def _stored(node, seed: int, instances: int = 2):
    """A fresh study of `instances` CT images, stored and acknowledged."""
    study = sample_study(seed=seed, instances=instances)
    report = node.dimse().store(study)
    assert report.ok, [r.error for r in report.failed]
    return study


def _level_keys(level: str, ds) -> dict:
    return {
        "PATIENT": {"PatientID": ds.PatientID},
        "STUDY": {"StudyInstanceUID": ds.StudyInstanceUID},
        "SERIES": {"StudyInstanceUID": ds.StudyInstanceUID, "SeriesInstanceUID": None},
        "IMAGE": {"StudyInstanceUID": ds.StudyInstanceUID,
                  "SeriesInstanceUID": ds.SeriesInstanceUID, "SOPInstanceUID": None},
    }[level]


def test_query_levels_are_answered(node):
    """PS3.4 C.6: each declared level answers with its matches; others are refused."""
    study = _stored(node, seed=501)
    expected = {"PATIENT": 1, "STUDY": 1, "SERIES": 1, "IMAGE": 2}
    for level in QUERY_LEVELS:
        model = "patient" if level == "PATIENT" else "study"
        found = node.dimse().find(level, _level_keys(level, study[0]), model=model)
        if level in node.capabilities.query_levels:
            assert found.ok, f"{level}: {found.status}"
            assert len(found.matches) == expected[level], level
        else:
            assert not found.ok, f"{level} answered but is not declared"


def test_retrieve_methods_work(node, cluster):
    """C-GET returns the instances, C-MOVE delivers them to a peer (counted in the sink's
    own index), WADO-RS returns them; an undeclared method is absent."""
    # one study per kind; names without an apostrophe, on which CTN aborts (tests/test_ctn.py)
    study = _stored(node, seed=1502 + 1000 * LAUNCHED.index(node.kind))
    uids = sorted(ds.SOPInstanceUID for ds in study)
    methods = node.capabilities.retrieve_methods
    key = {"StudyInstanceUID": study[0].StudyInstanceUID}

    got = node.dimse().get("STUDY", key)
    if "C-GET" in methods:
        assert got.ok and sorted(i.sop_instance_uid for i in got.instances) == uids
    else:
        assert not got.ok and not got.instances

    sink = cluster.node("sink")
    moved = node.dimse().move(sink.ae_title, "STUDY", key)
    in_sink = sink.dimse().find("IMAGE", {**key, "SeriesInstanceUID": study[0].SeriesInstanceUID,
                                          "SOPInstanceUID": None})
    if "C-MOVE" in methods:
        assert moved.ok and moved.completed == 2
        assert sorted(str(m.SOPInstanceUID) for m in in_sink.matches) == uids
    else:
        assert not moved.ok and in_sink.matches == []

    web = node.dicomweb()
    if "WADO-RS" in methods:
        parts = web.retrieve_study(study[0].StudyInstanceUID)
        assert sorted(dcmread(BytesIO(p)).SOPInstanceUID for p in parts) == uids
    else:
        assert web is None or "WADO-RS" not in node.capabilities.dicomweb


def _http_refused(node) -> None:
    """Nothing on the node answers HTTP: no HTTP port, and its DICOM port is not HTTP."""
    assert node.http_port is None
    with pytest.raises(requests.RequestException):
        requests.get(f"http://{node.host}:{node.dicom_port}/system", timeout=10)


def test_orthanc_rest(node):
    if node.capabilities.orthanc_rest:
        system = node.rest().system()
        assert system["DicomAet"] == node.ae_title and system["Version"]
    else:
        assert node.rest() is None
        if not node.capabilities.dicomweb:
            _http_refused(node)


def test_dicomweb_services(node):
    """PS3.18: STOW-RS stores, QIDO-RS finds, WADO-RS returns; none where not declared."""
    services = node.capabilities.dicomweb
    if not services:
        assert node.dicomweb() is None
        if not node.capabilities.orthanc_rest:
            _http_refused(node)
        return
    web = node.dicomweb()
    assert node.spec.dicomweb_root == node.capabilities.dicomweb_root
    study = sample_study(seed=503, instances=2)
    if "STOW-RS" in services:
        payloads = []
        for ds in study:
            buffer = BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            payloads.append(buffer.getvalue())
        assert "00081199" in web.store(payloads)  # ReferencedSOPSequence: what was stored
    else:
        _stored(node, seed=503)
    if "QIDO-RS" in services:
        found = web.search_studies(StudyInstanceUID=study[0].StudyInstanceUID)
        assert [f["0020000D"]["Value"][0] for f in found] == [study[0].StudyInstanceUID]
    if "WADO-RS" in services:
        assert len(web.retrieve_study(study[0].StudyInstanceUID)) == 2


def test_keeps_stored_syntax(node):
    """Stored in Implicit VR, asked with Explicit VR offered first: a keeper returns Implicit
    VR (as stored), a converter the first context it accepted."""
    ds = sample_study(seed=504)[0]
    buffer = BytesIO()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(buffer, enforce_file_format=True)
    implicit = dcmread(BytesIO(buffer.getvalue()))
    assert node.dimse().store([implicit]).ok
    got = node.dimse().get(
        "STUDY", {"StudyInstanceUID": ds.StudyInstanceUID},
        transfer_syntaxes=[ExplicitVRLittleEndian, ImplicitVRLittleEndian],
    )
    assert got.ok and len(got.instances) == 1
    syntax = got.instances[0].transfer_syntax_uid
    if node.capabilities.keeps_stored_syntax:
        assert syntax == ImplicitVRLittleEndian
    else:
        assert syntax == ExplicitVRLittleEndian


def test_reports_sop_classes_in_study(node):
    """PS3.4 C.6.1.1.5: SOP Classes in Study (0008,0062) in a study-level answer."""
    study = _stored(node, seed=505)
    found = node.dimse().find(
        "STUDY", {"StudyInstanceUID": study[0].StudyInstanceUID, "SOPClassesInStudy": None}
    )
    assert found.ok and len(found.matches) == 1
    reported = found.matches[0].get("SOPClassesInStudy")
    values = [v for v in (reported if isinstance(reported, MultiValue) else [reported]) if v]
    if node.capabilities.reports_sop_classes_in_study:
        assert [str(v) for v in values] == [study[0].SOPClassUID]
    else:
        assert values == []


def _associate(node) -> tuple[socket.socket, object]:
    """A Verification association on a plain socket, and the node's answer (AC or RJ)."""
    sock = socket.create_connection((node.host, node.dicom_port), timeout=30)
    pairs = [(Verification, ImplicitVRLittleEndian)]
    sock.sendall(associate_rq(node.ae_title, HARNESS_AE_TITLE, pairs, max_pdu=16384))
    header = _recv_exactly(sock, 6)
    pdu_type, length = decode_pdu_header(header)
    return sock, decode_pdu_body(pdu_type, _recv_exactly(sock, length))


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, f"connection closed after {len(data)} of {count} bytes"
        data += chunk
    return data


def test_max_associations(node):
    """PS3.8 9.3.4: the declared number of associations at once is accepted, one more is
    refused with an A-ASSOCIATE-RJ 'local limit exceeded'; once they are gone, it answers."""
    limit = node.capabilities.max_associations
    if limit is None:
        pytest.skip(f"{node.kind} declares no association limit")
    _wait_for_no_child_processes(node)  # dcmqrscp counts its children, reaped ones only
    held = []
    try:
        for number in range(1, limit + 1):
            sock, answer = _associate(node)
            held.append(sock)
            assert isinstance(answer, AAssociateAC), f"association {number}: {answer}"
        sock, answer = _associate(node)
        held.append(sock)
        assert isinstance(answer, AAssociateRJ), f"association {limit + 1}: {answer}"
        assert answer.describe().endswith("local limit exceeded")
    finally:
        for sock in held:
            sock.close()
    node.wait_ready(timeout_s=120)  # raises unless an association is accepted again


def _wait_for_no_child_processes(node, timeout_s: float = 60) -> None:
    """Until earlier associations' forked children (dcmqrscp forks one per association)
    have exited and been reaped, as /proc lists them."""
    children = Path(f"/proc/{node.handle.pid}/task/{node.handle.pid}/children")
    deadline = time.monotonic() + timeout_s
    while children.read_text().split():
        assert time.monotonic() < deadline, f"{node.kind} still has children: {children}"
        time.sleep(0.2)


def test_store_associations_keep_every_instance(node):
    """Storing over as many associations as asked, capped at the declared number, loses
    no instance (counted by the kind's own means, not C-FIND)."""
    before = node.held_statistics().statistics.instances
    study = sample_study(seed=506, instances=6)
    report = node.dimse().store(study, associations=4)
    assert report.ok
    if node.capabilities.store_associations:
        assert report.associations == node.capabilities.store_associations
    assert node.held_statistics().statistics.instances == before + 6


def test_tls(node, tmp_path):
    """A TLS handshake on the DICOM port succeeds only where TLS is declared (PS3.15 B.1):
    a kind declaring it is launched once more with `tls: {generate: true}` and shakes hands
    with the run's CA and the harness's certificate; a kind without it refuses TLS."""
    if not node.capabilities.tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection((node.host, node.dicom_port), timeout=15) as raw:
            with pytest.raises((ssl.SSLError, OSError)):
                context.wrap_socket(raw)
        return
    topology = parse_topology(
        f"name: caps-tls\nnodes:\n  t: {{kind: {node.kind}, tls: {{generate: true}}}}\n"
    )
    launched = Cluster.launch(topology, root=tmp_path / "run")
    try:
        tls_node = launched.node("t")
        material = tls_node.harness_tls_material
        context = ssl.create_default_context(cafile=str(material.ca_file))
        context.load_cert_chain(str(material.certificate_file), str(material.key_file))
        with socket.create_connection((tls_node.host, tls_node.dicom_port), timeout=15) as raw:
            with context.wrap_socket(raw, server_hostname=tls_node.host) as tls:
                assert tls.version()
    finally:
        launched.stop()


def test_hl7(node):
    """An ADT^A08 over MLLP (HL7 v2.5 3.3.8) changes the patient's name a C-FIND answers,
    where HL7 is declared; a kind without it gets no HL7 port from the cluster."""
    from harness.hl7.messages import PatientIdentity, build_a08
    from harness.hl7.mllp import send_message

    if not node.capabilities.hl7:
        assert getattr(node, "hl7_port", None) is None
        return
    study = _stored(node, seed=611, instances=1)
    patient_id = study[0].PatientID
    message, control = build_a08(PatientIdentity(patient_id, "CAPABILITY^PROBE", "20010101",
                                                 "O"))
    exchange = send_message(node.host, node.hl7_port, message, control)
    assert exchange.ack.code == "AA", exchange.ack.describe()
    found = node.dimse().find("STUDY", {"StudyInstanceUID": study[0].StudyInstanceUID,
                                        "PatientID": None, "PatientName": None})
    assert [(m.PatientID, str(m.PatientName)) for m in found.matches] == [
        (patient_id, "CAPABILITY^PROBE")]


def test_storage_commitment(node, cluster):
    """PS3.4 J: a kind declaring storage commitment commits a study it stored (every
    instance named in the N-EVENT-REPORT, on whichever association it comes); a kind
    without it refuses the SOP class in negotiation (DimseClient.negotiate), or accepts the
    class without committing (CTN 3.2 never answers the N-ACTION)."""
    pairs = [(STORAGE_COMMITMENT, ExplicitVRLittleEndian),
             (STORAGE_COMMITMENT, ImplicitVRLittleEndian)]  # CTN takes Implicit VR only
    # with Verification, so a node accepting nothing else still completes the association
    offered = node.dimse().negotiate([*pairs, (Verification, ImplicitVRLittleEndian)])
    offered_class = any(offered[pair] for pair in pairs)
    if not node.capabilities.storage_commitment and not offered_class:
        return
    assert offered_class, f"{node.kind} declares storage commitment but refuses the class"
    study = _stored(node, seed=507 + 1000 * LAUNCHED.index(node.kind))
    references = [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in study]
    result = commit_on_node(node, references, report_port=cluster.harness_port,
                            timeout_s=60 if node.capabilities.storage_commitment else 10)
    if not node.capabilities.storage_commitment:
        assert not result.committed, f"{node.kind} commits: declare storage_commitment"
        return
    assert result.ok, result.problems()
    assert sorted(o.sop_instance_uid for o in result.committed) == sorted(u for _, u in
                                                                          references)


def test_binaries_come_from_the_packages_the_hints_name(node):
    """Each program the kind declares belongs to the Debian package its install hint names
    (dpkg -S; through its alternatives link, as /usr/bin/java is); the first is the program
    the node runs (first, or after a wrapper such as pixelmed's network namespace), the
    others its sidecars and tools (ctn's MariaDB)."""
    if not node.capabilities.binaries:
        pytest.skip(f"{node.kind} runs no installed program")
    for program, hint in node.capabilities.binaries:
        path = find_binary(program)
        owner = subprocess.run(["dpkg", "-S", os.path.realpath(path)], capture_output=True,
                               text=True, timeout=60)
        assert owner.returncode == 0, owner.stderr
        package = owner.stdout.split(":")[0]
        assert hint.startswith("apt-get install ") and package in hint.split()[2:]
    # the first is the node's own program (others run beside it: dcmqrscp's wlmscpfs),
    # possibly after a wrapper (pixelmed and ctn start inside a network namespace)
    assert find_binary(node.capabilities.binaries[0][0]) in node.command()



def test_worklist(node):
    """PS3.4 K: a kind declaring a worklist answers an order written into its folder with
    exactly that item; any other refuses the worklist model on its DICOM port."""
    order = make_order(7000 + LAUNCHED.index(node.kind), "CAPS")
    if node.capabilities.worklist:
        schedule([order], node)
        found = worklist_client(node).find_worklist(
            worklist_identifier(AccessionNumber=order.accession_number))
        assert found.ok, found.error
        assert [m.StudyInstanceUID for m in found.matches] == [order.study_instance_uid]
        return
    client = WorklistClient(node.host, node.dicom_port, node.ae_title, tls=node.tls_client())
    try:
        found = client.find_worklist(worklist_identifier(AccessionNumber="*"))
    except DimseConnectionError:
        return  # refused at association: absent too
    assert not found.ok and found.matches == []


def test_mpps(node):
    """PS3.4 F.7: a kind declaring MPPS takes N-CREATE IN PROGRESS, N-SET COMPLETED, and
    refuses a later N-SET (0x0110); any other refuses MPPS."""
    uid = f"1.2.826.0.1.3680043.8.498.77{7000 + LAUNCHED.index(node.kind)}"
    step = Dataset()
    step.PerformedProcedureStepStatus = "IN PROGRESS"
    client = MppsClient(node.host, node.dicom_port, node.ae_title, tls=node.tls_client())
    try:
        created = client.create(uid, step)
    except DimseConnectionError:
        assert not node.capabilities.mpps
        return
    if not node.capabilities.mpps:
        assert not created.ok
        return
    assert created.ok, created.error
    step.PerformedProcedureStepStatus = "COMPLETED"
    assert client.set(uid, step).ok
    assert client.set(uid, step).status.code == 0x0110


@pytest.mark.parametrize("kind", list(catalog.kinds()))
def test_topology_accepts_what_the_kind_declares(kind):
    """The topology checks follow the declarations: launch methods, index backends."""
    caps = catalog.capabilities(kind)
    where = "host: 127.0.0.1, dicom_port: 104" if not caps.launched else "ae_title: N"
    for launch in LAUNCHES:
        text = f"name: x\nnodes:\n  n: {{kind: {kind}, {where}, launch: {launch}}}\n"
        if launch in caps.launches:
            assert parse_topology(text).node("n").launch == launch
        else:
            with pytest.raises(ConfigError, match="nodes.n.launch"):
                parse_topology(text)
    spec = parse_topology(f"name: x\nnodes:\n  n: {{kind: {kind}, {where}}}\n").node("n")
    assert spec.launched == caps.launched and spec.disposable == caps.launched
    assert spec.orthanc_rest == caps.orthanc_rest and spec.dicomweb_root == caps.dicomweb_root
    for index in caps.index_backends:
        assert parse_topology(
            f"name: x\nnodes:\n  n: {{kind: {kind}, index: {index}}}\n").node("n").index == index


@pytest.fixture
def pocket_kind():
    """A kind defined here, in no module of harness/: the embedded PACS, process only."""

    class PocketNode(EmbeddedNode):
        kind = "pocket"
        capabilities = dataclasses.replace(
            EmbeddedNode.capabilities, launches=("process",), image_recipe=None
        )

    yield PocketNode
    catalog.forget("pocket")


def test_a_new_kind_is_picked_up_without_touching_other_modules(pocket_kind):
    assert catalog.node_class("pocket") is pocket_kind
    with pytest.raises(ConfigError, match=r"allowed: .*pocket"):
        parse_topology("name: x\nnodes:\n  n: {kind: pockett}\n")
    with pytest.raises(ConfigError, match="pocket runs only with launch: process"):
        parse_topology("name: x\nnodes:\n  n: {kind: pocket, launch: docker}\n")
    with pytest.raises(ConfigError, match="index: postgresql is for orthanc nodes only"):
        parse_topology("name: x\nnodes:\n  n: {kind: pocket, index: postgresql}\n")
    topology = parse_topology("name: x\nnodes:\n  n: {kind: pocket, ae_title: POCKET}\n")
    assert isinstance(make_node(topology.node("n"), None), pocket_kind)
    launched = Cluster.launch(topology)
    try:
        node = launched.node("n")
        assert node.kind == "pocket" and node.dimse().echo().status.ok
    finally:
        launched.stop()


def test_a_declaration_outside_the_vocabulary_fails_at_once():
    with pytest.raises(ValueError, match="retrieve_methods: unknown"):
        Capabilities(retrieve_methods=("C-FETCH",))
    with pytest.raises(ValueError, match="WADO-RS but dicomweb has not"):
        Capabilities(retrieve_methods=("WADO-RS",))
