"""Deterministic UIDs under one root, so reruns with the same seed give the same UIDs.

Default root: ``2.25.`` (UUID-derived UIDs, PS3.5 B.2). Every UID is ``2.25.<int>`` where the
integer is a UUID built from a SHA-256 of (seed, purpose, indices); no registered org root is
needed and collisions with real archives are practically impossible. A user root such as
``1.2.826.0.1.3680043.10.1234.`` is extended with decimal digits of the same hash, up to the
64-character limit.
"""

from __future__ import annotations

import hashlib
import re
import uuid

from harness.errors import ConfigError

DEFAULT_UID_ROOT = "2.25."
IMPLEMENTATION_VERSION_NAME = "PACSHARN_SYN_1"  # <= 16 chars, fixed so files are stable
_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.?$")
_MAX_ROOT_LEN = 44  # leaves at least 20 digits of hash


def normalise_root(root: str | None) -> str:
    """Check a user UID root and return it ending with a dot."""
    if root is None or root == "":
        return DEFAULT_UID_ROOT
    root = root.strip()
    if not _ROOT_RE.match(root) or len(root) > _MAX_ROOT_LEN:
        raise ConfigError(
            f"uid_root: {root!r} is not a valid UID root (digits and dots, no leading zeros, "
            f"at most {_MAX_ROOT_LEN} characters, e.g. '1.2.826.0.1.3680043.10.1234.')"
        )
    return root if root.endswith(".") else root + "."


class UIDFactory:
    """Make UIDs from (purpose, indices) so that nothing depends on the clock or counters."""

    def __init__(self, root: str | None, seed: int) -> None:
        self.root = normalise_root(root)
        self.seed = seed
        self._room = 64 - len(self.root)

    def _digest(self, key: str) -> bytes:
        return hashlib.sha256(f"{self.seed}|{key}".encode()).digest()

    def uid(self, purpose: str, *indices: object) -> str:
        """A UID for one object; the same arguments always give the same UID."""
        key = purpose + "|" + "|".join(str(i) for i in indices)
        return self._from_digest(self._digest(key))

    def _from_digest(self, digest: bytes) -> str:
        if self.root == DEFAULT_UID_ROOT:
            return self.root + str(uuid.UUID(bytes=digest[:16], version=4).int)
        number = int.from_bytes(digest, "big") % (10 ** self._room)
        return self.root + str(number)

    def implementation_class_uid(self) -> str:
        """Fixed per root (not per seed): identifies this generator, not a run."""
        digest = hashlib.sha256(b"pacs-harness synthetic_data implementation 1").digest()
        return self._from_digest(digest)
