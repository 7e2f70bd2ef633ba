"""Finding the external programs the harness drives (Orthanc, DCMTK).

pynetdicom installs Python scripts named like DCMTK's tools (storescu, findscu, ...), which
may come first in PATH; a DCMTK tool is therefore looked up in the system directories first.
"""

from __future__ import annotations

import os
import shutil

from harness.errors import EnvironmentProblem

SYSTEM_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin")
#: the DCMTK client tools the harness and its tests call; a server's own hint is declared
#: with its kind (harness/nodes/capabilities.py, `binaries`)
INSTALL_HINTS = {
    "storescu": "apt-get install dcmtk",
    "findscu": "apt-get install dcmtk",
    "getscu": "apt-get install dcmtk",
    "movescu": "apt-get install dcmtk",
    "echoscu": "apt-get install dcmtk",
}


def _is_dcmtk_binary(path: str) -> bool:
    """True for a compiled program, False for a Python console-script shim."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"\x7fELF"
    except OSError:
        return False


def find_binary(name: str) -> str | None:
    """Absolute path of an installed program, preferring compiled system binaries."""
    for directory in SYSTEM_DIRS:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK) and _is_dcmtk_binary(candidate):
            return candidate
    found = shutil.which(name)
    if found and _is_dcmtk_binary(os.path.realpath(found)):
        return found
    return None


def require_binary(name: str, hint: str | None = None) -> str:
    """Like find_binary, but an EnvironmentProblem (exit 3) that says how to install it."""
    path = find_binary(name)
    if path is None:
        hint = hint or INSTALL_HINTS.get(name, "install it")
        raise EnvironmentProblem(f"{name} not found on this machine (install: {hint})")
    return path
