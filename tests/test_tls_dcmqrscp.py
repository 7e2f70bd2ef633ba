"""DICOM TLS (PS3.15 B.1) for launched dcmqrscp nodes, through their HAProxy terminator.

Checked from outside with independent means: DCMTK's echoscu and storescp in TLS mode (by
absolute path), Python's ssl module and the files dcmqrscp and storescp write. One cluster:
`archive` (client certificate required, TLS 1.2 and later), `legacy` (no client
certificate, TLS 1.1 still taken: a weak site setting reproduced); `archive` also knows two
TLS Storage SCPs started here (DCMTK storescp): `dest`, whose certificate comes from the
run's CA, and `rogue`, whose certificate does not.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.sop_class import Verification

from harness.cluster import Cluster
from harness.config import parse_topology
from harness.dicom.pdu import associate_rq
from harness.dicom.peer import HARNESS_AE_TITLE
from harness.errors import EnvironmentProblem
from harness.launch import tools
from harness.launch.ports import free_port, port_in_use
from harness.nodes import Peer, catalog
from harness.security.certificates import CertificateAuthority, TLSMaterial
from synthetic_data.samples import sample_study
from tests.helpers import processes_mentioning

pytestmark = pytest.mark.skipif(
    not (tools.find_binary("dcmqrscp") and tools.find_binary("haproxy")),
    reason="needs DCMTK and HAProxy (apt-get install dcmtk haproxy)",
)

TOPOLOGY = """name: tls-dcmqrscp
nodes:
  archive: {kind: dcmqrscp, ae_title: TLSARCHIVE, tls: {generate: true}}
  legacy: {kind: dcmqrscp, ae_title: TLSLEGACY,
           tls: {generate: true, min_version: "1.1", client_certificate: none}}
