"""A TLS terminator (Debian's HAProxy, mode tcp) for a DICOM server that has no TLS.

Why: sites run archives without DICOM TLS (PS3.15 B.1) behind a terminator; DCMTK 3.6.7's
dcmqrscp is one. The terminator holds the node's certificate and listens on the node's
public port; each association's plain DICOM bytes are forwarded to the server's loopback
port. The same process also carries the server's own outgoing associations (C-MOVE
sub-operations, PS3.4 C.4.2) to TLS peers: one plain loopback frontend per peer, whose
backend opens TLS to the peer with the node's certificate as the client certificate.

Every phase has a timeout (connect, client, server, half-closed), so a silent peer never
holds a connection for ever. HAProxy runs in the foreground (`-db`) as the harness's child,
never as the system service; its configuration is checked with `haproxy -c` first.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from harness.errors import EnvironmentProblem
from harness.launch.process import ProcessHandle, log_tail, spawn
from harness.launch.tools import require_binary
from harness.security.certificates import TLSMaterial

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


def haproxy_binary(who: str) -> str:
    """The installed haproxy, or an EnvironmentProblem naming who needs it."""
    try:
        return require_binary("haproxy", INSTALL_HINT)
    except EnvironmentProblem as exc:
        raise EnvironmentProblem(f"{who}: DICOM TLS needs HAProxy as terminator: {exc}") from None


def write_certificate_bundle(material: TLSMaterial, path: Path) -> Path:
    """HAProxy's `crt` wants the certificate and its key in one PEM file: written 0600."""
    data = material.certificate_file.read_bytes().rstrip(b"\n") + b"\n"
    data += material.key_file.read_bytes()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)
    return path


def _min_version_options(min_version: str) -> str:
    """`ssl-min-ver`, and BCP 195 suites when TLS 1.2 is the floor; an older floor (a site's
    weak setting, reproduced) opens OpenSSL's security level so TLS 1.0/1.1 really work."""
    floor = f"ssl-min-ver TLSv{min_version}"
    if min_version in ("1.2", "1.3"):
        return f"{floor} ciphers {BCP195_TLS12_CIPHERS}"
    return f"{floor} ciphers DEFAULT:@SECLEVEL=0"


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
        "global",
        "    maxconn 256",
        "    log stderr format short local0 info",
        "defaults",
        "    mode tcp",
        "    log global",
        "    option tcplog",
        f"    timeout connect {CONNECT_TIMEOUT_S}s",
        f"    timeout client {IDLE_TIMEOUT_S}s",
        f"    timeout server {IDLE_TIMEOUT_S}s",
        "    timeout client-fin 5s",
        "    timeout server-fin 5s",
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
