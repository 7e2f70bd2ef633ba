"""REST and DICOMweb over HTTPS (`https: true`, RFC 9110 4.2.2) on real Orthancs.

Three launched Orthancs: `web` declares only `https: true` (its certificate comes from the
run's CA all the same), `both` also DICOM TLS, `misnamed` a certificate without its host.
Checked from outside the harness: curl (with the run's CA, without it, and plain http://)
and `openssl s_client` for what the port takes; what the harness stores over STOW-RS is
listed by curl. `both` described as an external node works with the run's CA and, with a
CA from another run, every HTTP client refuses it: a rest check names the failure and the
CLI exits 3 with one line.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pydicom
import pytest

from harness.config import parse_topology
from harness.errors import ConfigError, EnvironmentProblem
from harness.fixtures import pacs_cluster_factory
from harness.launch.tools import find_binary
from harness.migration.discovery import StudyContent
from harness.migration.methods import check_method, send_study
from harness.nodes.external import ExternalNode
from harness.security.certificates import CertificateAuthority
from harness.security.rest_auth import rest_checks
from synthetic_data.samples import sample_study
from synthetic_data.templates import encode_part10
from tests.helpers import external_node, login_env, processes_mentioning, run_cli

CURL = "/usr/bin/curl"
QIDO_WORKLOAD = """name: qido-only
duration_s: 5
warmup_s: 0
max_operations: 200
dataset: {studies: 1, instances_per_study: 1, scale: tiny}
groups:
  - {name: qido, operation: qido-rs, users: 1}
"""
OPENSSL = "/usr/bin/openssl"

cluster = pacs_cluster_factory(
    "name: https\nnodes:\n"
    "  web: {kind: orthanc, ae_title: HTTPSWEB, https: true}\n"
    "  both: {kind: orthanc, ae_title: HTTPSBOTH, https: true, tls: {generate: true}}\n"
    "  misnamed: {kind: orthanc, ae_title: HTTPSMISNAMED, https: true, tls: {generate: true, "
    "certificate_names: [pacs.example.org]}}\n",
    scope="module",
    requires=("Orthanc",),
)


def _curl(url: str, *options: str, login: tuple[str, str] | None = None
          ) -> subprocess.CompletedProcess:
    """curl's exit code and body; the login goes through a config on stdin, not argv."""
    config = f'user = "{login[0]}:{login[1]}"\n' if login else ""
    return subprocess.run([CURL, "-s", "-S", "-m", "20", "-K", "-", *options, url],
                          input=config, capture_output=True, text=True, timeout=60)


def _handshake(port: int, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", *options],
                          input="", capture_output=True, text=True, timeout=60)


def test_curl_gets_the_rest_api_over_https_only(cluster):
    node = cluster.node("web")
    assert node.http_url == f"https://127.0.0.1:{node.http_port}"
    ca = str(node.tls_material.ca_file)
    url = f"{node.http_url}/system"
    answered = _curl(url, "--cacert", ca, login=node.generated_credentials)
    assert answered.returncode == 0, answered.stderr
    assert json.loads(answered.stdout)["Version"] == "1.10.1"
    # the system's CA store does not know the run's CA (curl exit 60: certificate problem)
    assert _curl(url, login=node.generated_credentials).returncode == 60
    # plain HTTP on the same port: no HTTP answer at all (curl 52: empty reply, 56: reset)
    plain = _curl(f"http://127.0.0.1:{node.http_port}/system", "-o", "/dev/null",
                  "-w", "%{http_code}", login=node.generated_credentials)
    assert plain.returncode in (52, 56), plain
    assert plain.stdout == "000"


def test_the_port_takes_tls_1_2_with_bcp195_suites_and_tls_1_3(cluster):
    node = cluster.node("web")
    ca = str(node.tls_material.ca_file)
    for version in ("-tls1", "-tls1_1"):  # the client opened to them: the server refuses
        assert _handshake(node.http_port, version, "-cipher", "DEFAULT:@SECLEVEL=0"
                          ).returncode != 0, version
    for suite in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384"):
        done = _handshake(node.http_port, "-tls1_2", "-cipher", suite, "-CAfile", ca)
        assert done.returncode == 0 and f"Cipher is {suite}" in done.stdout, done.stdout
        assert "Verify return code: 0 (ok)" in done.stdout
    for suite in ("ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES128-SHA",
                  "ECDHE-ECDSA-CHACHA20-POLY1305"):  # not in the BCP 195 list it is given
        assert _handshake(node.http_port, "-tls1_2", "-cipher", suite).returncode != 0, suite
    assert "TLSv1.3" in _handshake(node.http_port, "-tls1_3", "-CAfile", ca).stdout


