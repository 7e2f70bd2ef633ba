"""Command line of the embedded PACS::

    python -m harness.embedded_pacs --ae-title LEGACY --port 11112 --storage DIR \\
        --peers PEERS.json [--host 127.0.0.1] [--log-level info] [--timeout 30] \\
        [--audit-syslog udp://127.0.0.1:PORT | tls://127.0.0.1:PORT] [--hl7-port PORT] \\
        [--tls-certificate PEM --tls-key PEM --tls-ca PEM [--tls-min-version 1.2]
         [--tls-client-certificate required|optional|none]]

With ``--tls-*`` the port takes DICOM over TLS only (PS3.15 B.1); the same certificate is
presented on C-MOVE sub-associations to peers the peers file marks ``"tls": true``, and to
the audit repository of ``--audit-syslog tls://`` (RFC 5425; it requires the ``--tls-*`` files).

``--hl7-port`` adds an MLLP listener taking ADT^A08 and ADT^A40 (hl7.py); off by default.

``--port 0`` binds an ephemeral port; the startup line on stderr always names the real one::

    embedded PACS <AE> listening on <host>:<port>

Exit codes: 0 after SIGTERM/SIGINT, 2 usage (or an index of a newer schema version), 3 storage
unusable or port taken.
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import sys
from pathlib import Path

import pydicom.config
from pynetdicom import _config

from harness.embedded_pacs.audit import AuditSender, AuditSyslogError, parse_target
from harness.embedded_pacs.connection import (
    CLIENT_CERTIFICATE_MODES,
    DEFAULT_TIMEOUT_S,
    TLS_VERSIONS,
    client_tls_context,
    server_tls_context,
)
from harness.embedded_pacs.server import serve


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m harness.embedded_pacs",
        description="Embedded PACS: Verification, Storage and Query/Retrieve SCP.",
    )
    parser.add_argument("--ae-title", required=True, help="AE title of this node (max 16)")
    parser.add_argument("--port", type=int, required=True, help="TCP port, 0 for ephemeral")
    parser.add_argument("--storage", type=Path, required=True, help="storage directory")
    parser.add_argument(
        "--peers",
        type=Path,
        default=None,
        help="JSON of C-MOVE destinations, re-read on every C-MOVE",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds a peer has for its A-ASSOCIATE-RQ and for each PDU once started "
        f"(idle and DIMSE timeouts are twice this; default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--hl7-port", type=int, default=None,
        help="MLLP port for HL7 v2 ADT^A08/A40 (hl7.py), 0 for ephemeral (default: off)",
    )
    audit = parser.add_argument_group("audit trail (IHE ATNA, PS3.15 A.5)")
    audit.add_argument(
        "--audit-syslog",
        metavar="udp://HOST:PORT|tls://HOST:PORT",
        default=None,
        help="send one RFC 5424 audit message per operation served there; tls:// is RFC 5425 "
        "with the --tls-* certificate (default: none)",
    )
    add_tls_arguments(parser)
    args = parser.parse_args(argv)
    check_tls_arguments(parser, args)
    if args.audit_syslog is not None:
        try:
            target = parse_target(args.audit_syslog)
        except AuditSyslogError as exc:
            parser.error(str(exc))
        if target.scheme == "tls" and args.tls_certificate is None:
            parser.error(f"--audit-syslog {args.audit_syslog} needs --tls-certificate, --tls-key "
                         "and --tls-ca (the node authenticates to the audit repository, RFC 5425)")
    title = args.ae_title.strip()
    if not title or len(title) > 16 or "\\" in title or not title.isprintable():
        parser.error(f"--ae-title {args.ae_title!r}: 1-16 printable characters, no backslash")
    if not args.timeout > 0:
        parser.error(f"--timeout {args.timeout}: must be positive")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: out of range")
    if args.hl7_port is not None and not 0 <= args.hl7_port <= 65535:
        parser.error(f"--hl7-port {args.hl7_port}: out of range")
    args.ae_title = title
    return args


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """DICOM over TLS (PS3.15 B.1): all three files, or none for plain TCP."""
    tls = parser.add_argument_group("DICOM over TLS")
    tls.add_argument("--tls-certificate", type=Path, help="this node's certificate (PEM)")
    tls.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    tls.add_argument("--tls-ca", type=Path, help="CA certificates trusted for peers (PEM)")
    tls.add_argument("--tls-min-version", default="1.2", choices=list(TLS_VERSIONS))
    tls.add_argument(
        "--tls-client-certificate", default="required", choices=list(CLIENT_CERTIFICATE_MODES),
        help="whether a client must present a certificate the CA signed (default required)",
    )


def check_tls_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    files = {"--tls-certificate": args.tls_certificate, "--tls-key": args.tls_key,
             "--tls-ca": args.tls_ca}
    given = [name for name, path in files.items() if path is not None]
    if given and len(given) < len(files):
        missing = ", ".join(name for name in files if name not in given)
        parser.error(f"{', '.join(given)} needs {missing} too")
    for name, path in files.items():
        if path is not None and not path.is_file():
            parser.error(f"{name} {path}: no such file")


def tls_contexts(args: argparse.Namespace) -> tuple[ssl.SSLContext, ssl.SSLContext] | None:
    """(server, client) contexts from the ``--tls-*`` arguments, or None for plain TCP."""
    if args.tls_certificate is None:
        return None
    files = (str(args.tls_certificate), str(args.tls_key), str(args.tls_ca))
    return (
        server_tls_context(*files, args.tls_min_version, args.tls_client_certificate),
        client_tls_context(*files),
    )


def audit_sender(
    args: argparse.Namespace, client_tls: ssl.SSLContext | None
) -> AuditSender | None:
    """The ``--audit-syslog`` sender; over TLS (RFC 5425) it presents the node's own
    certificate, with the client context C-MOVE sub-associations use."""
    if args.audit_syslog is None:
        return None
    context = client_tls if parse_target(args.audit_syslog).scheme == "tls" else None
    return AuditSender(args.audit_syslog, args.ae_title, args.host, context)


def _one_line(record: logging.LogRecord) -> bool:
    """Log records without tracebacks: pynetdicom logs one when a sub-operation cannot be
    sent (no context for the class); the message line says enough for a test node's log."""
    if record.exc_info:
        exc = record.exc_info[1]
        record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
        record.args = None
        record.exc_info = None
        record.exc_text = None
    record.stack_info = None
    return True


def configure_logging(level: str, ae_title: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_one_line)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s embedded-pacs[{ae_title}] %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    # pynetdicom's and pydicom's own messages can carry identifiers: warnings and errors only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    # Validation messages quote values (names included); stored data is kept as received.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    args = parse_args(argv)
    configure_logging(args.log_level, args.ae_title)
    try:
        tls = tls_contexts(args)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        print(f"embedded PACS {args.ae_title}: TLS files unusable: {exc}", file=sys.stderr)
        return 2
    audit = audit_sender(args, tls[1] if tls else None)
    return serve(
        args.ae_title, args.port, args.storage, args.peers, host=args.host,
        timeout_s=args.timeout, tls=tls, audit=audit, hl7_port=args.hl7_port,
    )


if __name__ == "__main__":
    code = main()
    # pynetdicom's reactor threads are not daemons and a handler may still be busy (a long
    # C-FIND): exit now rather than wait for them; stores are atomic and SQLite is journalled.
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)
