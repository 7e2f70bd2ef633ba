"""A server that listens on every address, run where every address is loopback.

Why: some servers cannot be told where to listen. PixelMed's DicomAndWebStorageServer
binds its DICOM and HTTP ports on `*` and announces itself over mDNS (UDP 5353, jmdns),
with no property to turn either off (measured: docs/research/node-kinds-2026-12.md,
section 1). The harness's rule is loopback only, never any other address. So such a server
runs in a network namespace of its own (`unshare --net`, with `--map-root-user` when not
root) that has only `lo`: its wildcard binds and its multicast reach nothing outside.

The harness reaches it through relays over Unix sockets, which are files and so cross
namespaces (HAProxy, mode tcp, every phase bounded in time):

    inbound   127.0.0.1:P (outside HAProxy) -> <socket dir>/in-P.sock
              -> (inside HAProxy) 127.0.0.1:P in the namespace, where the server listens
    outbound  127.0.0.1:Q in the namespace (inside HAProxy) -> <socket dir>/out-N.sock
              -> (outside HAProxy) the peer's real address host:Q

so the server's own configuration names its ports and its peers' real loopback addresses
(`inside_address`). The inside HAProxy is started by the same wrapper before it execs the
server, with `setpriv --pdeathsig KILL`: it dies with the server, and it is in the server's
process group, which is what a stop signals. The outside HAProxy is a sidecar (its own
process handle). Unix socket paths are limited to 108 bytes (unix(7)), so the sockets live
in a short directory made under /tmp per server, 0700, removed at stop.

As a container (`launch: docker`) the namespace is Docker's: `network_mode: none` gives
the container only `lo` (up already), so no unshare; the socket directory is mounted at the
same path, the same wrapper runs the inside HAProxy of the image (`container_command`) and
the outside relay runs on the host as for a process (`run_isolated_container`).

API (also for other kinds): `IsolatedServer(name, workdir, inbound_ports, outbound_peers)`;
`check_environment()` (exit 3 when no namespace can be made here), `command(argv)` (the
argv to spawn), `start_relay()`, `remove_socket_dir()`; or `start(argv)` and `stop()` for
a caller that has no Node around it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import ConfigError, EnvironmentProblem
from harness.launch.docker import ContainerHandle, run_container
from harness.launch.process import ProcessHandle, log_tail, process_start_time, spawn
from harness.launch.tls_terminator import _defaults, haproxy_binary
from harness.launch.tools import require_binary

if TYPE_CHECKING:
    from harness.nodes.base import Node

#: where the per-server socket directory is made: short, so paths stay under 108 bytes
SOCKET_PARENT = Path("/tmp")
SOCKET_PREFIX = "pacs-ns-"
SOCKET_DIR_FILE = "netns-socket-dir"  # in the work directory: found again after `up`
RELAY_CONFIG = "netns-relay.cfg"  # the outside HAProxy
INSIDE_CONFIG = "netns-inside.cfg"  # the HAProxy in the namespace
#: an idle connection is cut after this long; a C-MOVE answers per sub-operation (PS3.4
#: C.4.2.3), so a working retrieve is never idle that long
IDLE_TIMEOUT_S = 300
#: HAProxy in the images of isolated kinds (Debian's package)
IMAGE_HAPROXY = "/usr/sbin/haproxy"
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL (unix(7))

# $1 ip ("-": lo is up already, as in a container), $2 haproxy, $3 its configuration, $4 a
# socket it binds; then the server's argv. The server is exec'd only once HAProxy listens:
# its parent-death signal is set by then (set after the parent had died, it would never
# fire), and a relay is there to reach it.
_WRAPPER = (
    'ip="$1"; haproxy="$2"; config="$3"; socket="$4"; shift 4; '
    '[ "$ip" = - ] || "$ip" link set lo up '
    '|| { echo "netns: cannot bring up lo in the namespace" >&2; exit 3; }; '
    'rm -f "$socket"; '
    'setpriv --pdeathsig KILL "$haproxy" -db -f "$config" & relay=$!; '
    'tries=0; '
    'while [ ! -S "$socket" ]; do '
    '  tries=$((tries + 1)); '
    '  if [ $tries -gt 400 ] || ! kill -0 $relay 2>/dev/null; then '
    '    echo "netns: the HAProxy in the namespace did not start" >&2; kill $relay; exit 3; '
    '  fi; sleep 0.05; '
    'done; '
    'exec "$@"'
)


def unshare_arguments() -> list[str]:
    """`unshare --net`; an unprivileged user also needs a user namespace to own it."""
    options = ["--net"] if os.geteuid() == 0 else ["--net", "--map-root-user"]
    return [require_binary("unshare", "apt-get install util-linux"), *options]


def check_environment(who: str, timeout_s: float = 30.0) -> None:
    """An EnvironmentProblem (exit 3, one line) unless a namespace can be made here and its
    `lo` brought up; e.g. in a container without CAP_SYS_ADMIN or user namespaces."""
    ip = require_binary("ip", "apt-get install iproute2")
    require_binary("setpriv", "apt-get install util-linux")
    try:
        probe = subprocess.run([*unshare_arguments(), ip, "link", "set", "lo", "up"],
                               capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise EnvironmentProblem(
            f"{who}: unshare --net did not finish in {timeout_s:.0f} s") from None
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"])[-1]
        raise EnvironmentProblem(
            f"{who}: cannot make a network namespace here (unshare --net: {reason}); this "
            "server listens on every address and is run only isolated"
        )


def _loopback_ipv4(host: str) -> str | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return str(address) if address.version == 4 and address.is_loopback else None


class IsolatedServer:
    """One server in its own network namespace, with its two HAProxy relays.

    `inbound_ports`: the loopback ports the server listens on (the same numbers inside and
    out). `outbound_peers`: (host, port) of every peer the server calls; inside, each is
    at `inside_address(host, port)`.
    """

    def __init__(
        self, name: str, workdir: Path, inbound_ports: Sequence[int],
        outbound_peers: Sequence[tuple[str, int]],
    ) -> None:
        self.name = name
        self.workdir = workdir
        if not inbound_ports:
            raise ValueError("an isolated server needs at least one inbound port")
        self.inbound_ports = tuple(dict.fromkeys(inbound_ports))
        self.outbound_peers = tuple(dict.fromkeys(outbound_peers))
        inside: dict[tuple[str, int], tuple[str, int]] = {}
        for host, port in self.outbound_peers:
            where = self.inside_address(host, port)
            if where in inside or port in self.inbound_ports:
                other = inside.get(where, ("the server itself", port))
                raise ConfigError(
                    f"node {name}: peers {other[0]}:{other[1]} and {host}:{port} would share "
                    f"{where[0]}:{where[1]} inside its network namespace (give one another port)"
                )
            inside[where] = (host, port)
        self.relay: ProcessHandle | None = None
        self.relay_popen: subprocess.Popen | None = None

    @staticmethod
    def inside_address(host: str, port: int) -> tuple[str, int]:
        """Where the server calls a peer from inside: its own address when that is an IPv4
        loopback one (all of 127/8 is on `lo`), else 127.0.0.1 with the peer's port."""
        return _loopback_ipv4(host) or "127.0.0.1", port

    # -- the socket directory ------------------------------------------------------------
    @property
    def socket_dir(self) -> Path:
        """The per-server directory of Unix sockets, made on first use (recorded in the
        work directory, so a node attached after `up` finds and removes it)."""
        record = self.workdir / SOCKET_DIR_FILE
        if record.is_file():
            return Path(record.read_text().strip())
        sweep_stale_socket_dirs()
        made = Path(tempfile.mkdtemp(prefix=SOCKET_PREFIX, dir=SOCKET_PARENT))
        record.write_text(f"{made}\n")
        return made

    def _socket(self, role: str, number: int) -> str:
        path = str(self.socket_dir / f"{role}-{number}.sock")
        if len(path.encode()) > UNIX_PATH_MAX:  # only if SOCKET_PARENT were made long
            raise EnvironmentProblem(f"node {self.name}: socket path too long: {path}")
        return path

    def remove_socket_dir(self) -> None:
        record = self.workdir / SOCKET_DIR_FILE
        if record.is_file():
            shutil.rmtree(record.read_text().strip(), ignore_errors=True)
            record.unlink()

    # -- HAProxy configurations -----------------------------------------------------------
    def relay_config(self) -> str:
        """Outside: 127.0.0.1:P -> in-P.sock; out-N.sock -> the N-th peer's real address."""
        lines = [*_defaults(IDLE_TIMEOUT_S)]
        for port in self.inbound_ports:
            lines += [f"listen in_{port}", f"    bind 127.0.0.1:{port}",
                      f"    server inside unix@{self._socket('in', port)}"]
        for number, (host, port) in enumerate(self.outbound_peers):
            lines += [f"listen out_{number}", f"    bind unix@{self._socket('out', number)}",
                      f"    server peer {host}:{port}"]
        return "\n".join(lines) + "\n"

    def inside_config(self) -> str:
        """Inside: in-P.sock -> 127.0.0.1:P; the N-th peer's inside address -> out-N.sock."""
        lines = [*_defaults(IDLE_TIMEOUT_S)]
        for port in self.inbound_ports:
            lines += [f"listen in_{port}", f"    bind unix@{self._socket('in', port)}",
                      f"    server server 127.0.0.1:{port}"]
        for number, (host, port) in enumerate(self.outbound_peers):
            address, inside_port = self.inside_address(host, port)
            lines += [f"listen out_{number}", f"    bind {address}:{inside_port}",
                      f"    server outside unix@{self._socket('out', number)}"]
        return "\n".join(lines) + "\n"

    def _checked(self, file_name: str, config: str, binary: str) -> Path:
        """Write a configuration and have `haproxy -c` check it (it binds nothing)."""
        path = self.workdir / file_name
        path.write_text(config)
        check = subprocess.run([binary, "-c", "-q", "-f", str(path)], capture_output=True,
                               text=True, timeout=60)
        if check.returncode != 0:
            raise EnvironmentProblem(f"haproxy rejected {path}: {check.stderr.strip()}")
        return path

    # -- commands and processes -----------------------------------------------------------
    def command(self, argv: Sequence[str]) -> list[str]:
        """argv run in a new network namespace, behind the inside HAProxy (written now)."""
        binary = haproxy_binary(f"node {self.name}", "its network namespace")
        config = self._checked(INSIDE_CONFIG, self.inside_config(), binary)
        ip = require_binary("ip", "apt-get install iproute2")
        awaited = self._socket("in", self.inbound_ports[-1])
        return [*unshare_arguments(), "/bin/sh", "-c", _WRAPPER, "netns-wrapper",
                ip, binary, str(config), awaited, *argv]

    def container_command(self, argv: Sequence[str]) -> list[str]:
        """argv run in a container without a network (`lo` only), behind the inside
        HAProxy of the image (its configuration written now, checked by the host's)."""
        binary = haproxy_binary(f"node {self.name}", "its network namespace")
        config = self._checked(INSIDE_CONFIG, self.inside_config(), binary)
        awaited = self._socket("in", self.inbound_ports[-1])
        return ["/bin/sh", "-c", _WRAPPER, "netns-wrapper", "-", IMAGE_HAPROXY, str(config),
                awaited, *argv]

    def start_relay(self, *, detached: bool, timeout_s: float = 20.0
                    ) -> tuple[subprocess.Popen, ProcessHandle]:
        """Start the outside HAProxy and wait until it listens on every inbound port and
        every outbound socket (or exits: an EnvironmentProblem with its log tail)."""
        binary = haproxy_binary(f"node {self.name}", "its network namespace")
        config = self._checked(RELAY_CONFIG, self.relay_config(), binary)
        log_path = self.workdir / "netns-relay.log"
        popen, handle = spawn([binary, "-db", "-f", str(config)], log_path=log_path,
                              cwd=self.workdir, detached=detached)
        sockets = [Path(self._socket("out", n)) for n in range(len(self.outbound_peers))]
        deadline = time.monotonic() + timeout_s
        while not (all(s.is_socket() for s in sockets)
                   and all(_listening(p) for p in self.inbound_ports)):
            if not handle.alive() or time.monotonic() > deadline:
                handle.stop(timeout_s=5)
                popen.wait(timeout=5)
                raise EnvironmentProblem(
                    f"node {self.name}: the HAProxy relay to its network namespace did not "
                    f"start; log tail:\n{log_tail(log_path)}"
                )
            time.sleep(0.05)
        self.relay, self.relay_popen = handle, popen
        return popen, handle

    def start(self, argv: Sequence[str], *, log_path: Path, detached: bool = False
              ) -> tuple[subprocess.Popen, ProcessHandle]:
        """Relay first, then the server in its namespace (for callers without a Node)."""
        check_environment(f"node {self.name}")
        self.start_relay(detached=detached)
        try:
            return spawn(self.command(argv), log_path=log_path, cwd=self.workdir,
                         detached=detached)
        except BaseException:
            self.stop(None)
            raise

    def stop(self, server: ProcessHandle | None) -> None:
        """SIGTERM the server's process group (the inside HAProxy is in it) until it is gone,
        then the relay; the socket directory goes last."""
        inside = inside_processes(server)
        for handle in (server, self.relay):
            if handle is not None:
                handle.stop()
        wait_gone(inside)
        if self.relay_popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.relay_popen.wait(timeout=5)
        self.relay = self.relay_popen = None
        self.remove_socket_dir()


