"""Permissions per node: a site's own PACS is read-only to the harness unless declared.

A real Orthanc is launched, filled with a few studies, then described in a second topology
as `kind: external` (not disposable), the way a hospital's PACS is. Every command that would
store synthetic data into it must exit 2 with one line naming the node and the permission,
and the node's content, counted by Orthanc's own REST API (GET /statistics), must not move.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from pydicom import dcmwrite

from harness.cluster import Cluster
from harness.config import parse_topology
from harness.errors import ConfigError, NotDisposableError
from harness.fixtures import pacs_cluster_factory
from harness.nodes import make_node
from synthetic_data.samples import sample_study
from tests.helpers import external_node, external_topology, login_env, run_cli

STORING_WORKLOAD = """name: storing
duration_s: 1
warmup_s: 0
max_operations: 5
dataset: {studies: 1, instances_per_study: 1, scale: tiny}
groups:
  - {name: store, operation: c-store, users: 1}
"""
QIDO_WORKLOAD = """name: qido-only
duration_s: 1
warmup_s: 0
max_operations: 5
dataset: {studies: 1, instances_per_study: 1, scale: tiny}
groups:
  - {name: qido, operation: qido-rs, users: 1}
"""
ECHO_CONTRACT = """name: echo-only
workloads:
  ping:
    duration_s: 1
    warmup_s: 0
    max_operations: 5
    dataset: {studies: 2, instances_per_study: 5, scale: tiny}
    groups:
      - {name: echo, operation: c-echo, users: 1}
clauses:
  - {id: echo-p95, metric: latency, percentile: 95, operation: echo, threshold: "<= 30 s",
     workload: ping}
