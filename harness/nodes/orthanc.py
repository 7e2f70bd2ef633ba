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
from harness.nodes.base import Node, NodeStatistics, Peer
from harness.tools import require_binary

DICOMWEB_PLUGIN_PATHS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)


def orthanc_configuration(node: Node, peers: list[Peer]) -> dict:
    """The JSON configuration Orthanc reads (also mounted into containers later)."""
    assert node.workdir is not None
    plugins = [p for p in DICOMWEB_PLUGIN_PATHS if os.path.exists(p)][:1]
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
    kind = "orthanc"
    has_process = True

    def prepare(self, peers: list[Peer]) -> None:
        super().prepare(peers)
        assert self.workdir is not None
        for sub in ("storage", "index"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        config = orthanc_configuration(self, self.peers)
        (self.workdir / "orthanc.json").write_text(json.dumps(config, indent=2))

    def command(self) -> list[str]:
        return [require_binary("Orthanc"), str(self.workdir / "orthanc.json")]

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
