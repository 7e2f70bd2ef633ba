"""The reference high-availability setup the failover scenario runs against.

Why: CI needs a real HA pair to measure RTO and RPO on, built from parts a hospital uses:
two Orthanc nodes (primary and standby), the primary forwarding every stored instance to
the standby with Orthanc's built-in Lua (`OnStoredInstance` -> `SendToModality`), and
Debian's HAProxy in TCP mode as the virtual address modalities send to (primary active,
standby `backup`). HAProxy's health check speaks DICOM: it sends an A-ASSOCIATE-RQ and
expects an A-ASSOCIATE-AC, so a frozen node (whose kernel still accepts TCP) is seen as down.

HAProxy forwards raw TCP, so both Orthancs must accept the virtual AE title: the generated
orthanc.json gets "DicomCheckCalledAet": false (and the primary its Lua script), then each
Orthanc is restarted on the same ports. Orthanc accepts only known calling AE titles, so the
health check's AE title joins both modality tables. Everything stops at `stop()` / leaving
the `with`.
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import time
from pathlib import Path
from types import TracebackType

from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.sop_class import Verification

from harness.cluster import Cluster
from harness.config import parse_topology
from harness.dicom import pdu
from harness.dicom.client import DimseClient
from harness.dicom.peer import HARNESS_AE_TITLE
from harness.errors import EnvironmentProblem
from harness.launch.ports import free_port
from harness.launch.process import ProcessHandle, log_tail, spawn
from harness.nodes.base import Node
from harness.resilience import node_faults
from harness.security.certificates import write_private

VIRTUAL_AE_TITLE = "HAPACS"

FORWARD_LUA = """-- pacs-harness reference HA: forward what modalities store to the standby
function OnStoredInstance(instanceId, tags, metadata, origin)
   if origin['RequestOrigin'] ~= 'Lua' then
      SendToModality(instanceId, '{standby}')
   end
end
"""

HA_TOPOLOGY = """name: reference-ha
nodes:
  primary: {kind: orthanc, ae_title: HA_PRIMARY, disposable: true}
  standby: {kind: orthanc, ae_title: HA_STANDBY, disposable: true}
settings: {}
"""


HEALTH_CHECK_AE_TITLE = "HAPROXY_CHECK"


def associate_rq(called_ae: str, calling_ae: str = HEALTH_CHECK_AE_TITLE) -> bytes:
    """The A-ASSOCIATE-RQ of HAProxy's DICOM health check: Verification, implicit VR little
    endian, built by the harness's one builder (harness/dicom/pdu.py)."""
    return pdu.associate_rq(
        called_ae, calling_ae, [(Verification, ImplicitVRLittleEndian)], max_pdu=16384
    )


RELEASE_RQ = pdu.AReleaseRQ().encode()


def haproxy_config(
    port: int,
    primary: tuple[str, int],
    standby: tuple[str, int],
    *,
    ae_title: str,
    inter_ms: int = 300,
    fall: int = 2,
    rise: int = 3,
) -> str:
    """TCP mode, DICOM health check, standby as `backup`, sessions cut when a side flips."""
    check = (
        f"    option tcp-check\n"
        f"    tcp-check connect\n"
        f"    tcp-check send-binary {associate_rq(ae_title).hex()}\n"
        f"    tcp-check expect rbinary ^02\n"
        f"    tcp-check send-binary {RELEASE_RQ.hex()}\n"
        f"    tcp-check expect rbinary ^06\n"
    )
    server_opts = f"check inter {inter_ms}ms fall {fall} rise {rise}"
    return (
        "global\n"
        "    maxconn 512\n"
        "defaults\n"
        "    mode tcp\n"
        "    timeout connect 2s\n"
        "    timeout client 60s\n"
        "    timeout server 60s\n"
        "    timeout check 1s\n"
        "    retries 2\n"
        "    option redispatch\n"
        "listen dicom\n"
        f"    bind 127.0.0.1:{port}\n"
        + check
        + f"    server primary {primary[0]}:{primary[1]} {server_opts} "
        "on-marked-down shutdown-sessions on-marked-up shutdown-backup-sessions\n"
        f"    server standby {standby[0]}:{standby[1]} {server_opts} backup "
        "on-marked-down shutdown-sessions\n"
    )


