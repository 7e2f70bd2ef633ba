"""A server that binds every address, isolated in a network namespace (harness/launch/netns.py).

The listeners are read with `/usr/bin/ss` (iproute2), in the root namespace and, through
`/usr/bin/nsenter`, in the server's own: an independent view of who listens where.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.errors import ConfigError, EnvironmentProblem
from harness.launch.netns import IsolatedServer, check_environment
from harness.launch.ports import free_port
from harness.launch.process import ProcessHandle
from tests.helpers import processes_mentioning

pytestmark = pytest.mark.skipif(
    subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0
    and subprocess.run(["unshare", "--net", "--map-root-user", "true"],
                       capture_output=True).returncode != 0,
    reason="no network namespace can be made here",
)


@dataclass(frozen=True)
class Listener:
    protocol: str  # tcp or udp
    address: str  # as ss prints it: 127.0.0.1, *, 0.0.0.0, [::]
    port: int
    pids: frozenset[int]


def listeners(in_namespace_of: int | None = None) -> list[Listener]:
    """Listening TCP and bound UDP sockets (`ss -Hltunp`), in the root network namespace or
    in the one of process `in_namespace_of`."""
    argv = ["/usr/bin/ss", "-Hltunp"]
    if in_namespace_of is not None:
        argv = ["/usr/bin/nsenter", f"--net=/proc/{in_namespace_of}/ns/net", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        address, _, port = fields[4].rpartition(":")
        pids = frozenset(int(p) for p in re.findall(r"pid=(\d+)", line))
        found.append(Listener(fields[0], address, int(port), pids))
    return found


def wait_for(predicate, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not seen: {what}"
        time.sleep(0.1)


@pytest.fixture
def isolated(tmp_path):
    """An IsolatedServer running `python -m http.server` on every address (0.0.0.0);
    stopped after the test."""
    port = free_port("127.0.0.1")
    server = IsolatedServer("webby", tmp_path, [port], [])
    popen, handle = server.start(
        [sys.executable, "-m", "http.server", str(port), "--bind", "0.0.0.0"],
        log_path=tmp_path / "server.log",
    )
    server.port, server.handle = port, handle
    yield server
    server.stop(handle)
    popen.wait(timeout=30)


def _get(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as answer:
        return answer.status


def test_inbound_relay_reaches_a_wildcard_server_that_is_not_outside(isolated):
    """The server binds 0.0.0.0 in its namespace; outside, only HAProxy's 127.0.0.1 relay."""
    wait_for(lambda: any(x.port == isolated.port for x in listeners(isolated.handle.pid)),
             "the server listening in its namespace")
    assert _get(isolated.port) == 200
    inside = [x for x in listeners(isolated.handle.pid) if x.port == isolated.port]
    assert [(x.address, isolated.handle.pid in x.pids) for x in inside] == [("0.0.0.0", True)]
    outside = [x for x in listeners() if x.port == isolated.port]
    assert [x.address for x in outside] == ["127.0.0.1"]
    assert isolated.handle.pid not in outside[0].pids  # the relay, not the server
    assert not [x for x in listeners() if isolated.handle.pid in x.pids]


def test_outbound_relay_reaches_a_declared_peer_only(tmp_path):
    """From inside, the declared peer answers at its real address; an outside listener that
    is not declared is unreachable (connection refused in the namespace)."""
    with socket.create_server(("127.0.0.1", 0)) as peer, \
            socket.create_server(("127.0.0.1", 0)) as undeclared:
        peer.settimeout(60)
        peer_port, other_port = peer.getsockname()[1], undeclared.getsockname()[1]
        script = (
            "import socket, time\n"
            "for _ in range(200):\n"
            "    try:\n"
            f"        s = socket.create_connection(('127.0.0.1', {peer_port}), timeout=10); break\n"
            "    except ConnectionRefusedError: time.sleep(0.05)\n"
            "s.sendall(b'from inside'); s.close()\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {other_port}), timeout=10)\n"
            "    print('undeclared: reached', flush=True)\n"
            "except OSError as exc: print('undeclared:', type(exc).__name__, flush=True)\n"
            "time.sleep(60)\n"
        )
        server = IsolatedServer("caller", tmp_path, [free_port("127.0.0.1")],
                                [("127.0.0.1", peer_port)])
        _popen, handle = server.start([sys.executable, "-c", script],
                                      log_path=tmp_path / "caller.log")
        try:
            conn, _ = peer.accept()
            with conn:
                conn.settimeout(30)
                assert conn.recv(100) == b"from inside"
            wait_for(lambda: "undeclared:" in (tmp_path / "caller.log").read_text(),
                     "the undeclared attempt")
            assert "undeclared: ConnectionRefusedError" in (tmp_path / "caller.log").read_text()
        finally:
            server.stop(handle)


def test_stop_leaves_no_process_and_no_socket_directory(isolated):
    wait_for(lambda: any(x.port == isolated.port for x in listeners(isolated.handle.pid)),
             "the server listening in its namespace")
    socket_dir = isolated.socket_dir
    assert len(str(socket_dir / "in-65535.sock")) < 108 and socket_dir.is_dir()
    workdir = str(isolated.workdir)
    assert len(processes_mentioning(workdir)) == 2  # the two HAProxys (configs in workdir)
    relay = isolated.relay
    isolated.stop(isolated.handle)
    assert not isolated.handle.alive() and not ProcessHandle.alive(relay)
    assert processes_mentioning(workdir) == []
    assert not [p for p in processes_mentioning("http.server") if str(isolated.port) in p]
    assert not socket_dir.exists()
    assert not [x for x in listeners() if x.port == isolated.port]


def test_a_server_that_cannot_start_takes_the_inside_haproxy_with_it(tmp_path):
    """The wrapper execs the server only once the inside HAProxy listens (its parent-death
    signal set), so a server that fails at once leaves no HAProxy in the namespace."""
    server = IsolatedServer("broken", tmp_path, [free_port("127.0.0.1")], [])
    handle = None
    try:
        try:
            popen, handle = server.start(["/nonexistent/server"], log_path=tmp_path / "log")
            popen.wait(timeout=60)
        except EnvironmentProblem:  # it may be gone before spawn looks
            pass
        wait_for(lambda: "/nonexistent/server" in (tmp_path / "log").read_text(), "the failure")
        wait_for(lambda: not processes_mentioning(str(tmp_path / "netns-inside.cfg")),
                 "the inside HAProxy gone")
    finally:
        server.stop(handle)


def test_peers_that_would_share_an_inside_address_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="would share 127.0.0.1:4242"):
        IsolatedServer("n", tmp_path, [11112], [("127.0.0.1", 4242), ("pacs.example", 4242)])


@pytest.mark.skipif(not Path("/usr/bin/setpriv").exists(), reason="needs setpriv")
def test_no_namespace_is_one_line_exit_3(tmp_path):
    """Without the capability to make a namespace (root with an empty bounding set), the
    check says so in one line with the environment exit code."""
    if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() != "0":
        pytest.skip("only root can be stripped of the capability here")
    code = ("from harness.launch.netns import check_environment\n"
            "from harness.errors import HarnessError\n"
            "try:\n    check_environment('node px')\n"
            "except HarnessError as exc:\n    print(exc); raise SystemExit(exc.exit_code)\n")
    proc = subprocess.run(
        ["/usr/bin/setpriv", "--bounding-set", "-all", "--inh-caps", "-all",
         sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.count("\n") == 1
    assert proc.stdout.startswith("node px: cannot make a network namespace here (unshare")
    check_environment("node px")  # and here, with the capability, it can
