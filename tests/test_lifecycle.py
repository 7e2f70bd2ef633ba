"""Nothing is left running: not after Ctrl-C, SIGTERM or SIGKILL of the harness, not after
`down`; and the CLI's up / status / store / down work on one node of each launched kind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from harness.launch.tools import find_binary
from synthetic_data.samples import sample_study
from tests.helpers import (
    CHILD_PYTEST,
    handle_alive,
    processes_mentioning,
    run_cli,
    status_json,
)

ALL_KINDS = """\
name: every-kind
nodes:
  archive: {kind: dcmqrscp, ae_title: ARCHIVE}
  central: {kind: orthanc, ae_title: CENTRAL}
  pocket: {kind: embedded, ae_title: POCKET}
"""

SLEEPING_TEST = '''
import json, os, time
def test_hold_nodes(pacs_cluster):
    nodes = {n.name: [n.handle.pid, n.handle.start_time] for n in pacs_cluster.nodes.values()}
    out = os.environ["HOLD_INFO"]
    with open(out + ".tmp", "w") as f:
        json.dump({"nodes": nodes, "root": str(pacs_cluster.root)}, f)
    os.replace(out + ".tmp", out)
    time.sleep(3600)  # far past SESSION_END_DEADLINE_S: only the signal ends it
'''


def _need_real_servers():
    if not (find_binary("Orthanc") and find_binary("dcmqrscp")):
        pytest.skip("Orthanc and DCMTK needed (apt-get install orthanc dcmtk)")


@pytest.fixture
def every_kind_topology(tmp_path) -> Path:
    _need_real_servers()
    path = tmp_path / "every-kind.yaml"
    path.write_text(ALL_KINDS)
    return path


#: how the session is interrupted: (signal, how many times, started as a shell's `cmd &`)
INTERRUPTIONS = {
    "SIGINT": (signal.SIGINT, 1, False),
    # Ctrl-C again while the nodes stop: the teardown still finishes
    "SIGINT-twice": (signal.SIGINT, 2, False),
    # a non-interactive shell's background job starts with SIGINT ignored (POSIX)
    "SIGINT-background-job": (signal.SIGINT, 1, True),
    "SIGTERM": (signal.SIGTERM, 1, False),
    "SIGKILL": (signal.SIGKILL, 1, False),
}

#: generous: the session ends within seconds; this only bounds a hung one
SESSION_END_DEADLINE_S = 300


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("how", list(INTERRUPTIONS))
def test_interrupted_session_leaves_no_process(tmp_path, every_kind_topology, how):
    sig, times, background_job = INTERRUPTIONS[how]
    test_file = tmp_path / "test_hold.py"
    test_file.write_text(textwrap.dedent(SLEEPING_TEST))
    info = tmp_path / "hold.json"
    env = {**os.environ, "HOLD_INFO": str(info)}
    proc = subprocess.Popen(
        [*CHILD_PYTEST, str(test_file),
         "--pacs-topology", str(every_kind_topology), "--rootdir", str(tmp_path)],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        preexec_fn=_ignore_sigint if background_job else None,
    )
    try:
        deadline = time.monotonic() + 300
        while not info.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "nodes did not come up"
            time.sleep(0.2)
        held = json.loads(info.read_text())
        assert all(handle_alive(*pid_start) for pid_start in held["nodes"].values())
        proc.send_signal(sig)
        if times == 2:
            # again once the teardown is under way (a node is gone), if still running
            while proc.poll() is None and all(
                handle_alive(*p) for p in held["nodes"].values()
            ):
                time.sleep(0.05)
            if proc.poll() is None:
                proc.send_signal(sig)
        try:
            proc.wait(timeout=SESSION_END_DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the session did not end within {SESSION_END_DEADLINE_S} s of {how}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(
        handle_alive(*p) for p in held["nodes"].values()
    ):
        time.sleep(0.2)
    assert [n for n, p in held["nodes"].items() if handle_alive(*p)] == []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and processes_mentioning(held["root"]):
        time.sleep(0.2)
    assert processes_mentioning(held["root"]) == []
    if sig != signal.SIGKILL:  # a killed harness cannot clean its temporary folder
        assert not Path(held["root"]).exists()


def _saved_root(topology_path: Path) -> Path:
    """The temporary root `up` recorded for this topology."""
    from harness.config import load_topology
    from harness.launch.state import state_dir_for

    state = json.loads((state_dir_for(load_topology(topology_path)) / "state.json").read_text())
    return Path(state["root"])


def test_up_status_store_down_with_every_launched_kind(every_kind_topology, tmp_path):
    topo = str(every_kind_topology)
    up = run_cli("up", "--topology", topo)
    assert up.returncode == 0, up.stderr
    try:
        rows = before = status_json("--topology", topo)
        row_root = str(_saved_root(every_kind_topology))
        assert [(r["name"], r["kind"], r["alive"]) for r in rows] == [
            ("archive", "dcmqrscp", True),
            ("central", "orthanc", True),
            ("pocket", "embedded", True),
        ]
        for row in rows:
            assert set(row) >= {"name", "kind", "ae_title", "host", "dicom_port",
                                "http_port", "alive"}
            assert row["host"] == "127.0.0.1"
        assert rows[1]["http_port"]

        again = run_cli("up", "--topology", topo)
        assert again.returncode == 0 and "already up" in again.stderr

        folder = tmp_path / "study"
        folder.mkdir()
        for ds in sample_study(seed=21, instances=4):
            ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        (folder / "notes.txt").write_text("not DICOM")
        for row in rows:
            stored = run_cli("store", "--topology", topo, "--to", row["name"],
                             "--associations", "2", "--json", str(folder))
            assert stored.returncode == 0, stored.stderr
            summary = json.loads(stored.stdout)
            assert (summary["stored"], summary["failed"], summary["skipped_not_dicom"]) == (
                4, 0, 1)

        missing = run_cli("store", "--topology", topo, "--to", "nosuch", str(folder))
        assert missing.returncode == 2
        assert "no node named 'nosuch'" in missing.stderr
        bad_path = run_cli("store", "--topology", topo, "--to", "central", "/no/such/dir")
        assert bad_path.returncode == 2 and "/no/such/dir: no such file" in bad_path.stderr
    finally:
        down = run_cli("down", "--topology", topo)
    assert down.returncode == 0, down.stderr
    rows = status_json("--topology", topo)
    assert not any(r["alive"] for r in rows)
    # really gone, not only forgotten: the ports are closed and no process is left
    from harness.launch.ports import port_in_use

    for row in before:
        assert not port_in_use("127.0.0.1", row["dicom_port"]), row["name"]
    assert processes_mentioning(row_root) == []
    assert run_cli("status", "--topology", topo).returncode == 1


def test_store_to_a_node_that_is_not_up_is_an_environment_error(tmp_path):
    topo = tmp_path / "t.yaml"
    topo.write_text("name: t\nnodes:\n  a: {kind: embedded}\n")
    proc = run_cli("store", "--topology", str(topo), "--to", "a", str(tmp_path))
    assert proc.returncode == 3
    assert "node a is not running (start it: pacs-harness up" in proc.stderr


def test_down_all_stops_what_any_run_left(tmp_path):
    topo = tmp_path / "left.yaml"
    topo.write_text("name: left\nnodes:\n  a: {kind: embedded, ae_title: LEFTOVER}\n")
    assert run_cli("up", "--topology", str(topo)).returncode == 0
    (row,) = status_json("--topology", str(topo))
    assert row["alive"]
    proc = run_cli("down", "--all")
    assert proc.returncode == 0 and "stopped left-" in proc.stderr
    (after,) = status_json("--topology", str(topo))
    assert not after["alive"]
    from harness.launch.ports import port_in_use

    assert not port_in_use("127.0.0.1", row["dicom_port"])
