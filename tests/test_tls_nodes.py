"""DICOM over TLS (PS3.15 B.1) on launched Orthanc and embedded-PACS nodes, end to end.

Checked from outside the harness's own client: DCMTK's echoscu/findscu (+tls) by absolute
path, Python's ssl for the negotiated protocol, Orthanc's REST API and pydicom reads for
what arrived.
"""

from __future__ import annotations

import io
import json
import select
import socket
import ssl
import subprocess

import pydicom
import pytest
import requests
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from harness.cluster import Cluster
from harness.config import load_topology, parse_topology
from harness.dicom.pdu import associate_rq
from harness.errors import ConfigError
from harness.fixtures import pacs_cluster_factory
from harness.launch.state import state_dir_for
from harness.security.certificates import CertificateAuthority
from synthetic_data.samples import sample_study
from tests.helpers import run_cli
from tests.test_embedded_server import start_node

cluster = pacs_cluster_factory(
    "name: tls\nnodes:\n"
    "  orthanc: {kind: orthanc, ae_title: TLSORTHANC, tls: {generate: true}}\n"
    "  embedded: {kind: embedded, ae_title: TLSEMBEDDED, tls: {generate: true}}\n",
    scope="module",
    requires=("Orthanc",),
)
KINDS = ("orthanc", "embedded")


def _dcmtk(node, program: str, *args: str, tls: str = "certificate") -> subprocess.CompletedProcess:
    """A DCMTK tool as installed, with the harness's certificate (+tls KEY CERT +cf CA),
    TLS without a client certificate (tls="anonymous": +tla +cf CA) or plain (tls="")."""
    material = node.harness_tls_material
    over_tls = {
        "certificate": ["+tls", str(material.key_file), str(material.certificate_file)],
        "anonymous": ["+tla"],
    }.get(tls, [])
    if tls:
        over_tls += ["+cf", str(material.ca_file)]
    return subprocess.run(
        [f"/usr/bin/{program}", *over_tls, "-to", "20", "-ta", "20", "-td", "20",
         "-aet", "PACSHARNESS", "-aec", node.ae_title, *args, node.host, str(node.dicom_port)],
        capture_output=True, text=True, timeout=120,
    )


def _study_on(node, study_uid: str) -> list[str]:
    """SOP Instance UIDs DCMTK's findscu (+tls) finds in the study."""
    proc = _dcmtk(node, "findscu", "-S", "-k", "QueryRetrieveLevel=IMAGE",
                  "-k", f"StudyInstanceUID={study_uid}", "-k", "SOPInstanceUID")
    assert proc.returncode == 0, proc.stderr
    return sorted(line.split("[", 1)[1].split("]", 1)[0].rstrip("\x00 ")
                  for line in proc.stderr.splitlines() if "(0008,0018)" in line)


@pytest.mark.parametrize("kind", KINDS)
def test_echoscu_needs_tls_and_a_certificate(cluster, kind):
    """DCMTK's echoscu with the harness's certificate is answered; without TLS it is not
    (one DICOM port, TLS only), nor over TLS without a client certificate (the default
    client_certificate: required)."""
    node = cluster.node(kind)
    assert _dcmtk(node, "echoscu").returncode == 0
    for how in ("", "anonymous"):
        refused = _dcmtk(node, "echoscu", tls=how)
        assert refused.returncode != 0, how
        assert "Association Request Failed" in refused.stderr, (how, refused.stderr)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
@pytest.mark.parametrize("kind", KINDS)
def test_protocol_is_tls_1_2_or_later(cluster, kind):
    """Python's ssl negotiates TLS 1.2+; a client capped at TLS 1.1 is refused."""
    node = cluster.node(kind)
    material = node.harness_tls_material
    context = ssl.create_default_context(cafile=str(material.ca_file))
    context.load_cert_chain(str(material.certificate_file), str(material.key_file))
    with socket.create_connection((node.host, node.dicom_port), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname=node.host) as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.load_cert_chain(str(material.certificate_file), str(material.key_file))
    with socket.create_connection((node.host, node.dicom_port), timeout=30) as raw:
        with pytest.raises(ssl.SSLError):
            old.wrap_socket(raw)


