"""Where a node serves its worklist and MPPS, and how the harness reads its MPPS steps back.

A node's worklist is at its DICOM port and AE title, except where its kind runs the worklist
server beside the archive (dcmqrscp with wlmscpfs: `worklist_port`). The MPPS steps are read
back from the SCP's own store where the harness can (the embedded PACS's mpps.sqlite); for any
other provider the check falls back to what the modality sent, and says so.
"""

from __future__ import annotations

from typing import Any

from pydicom import Dataset

from harness.dicom.mpps import MppsClient
from harness.dicom.peer import HARNESS_AE_TITLE
from harness.dicom.worklist import WorklistClient
from harness.errors import ConfigError


def worklist_client(node: Any, calling_ae: str = HARNESS_AE_TITLE) -> WorklistClient:
    """A worklist C-FIND client for `node` (ConfigError when its kind serves none)."""
    if not node.capabilities.worklist:
        raise ConfigError(f"node {node.name} ({node.kind}) serves no Modality Worklist")
    port = getattr(node, "worklist_port", None) or node.access_port or node.dicom_port
    tls = None if getattr(node, "worklist_port", None) else node.tls_client()
    return WorklistClient(node.host, port, node.ae_title, calling_ae, tls=tls)


def mpps_client(node: Any, calling_ae: str = HARNESS_AE_TITLE) -> MppsClient:
    """An MPPS client for `node` (ConfigError when its kind has no MPPS SCP)."""
    if not node.capabilities.mpps:
        raise ConfigError(f"node {node.name} ({node.kind}) has no MPPS SCP")
    return MppsClient(node.host, node.access_port or node.dicom_port, node.ae_title,
                      calling_ae, tls=node.tls_client())


def read_mpps(node: Any) -> dict[str, tuple[str, Dataset]] | None:
    """The MPPS steps as `node` keeps them, or None when the harness cannot read them."""
    storage_dir = getattr(node, "storage_dir", None)
    if node.kind != "embedded" or storage_dir is None:
        return None
    from harness.embedded_pacs.mpps import read_steps

    return read_steps(storage_dir)
