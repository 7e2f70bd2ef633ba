"""The AE-title access-control matrix (harness/security/access_control.py) on real servers.

The harness's launched kinds are strict (every check passes); an Orthanc configured the way a
permissive site PACS is (DicomAlwaysAllow* on, no called-AE check) gets exactly the matching
findings. What each check says the node accepts or refuses is verified with DCMTK's echoscu
and findscu (their exit codes), and a stored intruder instance with Orthanc's REST API.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from harness.config import parse_topology
from harness.fixtures import pacs_cluster_factory
from harness.launch.ports import free_port, release_port
from harness.nodes.external import ExternalNode
from harness.security.access_control import (
    CHECK_NAMES,
    INTRUDER_SEED,
    UNKNOWN_CALLING_AE,
    WRONG_CALLED_AE,
    access_checks,
)
from synthetic_data.samples import sample_study
from tests.helpers import external_node

ECHOSCU = "/usr/bin/echoscu"
FINDSCU = "/usr/bin/findscu"
SERVICES = ("C-ECHO", "C-FIND", "C-STORE", "C-MOVE")
NAMES = {
    *(f"unknown calling AE: {s}" for s in SERVICES),
    "wrong called AE",
    "C-MOVE to unknown destination",
}
assert set(CHECK_NAMES) == NAMES
PERMISSIVE = (
    "{DicomAlwaysAllowEcho: true, DicomAlwaysAllowFind: true, DicomAlwaysAllowStore: true, "
    "DicomCheckCalledAet: false}"
)

cluster = pacs_cluster_factory(
    "name: access\nnodes:\n"
    "  orthanc: {kind: orthanc, ae_title: STRICT1}\n"
    "  archive: {kind: dcmqrscp, ae_title: ARCHIVE1}\n"
    "  pocket: {kind: embedded, ae_title: POCKET1}\n"
    f"  loose: {{kind: orthanc, ae_title: LOOSE1, orthanc_config: {PERMISSIVE}}}\n",
    scope="module",
    requires=("Orthanc", "dcmqrscp"),
)


@pytest.fixture(scope="module")
def nodes(cluster):
    """Every node holds one study (the C-MOVE to nowhere then moves an existing one)."""
    for node in cluster.nodes.values():
        assert node.dimse().store(sample_study(seed=61)).ok
    return cluster


def _dcmtk(program: str, node, calling_ae: str, called_ae: str, *extra: str):
    return subprocess.run(
        [program, "-aet", calling_ae, "-aec", called_ae, "-to", "10", "-ta", "10", "-td", "10",
         *extra, node.host, str(node.dicom_port)],
        capture_output=True, text=True, timeout=120,
    )


def _echoscu(node, calling_ae: str, called_ae: str | None = None):
    return _dcmtk(ECHOSCU, node, calling_ae, called_ae or node.ae_title)


def _findscu(node, calling_ae: str):
    return _dcmtk(FINDSCU, node, calling_ae, node.ae_title, "-S",
                  "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID")


def _by_name(checks) -> dict:
    assert {c.name for c in checks} == NAMES
    assert all(c.area == "access" and c.reference.startswith("PS3.") for c in checks)
    return {c.name: c for c in checks}


@pytest.mark.parametrize("name", ["orthanc", "archive", "pocket"])
def test_launched_nodes_refuse_every_stranger(nodes, name):
    node = nodes.node(name)
    checks = _by_name(access_checks(node))
    assert [c.line() for c in checks.values() if c.outcome != "pass"] == []
    # an A-ASSOCIATE-RJ, or (the socket closed right behind it, under load) an abort
    refused = re.compile(r"association (rejected|aborted)")
    for service in SERVICES:
        assert refused.search(checks[f"unknown calling AE: {service}"].observed)
    assert refused.search(checks["wrong called AE"].observed)
    # DCMTK agrees: the stranger and the wrong called AE are refused, the harness is not
    assert _echoscu(node, UNKNOWN_CALLING_AE).returncode != 0
    assert _findscu(node, UNKNOWN_CALLING_AE).returncode != 0
    assert _echoscu(node, "PACSHARNESS", WRONG_CALLED_AE).returncode != 0
    assert _echoscu(node, "PACSHARNESS").returncode == 0


@pytest.mark.parametrize("name", ["archive", "pocket"])
def test_move_to_an_unknown_destination_answers_a801(nodes, name):
    """PS3.4 C.4.2.1.4.1; Orthanc answers 0xC000 instead (a refusal, noted in observed)."""
    check = _by_name(access_checks(nodes.node(name)))["C-MOVE to unknown destination"]
    assert check.outcome == "pass"
    assert "existing study" in check.observed and "status 0xA801" in check.observed


def test_orthanc_refuses_a_move_to_nowhere_with_another_status(nodes):
    check = _by_name(access_checks(nodes.node("orthanc")))["C-MOVE to unknown destination"]
    assert check.outcome == "pass" and "not with 0xA801" in check.observed


def test_a_permissive_orthanc_gets_one_finding_per_open_door(nodes):
    node = nodes.node("loose")
    checks = _by_name(access_checks(node))
    failed = {name for name, c in checks.items() if c.outcome == "fail"}
    assert failed == {"unknown calling AE: C-ECHO", "unknown calling AE: C-FIND",
                      "unknown calling AE: C-STORE", "wrong called AE"}
    for name in failed:
        assert "DicomAlwaysAllow" in checks[name].remedy or "DicomCheckCalledAet" in (
            checks[name].remedy)
    # DicomAlwaysAllowMove stays false: the association is accepted, the C-MOVE is not
    move = checks["unknown calling AE: C-MOVE"]
    assert move.outcome == "pass" and "request refused" in move.observed
    assert "C-MOVE to PACSHARNESS" in move.observed  # never to a third party
    # DCMTK sees the same open doors
    assert _echoscu(node, UNKNOWN_CALLING_AE).returncode == 0
    found = _findscu(node, UNKNOWN_CALLING_AE)
    assert found.returncode == 0 and "Find Response" in found.stdout + found.stderr
    assert _echoscu(node, "PACSHARNESS", WRONG_CALLED_AE).returncode == 0
    # the intruder's synthetic instance is in Orthanc, as its REST API counts and finds it
    stored = re.search(r"synthetic instance ([0-9.]+) answered status 0x0000",
                       checks["unknown calling AE: C-STORE"].observed)
    assert stored, checks["unknown calling AE: C-STORE"].observed
    assert [m["Type"] for m in node.rest().lookup(stored.group(1))] == ["Instance"]


def test_no_store_into_a_node_not_writable(nodes):
    """Permissions (docs/safety.md): the same permissive Orthanc described as a site's
    external node, not writable: the C-STORE door is reported but never tried."""
    launched = nodes.node("loose")
    topology = parse_topology("name: site\nnodes:\n" + external_node(launched, "ACCESS"),
                              "<test>")
    site = ExternalNode(topology.node("loose"))
    assert not site.writable
    intruder_instance = sample_study(seed=INTRUDER_SEED)[0].SOPInstanceUID
    for match in launched.rest().lookup(intruder_instance):
        launched.rest().delete(match["Path"])
    check = _by_name(access_checks(site))["unknown calling AE: C-STORE"]
    assert check.outcome == "fail"
    assert "association established" in check.observed
    assert "not attempted: node not writable" in check.observed
    assert launched.rest().lookup(intruder_instance) == []


def test_a_node_that_answers_nobody_passes_nothing():
    """The control: nothing listens on the port, so no refusal can be credited."""
    port = free_port()
    try:
        topology = parse_topology(
            "name: gone\nnodes:\n"
            f"  gone: {{kind: external, ae_title: GONE, host: 127.0.0.1, dicom_port: {port}}}\n",
            "<test>")
        checks = access_checks(ExternalNode(topology.node("gone")))
    finally:
        release_port(port)
    assert [c.name for c in checks] == list(CHECK_NAMES)
    assert {c.outcome for c in checks} == {"skip"}
    assert "the harness's own C-ECHO" in checks[0].observed