def test_stow_and_wado_go_through_https(cluster):
    node = cluster.node("web")
    study = sample_study(seed=151, instances=2)
    study_uid = str(study[0].StudyInstanceUID)
    web = node.dicomweb()
    assert web.root_url.startswith("https://")
    stored = web.store([encode_part10(ds) for ds in study])
    assert not stored.get("00081198", {}).get("Value"), stored  # no FailedSOPSequence items
    # the RetrieveURL Orthanc builds (PS3.18 10.5.3) is the https:// one clients use
    assert all(item["00081190"]["Value"][0].startswith(f"{node.http_url}/dicom-web/studies/")
               for item in stored["00081199"]["Value"]), stored
    listed = _curl(f"{node.http_url}/dicom-web/studies?StudyInstanceUID={study_uid}",
                   "--cacert", str(node.tls_material.ca_file), login=node.generated_credentials)
    assert listed.returncode == 0, listed.stderr
    assert [s["0020000D"]["Value"][0] for s in json.loads(listed.stdout)] == [study_uid]
    back = [pydicom.dcmread(io.BytesIO(part)) for part in web.retrieve_study(study_uid)]
    assert sorted(ds.SOPInstanceUID for ds in back) == sorted(ds.SOPInstanceUID for ds in study)
    assert node.statistics().instances >= 2  # Orthanc REST over HTTPS


def test_rest_checks_pass_with_both_https_checks(cluster):
    node = cluster.node("web")
    checks = rest_checks(node)
    outcomes = {c.name: c.outcome for c in checks}
    assert set(outcomes.values()) == {"pass"}, [c.line() for c in checks]
    assert {"plain HTTP", "HTTPS certificate verifies", "plain HTTP refused"} <= set(outcomes)
    assert node.generated_credentials[1] not in json.dumps([c.as_dict() for c in checks])


def _external(cluster, tmp_path: Path, ca_file: str) -> tuple[Path, dict[str, str]]:
    """`both` described as a site's node: its TLS files named in the topology, `ca_file` as
    tls.ca (the run's CA, or another), and https: true; the CLI's environment."""
    node = cluster.node("both")
    harness = node.harness_tls_material
    extra = (f", https: true, tls: {{ca: {ca_file}, certificate: {harness.certificate_file}, "
             f"key: {harness.key_file}}}")
    topology = tmp_path / "site.yaml"
    topology.write_text("name: site\nnodes:\n" + external_node(node, "HTTPS_TEST", extra))
    return topology, login_env(cluster, "HTTPS_TEST", tmp_path / "state")


