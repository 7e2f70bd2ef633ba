"""Command line of the embedded PACS::

    python -m harness.embedded_pacs --ae-title LEGACY --port 11112 --storage DIR \\
        --peers PEERS.json [--host 127.0.0.1] [--log-level info] [--timeout 30] \\
        [--audit-syslog udp://127.0.0.1:PORT]

``--port 0`` binds an ephemeral port; the startup line on stderr always names the real one::

    embedded PACS <AE> listening on <host>:<port>

Exit codes: 0 after SIGTERM/SIGINT, 2 usage (or an index of a newer schema version), 3 storage
unusable or port taken.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import pydicom.config
from pynetdicom import _config

from harness.embedded_pacs.audit import AuditSender, AuditSyslogError, parse_target
from harness.embedded_pacs.connection import DEFAULT_TIMEOUT_S
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
    audit = parser.add_argument_group("audit trail (IHE ATNA, PS3.15 A.5)")
    audit.add_argument(
        "--audit-syslog",
        metavar="udp://HOST:PORT",
        default=None,
        help="send one RFC 5424 audit message per operation served there (default: none)",
    )
    args = parser.parse_args(argv)
    if args.audit_syslog is not None:
        try:
            parse_target(args.audit_syslog)
        except AuditSyslogError as exc:
            parser.error(str(exc))
    title = args.ae_title.strip()
    if not title or len(title) > 16 or "\\" in title or not title.isprintable():
        parser.error(f"--ae-title {args.ae_title!r}: 1-16 printable characters, no backslash")
    if not args.timeout > 0:
        parser.error(f"--timeout {args.timeout}: must be positive")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: out of range")
    args.ae_title = title
    return args


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
    audit = AuditSender(args.audit_syslog, args.ae_title, args.host) if args.audit_syslog else None
    return serve(
        args.ae_title, args.port, args.storage, args.peers, host=args.host, timeout_s=args.timeout,
        audit=audit,
    )


if __name__ == "__main__":
    code = main()
    # pynetdicom's reactor threads are not daemons and a handler may still be busy (a long
    # C-FIND): exit now rather than wait for them; stores are atomic and SQLite is journalled.
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)
