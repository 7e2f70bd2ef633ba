"""Helpers for the harness's own tests: running the CLI, finding leftover processes, and
launched nodes described as a site's external nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from harness.launch.process import ProcessHandle
from harness.launch.tools import find_binary

if TYPE_CHECKING:
    from pydicom import Dataset

    from harness.cluster import Cluster
    from harness.nodes import Node

# the node kinds this machine can launch: the embedded PACS always, the others when installed
LAUNCHABLE_KINDS = [kind for kind, binary in (("embedded", None), ("dcmqrscp", "dcmqrscp"),
                                              ("orthanc", "Orthanc"))
                    if binary is None or find_binary(binary)]

#: a pytest session started by a test, as a harness user runs one: without Hypothesis's
#: plugin, which imports and assertion-rewrites all of Hypothesis for its closing summary
#: (no bytecode cache under PYTHONDONTWRITEBYTECODE): tens of seconds on a loaded machine
CHILD_PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                "-p", "no:hypothesispytest"]


#: The one test of a child session that holds its nodes: it writes the cluster's run id and
#: state root to $HOLD_INFO, then sleeps until a signal ends the session.
HOLD_TEST = '''
import json, os, time
def test_hold(pacs_cluster):
    with open(os.environ["HOLD_INFO"] + ".tmp", "w") as f:
        json.dump({"run_id": pacs_cluster.run_id, "root": str(pacs_cluster.root)}, f)
    os.replace(os.environ["HOLD_INFO"] + ".tmp", os.environ["HOLD_INFO"])
    time.sleep(3600)  # far past the test's deadline: only the signal ends it
'''


def start_held_session(topology: Path, folder: Path) -> tuple[subprocess.Popen, dict]:
    """A child pytest session (CHILD_PYTEST, HOLD_TEST) that launched `topology` and holds
    its nodes, and what it wrote once they were up ({run_id, root}). Waits for that file,
    not for a time (300 s bounds a hung start only); the caller ends the session."""
    (folder / "test_hold.py").write_text(HOLD_TEST)
    info = folder / "hold.json"
    proc = subprocess.Popen(
        [*CHILD_PYTEST, str(folder / "test_hold.py"), "--pacs-topology", str(topology),
         "--rootdir", str(folder)],
        env={**os.environ, "HOLD_INFO": str(info)}, cwd=folder,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 300
        while not info.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "nodes did not come up"
            time.sleep(0.3)
        return proc, json.loads(info.read_text())
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def wait_for_no_process_mentioning(text: str, timeout_s: float = 60) -> None:
    """Until no live process mentions `text` (processes of a session that ended are still
    exiting), at most `timeout_s`; the caller asserts what is left."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and processes_mentioning(text):
        time.sleep(0.3)


def run_cli(*args: str, timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
    """Run `pacs-harness ARGS` as a user would, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        capture_output=True, text=True, timeout=timeout, **kwargs,
    )


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live (non-zombie) processes whose command line contains `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            found.append(f"{proc.name}: {cmdline.strip()}")
    return found


def status_json(*args: str) -> list[dict]:
    proc = run_cli("status", "--json", *args)
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout)


def handle_alive(pid: int, start_time: int) -> bool:
    return ProcessHandle(pid, start_time).alive()


def external_node(
    node: Node, login_prefix: str, extra: str = "", *, dicomweb_root: str | None = "/dicom-web"
) -> str:
    """The topology line `  NAME: {kind: external, ...}` declaring a launched node the way a
    site declares its own PACS: its address and, for an Orthanc, its REST API and the login
    generated at launch, named by the variables LOGIN_PREFIX_NAME_USER / _PASSWORD (see
    `login_env`). `extra` is more YAML flow fields, e.g. ", writable: true"."""
    fields = (f"kind: external, ae_title: {node.ae_title}, host: {node.host}, "
              f"dicom_port: {node.dicom_port}")
    if node.kind == "orthanc":
        variable = f"{login_prefix}_{node.name.upper()}"
        fields += f", http_port: {node.http_port}, orthanc_rest: true"
        if dicomweb_root:
            fields += f", dicomweb_root: {dicomweb_root}"
        fields += (f", credentials: {{username_env: {variable}_USER, "
                   f"password_env: {variable}_PASSWORD}}")
    return f"  {node.name}: {{{fields}{extra}}}\n"


def external_topology(
    path: Path, name: str, nodes: Iterable[Node], login_prefix: str,
    extra: dict[str, str] | None = None, tail: str = "",
) -> Path:
    """Write a topology of `nodes` as external nodes (`extra` per node name, `tail` after the
    nodes, e.g. a settings block) to `path`, for the CLI in a subprocess."""
    extra = extra or {}
    path.write_text(f"name: {name}\nnodes:\n"
                    + "".join(external_node(n, login_prefix, extra.get(n.name, ""))
                              for n in nodes)
                    + tail)
    return path


def login_env(
    cluster: Cluster, login_prefix: str, state_dir: Path, *, password: str | None = None
) -> dict[str, str]:
    """The CLI's environment: its own state directory and, under the variable names
    `external_node` gives, each node's login generated at launch (or that user with
    `password` instead, to try a wrong one)."""
    env = {**os.environ, "PACS_HARNESS_STATE_DIR": str(state_dir)}
    for name, node in cluster.nodes.items():
        if node.generated_credentials:
            user, generated = node.generated_credentials
            env[f"{login_prefix}_{name.upper()}_USER"] = user
            env[f"{login_prefix}_{name.upper()}_PASSWORD"] = password or generated
    return env


def one_node_per_kind(name: str, kinds: Iterable[str] = LAUNCHABLE_KINDS) -> str:
    """Topology YAML: one node of each kind, named after its kind (AE title in capitals)."""
    nodes = "".join(f"  {kind}: {{kind: {kind}, ae_title: {kind.upper()[:16]}}}\n"
                    for kind in kinds)
    return f"name: {name}\nnodes:\n{nodes}"


def store_into_every_node(cluster: Cluster, datasets: list[Dataset]) -> Cluster:
    """The cluster, once every node has accepted every data set (C-STORE, PS3.4 B)."""
    for node in cluster.nodes.values():
        stored = node.dimse().store(datasets)
        assert stored.ok, [r.error for r in stored.failed]
    return cluster
