"""Launched nodes accept only the topology's peers: what a hospital's security officer checks
before letting the harness near the PACS network.

Listening addresses are read from the kernel (`ss -ltnp`), refusals from DCMTK's echoscu and a
pynetdicom association (PS3.8 9.3.4 A-ASSOCIATE-RJ), HTTP from a plain `requests` call.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from harness.cluster import Cluster
from harness.config import load_topology
from harness.dicom.peer import HARNESS_AE_TITLE
from harness.fixtures import pacs_cluster_factory
from harness.launch.state import state_dir_for
from harness.launch.tools import find_binary
from synthetic_data.samples import sample_study
from tests.helpers import run_cli

ECHOSCU = "/usr/bin/echoscu"
INTRUDER = "INTRUDER"

#: kinds whose server cannot bind to 127.0.0.1 (no such option in the installed version; see
#: the docstrings of harness/nodes/orthanc.py and harness/nodes/dcmqrscp.py): they listen on
#: every address, and only their peer checks keep other hosts out
LISTENS_ON_ALL_ADDRESSES = {"orthanc", "dcmqrscp"}

pytestmark = pytest.mark.skipif(
    not (find_binary("Orthanc") and find_binary("dcmqrscp") and shutil.which("ss")),
    reason="needs Orthanc, dcmqrscp and ss (apt-get install orthanc dcmtk iproute2)",
)


cluster = pacs_cluster_factory(
    "name: exposure\nnodes:\n"
    "  orthanc: {kind: orthanc, ae_title: ORTHANC1, disposable: true}\n"
    "  archive: {kind: dcmqrscp, ae_title: ARCHIVE1, disposable: true}\n"
    "  pocket: {kind: embedded, ae_title: POCKET1, disposable: true}\n",
    scope="module",
)


def listening(pid: int) -> dict[int, set[str]]:
    """Local TCP port -> addresses process `pid` listens on, from the kernel's socket table."""
    out = subprocess.run(
        ["ss", "-ltnpH"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    found: dict[int, set[str]] = {}
    for line in out.splitlines():
        if f"pid={pid}," not in line:
            continue
        local = line.split()[3]  # State Recv-Q Send-Q Local:Port Peer:Port Process
        address, port = local.rsplit(":", 1)
        found.setdefault(int(port), set()).add(address.strip("[]"))
    return found


@pytest.mark.parametrize("name", ["orthanc", "archive", "pocket"])
def test_listening_addresses(cluster, name):
    node = cluster.node(name)
    # the embedded PACS's HL7 listener (MLLP, issue 17) is on 127.0.0.1 too
    ports = {node.dicom_port, *(p for p in (node.http_port, getattr(node, "hl7_port", None))
                                if p)}
    sockets = listening(node.handle.pid)
    assert set(sockets) == ports, f"{name} listens on ports {sorted(sockets)}, not {ports}"
    addresses = set().union(*sockets.values())
    if node.kind in LISTENS_ON_ALL_ADDRESSES:
        # the documented exception: no bind option in Orthanc 1.10.1 / DCMTK 3.6.7
        assert addresses <= {"0.0.0.0", "*", "::"}, addresses
    else:
        assert addresses == {"127.0.0.1"}


def _echoscu(node, calling_ae: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            ECHOSCU,
            "-aet",
            calling_ae,
            "-aec",
            node.ae_title,
            "-to",
            "10",
            "-ta",
            "10",
            node.host,
            str(node.dicom_port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _associate(node, calling_ae: str, bind_address: tuple[str, int] | None = None):
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = 10
    for context in (Verification, StudyRootQueryRetrieveInformationModelFind, CTImageStorage):
        ae.add_requested_context(context, ExplicitVRLittleEndian)
    kwargs = {"bind_address": bind_address} if bind_address else {}
    return ae.associate(node.host, node.dicom_port, ae_title=node.ae_title, **kwargs)


@pytest.mark.parametrize("name", ["orthanc", "archive"])
def test_unknown_calling_ae_title_is_refused(cluster, name):
    node = cluster.node(name)
    # DCMTK's own tool as the independent means: the known AE title is answered...
    assert _echoscu(node, HARNESS_AE_TITLE).returncode == 0
    # ...an unknown one is rejected at association time (PS3.8 9.3.4)
    refused = _echoscu(node, INTRUDER)
    assert refused.returncode != 0
    assert "Association Rejected" in refused.stdout + refused.stderr

    # nothing to echo, find or store over: the association offering all three is rejected
    assoc = _associate(node, INTRUDER)  # rejected, or (dcmqrscp under load) dropped
    assert not assoc.is_established, "an unknown calling AE title was accepted"
    # the harness's AE title gets all three (the positive control)
    assoc = _associate(node, HARNESS_AE_TITLE)
    try:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        study = sample_study(seed=41)
        assert assoc.send_c_store(study[0]).Status == 0
    finally:
        assoc.release()
    # C-FIND through the harness's own client (pynetdicom 3.0.4 can drop a C-FIND response
    # that follows another message on one association under load: README, known limits)
    found = node.dimse().find("STUDY", {"StudyInstanceUID": study[0].StudyInstanceUID})
    assert found.ok and len(found.matches) == 1, found


@pytest.mark.parametrize("name", ["orthanc", "archive"])
def test_known_ae_title_from_another_host_is_refused(cluster, name):
    """A peer is its AE title *and* its address: the harness's title from 127.0.0.2 (another
    loopback address, standing in for another host) is refused."""
    node = cluster.node(name)
    assoc = _associate(node, HARNESS_AE_TITLE, bind_address=("127.0.0.2", 0))
    accepted = assoc.is_established  # rejected, or (dcmqrscp under load) dropped
    if accepted:
        assoc.release()
    assert not accepted, "the harness's AE title was accepted from another host"


def test_orthanc_refuses_a_wrong_called_ae_title(cluster):
    node = cluster.node("orthanc")
    refused = subprocess.run(
        [
            ECHOSCU,
            "-aet",
            HARNESS_AE_TITLE,
            "-aec",
            "NOT_ORTHANC",
            "-to",
            "10",
            node.host,
            str(node.dicom_port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0


def test_orthanc_http_requires_the_generated_login(cluster):
    node = cluster.node("orthanc")
    for path in ("/system", "/patients", "/dicom-web/studies"):
        assert requests.get(node.http_url + path, timeout=10).status_code == 401, path
    assert (
        requests.get(
            node.http_url + "/system", auth=("pacs-harness", "guess"), timeout=10
        ).status_code
        == 401
    )
    user, password = node.generated_credentials
    assert len(password) >= 32
    assert (
        requests.get(node.http_url + "/system", auth=(user, password), timeout=10).status_code
        == 200
    )
    # the configuration holding the password is readable by its owner only
    assert (node.workdir / "orthanc.json").stat().st_mode & 0o077 == 0
    assert password not in node.log_path.read_text()


def test_each_launch_generates_its_own_password(cluster, pacs_launch):
    other = pacs_launch("name: again\nnodes:\n  o: {kind: orthanc, ae_title: AGAIN}\n")
    assert (
        other.node("o").generated_credentials[1]
        != (cluster.node("orthanc").generated_credentials[1])
    )


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_cli(*args, env=env, timeout=300)


def test_harness_commands_use_the_login_and_never_show_it(tmp_path, monkeypatch):
    """`up`, then status/store/inventory/migrate (orthanc and dicomweb) as a user runs them,
    in other processes that find the login in the saved state; it appears in no output."""
    env = {**os.environ, "PACS_HARNESS_STATE_DIR": str(tmp_path / "state")}
    monkeypatch.setenv("PACS_HARNESS_STATE_DIR", env["PACS_HARNESS_STATE_DIR"])
    topo = tmp_path / "two.yaml"
    topo.write_text(
        "name: two\nnodes:\n"
        "  src: {kind: orthanc, ae_title: SRC, disposable: true}\n"
        "  dst: {kind: orthanc, ae_title: DST, disposable: true}\n"
    )
    outputs = []
    up = _run("up", "--topology", str(topo), env=env)
    outputs.append(up)
    assert up.returncode == 0, up.stderr
    try:
        topology = load_topology(topo)
        state_file = state_dir_for(topology) / "state.json"
        assert state_file.stat().st_mode & 0o077 == 0
        saved = Cluster.from_state(topology, state_dir_for(topology))
        passwords = [saved.node(n).generated_credentials[1] for n in ("src", "dst")]

        status = _run("status", "--json", "--topology", str(topo), env=env)
        outputs.append(status)
        assert status.returncode == 0, status.stderr
        assert {row["name"]: row["alive"] for row in json.loads(status.stdout)} == {
            "src": True,
            "dst": True,
        }

        files = tmp_path / "files"
        files.mkdir()
        for index, ds in enumerate(sample_study(seed=42, instances=2)):
            ds.save_as(files / f"{index}.dcm", enforce_file_format=True)
        store = _run("store", "--topology", str(topo), "--to", "src", str(files), env=env)
        outputs.append(store)
        assert store.returncode == 0, store.stdout + store.stderr

        inventory = _run(
            "inventory",
            "--topology",
            str(topo),
            "--node",
            "src",
            "--json",
            "--ledger",
            str(tmp_path / "inv.sqlite"),
            env=env,
        )
        outputs.append(inventory)
        assert inventory.returncode == 0, inventory.stdout + inventory.stderr

        for method in ("orthanc", "dicomweb"):
            dst = saved.node("dst")
            dst.wipe()
            migrate = _run(
                "migrate",
                "--topology",
                str(topo),
                "--from",
                "src",
                "--to",
                "dst",
                "--method",
                method,
                "--no-monitor",
                "--json",
                "--state",
                str(tmp_path / f"{method}.sqlite"),
                env=env,
            )
            outputs.append(migrate)
            assert migrate.returncode == 0, migrate.stdout + migrate.stderr
            # counted by Orthanc itself, over its REST API
            assert int(dst.rest().statistics()["CountInstances"]) == 2, method
    finally:
        down = _run("down", "--topology", str(topo), env=env)
        outputs.append(down)
    assert down.returncode == 0, down.stderr
    shown = "".join(p.stdout + p.stderr for p in outputs)
    for password in passwords:
        assert password not in shown
    written = [p for p in Path(tmp_path).rglob("*") if p.is_file() and p.suffix != ".dcm"]
    for path in written:
        if re.search(r"\.(sqlite|json|log|txt|html)$", path.name):
            data = path.read_bytes()
            assert not any(pw.encode() in data for pw in passwords), path
