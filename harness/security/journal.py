"""The journal of the DICOM operations the harness performed on a node, for the audit join.

Why: "every access is audited" (IHE ATNA) is checked by comparing what the harness did, as
the harness saw it, with what the node's audit trail says happened (audit_trail.py).
"""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass
from typing import Literal

Operation = Literal["C-STORE", "C-FIND", "C-MOVE", "C-GET"]


@dataclass(frozen=True)
class JournalEntry:
    """One operation: when it ran, against whom, as whom, on which study, and how it ended."""

    started: dt.datetime
    ended: dt.datetime
    node: str
    called_ae: str
    calling_ae: str
    operation: Operation
    study_uid: str
    outcome: Literal["ok", "failed"]
    detail: str = ""  # e.g. the status the node answered

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def describe(self) -> str:
        return f"{self.operation} of study {self.study_uid} by {self.calling_ae}"


class OperationJournal:
    """Entries in the order they were recorded (thread-safe)."""

    def __init__(self) -> None:
        self._entries: list[JournalEntry] = []
        self._lock = threading.Lock()

    def record(
        self,
        started: dt.datetime,
        node: str,
        called_ae: str,
        calling_ae: str,
        operation: Operation,
        study_uid: str,
        ok: bool,
        detail: str = "",
    ) -> JournalEntry:
        entry = JournalEntry(
            started, dt.datetime.now(dt.UTC), node, called_ae, calling_ae, operation,
            study_uid, "ok" if ok else "failed", detail,
        )
        with self._lock:
            self._entries.append(entry)
        return entry

    def entries(self, node: str | None = None) -> list[JournalEntry]:
        with self._lock:
            return [e for e in self._entries if node is None or e.node == node]


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
