"""A topology's nodes as one running unit: ports, peer tables, start, stop, saved state.

`Cluster.launch` picks free loopback ports, writes every node's configuration (each node
knowing every other node and the harness as C-MOVE peers), starts the processes and waits
until each answers. A detached cluster (`pacs-harness up`) saves its state in a directory
derived from the topology file, where `status`, `store`, `down` and pytest find it again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.config import NodeSpec, Topology, kind_capabilities
from harness.dicom.peer import HARNESS_AE_TITLE
from harness.errors import ConfigError, EnvironmentProblem
from harness.launch.docker import ContainerHandle
from harness.launch.ports import free_port, port_in_use, release_port
from harness.launch.process import ProcessHandle
from harness.launch.state import STATE_FILE
from harness.nodes import Node, Peer, make_node


def handle_state(handle: ProcessHandle | ContainerHandle | None) -> dict | None:
    """How a process or container is written into state.json."""
    if isinstance(handle, ProcessHandle):
        return {"type": "process", "pid": handle.pid, "start_time": handle.start_time}
    if isinstance(handle, ContainerHandle):
        return {"type": "container", "id": handle.container_id}
    return None


def handle_from_state(saved: dict | None) -> ProcessHandle | ContainerHandle | None:
    if not saved:
        return None
    if saved["type"] == "container":
        return ContainerHandle(saved["id"])
    return ProcessHandle(saved["pid"], saved["start_time"])


def tls_state(node: Node) -> dict[str, str] | None:
    """The paths of a launched node's generated TLS files (no key material) for state.json."""
    if node.tls_material is None or node.harness_tls_material is None:
        return None
    own, harness = node.tls_material, node.harness_tls_material
    return {
        "certificate": str(own.certificate_file), "key": str(own.key_file),
        "ca": str(own.ca_file), "harness_certificate": str(harness.certificate_file),
        "harness_key": str(harness.key_file),
    }


def restore_tls(node: Node, saved: dict[str, str] | None) -> None:
    if not saved:
        return
    from harness.security.certificates import TLSMaterial

    ca = Path(saved["ca"])
    node.tls_material = TLSMaterial(Path(saved["certificate"]), Path(saved["key"]), ca)
    node.harness_tls_material = TLSMaterial(
        Path(saved["harness_certificate"]), Path(saved["harness_key"]), ca
    )


