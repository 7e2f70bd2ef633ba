"""Each launched kind against the real server: start, answer, store, find, get, count,
wipe, stop with nothing left behind. The external kind against a node started separately."""

from __future__ import annotations

import pytest

from harness.cluster import Cluster
from harness.config import load_topology, parse_topology
from harness.errors import NotDisposableError
from harness.launch.state import state_dir_for
from harness.launch.tools import find_binary
from harness.nodes import catalog
from synthetic_data.samples import sample_study
from tests.helpers import processes_mentioning, run_cli, status_json

#: every kind the harness runs as a local process (a new kind's module joins by itself)
PROCESS_KINDS = [k for k, cls in catalog.kinds().items() if "process" in cls.capabilities.launches]


def _require(kind: str) -> None:
    for program, hint in catalog.capabilities(kind).binaries:
        if not find_binary(program):
            pytest.skip(f"{program} not installed (install: {hint})")


@pytest.fixture(params=PROCESS_KINDS)
def single_node(request):
    kind = request.param
    _require(kind)
    topology = parse_topology(f"name: one\nnodes:\n  n1: {{kind: {kind}, ae_title: NODE1}}\n")
    cluster = Cluster.launch(topology)
    node = cluster.node("n1")
    yield node
    cluster.stop()
    # the janitor side of the contract: nothing of the node survives stop()
    assert not node.handle.alive()
    assert not node.workdir.exists()
    assert processes_mentioning(str(node.workdir)) == []


def test_node_lifecycle_against_real_server(single_node):
    node = single_node
    assert node.alive()
    assert node.dimse().echo().status.ok
    assert node.version() != "unknown"
    assert node.log_path.exists()

    study = sample_study(seed=11, instances=3)
    stored = node.dimse().store(study, associations=2)
    assert stored.ok, [r.error for r in stored.failed]
    assert len(stored.results) == 3

    stats = node.statistics()
    assert stats.as_dict() == {"patients": 1, "studies": 1, "series": 1, "instances": 3}

    for level, keys in [
        ("PATIENT", {"PatientID": study[0].PatientID}),
        ("STUDY", {"StudyInstanceUID": study[0].StudyInstanceUID}),
        ("SERIES", {"StudyInstanceUID": study[0].StudyInstanceUID, "SeriesInstanceUID": None}),
        (
            "IMAGE",
            {
                "StudyInstanceUID": study[0].StudyInstanceUID,
                "SeriesInstanceUID": study[0].SeriesInstanceUID,
                "SOPInstanceUID": None,
            },
        ),
    ]:
        model = "patient" if level == "PATIENT" else "study"
        found = node.dimse().find(level, keys, model=model)
        assert found.ok, f"{level}: {found.status}"
        expected = {"PATIENT": 1, "STUDY": 1, "SERIES": 1, "IMAGE": 3}[level]
        assert len(found.matches) == expected, level

    got = node.dimse().get("STUDY", {"StudyInstanceUID": study[0].StudyInstanceUID})
    assert got.ok and got.completed == 3
    assert {i.sop_instance_uid: i.dataset.PixelData for i in got.instances} == {
        ds.SOPInstanceUID: ds.PixelData for ds in study
    }

    node.wipe()
    assert node.statistics().instances == 0
    assert node.dimse().find("STUDY", {"StudyInstanceUID": None}).matches == []


def test_unknown_move_destination_is_a_failure_status(single_node):
    """PS3.4 C.4.2.1.5: 0xA801 (or another failure); CTN 3.2 answers 0xB000, a warning
    (docs/conformance.md): not a success either way, nothing sent."""
    study = sample_study(seed=12)
    assert single_node.dimse().store(study).ok
    moved = single_node.dimse().move(
        "NOSUCHAE", "STUDY", {"StudyInstanceUID": study[0].StudyInstanceUID}
    )
    assert not moved.ok and moved.completed == 0
    expected = "warning" if single_node.kind == "ctn" else "failure"
    assert moved.status.category == expected, moved.status


@pytest.fixture
def separately_started(tmp_path):
    """An Orthanc (or embedded PACS) started by `pacs-harness up` in another process."""
    kind = "orthanc" if find_binary("Orthanc") else "embedded"
    topo = tmp_path / "site.yaml"
    topo.write_text(f"name: site\nnodes:\n  site: {{kind: {kind}, ae_title: SITEPACS}}\n")
    proc = run_cli("up", "--topology", str(topo))
    assert proc.returncode == 0, proc.stderr
    (row,) = status_json("--topology", str(topo))
    # the HTTP login `up` generated, as its state file keeps it
    topology = load_topology(topo)
    saved = Cluster.from_state(topology, state_dir_for(topology))
    row["credentials"] = saved.node("site").generated_credentials
    yield row
    proc = run_cli("down", "--topology", str(topo))
    assert proc.returncode == 0, proc.stderr