@pytest.mark.parametrize("kind", KINDS)
def test_store_find_get_round_trip_over_tls(cluster, kind):
    """The harness's C-STORE, C-FIND and C-GET speak TLS to the node; pixel data comes back
    byte for byte, and DCMTK's findscu (+tls) sees the instances."""
    node = cluster.node(kind)
    study = sample_study(seed=1500 + KINDS.index(kind), instances=2)
    client = node.dimse()
    assert client.store(study).ok
    uid = study[0].StudyInstanceUID
    assert len(client.find("STUDY", {"StudyInstanceUID": uid}).matches) == 1
    got = client.get("STUDY", {"StudyInstanceUID": uid})
    assert got.ok and got.completed == 2
    sent = {ds.SOPInstanceUID: ds.PixelData for ds in study}
    assert {i.sop_instance_uid: i.dataset.PixelData for i in got.instances} == sent
    assert _study_on(node, uid) == sorted(sent)


def test_cli_store_to_a_tls_node(cluster, tmp_path):
    """`pacs-harness store` to a TLS node declared as an external one with the site's files
    (ca, certificate, key) exits 0 and the instance is there (findscu +tls)."""
    node = cluster.node("embedded")
    material = node.harness_tls_material
    topology = tmp_path / "t.yaml"
    topology.write_text(
        "name: cli-tls\nnodes:\n  site: {kind: external, writable: true, "
        f"ae_title: {node.ae_title}, host: 127.0.0.1, dicom_port: {node.dicom_port}, "
        f"tls: {{ca: {material.ca_file}, certificate: {material.certificate_file}, "
        f"key: {material.key_file}}}}}\n"
    )
    ds = sample_study(seed=1510)[0]
    folder = tmp_path / "in"
    folder.mkdir()
    ds.save_as(folder / "one.dcm", enforce_file_format=True)
    proc = run_cli("store", "--topology", str(topology), "--to", "site", str(folder))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _study_on(node, ds.StudyInstanceUID) == [ds.SOPInstanceUID]


def test_move_between_tls_nodes(cluster):
    """C-MOVE embedded -> Orthanc and Orthanc -> embedded, both ends TLS only: the
    destination holds the same pixel data (Orthanc's REST API; findscu +tls)."""
    orthanc, embedded = cluster.node("orthanc"), cluster.node("embedded")
    to_orthanc, to_embedded = sample_study(seed=1520), sample_study(seed=1521)
    assert embedded.dimse().store(to_orthanc).ok
    assert orthanc.dimse().store(to_embedded).ok

    moved = embedded.dimse().move(orthanc.ae_title, "STUDY",
                                  {"StudyInstanceUID": to_orthanc[0].StudyInstanceUID})
    assert moved.ok and moved.completed == 1, moved
    found = orthanc.rest().lookup(to_orthanc[0].SOPInstanceUID)
    assert [f["Type"] for f in found] == ["Instance"]
    file = requests.get(f"{orthanc.http_url}/instances/{found[0]['ID']}/file",
                        auth=orthanc.generated_credentials, timeout=60)
    file.raise_for_status()
    arrived = pydicom.dcmread(io.BytesIO(file.content))
    assert arrived.PixelData == to_orthanc[0].PixelData

    moved = orthanc.dimse().move(embedded.ae_title, "STUDY",
                                 {"StudyInstanceUID": to_embedded[0].StudyInstanceUID})
    assert moved.ok and moved.completed == 1, moved
    assert _study_on(embedded, to_embedded[0].StudyInstanceUID) == [
        to_embedded[0].SOPInstanceUID]


def test_embedded_drops_plaintext_and_silent_clients(cluster):
    """A plaintext A-ASSOCIATE-RQ on the TLS port is dropped, and a client that connects and
    never handshakes does not hold up the others (the handshake runs per connection)."""
    node = cluster.node("embedded")
    with socket.create_connection((node.host, node.dicom_port), timeout=60):  # never speaks
        with socket.create_connection((node.host, node.dicom_port), timeout=60) as plain:
            plain.sendall(associate_rq(node.ae_title, "PACSHARNESS",
                                       [(Verification, ImplicitVRLittleEndian)], 16384))
            try:
                answer = plain.recv(6)
            except ConnectionResetError:
                answer = b""
            assert not answer.startswith(b"\x02")  # no A-ASSOCIATE-AC in the clear
        assert node.dimse(timeout_s=30).echo().status.ok
    assert _dcmtk(node, "echoscu").returncode == 0


def test_orthanc_refuses_a_min_version_it_cannot_honour(tmp_path):
    """Orthanc 1.10.1 has no DICOM TLS version setting: min_version 1.1 is a ConfigError
    naming the node and the field, before anything runs."""
    topology = parse_topology(
        "name: old\nnodes:\n  legacy: {kind: orthanc, tls: {generate: true, min_version: '1.1'}}\n"
    )
    with pytest.raises(ConfigError, match=r"node legacy: tls.min_version '1.1'"):
        Cluster.launch(topology, root=tmp_path / "run").stop()


