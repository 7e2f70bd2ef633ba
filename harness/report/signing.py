"""Ed25519 signatures (RFC 8032) over a JSON document: evidence a vendor or a hospital cannot edit.

Why: a SHA-256 anyone can recompute proves nothing after an edit; a signature made with a key
only the signer holds does. The public key travels in the document (`signature.public_key`):
checked against it, a signature proves the document was not changed since someone signed it;
checked against a key pinned beforehand (given out of band), it also proves who signed it.

Canonical form (the bytes that are signed): the document without its `signature` member,
serialised as JSON with object keys sorted, the separators "," and ":" and no other
whitespace, every non-ASCII character escaped as \\uXXXX, numbers as Python's `json` writes
them, encoded as UTF-8; i.e. `json.dumps(body, sort_keys=True, separators=(",", ":"))`.

`signature` = {"algorithm": "Ed25519", "public_key": base64 of the raw 32-byte key,
"value": base64 of the 64-byte signature, "canonical_form": the rule above in one line}.

Keys: a private key is a PEM file (PKCS#8, e.g. `openssl genpkey -algorithm ed25519` or
`pacs-harness keygen`), a raw 32-byte file, or base64 of those 32 bytes; from a file
(`--signing-key`) or the environment variable PACS_HARNESS_SIGNING_KEY (PEM text, base64,
or a path). A key file readable by other users is refused, as ssh does. Key material is
never printed or logged: errors name the file or the variable only.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from harness.errors import ConfigError

SIGNING_KEY_ENV = "PACS_HARNESS_SIGNING_KEY"
ALGORITHM = "Ed25519"
CANONICAL_FORM = ('JSON of the document without "signature": keys sorted, separators "," '
                  'and ":", non-ASCII as \\uXXXX, UTF-8')


def canonical_bytes(document: dict[str, Any]) -> bytes:
    """The bytes a signature covers: the document minus `signature`, canonical JSON."""
    body = {key: value for key, value in document.items() if key != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


# ---------------------------------------------------------------------------------------
# Keys


def _private_key_from_bytes(data: bytes, where: str) -> Ed25519PrivateKey:
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(text, password=None)
        except TypeError:
            raise ConfigError(f"{where}: encrypted private keys are not supported") from None
        except ValueError:
            raise ConfigError(f"{where}: not a readable PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{where}: not an Ed25519 private key "
                              f"({type(key).__name__.removeprefix('_')})")
        return key
    raw = data if len(data) == 32 else _base64_32(text)
    if raw is None:
        raise ConfigError(f"{where}: not an Ed25519 private key (PEM, raw 32 bytes or "
                          "base64 of them)")
    return Ed25519PrivateKey.from_private_bytes(raw)


def _base64_32(text: bytes) -> bytes | None:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """A private key file; refused when group or others may read it (chmod 600)."""
    target = Path(path)
    try:
        mode = target.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"{target}: private key readable by other users "
                              f"(mode {stat.S_IMODE(mode):o}); run chmod 600 {target}")
        data = target.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{target}: cannot read the signing key: "
                          f"{exc.strerror or exc}") from None
    return _private_key_from_bytes(data, str(target))


def signing_key(path: str | None) -> Ed25519PrivateKey | None:
    """The key from `--signing-key PATH`, else from PACS_HARNESS_SIGNING_KEY, else None."""
    if path:
        return load_private_key(path)
    value = os.environ.get(SIGNING_KEY_ENV, "").strip()
    if not value:
        return None
    if value.startswith("-----BEGIN") or _base64_32(value.encode()) is not None:
        return _private_key_from_bytes(value.encode(), SIGNING_KEY_ENV)
    if not Path(value).is_file():
        raise ConfigError(f"{SIGNING_KEY_ENV}: neither a PEM or base64 key nor a key file")
    return load_private_key(value)


def public_key_base64(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def load_public_key(value: str) -> Ed25519PublicKey:
    """A public key given as base64 of its 32 raw bytes, PEM text, or a file of either."""
    where = "--public-key"
    data = value.encode()
    if not value.startswith("-----BEGIN") and _base64_32(data) is None:
        try:
            data = Path(value).read_bytes()
        except OSError as exc:
            raise ConfigError(f"--public-key {value}: neither a base64 key nor a readable "
                              f"file ({exc.strerror or exc})") from None
        where = value
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text)
        except ValueError:
            raise ConfigError(f"{where}: not a readable PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"{where}: not an Ed25519 public key")
        return key
    raw = data if len(data) == 32 else _base64_32(text)
    if raw is None:
        raise ConfigError(f"{where}: not an Ed25519 public key (PEM, raw 32 bytes or base64)")
    return Ed25519PublicKey.from_public_bytes(raw)


def generate_key_pair(path: str | os.PathLike[str]) -> tuple[Path, Path, str]:
    """Write a new private key (PEM, mode 0600, never overwritten) and PATH.pub (PEM)."""
    private_path = Path(path)
    public_path = private_path.with_name(private_path.name + ".pub")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    for target in (private_path, public_path):
        if target.exists():
            raise ConfigError(f"{target}: exists; keygen never overwrites a key")
    try:
        # created 0600 from the start: the key is never readable by others, not even briefly
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        public_path.write_bytes(public_pem)
    except OSError as exc:
        raise ConfigError(f"{exc.filename or private_path}: cannot write the key: "
                          f"{exc.strerror or exc}") from None
    return private_path, public_path, public_key_base64(key.public_key())


# ---------------------------------------------------------------------------------------
# Signing and checking


def sign_document(document: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """The document with `signature` set (any earlier signature is replaced)."""
    body = {k: v for k, v in document.items() if k != "signature"}
    value = key.sign(canonical_bytes(body))
    return {**body, "signature": {
        "algorithm": ALGORITHM,
        "public_key": public_key_base64(key.public_key()),
        "value": base64.b64encode(value).decode(),
        "canonical_form": CANONICAL_FORM,
    }}


@dataclass(frozen=True)
class SignatureCheck:
    """The outcome of checking a signature, and what it proves."""

    valid: bool
    pinned: bool  # checked against a key given by the verifier, not the embedded one
    public_key: str  # base64 of the key the signature was checked against
    message: str


def check_signature(document: dict[str, Any],
                    pinned: Ed25519PublicKey | None = None) -> SignatureCheck:
    """Check `document["signature"]`; ConfigError when unsigned or malformed (exit 2)."""
    signature = document.get("signature")
    if not isinstance(signature, dict):
        raise ConfigError("unsigned: no signature to check (sign with --signing-key or "
                          f"{SIGNING_KEY_ENV})")
    if signature.get("algorithm") != ALGORITHM:
        raise ConfigError(f"signature.algorithm {signature.get('algorithm')!r}: only "
                          f"{ALGORITHM} is supported")
    embedded_text = str(signature.get("public_key", ""))
    embedded_raw = _base64_32(embedded_text.encode())
    try:
        value = base64.b64decode(str(signature.get("value", "")), validate=True)
    except (binascii.Error, ValueError):
        value = b""
    if embedded_raw is None or len(value) != 64:
        raise ConfigError("signature: public_key or value is not valid base64 of an Ed25519 "
                          "key (32 bytes) and signature (64 bytes)")
    key = pinned or Ed25519PublicKey.from_public_bytes(embedded_raw)
    key_text = public_key_base64(key)
    if pinned is not None and key_text != embedded_text:
        return SignatureCheck(False, True, key_text,
                              f"signed by key {embedded_text}, not by the pinned key {key_text}")
    try:
        key.verify(value, canonical_bytes(document))
    except InvalidSignature:
        return SignatureCheck(False, pinned is not None, key_text,
                              "signature does not match the content: the document was "
                              "changed after it was signed")
    proves = ("integrity and origin (pinned key)" if pinned is not None else
              "integrity only: checked against the key embedded in the document; "
              "pin the signer's key with --public-key to prove who signed it")
    return SignatureCheck(True, pinned is not None, key_text,
                          f"signature valid ({ALGORITHM}, key {key_text}): proves {proves}")
