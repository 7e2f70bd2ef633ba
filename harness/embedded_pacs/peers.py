"""The peers file of the embedded PACS: C-MOVE destinations and the calling AE titles it
accepts (PS3.8 7.1.1.6, rejection reason 3).

``PEERS.json`` maps AE titles to addresses, ``{"AETITLE": {"host": "127.0.0.1", "port": 11113}}``;
``"tls": true`` in an entry says the peer takes DICOM over TLS only (PS3.15 B.1), so C-MOVE
sub-associations to it use TLS with this node's certificate (``--tls-certificate``).
It is re-read on every association and every C-MOVE request, so the harness may rewrite it
while the server runs (write it to a temporary name and ``os.replace`` it, so a request never
sees half a file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

#: What a broken peers file raises while it is read.
PEERS_FILE_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError)


def load_peers(path: str | os.PathLike[str] | None) -> dict[str, tuple[str, int]]:
    """Read the peers table (AE title -> (host, port)); no file: no peers."""
    return {title: (host, port) for title, (host, port, _tls) in load_peer_table(path).items()}


def load_peer_table(path: str | os.PathLike[str] | None) -> dict[str, tuple[str, int, bool]]:
    """Read the peers table (AE title -> (host, port, takes TLS)); no file: no peers."""
    if path is None:
        return {}
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    peers: dict[str, tuple[str, int, bool]] = {}
    for title, spec in data.items():
        host = spec.get("host") or spec.get("address") or "127.0.0.1"
        tls = spec.get("tls", False)
        if not isinstance(tls, bool):
            raise ValueError(f"peer {title}: 'tls' must be true or false")
        peers[str(title).strip()] = (str(host), int(spec["port"]), tls)
    return peers
