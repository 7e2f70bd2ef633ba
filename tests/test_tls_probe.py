"""The TLS checks against real, independent DICOM TLS servers: DCMTK's storescp.

A properly configured storescp (+tls, +cf CA, --require-peer-cert) passes every check; each
misconfiguration (client certificates optional or ignored, wrong certificate name, a
certificate about to expire, no TLS at all) fails the check that names it and no other.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from harness.config import parse_topology
from harness.dicom.peer import TLSConfig
from harness.launch.ports import free_port, port_in_use, release_port
from harness.launch.process import log_tail, spawn
from harness.nodes import make_node
from harness.report.gate import evaluate_gate
from harness.security import tls_probe
from harness.security.certificates import CertificateAuthority, TLSMaterial
from harness.security.tls_probe import probe_tls, tls_checks
from tests.helpers import CHILD_PYTEST

REPOSITORY = Path(__file__).resolve().parent.parent

STORESCP = "/usr/bin/storescp"
ORTHANC = "/usr/sbin/Orthanc"
AE = "TLSSCP"
ALL_CHECKS = {
    tls_probe.PLAINTEXT, tls_probe.NO_CERTIFICATE, tls_probe.UNTRUSTED, "TLS 1.0 refused",
    "TLS 1.1 refused", tls_probe.PROFILE, tls_probe.VALID_NOW, tls_probe.EXPIRY,
    tls_probe.NAME, tls_probe.CHAIN,
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, object]:
    """A site CA: a good server certificate, one naming another host, one expiring in
    5 days, and the harness's client certificate."""
    ca = CertificateAuthority.create(tmp_path_factory.mktemp("pki"), valid_days=400)
    return {
        "ca": ca,
        "server": ca.issue("server", "pacs", valid_days=365),
        "wrong_name": ca.issue("wrong-name", "other", ("pacs.example.org",), valid_days=365),
        "expiring": ca.issue("expiring", "pacs", valid_days=5),
        "client": ca.issue("harness", "pacs-harness"),
    }


@pytest.fixture
def storescp(tmp_path):
    """start(*options) -> port: storescp listening with those options; stopped at teardown."""
    started = []

    def start(*options: str) -> int:
        port = free_port()
        log = tmp_path / f"storescp-{port}.log"
        proc, handle = spawn([STORESCP, *options, "-aet", AE, "-od", str(tmp_path), str(port)],
                             log_path=log, cwd=tmp_path)
        started.append((handle, port))
        deadline = time.monotonic() + 60
        while not port_in_use("127.0.0.1", port):
            assert proc.poll() is None, f"storescp exited: {log_tail(log)}"
            assert time.monotonic() < deadline, f"storescp not listening: {log_tail(log)}"
            time.sleep(0.05)
        return port

    yield start
    for handle, port in started:
        handle.stop()
        release_port(port)