def inside_processes(server: ProcessHandle | None) -> list[ProcessHandle]:
    """The server's children (the inside HAProxy), read before a stop: they are SIGTERMed
    with its group and SIGKILLed by the kernel when it dies, but may outlive it briefly."""
    if not isinstance(server, ProcessHandle) or not server.alive():
        return []  # none, or a container: its processes end with it
    try:
        pids = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    except OSError:
        return []
    found = []
    for pid in map(int, pids):
        start_time = process_start_time(pid)
        if start_time is not None:
            found.append(ProcessHandle(pid, start_time))
    return found


def wait_gone(processes: list[ProcessHandle], timeout_s: float = 10.0) -> None:
    """Until each process has exited (a zombie counts: init reaps it); SIGKILL at the end."""
    deadline = time.monotonic() + timeout_s
    for process in processes:
        while process.alive():
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                break
            time.sleep(0.02)


def sweep_stale_socket_dirs() -> list[Path]:
    """Remove socket directories nothing listens in any more (a killed run's: its relays
    died with it, no one removed the directory); one with no socket yet is being set up,
    and one where any socket answers is in use. Returns what was removed."""
    removed = []
    for directory in SOCKET_PARENT.glob(f"{SOCKET_PREFIX}*"):
        sockets = list(directory.glob("*.sock"))
        if sockets and not any(_unix_listening(path) for path in sockets):
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed


