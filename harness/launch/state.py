"""Where launched clusters keep their state, so `down` and `status` find them again."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.config import Topology

STATE_FILE = "state.json"


def state_root() -> Path:
    """Where detached clusters keep their state (PACS_HARNESS_STATE_DIR overrides)."""
    env = os.environ.get("PACS_HARNESS_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "pacs-harness"


def state_dir_for(topology: Topology) -> Path:
    """One state directory per topology file (by absolute path), `default` for the default."""
    if topology.is_default:
        return state_root() / "default"
    digest = hashlib.sha256(os.path.abspath(topology.source).encode()).hexdigest()[:12]
    return state_root() / f"{topology.name}-{digest}"


@contextlib.contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """Serialise up/down of one topology between concurrent commands."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
