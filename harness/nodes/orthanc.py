"""Orthanc launched as a process from the installed Debian package.

The configuration is generated per node into its work directory: AE title, ports, storage,
the DICOMweb plugin, and the DICOM modalities table filled with every other node of the
topology (and the harness itself), so C-MOVE between any two nodes works without hand edits.
"""

from __future__ import annotations

import json
import os

import requests

from harness.errors import EnvironmentProblem
from harness.launch.postgres import PostgresServer
from harness.nodes.base import Node, NodeStatistics, Peer
from harness.tools import require_binary

DEBIAN_PLUGIN_DIR = "/usr/share/orthanc/plugins"
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"
POSTGRESQL_INDEX_PLUGIN = "libOrthancPostgreSQLIndex.so"


def orthanc_configuration(node: Node, peers: list[Peer], plugins: list[str]) -> dict:
    """The JSON configuration Orthanc reads, as a process or in a container."""
    assert node.workdir is not None
    return {
        "Name": node.name,
        "StorageDirectory": str(node.workdir / "storage"),
        "IndexDirectory": str(node.workdir / "index"),
        "DicomAet": node.ae_title,
        "DicomPort": node.dicom_port,
        "HttpPort": node.http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "HttpServerEnabled": True,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "UnknownSopClassAccepted": True,
        "DicomModalities": {
            peer.name: {"AET": peer.ae_title, "Host": peer.host, "Port": peer.port}
            for peer in peers
        },
        "DicomModalitiesInDatabase": False,
        "OrthancPeers": {},
        "OverwriteInstances": True,
        "StableAge": 2,
        "SaveJobs": False,
        "ConcurrentJobs": 2,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
        "DicomScuTimeout": 30,
        "HttpTimeout": 60,
        "DeidentifyLogs": True,
        "LogExportedResources": False,
        "Plugins": plugins,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
    }


class OrthancNode(Node):
    """Orthanc as a process or container; `index: postgresql` adds a PostgreSQL sidecar."""

    kind = "orthanc"
    has_process = True
    image_program = ("/usr/sbin/Orthanc",)
    dcmtk_network = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.postgres_port: int | None = None

    def prepare(self, peers: list[Peer]) -> None:
        super().prepare(peers)
        assert self.workdir is not None
        for sub in ("storage", "index"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        plugins = [DICOMWEB_PLUGIN]
        if self.spec.index == "postgresql":
            from harness.cluster import free_port

            self.postgres_port = free_port()
            plugins.append(POSTGRESQL_INDEX_PLUGIN)
        if self.spec.launch == "docker":
            plugin_paths = [f"{DEBIAN_PLUGIN_DIR}/{p}" for p in plugins] if self.local_image else []
        else:
            plugin_paths = [f"{DEBIAN_PLUGIN_DIR}/{p}" for p in plugins]
            missing = [p for p in plugin_paths if not os.path.exists(p)]
            if missing:
                raise EnvironmentProblem(
                    f"node {self.name}: Orthanc plugin {missing[0]} not installed "
                    "(install: apt-get install orthanc-dicomweb orthanc-postgresql)"
                )
        config = orthanc_configuration(self, self.peers, plugin_paths)
        if self.postgres_port:
            config["PostgreSQL"] = {
                **PostgresServer(self.workdir / "pg", self.postgres_port).dsn(),
                "EnableIndex": True,
                "EnableStorage": False,
                "Lock": False,
            }
        config.update(self.spec.orthanc_config)  # the topology's own settings win
        (self.workdir / "orthanc.json").write_text(json.dumps(config, indent=2))

    def data_directories(self) -> tuple[str, ...]:
        # with index: postgresql the index lives in PostgreSQL (the DR drill pg_dumps it)
        return ("storage",) if self.spec.index == "postgresql" else ("storage", "index")

    def program(self) -> list[str]:
        return [require_binary("Orthanc")]

    def arguments(self) -> list[str]:
        return [str(self.workdir / "orthanc.json")]

    def container_mounts(self) -> dict:
        mounts = super().container_mounts()
        if not self.local_image:  # the official image reads /etc/orthanc/*.json
            mounts[self.workdir / "orthanc.json"] = "/etc/orthanc/orthanc.json"
        return mounts

    def container_environment(self) -> dict[str, str]:
        if self.local_image:
            return {}
        env = {"DICOM_WEB_PLUGIN_ENABLED": "true"}
        if self.postgres_port:
            env["POSTGRESQL_PLUGIN_ENABLED"] = "true"
        return env

    def start_sidecars(self, *, detached: bool) -> None:
        if self.postgres_port:
            postgres = PostgresServer(self.workdir / "pg", self.postgres_port)
            postgres.start(detached=detached)
            self.sidecars["postgres"] = postgres.handle

    def ready(self) -> bool:
        try:
            rsp = requests.get(f"{self.http_url}/system", timeout=5)
        except requests.RequestException as exc:
            raise EnvironmentProblem(f"HTTP {self.http_url}: {exc.__class__.__name__}") from None
        return rsp.status_code == 200 and super().ready()

    def version(self) -> str:
        try:
            return f"Orthanc {self.rest().system()['Version']}"
        except (EnvironmentProblem, KeyError):
            return "Orthanc (version unknown)"

    def _wipe(self) -> None:
        self.rest().delete_all()

    def statistics(self) -> NodeStatistics:
        stats = self.rest().statistics()
        return NodeStatistics(
            patients=int(stats["CountPatients"]),
            studies=int(stats["CountStudies"]),
            series=int(stats["CountSeries"]),
            instances=int(stats["CountInstances"]),
        )