class Cluster:
    """The nodes of one topology, launched by us or attached to from saved state."""

    def __init__(
        self,
        topology: Topology,
        nodes: dict[str, Node],
        *,
        root: Path | None,
        harness_port: int,
        owned: bool,
        state_dir: Path | None = None,
        run_id: str = "",
    ) -> None:
        safe_name = re.sub(r"[^A-Za-z0-9_.-]", "-", topology.name)[:40]
        self.run_id = run_id or f"{safe_name}-{uuid.uuid4().hex[:8]}"
        self.topology = topology
        self.nodes = nodes
        self.root = root
        self.harness_port = harness_port
        self.owned = owned  # True when this object must stop the nodes
        self.state_dir = state_dir
        self.links: dict = {}  # link name -> harness.resilience.proxy.FaultProxy
        self.reserved_ports: list[int] = []  # picked by launch, released by stop

    def __getitem__(self, name: str) -> Node:
        return self.node(name)

    def node(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise ConfigError(
                f"{self.topology.source}: no node named {name!r} (nodes: {', '.join(self.nodes)})"
            ) from None

    @property
    def harness_peer(self) -> Peer:
        """The harness's own storage SCP, a C-MOVE destination every node knows. It stays
        plain TCP (tls=False) in a TLS topology: it listens on loopback only and holds no
        data, and a TLS node calls it without TLS (Orthanc: no UseDicomTls; embedded: no
        "tls" in peers.json)."""
        return Peer("pacs-harness", HARNESS_AE_TITLE, "127.0.0.1", self.harness_port)

    # -- launch ------------------------------------------------------------------------
    @classmethod
    def launch(
        cls,
        topology: Topology,
        *,
        detached: bool = False,
        root: Path | None = None,
        state_dir: Path | None = None,
        ready_timeout_s: float = 60.0,
        on_event: Callable[[str], None] | None = None,
    ) -> Cluster:
        """Start every launched node and check every external one answers."""
        say = on_event or (lambda _msg: None)
        declared = {p for s in topology.nodes.values() for p in (s.dicom_port, s.http_port) if p}
        taken = set(declared)  # grows with every port picked (and reserved) below
        specs: dict[str, NodeSpec] = {}
        for name, spec in topology.nodes.items():
            if spec.launched:
                for port in (spec.dicom_port, spec.http_port):
                    if port and port_in_use(spec.host, port):
                        raise EnvironmentProblem(
                            f"{topology.source}: node {name}: port {port} on {spec.host} is "
                            "already in use (free it or pick another port)"
                        )
                spec = replace(
                    spec,
                    dicom_port=spec.dicom_port or free_port(spec.host, taken),
                    http_port=spec.http_port
                    or (
                        free_port(spec.host, taken)
                        if kind_capabilities(spec.kind).serves_http
                        else None
                    ),
                )
            specs[name] = spec
        if root is None:
            root = Path(tempfile.mkdtemp(prefix=f"pacs-harness-{topology.name}-"))
            # traversable (not listable) for servers that run as another user (PostgreSQL)
            root.chmod(0o711)
        root.mkdir(parents=True, exist_ok=True)
        nodes = {
            name: make_node(spec, root / name if spec.launched else None)
            for name, spec in specs.items()
        }
        for node in nodes.values():  # an HL7 (MLLP) listener's port, e.g. the embedded PACS
            if node.spec.launched and node.capabilities.hl7:
                node.hl7_port = free_port(node.host, taken)
        cluster = cls(
            topology,
            nodes,
            root=root,
            harness_port=free_port("127.0.0.1", taken),
            owned=True,
            state_dir=state_dir,
        )
        # reserved across processes until stop(): a restarted node finds its port again
        cluster.reserved_ports = sorted(taken - declared)
        if topology.links and detached:
            raise ConfigError(
                f"{topology.source}: links run inside the harness process: use them with "
                "`pacs-harness run` or pytest, not `up`"
            )
        cluster.start_links()
        cluster.issue_certificates()
        peers = cluster.peer_table()
        try:
            for node in nodes.values():
                if node.spec.launched:
                    node.workdir.mkdir(parents=True, exist_ok=True)
                    node.prepare(cluster.peers_seen_by(node.name, peers))
                    say(f"starting {node.name} ({node.kind}) on {node.host}:{node.dicom_port}")
                    node.start(detached=detached, run_id=cluster.run_id)
                    if detached:
                        cluster.save_state()  # so `down` finds what already started
            for node in nodes.values():
                node.wait_ready(ready_timeout_s)
                warning = f" (warning: {node.tls_warning})" if node.tls_warning else ""
                say(
                    f"{node.name} ({node.kind}) ready: "
                    f"{node.ae_title}@{node.host}:{node.dicom_port}{warning}"
                )
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def issue_certificates(self) -> None:
        """A private CA for this run when a launched node declares `tls: {generate: true}`
        or `https: true`: a certificate per such node (server and client: a TLS node also
        calls its peers) and one for the harness (PS3.15 B.1). Files under the run's
        directory, keys 0600."""
        wanting = [n for n in self.nodes.values()
                   if (n.spec.tls and n.spec.tls.generate) or (n.spec.https and n.spec.launched)]
        if not wanting:
            return
        from harness.config.security import TLSSpec
        from harness.security.certificates import CertificateAuthority

        assert self.root is not None
        # a node declaring only `https: true` gets the defaults of `tls:` for its certificate
        settings = {n.name: n.spec.tls or TLSSpec() for n in wanting}
        authority = CertificateAuthority.create(
            self.root / "tls", f"pacs-harness CA {self.run_id}",
            valid_days=max(t.valid_days for t in settings.values()) + 1,
        )
        harness = authority.issue("harness", HARNESS_AE_TITLE, valid_days=30)
        for node in wanting:
            tls = settings[node.name]
            node.tls_material = authority.issue(
                node.name, node.ae_title,
                names=tls.certificate_names or (node.host, "localhost"),
                valid_days=tls.valid_days,
            )
            node.harness_tls_material = harness

    # -- state for detached clusters --------------------------------------------------
    def save_state(self) -> None:
        assert self.state_dir is not None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "topology": self.topology.source,
            "name": self.topology.name,
            "root": str(self.root),
            "harness_port": self.harness_port,
            "run_id": self.run_id,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "nodes": {
                name: {
                    "kind": node.kind,
                    "ae_title": node.ae_title,
                    "host": node.host,
                    "dicom_port": node.dicom_port,
                    "http_port": node.http_port,
                    "hl7_port": getattr(node, "hl7_port", None),
                    "launch": node.spec.launch,
                    "workdir": str(node.workdir) if node.workdir else None,
                    "handle": handle_state(node.handle),
                    "sidecars": {k: handle_state(h) for k, h in node.sidecars.items()},
                    # the login generated at launch, so `status`, `store`, ... can use it
                    "http_credentials": list(node.generated_credentials)
                    if node.generated_credentials
                    else None,
                    "tls": tls_state(node),
                }
                for name, node in self.nodes.items()
            },
        }
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        # owner-only: it holds the generated HTTP passwords
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(state, indent=2))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.state_dir / STATE_FILE)

    @classmethod
    def from_state(cls, topology: Topology, state_dir: Path) -> Cluster | None:
        """The detached cluster saved for this topology, or None when there is none."""
        path = state_dir / STATE_FILE
        if not path.exists():
            return None
        state = json.loads(path.read_text())
        nodes: dict[str, Node] = {}
        for name, saved in state["nodes"].items():
            declared = topology.nodes.get(name)
            base = declared or NodeSpec(name=name, kind=saved["kind"], ae_title=saved["ae_title"])
            caps = kind_capabilities(saved["kind"])
            spec = replace(
                base,
                kind=saved["kind"],
                launch=saved.get("launch", "process"),
                ae_title=saved["ae_title"],
                host=saved["host"],
                dicom_port=saved["dicom_port"],
                http_port=saved["http_port"],
                dicomweb_root=base.dicomweb_root or caps.dicomweb_root,
                orthanc_rest=base.orthanc_rest or caps.orthanc_rest,
            )
            node = make_node(spec, Path(saved["workdir"]) if saved["workdir"] else None)
            node.handle = handle_from_state(saved.get("handle"))
            if saved.get("hl7_port"):
                node.hl7_port = saved["hl7_port"]
            if saved.get("http_credentials"):
                user, password = saved["http_credentials"]
                node.generated_credentials = (user, password)
            restore_tls(node, saved.get("tls"))
            node.sidecars = {
                key: handle_from_state(value) for key, value in saved.get("sidecars", {}).items()
            }
            nodes[name] = node
        cluster = cls(
            topology,
            nodes,
            root=Path(state["root"]),
            harness_port=state["harness_port"],
            owned=False,
            state_dir=state_dir,
            run_id=state.get("run_id", ""),
        )
        peers = cluster.peer_table()
        for node in nodes.values():
            if node.spec.launched:  # the table launch configured into it (conformance reads it)
                node.peers = [p for p in peers if p.ae_title != node.ae_title]
        return cluster

    def peer_table(self) -> list[Peer]:
        """Every node and the harness as C-MOVE peers: what launch configures into each
        launched node (Node.prepare), and what an attached cluster's nodes are given back."""
        peers = [
            Peer(n.name, n.ae_title, n.host, n.dicom_port, tls=n.spec.tls is not None,
                 ca_file=n.tls_signer())
            for n in self.nodes.values()
        ]
        return [*peers, self.harness_peer]

    def all_processes_alive(self) -> bool:
        return all(n.handle.alive() for n in self.nodes.values() if n.handle is not None)

    # -- status and stop ----------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        rows = []
        for node in self.nodes.values():
            row = node.describe()
            row["alive"] = node.alive()
            rows.append(row)
        return rows

    def collect_logs(self, target: Path) -> list[Path]:
        """Copy every node's log into `target` (for reports); returns the copies."""
        copies = []
        for node in self.nodes.values():
            if node.log_path and node.log_path.exists():
                target.mkdir(parents=True, exist_ok=True)
                copy = target / f"{node.name}.log"
                shutil.copyfile(node.log_path, copy)
                copies.append(copy)
        return copies

    # -- links (fault proxies) ----------------------------------------------------------
    def start_links(self) -> None:
        """One fault proxy per declared link, with its preset settings."""
        from harness.resilience.proxy import FaultProxy

        for link in self.topology.links.values():
            to = self.nodes[link.to]
            proxy = FaultProxy(0, to.host, to.dicom_port, name=link.name)
            proxy.latency_s, proxy.jitter_s = link.latency_s, link.jitter_s
            proxy.bandwidth_bps = link.bandwidth_bps
            self.links[link.name] = proxy.start()
            if link.source is None:
                to.access_port = proxy.port

    def peers_seen_by(self, name: str, peers: list[Peer]) -> list[Peer]:
        """The peer table of node `name`: a peer it reaches over a link is the link's proxy."""
        seen = []
        for peer in peers:
            proxy = self.links.get(f"{name}->{peer.name}")
            seen.append(replace(peer, host="127.0.0.1", port=proxy.port) if proxy else peer)
        return seen

    def stop(self) -> None:
        """Stop every process we started and remove the temporary directories and state.

        The nodes stop side by side, so the teardown takes the slowest node's grace period,
        not their sum; a further Ctrl-C or SIGTERM meanwhile waits until it is done (each
        stop has a deadline) instead of cutting it short and leaving nodes running.
        """
        with interrupts_deferred():
            for proxy in self.links.values():
                proxy.close()
            errors = []
            with ThreadPoolExecutor(max_workers=max(1, len(self.nodes))) as pool:
                stops = {pool.submit(node.stop): node for node in self.nodes.values()}
                for future, node in stops.items():
                    exc = future.exception()
                    if exc is not None:
                        errors.append(f"{node.name}: {exc}")
            for port in self.reserved_ports:
                release_port(port)
            if self.root and self.root.exists():
                shutil.rmtree(self.root, ignore_errors=True)
            if self.state_dir is not None:
                with contextlib.suppress(FileNotFoundError):
                    (self.state_dir / STATE_FILE).unlink()
        if errors:
            raise EnvironmentProblem("could not stop: " + "; ".join(errors))


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then deliver the first one as it would
    have been (KeyboardInterrupt, or the default action). Only the main thread can."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if handler in (signal.SIG_IGN, None):  # ignored, or set outside Python: leave it
            continue
        previous[signum] = signal.signal(signum, lambda got, _frame: received.append(got))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        signal.raise_signal(received[0])


def reachable_node(topology: Topology, cluster: Cluster | None, name: str) -> Node:
    """A node of the running cluster (`up`), else an external node of the topology.

    A launched node that is not up is an EnvironmentProblem telling how to start it.
    """
    if cluster is not None:
        return cluster.node(name)
    spec = topology.node(name)
    if spec.launched:
        hint = "" if topology.is_default else f" --topology {topology.source}"
        raise EnvironmentProblem(f"node {name} is not running (start it: pacs-harness up{hint})")
    return make_node(spec, None)