def test_the_cli_crawls_an_external_https_node(cluster, tmp_path):
    node = cluster.node("both")
    study = sample_study(seed=152, instances=2)
    assert node.dimse().store(study).ok
    topology, env = _external(cluster, tmp_path, str(node.tls_material.ca_file))
    proc = run_cli("inventory", "--topology", str(topology), "--node", "both", "--json",
                   "--ledger", str(tmp_path / "inv.sqlite"), env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = _curl(f"{node.http_url}/statistics", "--cacert", str(node.tls_material.ca_file),
                   login=node.generated_credentials)
    crawled = json.loads(proc.stdout)
    assert crawled["via"] == "dicomweb"
    assert crawled["studies_total"] == json.loads(listed.stdout)["CountStudies"]


@pytest.mark.parametrize("method", ["dicomweb", "orthanc"])
def test_migration_methods_go_through_https(cluster, method):
    """WADO-RS from `both` and STOW-RS into `web`, or Orthanc's REST store job on `both`:
    the study arrives on `web` (listed by curl)."""
    source, target = cluster.node("both"), cluster.node("web")
    study = sample_study(seed={"dicomweb": 153, "orthanc": 154}[method], instances=2)
    assert source.dimse().store(study).ok
    uid = str(study[0].StudyInstanceUID)
    check_method(method, source, target)
    assert send_study(method, source, target, uid, StudyContent()) == 2
    listed = _curl(f"{target.http_url}/dicom-web/studies/{uid}/instances", "--cacert",
                   str(target.tls_material.ca_file), login=target.generated_credentials)
    assert listed.returncode == 0, listed.stderr
    assert sorted(i["00080018"]["Value"][0] for i in json.loads(listed.stdout)) == sorted(
        ds.SOPInstanceUID for ds in study)


def test_locust_workers_query_over_https(cluster, tmp_path):
    """`load --locust`: the workers (other processes) get the CA to verify with."""
    topology, env = _external(cluster, tmp_path, str(cluster.node("both").tls_material.ca_file))
    workload = tmp_path / "qido.yaml"
    workload.write_text(QIDO_WORKLOAD)
    proc = run_cli("load", "--topology", str(topology), "--node", "both", "--workload",
                   str(workload), "--locust", "--json", env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    qido = json.loads(proc.stdout)["stats"]["qido: qido-rs"]
    # a worker checking the certificate against the system's store would fail every query
    assert qido["count"] > 0 and qido["failures"] == 0, qido


def test_a_ca_from_another_run_is_refused_by_name(cluster, tmp_path, monkeypatch):
    other = CertificateAuthority.create(tmp_path / "other", "another run's CA")
    topology, env = _external(cluster, tmp_path, str(other.ca_file))
    spec = parse_topology(topology.read_text(), str(topology)).node("both")
    for variable in ("HTTPS_TEST_BOTH_USER", "HTTPS_TEST_BOTH_PASSWORD"):
        monkeypatch.setenv(variable, env[variable])
    checks = {c.name: c for c in rest_checks(ExternalNode(spec))}
    verified = checks["HTTPS certificate verifies"]
    assert verified.outcome == "fail", verified.line()
    assert "certificate verify failed" in verified.observed and "tls.ca" in verified.remedy
    assert checks["plain HTTP refused"].outcome == "pass"
    proc = run_cli("inventory", "--topology", str(topology), "--node", "both",
                   "--ledger", str(tmp_path / "inv.sqlite"), env=env, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output
    assert "Traceback" not in output
    lines = [line for line in proc.stderr.splitlines() if "certificate verify failed" in line]
    assert len(lines) == 1 and "node both" in lines[0], proc.stderr


def test_a_certificate_without_the_host_name_is_a_finding(cluster):
    """Launched all the same (the server answers TLS), but every HTTP client refuses it and
    the rest check names the mismatch; openssl agrees the name is not in the certificate."""
    node = cluster.node("misnamed")
    assert "certificate verify failed" in node.tls_warning
    checks = {c.name: c for c in rest_checks(node)}
    verified = checks["HTTPS certificate verifies"]
    assert verified.outcome == "fail" and "mismatch" in verified.observed, verified.line()
    with pytest.raises(EnvironmentProblem, match="node misnamed: HTTPS certificate verify "
                       "failed"):
        node.rest().system()
    done = _handshake(node.http_port, "-CAfile", str(node.tls_material.ca_file),
                      "-verify_ip", "127.0.0.1")
    assert "Verify return code: 64" in done.stdout  # X509_V_ERR_IP_ADDRESS_MISMATCH


def test_tls_server_name_is_the_name_https_checks(cluster, tmp_path, monkeypatch):
    """The same server described as a site's node with `tls.server_name` set to the name
    its certificate carries: every HTTP client accepts it (openssl agrees)."""
    node = cluster.node("misnamed")
    harness = node.harness_tls_material
    extra = (f", https: true, tls: {{ca: {node.tls_material.ca_file}, server_name: "
             f"pacs.example.org, certificate: {harness.certificate_file}, "
             f"key: {harness.key_file}}}")
    topology = parse_topology("name: site\nnodes:\n" + external_node(node, "HTTPS_NAME", extra),
                              "<test>")
    for variable, value in zip(("HTTPS_NAME_MISNAMED_USER", "HTTPS_NAME_MISNAMED_PASSWORD"),
                               node.generated_credentials, strict=True):
        monkeypatch.setenv(variable, value)
    site = ExternalNode(topology.node("misnamed"))
    assert site.rest().system()["Version"] == "1.10.1"
    assert site.dicomweb().search_studies() == []
    checks = rest_checks(site)
    assert {c.outcome for c in checks} == {"pass"}, [c.line() for c in checks]
    done = _handshake(node.http_port, "-CAfile", str(node.tls_material.ca_file),
                      "-verify_hostname", "pacs.example.org", "-servername", "pacs.example.org")
    assert "Verify return code: 0 (ok)" in done.stdout


def test_up_keeps_https_for_later_commands_and_down_stops_the_terminator(tmp_path):
    """A detached cluster (`up`): `inventory` in another process finds the node's CA in the
    saved state; `down` leaves no HAProxy nor Orthanc behind."""
    if not find_binary("Orthanc"):
        pytest.skip("Orthanc not installed")
    topology = tmp_path / "up.yaml"
    topology.write_text("name: upweb\nnodes:\n  web: {kind: orthanc, ae_title: UPWEB, "
                        "https: true}\n")
    env = {**os.environ, "PACS_HARNESS_STATE_DIR": str(tmp_path / "state")}
    started = run_cli("up", "--topology", str(topology), env=env, timeout=300)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        (row,) = json.loads(run_cli("status", "--topology", str(topology), "--json",
                                    env=env).stdout)
        assert row["https"] and row["alive"]
        crawled = run_cli("inventory", "--topology", str(topology), "--node", "web", "--json",
                          "--ledger", str(tmp_path / "inv.sqlite"), env=env)
        assert crawled.returncode == 0, crawled.stdout + crawled.stderr
        assert json.loads(crawled.stdout)["via"] == "dicomweb"
        terminator_config = next(line.split("-f ", 1)[1].strip()
                                 for line in processes_mentioning("haproxy") if "upweb" in line)
        workdir = str(Path(terminator_config).parent)
        assert any("Orthanc" in line for line in processes_mentioning(workdir))
    finally:
        stopped = run_cli("down", "--topology", str(topology), env=env, timeout=300)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert processes_mentioning(workdir) == []


@pytest.mark.parametrize(("node", "wanted"), [
    ("{kind: dcmqrscp, https: true}", "dcmqrscp nodes cannot be launched with https"),
    ("{kind: external, host: 10.0.0.5, dicom_port: 104, https: true}", "declared http_port"),
    ("{kind: orthanc, https: true, https_ca: ca.pem}", "https_ca is for an external node"),
    ("{kind: external, host: 127.0.0.1, dicom_port: 104, http_port: 8042, https_ca: ca.pem}",
     "https_ca is for an external node declared https: true"),
])
def test_https_where_no_https_can_be_served_is_refused(node, wanted):
    with pytest.raises(ConfigError) as refused:
        parse_topology(f"name: x\nnodes:\n  n: {node}\n", "t.yaml")
    message = str(refused.value)
    assert "\n" not in message and "https" in message and wanted in message, message


def test_a_site_with_plain_dicom_names_its_https_ca(cluster, tmp_path):
    """The common case at a site: DICOM in the clear on its network, the web API behind a
    private CA. `https_ca` is that CA; the DICOM side stays plain (no tls: declared)."""
    node = cluster.node("web")
    study = sample_study(seed=153, instances=1)
    assert node.dimse().store(study).ok
    ca_file = str(node.tls_material.ca_file)
    topology = tmp_path / "site.yaml"
    topology.write_text("name: site\nnodes:\n" + external_node(
        node, "HTTPS_CA", f", https: true, https_ca: {ca_file}"))
    env = login_env(cluster, "HTTPS_CA", tmp_path / "state")
    spec = parse_topology(topology.read_text()).nodes["web"]
    assert spec.tls is None and spec.https_ca == ca_file
    proc = run_cli("inventory", "--topology", str(topology), "--node", "web", "--json",
                   "--ledger", str(tmp_path / "inv.sqlite"), env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = _curl(f"{node.http_url}/statistics", "--cacert", ca_file,
                   login=node.generated_credentials)
    assert json.loads(proc.stdout)["studies_total"] == json.loads(listed.stdout)["CountStudies"]