def rsa_server(ca: CertificateAuthority, directory: Path) -> TLSMaterial:
    """An RSA server certificate from the site CA: DCMTK's BCP 195 and AES profiles offer
    only RSA suites (TLS_ECDHE_RSA_*, TLS_RSA_WITH_AES_*) below TLS 1.3."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa-pacs")]))
        .issuer_name(ca.certificate.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca.key, hashes.SHA256()))
    cert_file, key_file = directory / "rsa.pem", directory / "rsa.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return TLSMaterial(cert_file, key_file, ca.ca_file)


def tls_server(material, *policy: str) -> list[str]:
    return ["+tls", str(material.key_file), str(material.certificate_file),
            "+cf", str(material.ca_file), *policy]


def client_of(pki) -> TLSConfig:
    client = pki["client"]
    return TLSConfig(str(client.ca_file), str(client.certificate_file), str(client.key_file),
                     "127.0.0.1")


def probe(port: int, pki, warning_days: int = 30) -> dict[str, object]:
    checks = probe_tls("127.0.0.1", port, AE, client_of(pki), "127.0.0.1", warning_days,
                       node="site")
    assert {c.name for c in checks} == ALL_CHECKS
    assert all(c.node == "site" and c.area == "tls" and c.reference for c in checks)
    return {c.name: c for c in checks}


def failed(checks: dict[str, object]) -> set[str]:
    return {name for name, c in checks.items() if c.outcome == "fail"}


def test_properly_configured_server_passes_every_check(storescp, pki):
    port = storescp(*tls_server(pki["server"], "--require-peer-cert"))
    checks = probe(port, pki)
    assert {name: c.outcome for name, c in checks.items()} == dict.fromkeys(ALL_CHECKS, "pass")
    assert checks[tls_probe.PROFILE].observed.startswith(("TLSv1.3", "TLSv1.2"))
    assert "A-ASSOCIATE-AC" in checks[tls_probe.PROFILE].observed
    assert "127.0.0.1" in checks[tls_probe.NAME].observed


@pytest.mark.parametrize("policy, expected", [
    ("--verify-peer-cert", {tls_probe.NO_CERTIFICATE}),
    # not even asked for a certificate, the server takes an untrusted one as well
    ("--ignore-peer-cert", {tls_probe.NO_CERTIFICATE, tls_probe.UNTRUSTED}),
])
def test_client_certificate_not_required_is_found(storescp, pki, policy, expected):
    checks = probe(storescp(*tls_server(pki["server"], policy)), pki)
    assert failed(checks) == expected
    finding = checks[tls_probe.NO_CERTIFICATE]
    assert "A-ASSOCIATE-AC" in finding.observed and "require" in finding.remedy
    assert "both sides authenticate" in finding.reference


@pytest.mark.parametrize("server_policy, declared, untrusted", [
    ("--verify-peer-cert", "optional", "pass"), ("--ignore-peer-cert", "none", "skip")])
def test_declared_client_certificate_policy_decides_what_applies(storescp, pki, server_policy,
                                                                 declared, untrusted):
    """A launched node reproducing a site's `client_certificate: optional | none`: accepting
    a client without a certificate is what was declared (skip, with what was seen); an
    optional policy still must refuse an untrusted certificate."""
    port = storescp(*tls_server(pki["server"], server_policy))
    checks = {c.name: c for c in probe_tls("127.0.0.1", port, AE, client_of(pki), None, 30,
                                           client_certificate=declared)}
    no_certificate = checks[tls_probe.NO_CERTIFICATE]
    assert no_certificate.outcome == "skip"
    assert no_certificate.observed.startswith("accepted: ")
    assert f"policy is '{declared}'" in no_certificate.observed
    assert checks[tls_probe.UNTRUSTED].outcome == untrusted
    assert not [c for c in checks.values() if c.outcome == "fail"]


def test_wrong_certificate_name_fails_the_name_check_alone(storescp, pki):
    checks = probe(storescp(*tls_server(pki["wrong_name"])), pki)
    assert failed(checks) == {tls_probe.NAME}
    assert checks[tls_probe.NAME].observed == "certificate names pacs.example.org, not 127.0.0.1"
    assert "subjectAltName" in checks[tls_probe.NAME].remedy


def test_certificate_expiring_soon_fails_the_expiry_check_alone(storescp, pki):
    port = storescp(*tls_server(pki["expiring"]))
    checks = probe(port, pki, warning_days=30)
    assert failed(checks) == {tls_probe.EXPIRY}
    assert checks[tls_probe.EXPIRY].observed.startswith("expires in 5 days")
    assert "renew" in checks[tls_probe.EXPIRY].remedy
    assert probe(port, pki, warning_days=3)[tls_probe.EXPIRY].outcome == "pass"


def test_old_protocol_versions_accepted_are_found(storescp, pki, tmp_path):
    """DCMTK's BCP 195 profile (+px) still negotiates TLS 1.0 and 1.1 with an RSA key."""
    checks = probe(storescp(*tls_server(rsa_server(pki["ca"], tmp_path)), "+px"), pki)
    assert failed(checks) == {"TLS 1.0 refused", "TLS 1.1 refused"}
    assert checks["TLS 1.0 refused"].observed.startswith("accepted a TLS 1.0 handshake")
    assert "minimum TLS version to 1.2" in checks["TLS 1.1 refused"].remedy
    assert "RFC 8996" in checks["TLS 1.0 refused"].reference


