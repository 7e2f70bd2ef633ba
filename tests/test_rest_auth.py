"""REST/DICOMweb authentication checks (harness/security/rest_auth.py) on real Orthancs.

A launched Orthanc passes every check; one launched with authentication switched off gets
the anonymous findings; a site's Orthanc still holding the well-known default login next to
its own (started here from a hand-written configuration, the way a site runs it) gets
"default credentials accepted". Each verdict is compared with what curl gets from Orthanc.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time

import pytest

from harness.config import parse_topology
from harness.fixtures import pacs_cluster_factory
from harness.launch.ports import free_port, release_port
from harness.launch.process import spawn
from harness.launch.tools import find_binary
from harness.nodes.external import ExternalNode
from harness.nodes.orthanc import DEBIAN_PLUGIN_DIR, DICOMWEB_PLUGIN
from harness.security.rest_auth import rest_checks

CURL = "/usr/bin/curl"
SERVICES = ("Orthanc REST GET /system", "DICOMweb GET /studies")
WHAT = ("anonymous request", "default login orthanc/orthanc", "wrong password",
        "configured login")

cluster = pacs_cluster_factory(
    "name: restauth\nnodes:\n"
    "  orthanc: {kind: orthanc, ae_title: RESTOK}\n"
    "  open: {kind: orthanc, ae_title: RESTOPEN, orthanc_config: {AuthenticationEnabled: "
    "false}}\n"
    "  pocket: {kind: embedded, ae_title: RESTNONE}\n",
    scope="module",
    requires=("Orthanc",),
)


def _curl(url: str, login: tuple[str, str] | None = None) -> int:
    """The HTTP status curl gets (the login goes through a config on stdin, not argv)."""
    config = f'user = "{login[0]}:{login[1]}"\n' if login else ""
    out = subprocess.run([CURL, "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "20",
                          "-K", "-", url], input=config, capture_output=True, text=True,
                         timeout=60)
    return int(out.stdout)


def _outcomes(checks) -> dict[str, str]:
    assert all(c.area == "rest" for c in checks)
    return {c.name: c.outcome for c in checks}


def _expected(outcome: dict[str, str], transport: tuple[str, str]) -> dict[str, str]:
    rows = {f"{s}: {w}": outcome.get(w, "pass") for s in SERVICES for w in WHAT}
    return {**rows, transport[0]: transport[1]}


def _no_secret(checks, *secrets_: str) -> None:
    text = json.dumps([c.as_dict() for c in checks])
    for secret in secrets_:
        assert secret not in text


def test_a_launched_orthanc_passes(cluster):
    node = cluster.node("orthanc")
    checks = rest_checks(node)
    assert _outcomes(checks) == _expected({}, ("plain HTTP", "pass")), [c.line() for c in checks]
    _no_secret(checks, node.generated_credentials[1])
    # curl agrees
    assert _curl(node.http_url + "/system") == 401
    assert _curl(node.http_url + "/system", ("orthanc", "orthanc")) == 401
    assert _curl(node.http_url + "/system", node.generated_credentials) == 200


def test_authentication_switched_off_is_found(cluster):
    node = cluster.node("open")
    checks = rest_checks(node)
    failed = {"anonymous request": "fail", "default login orthanc/orthanc": "fail",
              "wrong password": "fail"}
    assert _outcomes(checks) == _expected(failed, ("plain HTTP", "pass"))
    anonymous = next(c for c in checks if c.name == "Orthanc REST GET /system: anonymous request")
    assert "AuthenticationEnabled" in anonymous.remedy and "HTTP 200" in anonymous.observed
    assert _curl(node.http_url + "/system") == 200
    assert _curl(node.http_url + "/dicom-web/studies") == 200


def test_a_node_without_http_is_one_skip(cluster):
    checks = rest_checks(cluster.node("pocket"))
    assert [(c.name, c.outcome) for c in checks] == [("REST/DICOMweb authentication", "skip")]


@pytest.fixture()
def site_orthanc(tmp_path, monkeypatch):
    """An Orthanc run the way a site left it: its admin login and Orthanc's default pair,
    described to the harness as an external node whose login comes from the environment."""
    if not find_binary("Orthanc"):
        pytest.skip("Orthanc not installed (apt-get install orthanc orthanc-dicomweb)")
    http_port, dicom_port = free_port(), free_port()
    admin = ("siteadmin", secrets.token_urlsafe(24))
    config = {
        "Name": "site", "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "SITEREST",
        "StorageDirectory": str(tmp_path / "storage"), "IndexDirectory": str(tmp_path / "index"),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
        "RegisteredUsers": {"orthanc": "orthanc", admin[0]: admin[1]},
        "Plugins": [f"{DEBIAN_PLUGIN_DIR}/{DICOMWEB_PLUGIN}"],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    (tmp_path / "orthanc.json").chmod(0o600)
    popen, handle = spawn([find_binary("Orthanc"), str(tmp_path / "orthanc.json")],
                          log_path=tmp_path / "orthanc.log", cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while _curl(f"http://127.0.0.1:{http_port}/system", admin) != 200:
            assert handle.alive(), (tmp_path / "orthanc.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the site Orthanc did not answer in 120 s"
            time.sleep(0.2)
        monkeypatch.setenv("SITE_REST_USER", admin[0])
        monkeypatch.setenv("SITE_REST_PASSWORD", admin[1])
        topology = parse_topology(
            "name: site\nnodes:\n"
            f"  site: {{kind: external, ae_title: SITEREST, host: 127.0.0.1, "
            f"dicom_port: {dicom_port}, "
            f"http_port: {http_port}, orthanc_rest: true, dicomweb_root: /dicom-web, "
            "credentials: {username_env: SITE_REST_USER, password_env: SITE_REST_PASSWORD}}\n",
            "<test>")
        yield ExternalNode(topology.node("site")), admin
    finally:
        handle.stop()
        popen.wait(timeout=30)
        release_port(http_port)
        release_port(dicom_port)


def test_default_credentials_are_flagged(site_orthanc):
    node, admin = site_orthanc
    checks = rest_checks(node)
    # an external node on loopback: the harness cannot tell where its HTTP goes next
    assert _outcomes(checks) == _expected({"default login orthanc/orthanc": "fail"},
                                          ("plain HTTP", "fail"))
    flagged = [c for c in checks if c.failed and "default" in c.name]
    assert len(flagged) == 2
    assert all(c.observed.startswith("default credentials accepted") for c in flagged)
    plain = next(c for c in checks if c.name == "plain HTTP")
    assert "serve it over HTTPS and declare https: true" in plain.remedy
    _no_secret(checks, admin[1])
    assert _curl(node.http_url + "/system", ("orthanc", "orthanc")) == 200
    assert _curl(node.http_url + "/system", (admin[0], "not-" + admin[1])) == 401
