"""C-GET and C-MOVE SCP of the embedded PACS: send the stored files (PS3.4 C.4.2, C.4.3).

Retrieve keys are hierarchical unique keys: PatientID (PATIENT), StudyInstanceUID (STUDY),
SeriesInstanceUID (SERIES), SOPInstanceUID (IMAGE), each a single value or a backslash list;
unique keys of higher levels narrow the selection when present. A missing key of the level, an
unknown level, or PATIENT level in Study Root gives 0xA900. pynetdicom can only report a
C-GET/C-MOVE handler status after one announced sub-operation, so such a 0xA900 response
carries NumberOfFailedSuboperations 1, and a C-MOVE first associates with the (known)
destination. Unknown C-MOVE destination or unreachable destination: 0xA801.

Each instance goes out as stored, or converted (conversion.py). If no usable context remains
(e.g. a C-GET requestor that did not offer the SOP class, or offered only another compressed
syntax), that C-STORE sub-operation counts as failed and its SOP Instance UID goes into the
Failed SOP Instance UID List: the final status is 0xB000 (warning) if some sub-operations
succeeded, or 0xA702 if all failed. The server never crashes on it.

C-MOVE proposes one presentation context per (SOP class, transfer syntax) pair of the matched
instances, then, room permitting (128 contexts at most), Explicit and Implicit VR Little Endian
for each class, so a destination without the stored syntax gets a conversion. Instances whose
pair did not fit are failed sub-operations.
"""

from __future__ import annotations

import logging
import sqlite3
import ssl
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification

from harness.embedded_pacs.connection import prompt_tcp
from harness.embedded_pacs.conversion import for_peer
from harness.embedded_pacs.peers import PEERS_FILE_ERRORS, load_peer_table
from harness.embedded_pacs.query import (
    ATTRS,
    LEVELS,
    UNIQUE_KEYWORD,
    InvalidIdentifier,
    query_level,
    query_values,
)
from harness.embedded_pacs.storage import INDEX_FILENAME, connect

LOG = logging.getLogger("harness.embedded_pacs")

MAX_CONTEXTS = 128  # presentation contexts one A-ASSOCIATE-RQ may propose (PS3.8 9.3.2.2)


def retrieve_rows(conn: sqlite3.Connection, identifier: Dataset, model: UID) -> list[sqlite3.Row]:
    """Instances selected by a C-GET/C-MOVE identifier: unique keys of the level and above."""
    level = query_level(identifier, model)
    clauses: list[str] = []
    params: list[str] = []
    for lvl in range(level + 1):
        keyword = UNIQUE_KEYWORD[lvl]
        values = query_values(identifier.get(keyword))
        if not values:
            if lvl == level:
                raise InvalidIdentifier(f"{keyword} is required at {LEVELS[level]} level")
            continue
        column = ATTRS[keyword].column
        clauses.append(f"{column} IN ({','.join('?' * len(values))})")
        params.extend(values)
    return conn.execute(
        f"SELECT * FROM instances WHERE {' AND '.join(clauses)} ORDER BY study_instance_uid, "
        "series_instance_uid, CAST(instance_number AS INTEGER), sop_instance_uid",
        params,
    ).fetchall()


def move_contexts(pairs: Iterable[tuple[str, str]]) -> list[PresentationContext]:
    """Contexts for a C-MOVE sub-association: stored syntaxes first so files go out unchanged,
    then explicit and implicit VR little endian for classes stored in another syntax (what
    every Storage SCP accepts, PS3.5 10.1), so a conversion is possible."""
    unique = list(dict.fromkeys((str(c), str(t)) for c, t in pairs))
    wanted = list(unique)
    for sop_class, ts in unique:
        for fallback_ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            fallback = (sop_class, str(fallback_ts))
            if ts != fallback_ts and fallback not in wanted:
                wanted.append(fallback)
    # Exact pairs take precedence over fallbacks when the 128 limit bites.
    return [build_context(c, t) for c, t in wanted[:MAX_CONTEXTS]]


