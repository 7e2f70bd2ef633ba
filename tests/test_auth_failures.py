"""A wrong HTTP password is an environment error everywhere: exit 3, one line naming the node.

Two real Orthancs are launched (each with a login generated at launch), then described in a
second topology as `kind: external` whose credentials name environment variables holding a
WRONG password, the way a site's mistyped secret would look. Every command that talks HTTP
to them must stop at the first HTTP 401 (RFC 9110 15.5.2) with exit 3, one stderr line
naming the node and "authentication failed (HTTP 401)", no traceback, and never print the
secret it was given.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import requests

from harness.fixtures import pacs_cluster_factory
from synthetic_data.samples import sample_study
from tests.helpers import external_topology, login_env, run_cli

QIDO_WORKLOAD = """name: qido-only
duration_s: 30
warmup_s: 0
max_operations: 1000
dataset: {studies: 1, instances_per_study: 1, scale: tiny}
groups:
  - {name: qido, operation: qido-rs, users: 1}
"""
QIDO_CONTRACT = """name: qido-contract
workloads:
  search:
""" + "".join(f"    {line}\n" for line in QIDO_WORKLOAD.splitlines()[1:]) + """clauses:
  - {id: qido-p95, metric: latency, percentile: 95, operation: qido, threshold: "<= 30 s",
     workload: search}
"""
WRONG_PASSWORD = "wrong-" + secrets.token_hex(8)


launched = pacs_cluster_factory(
    "name: auth\nnodes:\n"
    "  site: {kind: orthanc, ae_title: SITEPACS}\n"
    "  newpacs: {kind: orthanc, ae_title: NEWPACS}\n",
    scope="module",
    requires=("Orthanc",),
)


@pytest.fixture(scope="module")
def cluster(launched):
    assert launched.node("site").dimse().store(sample_study(seed=21, instances=2)).ok
    return launched


@pytest.fixture()
def wrong_login(cluster, tmp_path) -> tuple[Path, dict[str, str]]:
    """The site topology and an environment with the right user names, wrong passwords."""
    topo = external_topology(
        tmp_path / "site.yaml", "site", cluster.nodes.values(), "AUTH_TEST",
        {name: ", writable: true, disposable: true" for name in cluster.nodes},
    )
    return topo, login_env(cluster, "AUTH_TEST", tmp_path / "state", password=WRONG_PASSWORD)


def test_the_wrong_password_is_refused_by_orthanc_itself(cluster):
    """Control, independent of the harness: Orthanc answers 401 to it and 200 to the real one."""
    node = cluster.node("site")
    url = f"http://{node.host}:{node.http_port}/system"
    user, password = node.generated_credentials
    assert requests.get(url, auth=(user, WRONG_PASSWORD), timeout=10).status_code == 401
    assert requests.get(url, auth=(user, password), timeout=10).status_code == 200


def _commands(tmp_path: Path, topo: Path) -> dict[str, tuple[str, list[str]]]:
    """Each command, with the node whose login it uses first."""
    workload = tmp_path / "qido.yaml"
    workload.write_text(QIDO_WORKLOAD)
    contract = tmp_path / "contract.yaml"
    contract.write_text(QIDO_CONTRACT)
    return {
        "inventory": ("site", ["inventory", "--topology", str(topo), "--node", "site",
                               "--ledger", str(tmp_path / "inv.sqlite")]),
        "verify": ("site", ["verify", "--topology", str(topo), "--source", "site",
                            "--target", "newpacs", "--out", str(tmp_path / "verify")]),
        "migrate-dicomweb": ("site", ["migrate", "--topology", str(topo), "--from", "site",
                                      "--to", "newpacs", "--method", "dicomweb", "--no-monitor",
                                      "--state", str(tmp_path / "m1.sqlite")]),
        "migrate-orthanc": ("site", ["migrate", "--topology", str(topo), "--from", "site",
                                     "--to", "newpacs", "--method", "orthanc", "--no-monitor",
                                     "--state", str(tmp_path / "m2.sqlite")]),
        "load": ("newpacs", ["load", "--topology", str(topo), "--node", "newpacs",
                             "--workload", str(workload)]),
        "load-locust": ("newpacs", ["load", "--topology", str(topo), "--node", "newpacs",
                                    "--workload", str(workload), "--locust"]),
        "sla": ("newpacs", ["sla", "--topology", str(topo), "--node", "newpacs",
                            "--contract", str(contract), "--evidence", str(tmp_path / "ev.json")]),
    }


@pytest.mark.parametrize(
    "command", ["inventory", "verify", "migrate-dicomweb", "migrate-orthanc", "load", "load-locust",
                "sla"]
)
def test_a_wrong_password_is_exit_3_naming_the_node(cluster, wrong_login, tmp_path, command):
    topo, env = wrong_login
    node_name, argv = _commands(tmp_path, topo)[command]
    proc = run_cli(*argv, env=env, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output
    assert "Traceback" not in output
    assert WRONG_PASSWORD not in output
    lines = [line for line in proc.stderr.splitlines() if "authentication failed" in line]
    assert len(lines) == 1, proc.stderr
    assert f"node {node_name}" in lines[0] and "authentication failed (HTTP 401)" in lines[0]


def test_run_with_a_wrong_password_is_exit_3(cluster, wrong_login, tmp_path):
    """A scenario refused by a node's login makes the whole run an environment error."""
    topo, env = wrong_login
    proc = run_cli("run", "--topology", str(topo), "--scenario", "connectivity",
                   "--report-dir", str(tmp_path / "report"), env=env, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3, output[-3000:]
    assert "authentication failed (HTTP 401)" in output
    assert WRONG_PASSWORD not in output
