"""A node's `tls:` and `audit:` fields, and the certificates a run makes for them.

A mistake in either field is one line naming the file, line and field (exit 2); the
certificates the cluster issues are checked with OpenSSL's own verifier, not with the code
that made them.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from harness.cluster import Cluster
from harness.config import parse_topology
from harness.errors import ConfigError
from harness.security.certificates import CertificateAuthority

OPENSSL = "/usr/bin/openssl"
EXTERNAL = "kind: external, host: 127.0.0.1, dicom_port: 104"


def _error(node: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_topology(f"name: x\nnodes:\n  a: {{{node}}}\n", "t.yaml")
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        (f"{EXTERNAL}, tls: {{generate: true}}", "t.yaml:3: nodes.a.tls: an external node has "
         "its own certificates"),
        (f"{EXTERNAL}, tls: {{certificate: c.pem}}", "nodes.a.tls.key: certificate and key go "
         "together"),
        (f"{EXTERNAL}, tls: {{key: k.pem, ca: ca.pem}}", "nodes.a.tls.certificate: certificate "
         "and key go together"),
        (f"{EXTERNAL}, tls: {{certificate: c.pem, key: k.pem}}", "nodes.a.tls: an external "
         "node needs tls.ca"),
        (f"{EXTERNAL}, tls: {{ca: c.pem, min_version: '1.5'}}", "nodes.a.tls.min_version: "
         "unknown TLS version '1.5' (allowed: 1.0, 1.1, 1.2, 1.3)"),
        (f"{EXTERNAL}, tls: {{ca: c.pem, cipher: x}}", "nodes.a.tls.cipher: unknown field"),
        (f"{EXTERNAL}, tls: {{ca: c.pem, client_certificate: maybe}}",
         "nodes.a.tls.client_certificate: unknown client_certificate 'maybe' (allowed: "
         "required, optional, none)"),
        (f"{EXTERNAL}, audit: true", "nodes.a.audit: an external node needs audit.port"),
        (f"{EXTERNAL}, audit: {{port: 70000}}", "nodes.a.audit.port: invalid port 70000"),
        (f"{EXTERNAL}, audit: {{port: 6514, transport: tcp}}", "nodes.a.audit.transport: "
         "unknown transport 'tcp' (allowed: udp, tls)"),
        ("kind: embedded, tls: {ca: c.pem}", "nodes.a.tls: a launched node takes tls: "
         "{generate: true}"),
    ],
)
def test_a_mistake_is_one_line_naming_the_field(node: str, expected: str) -> None:
    assert expected in _error(node)


def test_an_external_node_keeps_the_sites_files() -> None:
    topology = parse_topology(
        f"name: x\nnodes:\n  site: {{{EXTERNAL}, tls: {{ca: /etc/ca.pem, certificate: h.pem, "
        "key: h.key, server_name: pacs.example}, audit: {port: 6514}}\n"
    )
    spec = topology.nodes["site"]
    assert (spec.tls.ca_file, spec.tls.certificate_file, spec.tls.key_file) == (
        "/etc/ca.pem", "h.pem", "h.key"
    )
    assert spec.tls.server_name == "pacs.example"
    assert (spec.audit.transport, spec.audit.port) == ("udp", 6514)


def _verify(ca: Path, cert: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [OPENSSL, "verify", "-CAfile", str(ca), str(cert)], capture_output=True, text=True
    )


def test_issued_certificates_verify_with_openssl_and_keys_are_private(tmp_path: Path) -> None:
    authority = CertificateAuthority.create(tmp_path / "ca")
    material = authority.issue("node", "NODE", names=("127.0.0.1", "pacs.test"))
    assert _verify(material.ca_file, material.certificate_file).returncode == 0
    for key in (material.key_file, tmp_path / "ca" / "ca.key"):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    text = subprocess.run(
        [OPENSSL, "x509", "-in", str(material.certificate_file), "-noout", "-ext",
         "subjectAltName"], capture_output=True, text=True, check=True,
    ).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:pacs.test" in text
    stranger = CertificateAuthority.create(tmp_path / "other")
    assert _verify(stranger.ca_file, material.certificate_file).returncode != 0


def test_a_back_dated_certificate_is_expired_for_openssl(tmp_path: Path) -> None:
    authority = CertificateAuthority.create(tmp_path / "ca", valid_days=400)
    old = authority.issue("old", "OLD", valid_days=10, not_before_days=-30)
    result = _verify(old.ca_file, old.certificate_file)
    assert result.returncode != 0 and "expired" in (result.stdout + result.stderr)


def test_the_cluster_issues_a_certificate_per_tls_node_and_keeps_paths_in_state(
    tmp_path: Path,
) -> None:
    """Without starting servers: the certificates and the state a detached cluster saves."""
    from harness.nodes import make_node

    topology = parse_topology(
        "name: t\nnodes:\n  a: {kind: embedded, dicom_port: 11112}\n"
        "  b: {kind: embedded, dicom_port: 11113}\n"
    )
    from dataclasses import replace

    from harness.config.security import TLSSpec

    specs = {name: spec for name, spec in topology.nodes.items()}
    specs["a"] = replace(specs["a"], tls=TLSSpec(generate=True, certificate_names=("a.test",)))
    nodes = {name: make_node(spec, tmp_path / name) for name, spec in specs.items()}
    cluster = Cluster(replace(topology, nodes=specs), nodes, root=tmp_path, harness_port=11114,
                      owned=True, state_dir=tmp_path / "state")
    cluster.issue_certificates()
    a, b = nodes["a"], nodes["b"]
    assert b.tls_material is None and b.tls_client() is None
    assert _verify(a.tls_material.ca_file, a.tls_material.certificate_file).returncode == 0
    assert _verify(a.tls_material.ca_file, a.harness_tls_material.certificate_file).returncode == 0
    client = a.tls_client()
    assert client.server_hostname == "127.0.0.1" and client.cert_file.endswith("harness.pem")
    cluster.save_state()
    saved = json.loads((tmp_path / "state" / "state.json").read_text())
    assert "BEGIN" not in json.dumps(saved), "key material in state.json"
    again = Cluster.from_state(replace(topology, nodes=specs), tmp_path / "state")
    assert again.nodes["a"].tls_material == a.tls_material
    assert again.nodes["a"].harness_tls_material == a.harness_tls_material


def test_audit_over_tls_needs_the_nodes_certificate() -> None:
    assert "nodes.a.audit: audit over TLS sends with the node's own certificate" in _error(
        "kind: embedded, audit: {transport: tls}"
    )
    spec = parse_topology(
        "name: x\nnodes:\n  a: {kind: embedded, tls: {generate: true}, "
        "audit: {transport: tls}}\n"
    ).nodes["a"]
    assert spec.audit.transport == "tls" and spec.tls.generate