"""


class StoreSCP:
    """DCMTK's storescp speaking TLS only, requiring a client certificate from `trusted`."""

    def __init__(self, ae_title: str, own: TLSMaterial, trusted: Path, folder: Path) -> None:
        self.ae_title, self.folder = ae_title, folder
        self.port = free_port()
        folder.mkdir(parents=True)
        self.log = folder.parent / f"{ae_title}.log"
        self.process = subprocess.Popen(
            ["/usr/bin/storescp", "+tls", str(own.key_file), str(own.certificate_file),
             "+cf", str(trusted), "--require-peer-cert", "-aet", ae_title,
             "-od", str(folder), "-v", str(self.port)],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not port_in_use("127.0.0.1", self.port):
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"storescp {ae_title} not listening"
            time.sleep(0.1)

    def peer(self) -> Peer:
        return Peer(self.ae_title.lower(), self.ae_title, "127.0.0.1", self.port, tls=True)

    def received(self) -> dict[str, bytes]:
        """SOP Instance UID -> Pixel Data of every file storescp wrote (read by pydicom)."""
        found = {}
        for path in self.folder.iterdir():
            ds = dcmread(path)
            found[str(ds.SOPInstanceUID)] = ds.PixelData
        return found

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def tls_run(tmp_path_factory):
    """The cluster, and `archive` restarted knowing the two TLS storescp peers (their
    certificates need the run's CA, which exists once the cluster is launched)."""
    cluster = Cluster.launch(parse_topology(TOPOLOGY, "<tls-dcmqrscp>"))
    scps: list[StoreSCP] = []
    try:
        place = tmp_path_factory.mktemp("tls-scps")
        run_ca = CertificateAuthority.load(cluster.root / "tls")
        other_ca = CertificateAuthority.create(place / "other-ca", "a CA nobody here trusts")
        scps.append(StoreSCP("DEST", run_ca.issue("dest", "DEST"), run_ca.ca_file,
                             place / "dest"))
        scps.append(StoreSCP("ROGUE", other_ca.issue("rogue", "ROGUE"), run_ca.ca_file,
                             place / "rogue"))
        archive = cluster.node("archive")
        archive.stop()
        archive.prepare([*archive.peers, *(scp.peer() for scp in scps)])
        archive.start(run_id=cluster.run_id)
        archive.wait_ready()
        yield cluster, {scp.ae_title: scp for scp in scps}
    finally:
        for scp in scps:
            scp.stop()
        cluster.stop()


def _echoscu(node, *tls: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["/usr/bin/echoscu", *tls, "-to", "20", "-ta", "20", "-td", "20", node.host,
         str(node.dicom_port), "-aec", node.ae_title, "-aet", HARNESS_AE_TITLE],
        capture_output=True, text=True, timeout=120,
    )


def test_echoscu_over_tls_succeeds_and_plain_fails(tls_run):
    """DCMTK's own TLS client associates through the terminator; plain DICOM is refused."""
    cluster, _scps = tls_run
    node = cluster.node("archive")
    material = node.harness_tls_material
    over_tls = _echoscu(node, "+tls", str(material.key_file), str(material.certificate_file),
                        "+cf", str(material.ca_file))
    assert over_tls.returncode == 0, over_tls.stderr
    plain = _echoscu(node)
    assert plain.returncode != 0
    assert "Association Request Failed" in plain.stderr


def test_store_find_get_round_trip_over_tls(tls_run):
    """C-STORE, C-FIND and C-GET through the terminator: every pixel comes back unchanged."""
    cluster, _scps = tls_run
    client = cluster.node("archive").dimse()
    study = sample_study(seed=1501, instances=2)
    assert client.store(study).ok
    key = {"StudyInstanceUID": study[0].StudyInstanceUID}
    found = client.find("IMAGE", {**key, "SeriesInstanceUID": study[0].SeriesInstanceUID,
                                  "SOPInstanceUID": None})
    assert found.ok
    assert sorted(str(m.SOPInstanceUID) for m in found.matches) == sorted(
        ds.SOPInstanceUID for ds in study)
    got = client.get("STUDY", key)
    assert got.ok and len(got.instances) == 2
    pixels = {i.sop_instance_uid: i.dataset.PixelData for i in got.instances}
    assert pixels == {ds.SOPInstanceUID: ds.PixelData for ds in study}


def _handshake_then_associate(node, context: ssl.SSLContext) -> bytes:
    """TLS, then an A-ASSOCIATE-RQ; the first bytes answered (b'' when the peer closed).
    Under TLS 1.3 a refused client certificate shows at the first read, not the handshake."""
    with socket.create_connection((node.host, node.dicom_port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(associate_rq(node.ae_title, HARNESS_AE_TITLE,
                                     [(Verification, ImplicitVRLittleEndian)], max_pdu=16384))
            return tls.recv(6)


@pytest.mark.parametrize("client_certificate", ["none", "untrusted"])
def test_a_client_without_a_trusted_certificate_is_refused(tls_run, tmp_path,
                                                           client_certificate):
    """PS3.15 B.1: both sides authenticate; `client_certificate: required` refuses a client
    that shows none or one from another CA (the same client with the harness's gets an
    A-ASSOCIATE-AC, PDU type 2)."""
    cluster, _scps = tls_run
    node = cluster.node("archive")
    context = ssl.create_default_context(cafile=str(node.harness_tls_material.ca_file))
    if client_certificate == "untrusted":
        stranger = CertificateAuthority.create(tmp_path / "ca").issue("me", HARNESS_AE_TITLE)
        context.load_cert_chain(stranger.certificate_file, stranger.key_file)
    with pytest.raises((ssl.SSLError, ConnectionError)) as refused:
        answer = _handshake_then_associate(node, context)
        assert answer == b"", f"answered {answer!r}"
        raise ConnectionError("closed without an answer")
    assert "alert" in str(refused.value) or "closed" in str(refused.value)
    material = node.harness_tls_material
    context.load_cert_chain(material.certificate_file, material.key_file)
    assert _handshake_then_associate(node, context)[:1] == b"\x02"


def _version_context(version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that offers exactly `version`, with every cipher OpenSSL has, so a refusal
    is the server's (its alert), not this client's."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is the point here
        context.minimum_version = context.maximum_version = version
    return context


def _negotiated(node, version: ssl.TLSVersion) -> str:
    """The protocol version agreed, offering only `version` (and the harness's certificate)."""
    context = _version_context(version)
    material = node.harness_tls_material
    context.load_cert_chain(material.certificate_file, material.key_file)
    with socket.create_connection((node.host, node.dicom_port), timeout=30) as raw:
        with context.wrap_socket(raw) as tls:
            return tls.version() or ""


def test_min_version_is_what_the_terminator_takes(tls_run):
    """`min_version: "1.2"` (the default): TLS 1.1 refused with the server's protocol-version
    alert, TLS 1.2 taken; a node declared with "1.1" takes TLS 1.1, so the setting is applied."""
    cluster, _scps = tls_run
    archive, legacy = cluster.node("archive"), cluster.node("legacy")
    with pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"):
        _negotiated(archive, ssl.TLSVersion.TLSv1_1)
    assert _negotiated(archive, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert _negotiated(legacy, ssl.TLSVersion.TLSv1_1) == "TLSv1.1"


def test_cmove_to_tls_peers_goes_through_the_tunnel(tls_run):
    """C-MOVE sub-operations (PS3.4 C.4.2) reach a TLS storescp that requires a client
    certificate, and another TLS dcmqrscp; a peer whose certificate the run's CA did not
    sign gets nothing (the tunnel verifies it)."""
    cluster, scps = tls_run
    archive, legacy = cluster.node("archive"), cluster.node("legacy")
    study = sample_study(seed=1502, instances=2)
    assert archive.dimse().store(study).ok
    key = {"StudyInstanceUID": study[0].StudyInstanceUID}
    expected = {ds.SOPInstanceUID: ds.PixelData for ds in study}

    moved = archive.dimse().move("DEST", "STUDY", key)
    assert moved.ok and moved.completed == 2, moved.status
    assert scps["DEST"].received() == expected

    moved = archive.dimse().move(legacy.ae_title, "STUDY", key)
    assert moved.ok and moved.completed == 2, moved.status
    held = {str(dcmread(p).SOPInstanceUID) for p in legacy.database_dir.rglob("*")
            if p.is_file() and p.name != "index.dat"}
    assert held == set(expected)

    refused = archive.dimse().move("ROGUE", "STUDY", key)
    assert not refused.ok and refused.completed == 0
    assert scps["ROGUE"].received() == {}


def test_cmove_to_the_plain_harness_destination_stays_plain(tls_run, tmp_path):
    """The harness's own C-MOVE destination (no TLS) gets plain DICOM: a plain DCMTK
    storescp on its port and AE title receives the study."""
    cluster, _scps = tls_run
    archive = cluster.node("archive")
    study = sample_study(seed=1503, instances=1)
    assert archive.dimse().store(study).ok
    folder = tmp_path / "plain"
    folder.mkdir()
    log = tmp_path / "storescp.log"
    scp = subprocess.Popen(
        ["/usr/bin/storescp", "-aet", HARNESS_AE_TITLE, "-od", str(folder),
         str(cluster.harness_port)], stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not port_in_use("127.0.0.1", cluster.harness_port):
            assert scp.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        moved = archive.dimse().move(HARNESS_AE_TITLE, "STUDY",
                                     {"StudyInstanceUID": study[0].StudyInstanceUID})
    finally:
        scp.terminate()
        scp.wait(timeout=20)
    assert moved.ok and moved.completed == 1, moved.status
    assert [dcmread(p).SOPInstanceUID for p in folder.iterdir()] == [study[0].SOPInstanceUID]


def test_stopping_the_node_stops_its_terminator():
    """The terminator is the node's sidecar: stop() leaves no haproxy process (by pid)."""
    cluster = Cluster.launch(parse_topology(
        "name: tls-stop\nnodes:\n  one: {kind: dcmqrscp, tls: {generate: true}}\n"))
    try:
        node = cluster.node("one")
        terminator = node.sidecars["tls-terminator"]
        assert terminator.alive()
        assert "haproxy" in Path(f"/proc/{terminator.pid}/cmdline").read_text()
    finally:
        cluster.stop()
    assert not terminator.alive() and not Path(f"/proc/{terminator.pid}").exists()
    assert not node.handle.alive()


def test_missing_haproxy_is_an_environment_problem(monkeypatch):
    """Without HAProxy a TLS dcmqrscp cannot start: one line saying how to install it, and
    nothing left running."""
    real = tools.find_binary
    monkeypatch.setattr(tools, "find_binary", lambda name: None if name == "haproxy"
                        else real(name))
    topology = parse_topology(
        "name: tls-nohaproxy\nnodes:\n  lone: {kind: dcmqrscp, ae_title: NOHAPROXY, "
        "tls: {generate: true}}\n")
    with pytest.raises(EnvironmentProblem, match=r"install: apt-get install haproxy"):
        Cluster.launch(topology)
    assert not processes_mentioning("pacs-harness-tls-nohaproxy-")


@pytest.mark.skipif(not catalog.capabilities("embedded").tls,
                    reason="the embedded PACS speaks no TLS on this branch")
def test_cmove_both_ways_with_a_tls_embedded_node():
    """C-MOVE between TLS nodes of two kinds: dcmqrscp (its tunnel) to the embedded PACS and
    back (the embedded PACS's own TLS client to dcmqrscp's terminator)."""
    cluster = Cluster.launch(parse_topology(
        "name: tls-pair\nnodes:\n  dq: {kind: dcmqrscp, ae_title: PAIRDQ, tls: {generate: true}}\n"
        "  emb: {kind: embedded, ae_title: PAIREMB, tls: {generate: true}}\n"))
    try:
        dq, emb = cluster.node("dq"), cluster.node("emb")
        there, back = sample_study(seed=1504, instances=2), sample_study(seed=1505, instances=2)
        assert dq.dimse().store(there).ok and emb.dimse().store(back).ok
        moved = dq.dimse().move(emb.ae_title, "STUDY",
                                {"StudyInstanceUID": there[0].StudyInstanceUID})
        assert moved.ok and moved.completed == 2, moved.status
        found = emb.dimse().find("IMAGE", {"StudyInstanceUID": there[0].StudyInstanceUID,
                                           "SeriesInstanceUID": there[0].SeriesInstanceUID,
                                           "SOPInstanceUID": None})
        assert sorted(str(m.SOPInstanceUID) for m in found.matches) == sorted(
            ds.SOPInstanceUID for ds in there)
        moved = emb.dimse().move(dq.ae_title, "STUDY",
                                 {"StudyInstanceUID": back[0].StudyInstanceUID})
        assert moved.ok and moved.completed == 2, moved.status
        held = {str(dcmread(p).SOPInstanceUID) for p in dq.database_dir.rglob("*")
                if p.is_file() and p.name != "index.dat"}
        assert {ds.SOPInstanceUID for ds in back} <= held
    finally:
        cluster.stop()