def test_only_retired_cipher_suites_fail_the_profile_check(storescp, pki, tmp_path):
    """DCMTK's retired AES profile (+pa): TLS_RSA_WITH_AES_128_CBC_SHA, no forward secrecy,
    no AEAD; the harness's client does not even offer it."""
    checks = probe(storescp(*tls_server(rsa_server(pki["ca"], tmp_path)), "+pa"), pki)
    profile = checks[tls_probe.PROFILE]
    assert profile.outcome == "fail"
    assert "AES128-SHA only: not a BCP 195 suite" in profile.observed
    assert "ECDHE" in profile.remedy


@pytest.mark.skipif(not Path(ORTHANC).exists(), reason=f"{ORTHANC} not installed")
def test_orthanc_dicom_tls_has_no_minimum_version(pki, tmp_path):
    """Orthanc 1.10.1's DICOM TLS has no minimum-version option: with an RSA certificate it
    completes TLS 1.0 and 1.1 handshakes (docs/security.md, limits); the rest passes."""
    server = rsa_server(pki["ca"], tmp_path)
    dicom_port, http_port = free_port(), free_port()
    config = tmp_path / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "tls-probe", "StorageDirectory": str(tmp_path / "db"),
        "IndexDirectory": str(tmp_path / "db"), "DicomAet": AE, "DicomPort": dicom_port,
        "HttpPort": http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "Plugins": [], "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(server.certificate_file),
        "DicomTlsPrivateKey": str(server.key_file),
        "DicomTlsTrustedCertificates": str(server.ca_file),
        "DicomTlsRemoteCertificateRequired": True}))
    log = tmp_path / "orthanc.log"
    proc, handle = spawn([ORTHANC, str(config)], log_path=log, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not port_in_use("127.0.0.1", dicom_port):
            assert proc.poll() is None, f"Orthanc exited: {log_tail(log)}"
            assert time.monotonic() < deadline, f"Orthanc not listening: {log_tail(log)}"
            time.sleep(0.1)
        checks = probe(dicom_port, pki)
    finally:
        handle.stop()
        release_port(dicom_port)
        release_port(http_port)
    assert failed(checks) == {"TLS 1.0 refused", "TLS 1.1 refused"}


def test_server_without_tls_fails_plaintext_and_says_why_the_rest_could_not_run(storescp, pki):
    checks = probe(storescp(), pki)
    assert failed(checks) == {tls_probe.PLAINTEXT, tls_probe.PROFILE}
    assert "accepted" in checks[tls_probe.PLAINTEXT].observed
    assert "no TLS 1.2 or newer handshake" in checks[tls_probe.PROFILE].observed
    for name in ALL_CHECKS - failed(checks):
        assert checks[name].outcome == "skip"
        assert checks[name].observed.startswith("could not run: no TLS handshake completes")


def test_silent_server_ends_by_the_deadline(pki):
    """A port that takes connections and never answers: each attempt meets its deadline."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        checks = probe_tls("127.0.0.1", port, AE, client_of(pki), "127.0.0.1", 30,
                           node="site", timeout_s=1.0)
    by_name = {c.name: c for c in checks}
    assert by_name[tls_probe.PROFILE].outcome == "fail"
    assert "no answer before the deadline" in by_name[tls_probe.PROFILE].observed


def test_unreachable_port_is_one_finding(pki):
    port = free_port()
    try:
        checks = probe_tls("127.0.0.1", port, AE, client_of(pki), "127.0.0.1", 30)
    finally:
        release_port(port)
    assert [(c.name, c.outcome) for c in checks] == [("TLS port reachable", "fail")]
    assert "cannot connect" in checks[0].observed


def site_node(port: int | None, tls: str = ""):
    """An external node as a site declares its PACS in the topology."""
    text = (f"name: site\nnodes:\n  pacs: {{kind: external, ae_title: {AE}, host: 127.0.0.1, "
            f"dicom_port: {port or 104}{tls}}}\n")
    return make_node(parse_topology(text).nodes["pacs"], None)


def test_external_node_declared_with_site_files(storescp, pki):
    port = storescp(*tls_server(pki["server"], "--require-peer-cert"))
    client: object = pki["client"]
    node = site_node(port, f", tls: {{ca: {client.ca_file}, certificate: "
                           f"{client.certificate_file}, key: {client.key_file}}}")
    checks = tls_checks(node)
    assert [c.outcome for c in checks] == ["pass"] * len(ALL_CHECKS)
    assert {c.node for c in checks} == {"pacs"}


def test_external_node_without_the_harness_certificate_cannot_hide_behind_refusals(
        storescp, pki):
    """Declared without a client certificate for a server that requires one: no TLS
    association works, and that is a finding, not a pass by refusals."""
    port = storescp(*tls_server(pki["server"], "--require-peer-cert"))
    node = site_node(port, f", tls: {{ca: {Path(pki['client'].ca_file)}}}")
    checks = {c.name: c for c in tls_checks(node)}
    assert checks[tls_probe.PROFILE].outcome == "fail"
    assert "refuses the harness's client" in checks[tls_probe.PROFILE].observed
    assert "tls.certificate" in checks[tls_probe.PROFILE].remedy
    for name in (tls_probe.NO_CERTIFICATE, tls_probe.UNTRUSTED):
        assert checks[name].outcome == "skip"
        assert "the harness's own client gets no DICOM answer either" in checks[name].observed


def test_node_without_tls_is_one_skip():
    checks = tls_checks(site_node(None))
    assert [(c.name, c.outcome, c.observed) for c in checks] == [
        ("TLS", "skip", "no TLS declared")]


@pytest.mark.parametrize("policy, outcome", [("--require-peer-cert", "passed"),
                                             ("--verify-peer-cert", "failed")])
def test_security_scenario_gates_the_infrastructure_phase(storescp, pki, tmp_path, policy,
                                                          outcome):
    """scenarios/test_security.py::test_tls on a site's TLS PACS, as `pacs-harness run`
    starts it: the checks land in report.json; a failed one fails the test and the gate."""
    port = storescp(*tls_server(pki["server"], policy))
    client = pki["client"]
    topology = tmp_path / "site.yaml"
    topology.write_text(
        f"name: site\nnodes:\n  pacs: {{kind: external, ae_title: {AE}, host: 127.0.0.1, "
        f"dicom_port: {port}, tls: {{ca: {client.ca_file}, certificate: "
        f"{client.certificate_file}, key: {client.key_file}}}}}\n")
    report_json = tmp_path / "run" / "report.json"
    scenarios = REPOSITORY / "scenarios"
    subprocess.run([*CHILD_PYTEST, str(scenarios / "test_security.py"), "-k", "test_tls",
                    "-c", str(scenarios / "pytest.ini"), "--rootdir", str(REPOSITORY),
                    "--pacs-topology", str(topology), "--pacs-report-json", str(report_json)],
                   cwd=REPOSITORY, capture_output=True, timeout=600)
    report = json.loads(report_json.read_text())
    [scenario] = report["scenarios"]
    assert (scenario["name"], scenario["phase"]) == ("security", "infrastructure")
    assert [t["outcome"] for t in scenario["tests"]] == [outcome]
    rows = {c["name"]: c for c in scenario["metrics"]["security.tls.pacs"]}
    assert rows.keys() == ALL_CHECKS
    gate = evaluate_gate(report, "infrastructure")
    if outcome == "passed":
        assert gate.ready and {c["outcome"] for c in rows.values()} == {"pass"}
    else:
        assert not gate.ready
        assert rows[tls_probe.NO_CERTIFICATE]["outcome"] == "fail"
        assert "client without certificate refused" in scenario["tests"][0]["message"]
