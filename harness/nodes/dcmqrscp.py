"""DCMTK's dcmqrscp (a classic Q/R archive) launched as a process.

The generated dcmqrscp.cfg knows every peer of the topology in its HostTable, so C-MOVE to
any of them works. dcmqrscp forks one child per association; the process group is stopped
as a whole. By default it accepts uncompressed transfer syntaxes only, as a real legacy
archive would: the connectivity scenario reports that rather than hiding it.

Two DCMTK 3.6.7 limits shape this adapter: at most 500 studies per storage area (beyond
that dcmqrscp deletes the oldest study), and parallel C-STOREs lose instances (the forked
children pick the same file names: 20 instances over 2 associations left 9 files). So the
harness stores into dcmqrscp over one association (`store_associations=1`);
`--single-process` is no way out, it aborts every association after the first.

Exposure: the AETable lets only the topology's peers (every node and the harness, by AE
title and host, as the HostTable lists them) associate; any other calling AE title or host
is refused with an A-ASSOCIATE-RJ (PS3.8 9.3.4). dcmqrscp compares the caller's address as
text with the peer's host, and `--disable-host-lookup` makes that address the dotted IP, so
peers are written with their IP address. DCMTK 3.6.7's dcmqrscp has no option for the
listening address (`dcmqrscp --help`): it listens on 0.0.0.0, and the peer check is what
keeps other hosts out.

DICOM TLS (PS3.15 B.1): dcmqrscp has none (DCMTK's storescu, findscu, movescu have), so a
node with `tls: {generate: true}` gets a TLS terminator in front of it, as sites do for such
archives: HAProxy (harness/launch/tls_terminator.py) listens on the node's port on 127.0.0.1
with the node's certificate, and dcmqrscp on a loopback port of its own (still bound to
0.0.0.0 by DCMTK, and still behind the AETable/HostTable peer check). Its C-MOVE
sub-operations to TLS peers go through the same HAProxy: the HostTable points each TLS peer
at a plain loopback frontend whose backend speaks TLS to the peer with the node's
certificate. Behind the terminator every caller's address is 127.0.0.1, so the peer check
compares AE titles and that address: on a loopback topology it still holds.

Modality Worklist (PS3.4 K): dcmqrscp has none, so the node runs DCMTK's wlmscpfs beside it,
as sites pair a DCMTK archive with a file-based worklist server: a sidecar on a loopback port
of its own (`worklist_port`, kept in the work directory's `worklist-port` so a node attached
from saved state finds it), answering under the node's AE title from the .wl files of
`worklist_dir` (wlmscpfs wants a folder per called AE title, with a `lockfile`). A sidecar
rather than a node kind of its own: it is started, saved, stopped and reaped with the archive
by the node lifecycle that already does so for the TLS terminator, whereas a kind that stores
nothing would have to be excused from every archive chore (store, statistics, wipe, C-FIND).
wlmscpfs 3.6.7 has no listening address option either (0.0.0.0) and no calling AE title check:
it serves worklists, which a site exposes to its modalities, not images; and it speaks no TLS.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time

from harness.errors import EnvironmentProblem
from harness.launch.ports import free_port
from harness.launch.process import log_tail, spawn
from harness.launch.tls_terminator import (
    Tunnel,
    haproxy_binary,
    haproxy_config,
    name_to_verify,
    start_node_terminator,
    write_certificate_bundle,
)
from harness.launch.tools import find_binary
from harness.nodes.base import HeldStatistics, Node, Peer, files_statistics
from harness.nodes.capabilities import Capabilities, ImageRecipe
from harness.nodes.orthanc import peer_ip

# dcmqrscp deletes the oldest studies when an AE's quota is exceeded: make it unreachable.
MAX_STUDIES = 500  # the most DCMTK allows per storage area
MAX_BYTES_PER_STUDY = "100000mb"
WORKLIST_PORT_FILE = "worklist-port"  # wlmscpfs's port, for a node attached from saved state
PEERS_GROUP = "topology_peers"  # HostTable group naming everyone allowed to associate


def _symbolic(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


class DcmqrscpNode(Node):
    kind = "dcmqrscp"
    has_process = True
    dcmtk_network = True
    capabilities = Capabilities(
        query_levels=("PATIENT", "STUDY", "SERIES", "IMAGE"),
        retrieve_methods=("C-MOVE", "C-GET"),
        # its C-GET converts to the first context it accepted: the stored syntax is unknown
        keeps_stored_syntax=False,
        reports_sop_classes_in_study=False,  # index.dat holds no SOP Classes in Study
        max_associations=32,  # MaxAssociations of the generated dcmqrscp.cfg
        store_associations=1,  # parallel C-STOREs lose instances (module docstring)
        tls=True,  # through an HAProxy terminator on the node's port (module docstring)
        worklist=True,  # DCMTK's wlmscpfs beside it, on `worklist_port` (module docstring)
        binaries=(("dcmqrscp", "apt-get install dcmtk"), ("wlmscpfs", "apt-get install dcmtk")),
        image_recipe=ImageRecipe(("dcmtk",)),
    )

    #: dcmqrscp's own (plain) port when a TLS terminator holds the node's port
    server_port: int | None = None
    #: outgoing TLS paths for C-MOVE to TLS peers, by peer name
    tunnels: dict[str, Tunnel] | None = None

    @property
    def database_dir(self):
        return self.workdir / "db"

    @property
    def worklist_dir(self):
        """wlmscpfs's folder of .wl entries for this node's AE title."""
        return self.workdir / "worklists" / self.ae_title if self.workdir else None

    @property
    def worklist_port(self) -> int | None:
        """wlmscpfs's port (module docstring), as written at prepare."""
        saved = self.workdir / WORKLIST_PORT_FILE if self.workdir else None
        return int(saved.read_text()) if saved is not None and saved.exists() else None

    def data_directories(self) -> tuple[str, ...]:
        return ("db",)  # storage area and index.dat (which holds absolute file paths)

    def prepare(self, peers: list[Peer]) -> None:
        super().prepare(peers)
        self.database_dir.mkdir(parents=True, exist_ok=True)
        self.worklist_dir.mkdir(parents=True, exist_ok=True)
        (self.worklist_dir / "lockfile").touch()  # wlmscpfs serves an AE folder holding one
        if self.worklist_port is None:
            (self.workdir / WORKLIST_PORT_FILE).write_text(f"{free_port('127.0.0.1')}\n")
        listen_port = self.dicom_port
        if self.tls_material is not None:
            haproxy_binary(f"node {self.name}")  # missing: say so before anything starts
            self.server_port = self.server_port or free_port("127.0.0.1")
            listen_port = self.server_port
            previous = self.tunnels or {}
            self.tunnels = {
                p.name: previous.get(p.name)
                or Tunnel(
                    _symbolic(p.name), free_port("127.0.0.1"), peer_ip(p.host), p.port,
                    name_to_verify(p.host),
                )
                for p in self.peers
                if p.tls
            }
        hosts = "\n".join(self._host_entry(p) for p in self.peers)
        # who may associate: a HostTable group of every peer (never ANY)
        group = f"{PEERS_GROUP} = " + ", ".join(_symbolic(p.name) for p in self.peers)
        config = f"""# generated by pacs-harness for node {self.name}
NetworkTCPPort  = {listen_port}
MaxPDUSize      = 65536
MaxAssociations = {self.capabilities.max_associations}

HostTable BEGIN
{hosts}
{group}
HostTable END

VendorTable BEGIN
VendorTable END

AETable BEGIN
{self.ae_title}  {self.database_dir}  RW  ({MAX_STUDIES}, {MAX_BYTES_PER_STUDY})  {PEERS_GROUP}
AETable END
"""
        (self.workdir / "dcmqrscp.cfg").write_text(config)

    def _host_entry(self, peer: Peer) -> str:
        """A HostTable line: a TLS peer is reached through its loopback tunnel."""
        tunnel = (self.tunnels or {}).get(peer.name)
        if tunnel is not None:
            return f"{_symbolic(peer.name)} = ({peer.ae_title}, 127.0.0.1, {tunnel.local_port})"
        return f"{_symbolic(peer.name)} = ({peer.ae_title}, {peer_ip(peer.host)}, {peer.port})"

    def start_sidecars(self, *, detached: bool) -> None:
        """wlmscpfs, and the TLS terminator (a node without `tls:` has none), listening before
        dcmqrscp starts."""
        self._start_worklist_server(detached=detached)
        material = self.tls_material
        if material is None or self.spec.tls is None:
            return
        assert self.workdir is not None
        public = (self.host, self.dicom_port)
        tls = self.spec.tls

        def config() -> str:
            bundle = write_certificate_bundle(material, self.workdir / "tls-terminator.pem")
            return haproxy_config(
                public=public,
                server_port=self.server_port,
                bundle=bundle,
                ca_file=material.ca_file,
                client_certificate=tls.client_certificate,
                min_version=tls.min_version,
                tunnels=list((self.tunnels or {}).values()),
            )

        attached = self.server_port is None  # from saved state (`up`): launch's files
        popen, self.sidecars["tls-terminator"] = start_node_terminator(
            self.name, self.workdir, public, None if attached else config, detached=detached
        )
        self.reap_on_stop.append(popen)

    def _start_worklist_server(self, *, detached: bool, timeout_s: float = 20.0) -> None:
        """wlmscpfs on `worklist_port`; returns once it accepts connections."""
        assert self.workdir is not None and self.worklist_port is not None
        log_path = self.workdir / "wlmscpfs.log"
        popen, handle = spawn(
            [self.require_binary("wlmscpfs"), "--data-files-path", str(self.worklist_dir.parent),
             "--disable-host-lookup", "--log-level", "info", str(self.worklist_port)],
            log_path=log_path, cwd=self.workdir, detached=detached,
        )
        self.sidecars["wlmscpfs"] = handle
        self.reap_on_stop.append(popen)
        deadline = time.monotonic() + timeout_s
        while True:
            if not handle.alive():
                raise EnvironmentProblem(
                    f"node {self.name}: wlmscpfs exited at start-up; log tail:\n"
                    f"{log_tail(log_path)}"
                )
            with socket.socket() as probe:
                probe.settimeout(1.0)
                if probe.connect_ex(("127.0.0.1", self.worklist_port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise EnvironmentProblem(
                    f"node {self.name}: wlmscpfs not listening on port {self.worklist_port} "
                    f"after {timeout_s:.0f} s; log tail:\n{log_tail(log_path)}"
                )
            time.sleep(0.1)

    image_program = ("/usr/bin/dcmqrscp",)

    def program(self) -> list[str]:
        return [self.require_binary("dcmqrscp")]

    def arguments(self) -> list[str]:
        return [
            "--config",
            str(self.workdir / "dcmqrscp.cfg"),
            "--log-level",
            "info",
            "--disable-host-lookup",
        ]

    def version(self) -> str:
        binary = find_binary("dcmqrscp")
        if not binary:
            return "dcmqrscp (not installed)"
        out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
        match = re.search(r"dcmqrscp v([\w.]+)", out)
        return f"DCMTK dcmqrscp {match.group(1)}" if match else "DCMTK dcmqrscp"

    def held_statistics(self) -> HeldStatistics:
        """The storage area, every file read with pydicom (index.dat is its own index, the
        one its C-FIND answers from, so it is not what is counted)."""
        folder = self.database_dir
        return files_statistics(
            [p for p in folder.rglob("*") if p.is_file() and p.name != "index.dat"],
            f"files of dcmqrscp's storage area {folder} read with pydicom",
        )

    def _wipe(self) -> None:
        # dcmqrscp opens index.dat per association, so emptying the folder between
        # associations leaves it with an empty archive.
        for child in self.database_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
