"""A TLS terminator (Debian's HAProxy, mode tcp) for a server that has no usable TLS.

Why: sites run archives without DICOM TLS (PS3.15 B.1) behind a terminator; DCMTK 3.6.7's
dcmqrscp is one. The terminator holds the node's certificate and listens on the node's
public port; each association's plain DICOM bytes are forwarded to the server's loopback
port. The same process also carries the server's own outgoing associations (C-MOVE
sub-operations, PS3.4 C.4.2) to TLS peers: one plain loopback frontend per peer, whose
backend opens TLS to the peer with the node's certificate as the client certificate.

The same kind of process serves HTTPS in front of a launched Orthanc, whose own HTTPS crashes
on Debian (harness/nodes/orthanc.py, module docstring): `https_config`.

Every phase has a timeout (connect, client, server, half-closed), so a silent peer never
holds a connection for ever. HAProxy runs in the foreground (`-db`) as the harness's child,
never as the system service; its configuration is checked with `haproxy -c` first.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.errors import EnvironmentProblem
from harness.launch.process import ProcessHandle, log_tail, spawn
from harness.launch.tools import require_binary
from harness.security.certificates import TLSMaterial, write_private

INSTALL_HINT = "apt-get install haproxy"
#: TLS 1.2 suites of the BCP 195 profiles (PS3.15 B.9, RFC 9325 4.2) for ECDSA and RSA keys
BCP195_TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
))
#: an association idle this long (no PDU either way) is cut; C-MOVE answers with a pending
#: response per sub-operation (PS3.4 C.4.2.3), so a working retrieve is never idle that long
IDLE_TIMEOUT_S = 300
CONNECT_TIMEOUT_S = 5
#: an HTTP connection idle this long is closed (Orthanc's own keep-alive is shorter); a
#: WADO-RS answer being sent is never idle that long
HTTPS_IDLE_TIMEOUT_S = 120


@dataclass(frozen=True)
class Tunnel:
    """An outgoing TLS path: plain on 127.0.0.1:`local_port`, TLS to `host`:`port`, whose
    certificate must carry `server_name` (None: chain checked, name not)."""

    name: str
    local_port: int
    host: str
    port: int
    server_name: str | None


def name_to_verify(host: str) -> str | None:
    """The DNS name a peer's certificate is checked for. HAProxy 2.6's `verifyhost` matches
    DNS names only, never an IP address entry: a loopback peer is checked for `localhost`
    (generated certificates carry it, harness/cluster.py), another IP for its chain only."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    return "localhost" if address.is_loopback else None


def haproxy_binary(who: str, what: str = "DICOM TLS") -> str:
    """The installed haproxy, or an EnvironmentProblem naming who needs it for what."""
    try:
        return require_binary("haproxy", INSTALL_HINT)
    except EnvironmentProblem as exc:
        raise EnvironmentProblem(f"{who}: {what} needs HAProxy as terminator: {exc}") from None


def write_certificate_bundle(material: TLSMaterial, path: Path) -> Path:
    """HAProxy's `crt` wants the certificate and its key in one PEM file: written 0600."""
    data = material.certificate_file.read_bytes().rstrip(b"\n") + b"\n"
    write_private(path, data + material.key_file.read_bytes())
    return path


def _min_version_options(min_version: str) -> str:
    """`ssl-min-ver`, and BCP 195 suites when TLS 1.2 is the floor; an older floor (a site's
    weak setting, reproduced) opens OpenSSL's security level so TLS 1.0/1.1 really work."""
    floor = f"ssl-min-ver TLSv{min_version}"
    if min_version in ("1.2", "1.3"):
        return f"{floor} ciphers {BCP195_TLS12_CIPHERS}"
    return f"{floor} ciphers DEFAULT:@SECLEVEL=0"


def _defaults(idle_s: int) -> list[str]:
    """Global and default sections: TCP mode, every phase bounded in time."""
    return [
        "global",
        "    maxconn 256",
        "    log stderr format short local0 info",
        "defaults",
        "    mode tcp",
        "    log global",
        f"    timeout connect {CONNECT_TIMEOUT_S}s",
        f"    timeout client {idle_s}s",
        f"    timeout server {idle_s}s",
        "    timeout client-fin 5s",
        "    timeout server-fin 5s",
    ]