class HAProxy:
    """Debian's haproxy in the foreground (`-db`) as our child, never the system service."""

    def __init__(self, workdir: Path, config: str) -> None:
        self.workdir = workdir
        self.config_path = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        self.config = config
        self.handle: ProcessHandle | None = None
        self._popen = None

    def start(self) -> None:
        binary = shutil.which("haproxy") or (
            "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
        )
        if binary is None:
            raise EnvironmentProblem("haproxy not installed (install: apt-get install haproxy)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config)
        check = spawn(
            [binary, "-c", "-f", str(self.config_path)], log_path=self.log_path, cwd=self.workdir
        )[0]
        if check.wait(timeout=20) != 0:
            raise EnvironmentProblem(
                f"haproxy rejected its configuration:\n{log_tail(self.log_path)}"
            )
        self._popen, self.handle = spawn(
            [binary, "-f", str(self.config_path), "-db"], log_path=self.log_path, cwd=self.workdir
        )

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.stop(timeout_s=5)
        if self._popen is not None:
            try:
                self._popen.wait(timeout=5)
            except Exception:  # noqa: BLE001 - already SIGKILLed by stop()
                pass


class ReferenceHA:
    """Primary + standby Orthanc with Lua forwarding, behind HAProxy on a free loopback port."""

    def __init__(
        self,
        *,
        root: Path | None = None,
        ae_title: str = VIRTUAL_AE_TITLE,
        inter_ms: int = 300,
        fall: int = 2,
        rise: int = 3,
    ) -> None:
        self.root = root
        self.ae_title = ae_title
        self.inter_ms, self.fall, self.rise = inter_ms, fall, rise
        self.cluster: Cluster | None = None
        self.haproxy: HAProxy | None = None
        self.port: int | None = None
        self._own_root = False

    # -- addresses ---------------------------------------------------------------------
    @property
    def virtual(self) -> tuple[str, int, str]:
        """(host, port, AE title) modalities send to."""
        assert self.port is not None
        return ("127.0.0.1", self.port, self.ae_title)

    @property
    def primary(self) -> Node:
        assert self.cluster is not None
        return self.cluster["primary"]

    @property
    def standby(self) -> Node:
        assert self.cluster is not None
        return self.cluster["standby"]

    def client(self, timeout_s: float = 10.0, calling_ae: str = HARNESS_AE_TITLE) -> DimseClient:
        host, port, ae = self.virtual
        return DimseClient(host, port, ae, calling_ae, timeout_s=timeout_s)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, ready_timeout_s: float = 60.0) -> ReferenceHA:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="pacs-harness-ha-"))
            self.root.chmod(0o711)
            self._own_root = True
        try:
            self.cluster = Cluster.launch(
                parse_topology(HA_TOPOLOGY, "<reference-ha>"), root=self.root / "nodes"
            )
            self.port = free_port()
            self._configure(self.primary, lua=FORWARD_LUA.format(standby=self.standby.name))
            self._configure(self.standby, lua=None)
            for node in (self.standby, self.primary):
                node_faults.restart(node, ready_timeout_s)
            self.haproxy = HAProxy(
                self.root / "haproxy",
                haproxy_config(
                    self.port,
                    (self.primary.host, self.primary.dicom_port),
                    (self.standby.host, self.standby.dicom_port),
                    ae_title=self.ae_title,
                    inter_ms=self.inter_ms,
                    fall=self.fall,
                    rise=self.rise,
                ),
            )
            self.haproxy.start()
            self.wait_virtual_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _configure(self, node: Node, lua: str | None) -> None:
        """Accept any called AE title (HAProxy forwards raw TCP) and HAProxy's health check as
        a calling AE title; the primary gets Lua."""
        assert node.workdir is not None
        path = node.workdir / "orthanc.json"
        config = json.loads(path.read_text())
        config["DicomCheckCalledAet"] = False
        # Orthanc wants a port for every modality; HAProxy's own is never called back
        config["DicomModalities"]["haproxy-check"] = {
            "AET": HEALTH_CHECK_AE_TITLE, "Host": "127.0.0.1", "Port": self.port
        }
        if lua is not None:
            script = node.workdir / "forward.lua"
            script.write_text(lua)
            config["LuaScripts"] = [str(script)]
        write_private(path, json.dumps(config, indent=2))

    def wait_virtual_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if self.haproxy and self.haproxy.handle and not self.haproxy.handle.alive():
                raise EnvironmentProblem(f"haproxy exited:\n{log_tail(self.haproxy.log_path)}")
            try:
                if self.client(timeout_s=3).echo().status.ok:
                    return
            except (EnvironmentProblem, OSError) as exc:
                last = str(exc)
            time.sleep(0.2)
        raise EnvironmentProblem(f"virtual address {self.virtual} not answering ({last})")

    def tcp_open(self) -> bool:
        """Is HAProxy listening (for leak checks)."""
        with socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex(("127.0.0.1", self.port or 0)) == 0

    def stop(self) -> None:
        """Stop HAProxy and both Orthancs, remove the temporary directory."""
        if self.haproxy is not None:
            self.haproxy.stop()
        if self.cluster is not None:
            self.cluster.stop()
        if self._own_root and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ReferenceHA:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