def test_cli_up_store_migrate_inventory_verify_down_over_tls(tmp_path):
    """The commands a user runs against a detached TLS topology (the certificates' paths kept
    in the state file): up, store, migrate (C-MOVE embedded -> Orthanc, both TLS),
    inventory, verify, load (the harness's engine and Locust workers), down; each exits 0,
    Orthanc's REST API holds what was migrated and every load operation succeeded."""
    topology = tmp_path / "tls.yaml"
    topology.write_text(
        "name: tls-cli\nnodes:\n"
        "  legacy: {kind: embedded, ae_title: TLSLEGACY, tls: {generate: true}}\n"
        "  central: {kind: orthanc, ae_title: TLSCENTRAL, tls: {generate: true}}\n"
    )
    folder = tmp_path / "study"
    folder.mkdir()
    study = sample_study(seed=1530, instances=3)
    for ds in study:
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    topo = ("--topology", str(topology))
    up = run_cli("up", *topo, cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    try:
        steps = [
            ("store", *topo, "--to", "legacy", str(folder)),
            ("migrate", *topo, "--from", "legacy", "--to", "central"),
            ("inventory", *topo, "--node", "central"),
            ("verify", *topo, "--source", "legacy", "--target", "central"),
        ]
        for step in steps:
            proc = run_cli(*step, cwd=tmp_path)
            assert proc.returncode == 0, f"{step[0]}: {proc.stdout}{proc.stderr}"
        state = json.loads((state_dir_for(load_topology(topology)) / "state.json").read_text())
        central = state["nodes"]["central"]
        rest = requests.get(f"http://127.0.0.1:{central['http_port']}/instances",
                            auth=tuple(central["http_credentials"]), timeout=60)
        rest.raise_for_status()
        held = {requests.get(f"http://127.0.0.1:{central['http_port']}/instances/{i}/simplified-tags",
                             auth=tuple(central["http_credentials"]), timeout=60)
                .json()["SOPInstanceUID"] for i in rest.json()}
        assert held == {str(ds.SOPInstanceUID) for ds in study}
        # the harness's own engine on the embedded node (its C-MOVEs reach the harness's
        # plain receiver while its own port is TLS only); Locust workers on Orthanc
        for node, operations, engine in (
            ("legacy", ("c-echo", "c-store", "c-find", "c-get", "c-move"), ()),
            ("central", ("c-echo", "c-store", "c-find", "c-get"),
             ("--locust", "--processes", "1")),
        ):
            workload = tmp_path / f"{node}.yaml"
            workload.write_text(
                "name: tls\nduration_s: 2\nmax_operations: 60\n"
                "dataset: {studies: 1, instances_per_study: 2, scale: small}\ngroups:\n"
                + "".join(f"  - {{operation: {op}, users: 1}}\n" for op in operations)
            )
            load = run_cli("load", *topo, "--node", node, "--workload", str(workload),
                           "--json", *engine, cwd=tmp_path)
            assert load.returncode == 0, load.stdout + load.stderr
            results = json.loads(load.stdout)
            if engine:  # Locust's statistics: one row per operation and "Aggregated"
                stats = results["stats"]
                assert len(stats) == len(operations) + 1, stats
                assert stats["Aggregated"]["failures"] == 0, results["master_log_tail"]
                assert all(row["count"] > 0 for row in stats.values()), stats
            else:
                measured = results["operations"]
                assert len(measured) == len(operations)
                assert all(op["count"] > 0 and op["errors"] == 0
                           for op in measured.values()), (node, measured)
    finally:
        down = run_cli("down", *topo, cwd=tmp_path)
    assert down.returncode == 0, down.stderr


# -- the embedded PACS's own TLS settings, on a node of its own with a short --timeout -------


@pytest.fixture(scope="module")
def strict_embedded(tmp_path_factory):
    """An embedded PACS taking TLS 1.3 only, client certificates optional, --timeout 2;
    and certificates from its CA and from a CA it does not trust."""
    root = tmp_path_factory.mktemp("strict")
    trusted = CertificateAuthority.create(root / "ca", "strict CA")
    stranger = CertificateAuthority.create(root / "other", "other CA")
    own = trusted.issue("node", "STRICT")
    finalizers: list = []
    node = start_node(
        "STRICT", root / "storage", finalizers.append, extra_args=(
            "--timeout", "2", "--tls-certificate", str(own.certificate_file),
            "--tls-key", str(own.key_file), "--tls-ca", str(own.ca_file),
            "--tls-min-version", "1.3", "--tls-client-certificate", "optional"),
    )
    yield node, trusted.issue("harness", "PACSHARNESS"), stranger.issue("intruder", "INTRUDER")
    for stop in finalizers:
        stop()


def _echo(port: int, context: ssl.SSLContext) -> bool:
    """C-ECHO over TLS with pynetdicom (not the harness's client)."""
    ae = AE(ae_title="PACSHARNESS")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="STRICT", tls_args=(context, "127.0.0.1"))
    if not assoc.is_established:
        return False
    try:
        return int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()