class Retriever:
    """C-GET and C-MOVE handlers over one storage directory and peers file."""

    def __init__(
        self, storage_dir: Path, peers_file: Path | None, client_tls: ssl.SSLContext | None = None
    ) -> None:
        self.storage = storage_dir
        self.db_file = storage_dir / INDEX_FILENAME
        self.peers_file = peers_file
        self.client_tls = client_tls  # our certificate, for destinations that take TLS only

    def _select(self, event: Any) -> list[sqlite3.Row]:
        model = UID(event.request.AffectedSOPClassUID)
        conn = connect(self.db_file)
        try:
            return retrieve_rows(conn, event.identifier, model)
        finally:
            conn.close()

    def _payload(
        self, row: sqlite3.Row, accepted: list[PresentationContext] | None
    ) -> Dataset | None:
        """The stored instance to send (None: the file cannot be read), converted for the
        peer when its accepted contexts are known."""
        try:
            ds = dcmread(self.storage / row["path"])
        except Exception as exc:
            LOG.error(
                "cannot read stored instance %s: %s", row["sop_instance_uid"], type(exc).__name__
            )
            return None
        if accepted is None:
            return ds
        return for_peer(ds, row["sop_class_uid"], accepted)

    def _send(
        self, event: Any, rows: list[sqlite3.Row], accepted: list[PresentationContext] | None
    ) -> Iterator[tuple[int, Dataset | None]]:
        for row in rows:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            ds = self._payload(row, accepted)
            if ds is None:
                # Unreadable file: a stub without SOP Class UID makes pynetdicom's C-STORE
                # raise, which it counts as a failed sub-operation listing this UID.
                ds = Dataset()
                ds.SOPInstanceUID = row["sop_instance_uid"]
            yield 0xFF00, ds

    def handle_get(
        self, event: Any, note: Callable[[str], None]
    ) -> Iterator[int | tuple[int, Dataset | None]]:
        """C-GET: C-STORE the matched files back over the requestor's association."""
        try:
            rows = self._select(event)
        except InvalidIdentifier as exc:
            note(f"invalid identifier: {exc}")
            yield 1
            yield 0xA900, None
            return
        except Exception as exc:
            note(f"cannot process: {type(exc).__name__}")
            yield 1
            yield 0xC410, None
            return
        note(f"matches={len(rows)}")
        yield len(rows)
        accepted = [cx for cx in event.assoc.accepted_contexts if cx.as_scu]
        yield from self._send(event, rows, accepted)

    def handle_move(self, event: Any, ae: AE, note: Callable[[str], None]) -> Iterator[Any]:
        """C-MOVE: open an association to the destination named in the peers file and send;
        ``ae`` is the server's AE (its associations identify the sub-association)."""
        dest = str(event.move_destination or "").strip()
        try:
            peers = load_peer_table(self.peers_file)
        except PEERS_FILE_ERRORS as exc:
            LOG.error("peers file %s unusable: %s", self.peers_file, exc)
            peers = {}
        if dest not in peers:
            note(f"unknown destination {dest!r}")
            yield None, None
            return
        host, port, tls = peers[dest]
        if tls and self.client_tls is None:
            # a plaintext association to a TLS-only port could only fail (PS3.15 B.1)
            note(f"dest={dest} takes TLS but this node has no certificate (--tls-certificate)")
            yield None, None
            return
        over_tls = {"tls_args": (self.client_tls, host)} if tls else {}
        try:
            rows = self._select(event)
        except Exception as exc:
            invalid = isinstance(exc, InvalidIdentifier)
            problem = (
                f"invalid identifier: {exc}" if invalid else f"cannot process: {type(exc).__name__}"
            )
            note(f"dest={dest} {problem}")
            # pynetdicom only reports a handler status after the destination is associated.
            yield host, port, {"contexts": [build_context(Verification)], **over_tls}
            yield 1
            yield (0xA900 if invalid else 0xC510), None
            return
        note(f"dest={dest} matches={len(rows)}")
        contexts = move_contexts((r["sop_class_uid"], r["transfer_syntax_uid"]) for r in rows)
        before = list(ae.active_associations)
        yield (
            host,
            port,
            {
                "contexts": contexts or [build_context(Verification)],
                "evt_handlers": [(evt.EVT_CONN_OPEN, prompt_tcp)],
                **over_tls,
            },
        )
        yield len(rows)
        accepted = _store_assoc_contexts(ae, before, dest, port)
        yield from self._send(event, rows, accepted)


def _store_assoc_contexts(
    ae: AE, before: list[Any], dest: str, port: int
) -> list[PresentationContext] | None:
    """Accepted contexts of the sub-association pynetdicom just opened, if identifiable.

    None (ambiguous, e.g. two simultaneous moves to the same peer) means: send as stored
    and let pynetdicom choose; only the decompression fallback is lost.
    """
    found = [
        a
        for a in ae.active_associations
        if a not in before
        and a.is_requestor
        and a.is_established
        and str(a.acceptor.ae_title).strip() == dest
        and a.acceptor.port == port
    ]
    return list(found[0].accepted_contexts) if len(found) == 1 else None