def https_config(public: tuple[str, int], server_port: int, bundle: Path) -> str:
    """HTTPS in front of a plain HTTP server on `server_port`: TLS 1.2 with the BCP 195 suites
    (RFC 9325 4.2) or TLS 1.3, no client certificate (HTTP Basic is the login)."""
    return "\n".join([
        *_defaults(HTTPS_IDLE_TIMEOUT_S),
        "listen https",
        f"    bind {public[0]}:{public[1]} ssl crt {bundle} ssl-min-ver TLSv1.2 "
        f"ciphers {BCP195_TLS12_CIPHERS}",
        f"    server http 127.0.0.1:{server_port}",
    ]) + "\n"


def haproxy_config(
    *,
    public: tuple[str, int],
    server_port: int,
    bundle: Path,
    ca_file: Path,
    client_certificate: str,
    min_version: str,
    tunnels: list[Tunnel],
) -> str:
    """The terminator's configuration: the TLS front (`client_certificate`: required,
    optional or none, PS3.15 B.1 mutual authentication) and one tunnel per TLS peer, whose
    certificate must chain to `ca_file` and carry the tunnel's `server_name` (name_to_verify)."""
    verify = "verify none" if client_certificate == "none" else (
        f"verify {client_certificate} ca-file {ca_file}"
    )
    lines = [
        *_defaults(IDLE_TIMEOUT_S),
        "    option tcplog",
        "listen dicom_tls",
        f"    bind {public[0]}:{public[1]} ssl crt {bundle} {verify} "
        + _min_version_options(min_version),
        f"    server archive 127.0.0.1:{server_port}",
    ]
    for tunnel in tunnels:
        lines += [
            f"listen to_{tunnel.name}",
            f"    bind 127.0.0.1:{tunnel.local_port}",
            f"    server {tunnel.name} {tunnel.host}:{tunnel.port} ssl crt {bundle} "
            f"ca-file {ca_file} verify required ssl-min-ver TLSv1.2"
            + (f" sni str({tunnel.server_name}) verifyhost {tunnel.server_name}"
               if tunnel.server_name else ""),
        ]
    return "\n".join(lines) + "\n"


def start_terminator(
    binary: str, workdir: Path, config: str, public: tuple[str, int], *, detached: bool,
    timeout_s: float = 20.0,
) -> tuple[subprocess.Popen, ProcessHandle]:
    """Check and start HAProxy, then wait until its public port accepts connections (or it
    exited: an EnvironmentProblem with its log tail). The Popen is for reaping it."""
    config_path = workdir / "haproxy.cfg"
    log_path = workdir / "haproxy.log"
    config_path.write_text(config)
    checker = spawn(
        [binary, "-c", "-q", "-f", str(config_path)], log_path=log_path, cwd=workdir
    )[0]
    if checker.wait(timeout=timeout_s) != 0:
        raise EnvironmentProblem(
            f"haproxy rejected {config_path}:\n{log_tail(log_path)}"
        )
    _popen, handle = spawn(
        [binary, "-db", "-f", str(config_path)], log_path=log_path, cwd=workdir,
        detached=detached,
    )
    deadline = time.monotonic() + timeout_s
    while True:
        if not handle.alive():
            _popen.wait(timeout=5)
            raise EnvironmentProblem(
                f"haproxy (TLS terminator on {public[0]}:{public[1]}) exited at start-up; "
                f"log tail:\n{log_tail(log_path)}"
            )
        with socket.socket() as probe:
            probe.settimeout(1.0)
            if probe.connect_ex(public) == 0:
                return _popen, handle
        if time.monotonic() > deadline:
            handle.stop(timeout_s=5)
            raise EnvironmentProblem(
                f"haproxy (TLS terminator) not listening on {public[0]}:{public[1]} after "
                f"{timeout_s:.0f} s; log tail:\n{log_tail(log_path)}"
            )
        time.sleep(0.1)


def start_node_terminator(
    node_name: str, workdir: Path, public: tuple[str, int],
    make_config: Callable[[], str] | None, *, detached: bool, what: str = "DICOM TLS",
) -> tuple[subprocess.Popen, ProcessHandle]:
    """A node's terminator as a sidecar: `make_config()` at launch; None for a node attached
    from saved state (`up`, then a restart), which starts again from the written file."""
    written = workdir / "haproxy.cfg"
    if make_config is None:
        if not written.exists():
            raise EnvironmentProblem(f"node {node_name}: {written} is missing")
        config = written.read_text()
    else:
        config = make_config()
    binary = haproxy_binary(f"node {node_name}", what)
    return start_terminator(binary, workdir, config, public, detached=detached)