def _unix_listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def run_isolated_container(
    node: Node, isolated: IsolatedServer, argv: Sequence[str], *, run_id: str,
    detached: bool, mounts: dict[Path, str] | None = None,
    environment: dict[str, str] | None = None, hostname: str | None = None,
) -> ContainerHandle:
    """The node's server in a container with Docker's `network_mode: none` (only `lo`, no
    bridge, no published port), its work directory and socket directory mounted at the
    same paths; the outside relay must be started first (`start_relay`). Its host name
    (the node's name unless given) resolves to 127.0.0.1: with network mode none Docker
    maps it to nothing, and PixelMed's mDNS logged an UnknownHostException at start-up."""
    assert node.workdir is not None
    socket_dir = isolated.socket_dir
    hostname = hostname or re.sub(r"[^A-Za-z0-9-]", "-", node.name).strip("-")[:63] or "node"
    return run_container(
        image=node.image(),
        command=isolated.container_command(argv),
        name=f"pacs-harness-{run_id}-{node.name}",
        run_id=run_id,
        node_name=node.name,
        mounts={**node.container_mounts(), socket_dir: str(socket_dir), **(mounts or {})},
        environment=environment,
        detached=detached,
        network_mode="none",
        working_dir=str(node.workdir),
        hostname=hostname,
        extra_hosts={hostname: "127.0.0.1"},
    )


def restart_container(node: Node, while_stopped: Callable[[], None],
                      timeout_s: float = 10.0) -> None:
    """Stop the node's container, run `while_stopped`, start the same container again (its
    id, the one state.json holds, stays valid; the wrapper and the server run afresh)."""
    handle = node.handle
    assert isinstance(handle, ContainerHandle)
    container = handle._container()
    if container is None:
        raise EnvironmentProblem(f"node {node.name}: its container {handle.container_id} "
                                 "is gone")
    container.stop(timeout=int(timeout_s))
    while_stopped()
    container.start()


def container_package_version(handle: object, package: str) -> str | None:
    """The Debian version of `package` in the node's running container, else None."""
    if not isinstance(handle, ContainerHandle):
        return None
    container = handle._container()
    if container is None or container.status != "running":
        return None
    code, output = container.exec_run(["dpkg-query", "-W", "-f", "${Version}", package])
    return output.decode().strip() if code == 0 and output.strip() else None
