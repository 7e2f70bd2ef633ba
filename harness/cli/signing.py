"""`pacs-harness keygen` and what the signing commands share: the key options and the
verdict of a check (signature first, then the figures).

Exit codes of a check: 0 valid, 1 the signature or a figure does not match (named),
2 unreadable or unsigned file, or a bad key.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from harness.console import console, out
from harness.errors import EXIT_FINDINGS, EXIT_PASS, ConfigError

SIGNING_KEY_HELP = ("sign with this Ed25519 private key (PEM or raw 32 bytes, mode 0600); "
                    "default: the PACS_HARNESS_SIGNING_KEY environment variable (PEM, base64 "
                    "or a path), else unsigned")
PUBLIC_KEY_HELP = ("the signer's public key (base64 of 32 bytes, PEM, or a file of either) "
                   "to prove who signed; without it the embedded key proves integrity only")


def signing_key_option(func):
    return click.option("--signing-key", "signing_key_path", type=click.Path(dir_okay=False),
                        default=None, help=SIGNING_KEY_HELP)(func)


def public_key_option(func):
    return click.option("--public-key", "public_key", default=None, help=PUBLIC_KEY_HELP)(func)


def read_json_document(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`, or one line naming the file (exit 2)."""
    try:
        document = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: not a {what} (a JSON object is expected)")
    return document


def finish_check(path: Path, document: dict[str, Any], public_key: str | None,
                 figures: list[str]) -> None:
    """Print the signature's check and the figures' problems; exit 0, 1 (or 2 unsigned)."""
    from harness.report.signing import check_signature, load_public_key

    pinned = load_public_key(public_key) if public_key else None
    try:
        check = check_signature(document, pinned)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    out.print(f"{path}: {check.message}", markup=False, highlight=False)
    for problem in figures:
        out.print(f"{path}: figures do not match: {problem}", markup=False, highlight=False)
    if check.valid and not figures:
        out.print(f"{path}: figures recomputed: consistent", markup=False, highlight=False)
        sys.exit(EXIT_PASS)
    sys.exit(EXIT_FINDINGS)


def write_signed(path: Path, document: dict[str, Any], key: Any) -> dict[str, Any]:
    """Sign `document` with `key` and write it to `path` atomically (a reader never sees
    half a file); says so on stderr. Returns the signed document."""
    from harness.report.signing import sign_document

    signed = sign_document(document, key)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(signed, indent=2, default=str))
    tmp.replace(path)
    say_signed(path, signed)
    return signed


def say_signed(path: Path, document: dict[str, Any]) -> None:
    """One line on stderr: signed with which public key, or plainly unsigned."""
    signature = document.get("signature")
    if isinstance(signature, dict):
        console.print(f"{path}: signed (Ed25519, public key {signature['public_key']})",
                      markup=False, highlight=False)
    else:
        digest = "its sha256 is a content digest, not protection; " if "sha256" in document else ""
        console.print(f"{path}: UNSIGNED (anyone can edit it unseen: {digest}give "
                      "--signing-key or PACS_HARNESS_SIGNING_KEY)", markup=False, highlight=False)


@click.command("keygen")
@click.argument("path", type=click.Path(dir_okay=False))
def keygen(path: str) -> None:
    """Make an Ed25519 key pair: PATH (private, PEM, mode 0600) and PATH.pub (public, PEM).

    Give PATH to `--signing-key` (or PACS_HARNESS_SIGNING_KEY) to sign SLA evidence and
    readiness reports; hand the printed public key to whoever verifies them (--public-key).
    """
    from harness.report.signing import generate_key_pair

    private_path, public_path, public_b64 = generate_key_pair(path)
    console.print(f"private key: {private_path} (mode 0600; keep it secret)", markup=False)
    console.print(f"public key:  {public_path}", markup=False)
    out.print(public_b64, markup=False, highlight=False)