"""
# an echo clause first: the storing workload is refused before the echo one runs
STORING_CONTRACT = ECHO_CONTRACT.replace("name: echo-only", "name: storing").replace(
    "clauses:\n",
    "  ingest:\n    duration_s: 1\n    warmup_s: 0\n    max_operations: 5\n"
    "    groups:\n      - {name: store, operation: c-store, users: 1}\n"
    "clauses:\n",
) + ('  - {id: store-rate, metric: throughput, operation: store, '
     'threshold: ">= 0.1 instances/s", workload: ingest}\n')


launched = pacs_cluster_factory(
    "name: perm\nnodes:\n"
    "  site: {kind: orthanc, ae_title: SITEPACS}\n"
    "  scratch: {kind: orthanc, ae_title: SCRATCH}\n",
    scope="module",
    requires=("Orthanc",),
)


@pytest.fixture(scope="module")
def cluster(launched):
    # the "hospital" holds studies of its own before any test runs
    assert launched.node("site").dimse().store(sample_study(seed=7, instances=3)).ok
    assert launched.node("scratch").dimse().store(sample_study(seed=8, instances=2)).ok
    return launched


def _external(node, extra: str = "") -> str:
    """The node as a site would describe it, its login named by environment variables."""
    return external_node(node, "PERM_TEST", extra)


def _topology(cluster, tmp_path: Path, site_extra: str = "", settings: str = "") -> Path:
    """The launched nodes as a site would describe them: `site` external (read-only unless
    site_extra says otherwise), `scratch` external and disposable."""
    return external_topology(
        tmp_path / "site.yaml", "site", cluster.nodes.values(), "PERM_TEST",
        {"site": site_extra, "scratch": ", disposable: true"}, settings,
    )


def _held(node) -> dict:
    """Orthanc's own count (REST GET /statistics), independent of the harness's clients."""
    answer = requests.get(f"http://{node.host}:{node.http_port}/statistics",
                          auth=node.generated_credentials, timeout=10)
    answer.raise_for_status()
    stats = answer.json()
    return {k: stats[k] for k in ("CountPatients", "CountStudies", "CountSeries",
                                  "CountInstances")}


def _env(tmp_path: Path, cluster: Cluster) -> dict[str, str]:
    return login_env(cluster, "PERM_TEST", tmp_path / "state")


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _commands(tmp_path: Path, topo: Path) -> dict[str, list[str]]:
    study = tmp_path / "study"
    study.mkdir()
    for number, ds in enumerate(sample_study(seed=99, instances=2)):
        dcmwrite(study / f"{number}.dcm", ds, enforce_file_format=True)
    return {
        "store": ["store", "--topology", str(topo), "--to", "site", str(study)],
        "load": ["load", "--topology", str(topo), "--node", "site",
                 "--workload", _write(tmp_path, "w.yaml", STORING_WORKLOAD)],
        "sla": ["sla", "--topology", str(topo), "--node", "site",
                "--contract", _write(tmp_path, "c.yaml", STORING_CONTRACT),
                "--evidence", str(tmp_path / "ev.json")],
        "migrate": ["migrate", "--topology", str(topo), "--from", "scratch", "--to", "site",
                    "--state", str(tmp_path / "m.sqlite"), "--no-monitor"],
        "run": ["run", "--topology", str(topo), "--scenario", "migration",
                "--report-dir", str(tmp_path / "report")],
    }


@pytest.mark.parametrize("command", ["store", "load", "sla", "migrate", "run"])
def test_every_writing_command_refuses_a_read_only_node(cluster, tmp_path, command):
    settings = "settings:\n  migration: {source: site, target: scratch}\n"
    topo = _topology(cluster, tmp_path, settings=settings)
    site, scratch = cluster.node("site"), cluster.node("scratch")
    before = _held(site), _held(scratch)
    proc = run_cli(*_commands(tmp_path, topo)[command], env=_env(tmp_path, cluster))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: node site: refusing to "), lines[0]
    assert "(needs write permission)" in lines[0], lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert (_held(site), _held(scratch)) == before
    if command == "sla":  # nothing ran, so no evidence was written either
        assert not (tmp_path / "ev.json").exists()


def test_every_scenario_leaves_read_only_nodes_unchanged(cluster, tmp_path):
    """`run` with every scenario on a topology of two read-only site archives: the scenarios
    that write skip them (or refuse), the assessment only reads, and neither archive holds
    anything new or loses anything afterwards."""
    path = tmp_path / "sites.yaml"
    path.write_text("name: sites\nnodes:\n" + _external(cluster.node("site"))
                    + _external(cluster.node("scratch")))
    site, scratch = cluster.node("site"), cluster.node("scratch")
    before = _held(site), _held(scratch)
    proc = run_cli("run", "--topology", str(path), "--report-dir", str(tmp_path / "report"),
                   env=_env(tmp_path, cluster), timeout=900)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    ran = {s["name"]: s["outcome"] for s in report["scenarios"]}
    assert ran.get("assessment") == "passed", ran  # reading a site's archive is allowed
    assert (_held(site), _held(scratch)) == before


def test_echo_only_sla_and_qido_only_load_store_nothing(cluster, tmp_path):
    topo = _topology(cluster, tmp_path)
    site = cluster.node("site")
    before = _held(site)
    sla = run_cli("sla", "--topology", str(topo), "--node", "site",
                  "--contract", _write(tmp_path, "c.yaml", ECHO_CONTRACT),
                  "--evidence", str(tmp_path / "ev.json"), env=_env(tmp_path, cluster))
    assert sla.returncode == 0, sla.stdout + sla.stderr
    evidence = json.loads((tmp_path / "ev.json").read_text())
    assert evidence["verdict"] == "pass"
    load = run_cli("load", "--topology", str(topo), "--node", "site", "--json",
                   "--workload", _write(tmp_path, "w.yaml", QIDO_WORKLOAD),
                   env=_env(tmp_path, cluster))
    assert load.returncode == 0, load.stdout + load.stderr
    results = json.loads(load.stdout)
    assert results["dataset_stored"] is False
    qido = results["operations"]["qido"]
    assert qido["count"] > 0 and qido["errors"] == 0, qido
    assert _held(site) == before


def test_writable_allows_store_but_not_wipe(cluster, tmp_path):
    topo = _topology(cluster, tmp_path, site_extra=", writable: true")
    site = cluster.node("site")
    before = _held(site)
    study = tmp_path / "one"
    study.mkdir()
    (instance,) = sample_study(seed=1234, instances=1)
    dcmwrite(study / "one.dcm", instance, enforce_file_format=True)
    stored = run_cli("store", "--topology", str(topo), "--to", "site", str(study),
                     env=_env(tmp_path, cluster))
    assert stored.returncode == 0, stored.stdout + stored.stderr
    after_store = _held(site)
    assert after_store["CountInstances"] == before["CountInstances"] + 1

    spec = parse_topology(topo.read_text(), str(topo)).node("site")
    assert spec.writable and not spec.disposable
    external = make_node(spec, None)
    with pytest.raises(NotDisposableError, match=r"node site: refusing to wipe it "
                                                 r"\(needs destroy permission\)"):
        external.wipe()
    assert _held(site) == after_store


def test_writable_is_parsed_and_checked():
    base = "name: w\nnodes:\n  s: {kind: external, host: 127.0.0.1, dicom_port: 104"
    assert not parse_topology(base + "}\n").node("s").may_write
    assert parse_topology(base + ", writable: true}\n").node("s").may_write
    assert parse_topology(base + ", disposable: true}\n").node("s").may_write
    assert parse_topology("name: l\nnodes:\n  o: {kind: orthanc}\n").node("o").may_write
    with pytest.raises(ConfigError, match=r"t.yaml:4: nodes.s.writable: invalid value"):
        parse_topology(base + ",\n      writable: yes please}\n", "t.yaml")