def _context(ca_file, material=None, version=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    if material is not None:
        context.load_cert_chain(str(material.certificate_file), str(material.key_file))
    if version is not None:
        context.maximum_version = version
    return context


def test_embedded_tls_settings_are_honoured(strict_embedded):
    """--tls-min-version 1.3 refuses a TLS 1.2 client; --tls-client-certificate optional
    takes a client without a certificate but not one with a certificate of another CA."""
    node, harness, intruder = strict_embedded
    assert _echo(node.port, _context(harness.ca_file, harness))
    assert _echo(node.port, _context(harness.ca_file))  # no client certificate: optional
    assert not _echo(node.port, _context(harness.ca_file, intruder))
    assert not _echo(node.port, _context(harness.ca_file, harness, ssl.TLSVersion.TLSv1_2))
    log = "".join(node.log)
    assert "TLS handshake failed" in log


def test_embedded_drops_a_dripping_tls_handshake(strict_embedded):
    """A client sending its ClientHello one byte at a time is cut off by the ARTIM deadline
    (--timeout 2), not served forever; the node still answers afterwards."""
    node, harness, _ = strict_embedded
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    hello_maker = _context(harness.ca_file).wrap_bio(incoming, outgoing,
                                                     server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        hello_maker.do_handshake()
    hello = outgoing.read()
    closed = False
    with socket.create_connection(("127.0.0.1", node.port), timeout=60) as dripper:
        for byte in hello:
            try:
                dripper.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            readable, _, _ = select.select([dripper], [], [], 0.5)
            if readable:
                try:
                    closed = dripper.recv(1) == b""
                except OSError:
                    closed = True
                break
    assert closed, "the server kept a dripping handshake open"
    assert _echo(node.port, _context(harness.ca_file, harness))


def test_orthanc_moves_to_a_site_pacs_signed_by_another_ca(tmp_path):
    """A site PACS (external, its own CA: tls.ca) next to a launched TLS Orthanc: Orthanc
    trusts that CA too (trusted-ca.pem) and its C-MOVE reaches the site over TLS."""
    site_ca = CertificateAuthority.create(tmp_path / "site-ca", "site CA")
    site_cert = site_ca.issue("site", "SITEPACS")
    finalizers: list = []
    site = start_node(
        "SITEPACS", tmp_path / "site", finalizers.append, extra_args=(
            "--tls-certificate", str(site_cert.certificate_file),
            "--tls-key", str(site_cert.key_file), "--tls-ca", str(site_cert.ca_file),
            "--tls-client-certificate", "none"),
    )
    topology = parse_topology(
        "name: mixed\nnodes:\n"
        "  central: {kind: orthanc, ae_title: MIXCENTRAL, tls: {generate: true}}\n"
        f"  site: {{kind: external, ae_title: SITEPACS, host: 127.0.0.1, "
        f"dicom_port: {site.port}, tls: {{ca: {site_cert.ca_file}}}}}\n"
    )
    launched = Cluster.launch(topology, root=tmp_path / "run")
    try:
        central = launched.node("central")
        study = sample_study(seed=1540)
        assert central.dimse().store(study).ok
        moved = central.dimse().move("SITEPACS", "STUDY",
                                     {"StudyInstanceUID": study[0].StudyInstanceUID})
        assert moved.ok and moved.completed == 1, moved
        findscu = subprocess.run(
            ["/usr/bin/findscu", "+tla", "+cf", str(site_cert.ca_file), "-S",
             "-aet", "PACSHARNESS", "-aec", "SITEPACS", "-k", "QueryRetrieveLevel=STUDY",
             "-k", f"StudyInstanceUID={study[0].StudyInstanceUID}", "127.0.0.1", str(site.port)],
            capture_output=True, text=True, timeout=120,
        )
        assert findscu.returncode == 0, findscu.stderr
        assert study[0].StudyInstanceUID in findscu.stderr
    finally:
        launched.stop()
        for stop in finalizers:
            stop()