def test_external_node_is_reached_not_started(separately_started, tmp_path, monkeypatch,
                                              pacs_launch):
    row = separately_started
    topology = parse_topology(
        "name: ext\nnodes:\n"
        f"  remote: {{kind: external, ae_title: SITEPACS, host: 127.0.0.1, "
        f"dicom_port: {row['dicom_port']}}}\n"
    )
    cluster = Cluster.launch(topology)
    remote = cluster.node("remote")
    assert remote.handle is None  # nothing launched
    assert remote.alive()
    study = sample_study(seed=13, instances=2)
    assert remote.dimse().store(study).ok
    # counted over DIMSE only (no REST declared)
    assert remote.statistics().instances == 2
    with pytest.raises(NotDisposableError, match="not declared 'disposable: true'"):
        remote.wipe()
    cluster.stop()
    assert remote.alive(), "stopping a cluster must never stop an external node"

    if row["kind"] == "orthanc":
        user, password = row["credentials"]
        monkeypatch.setenv("SITE_USER", user)
        monkeypatch.setenv("SITE_PASSWORD", password)
        declared = parse_topology(
            "name: ext2\nnodes:\n"
            f"  remote: {{kind: external, ae_title: SITEPACS, host: 127.0.0.1, "
            f"dicom_port: {row['dicom_port']}, http_port: {row['http_port']}, "
            "orthanc_rest: true, disposable: true, "
            "credentials: {username_env: SITE_USER, password_env: SITE_PASSWORD}}\n"
        )
        node = pacs_launch(declared).node("remote")
        node.wipe()
        assert node.statistics().instances == 0


def test_external_node_that_does_not_answer_is_an_environment_error():
    from harness.errors import EnvironmentProblem
    from harness.launch.ports import free_port

    topology = parse_topology(
        "name: ext\nnodes:\n"
        f"  ghost: {{kind: external, host: 127.0.0.1, dicom_port: {free_port()}}}\n"
    )
    with pytest.raises(EnvironmentProblem, match="node ghost .* not ready"):
        Cluster.launch(topology, ready_timeout_s=2)


def test_dicomweb_stow_qido_wado_on_orthanc(pacs_launch):
    _require("orthanc")
    cluster = pacs_launch("name: web\nnodes:\n  web: {kind: orthanc, ae_title: WEB}\n")
    web = cluster.node("web").dicomweb()
    study = sample_study(seed=31, instances=2)
    from io import BytesIO

    from pydicom import dcmread

    payloads = []
    for ds in study:
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        payloads.append(buffer.getvalue())
    response = web.store(payloads)
    assert "00081199" in response  # ReferencedSOPSequence: what was stored
    found = web.search_studies(StudyInstanceUID=study[0].StudyInstanceUID)
    assert [f["0020000D"]["Value"][0] for f in found] == [study[0].StudyInstanceUID]
    instances = web.search_instances(study[0].StudyInstanceUID)
    assert len(instances) == 2
    parts = web.retrieve_study(study[0].StudyInstanceUID)
    assert sorted(dcmread(BytesIO(p)).SOPInstanceUID for p in parts) == sorted(
        ds.SOPInstanceUID for ds in study
    )


@pytest.mark.parametrize("exported", [None, "0"])
def test_dcmtk_based_nodes_start_without_nagle_unless_told(monkeypatch, exported, pacs_launch):
    """Orthanc and dcmqrscp get TCP_NODELAY=1 (no 40 ms stall per response); an exported
    TCP_NODELAY wins, so a Debian-packaged server's behaviour stays reproducible."""
    _require("orthanc")
    _require("dcmqrscp")
    if exported is None:
        monkeypatch.delenv("TCP_NODELAY", raising=False)
    else:
        monkeypatch.setenv("TCP_NODELAY", exported)
    cluster = pacs_launch(
        "name: nagle\nnodes:\n  o: {kind: orthanc}\n  q: {kind: dcmqrscp}\n  e: {kind: embedded}\n"
    )
    seen = {}
    for name in ("o", "q", "e"):
        environ = open(f"/proc/{cluster.node(name).handle.pid}/environ", "rb").read()
        values = [v for v in environ.split(b"\0") if v.startswith(b"TCP_NODELAY=")]
        seen[name] = values[0].decode() if values else None
    expected = f"TCP_NODELAY={exported or '1'}"
    assert seen["o"] == expected and seen["q"] == expected
    # the embedded PACS (pynetdicom) tunes its own sockets: it only inherits what was exported
    assert seen["e"] == (None if exported is None else expected)
