"""The journal of the DICOM operations the harness performed on a node, for the audit join.

Why: "every access is audited" (IHE ATNA) is checked by comparing what the harness did, as
the harness saw it, with what the node's audit trail says happened (audit_trail.py).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from harness.dicom.peer import OperationDone, add_operation_observer, remove_operation_observer

if TYPE_CHECKING:
    from harness.nodes.base import Node

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
        what = f"study {self.study_uid}" if self.study_uid else "no single study"
        return (f"{self.operation} of {what} by {self.calling_ae} at "
                f"{self.started:%H:%M:%S}Z")


class OperationJournal:
    """Entries in the order they were recorded (thread-safe); beyond `capacity`, entries
    are only counted (`dropped`): a long run's journal stays bounded."""

    def __init__(self, capacity: int = 200_000) -> None:
        self._entries: list[JournalEntry] = []
        self._lock = threading.Lock()
        self.capacity = capacity
        self.dropped = 0

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
        ended: dt.datetime | None = None,
    ) -> JournalEntry:
        entry = JournalEntry(
            started, ended or dt.datetime.now(dt.UTC), node, called_ae, calling_ae, operation,
            study_uid, "ok" if ok else "failed", detail,
        )
        with self._lock:
            if len(self._entries) < self.capacity:
                self._entries.append(entry)
            else:
                self.dropped += 1
        return entry

    def entries(self, node: str | None = None) -> list[JournalEntry]:
        with self._lock:
            return [e for e in self._entries if node is None or e.node == node]


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


JOURNALLED = ("C-STORE", "C-FIND", "C-MOVE", "C-GET")  # C-ECHO reads no patient data


class RunJournal(OperationJournal):
    """Every C-STORE/C-FIND/C-MOVE/C-GET this process performs on the given nodes during a
    run, taken from the DIMSE layer's observer hook (harness/dicom/peer.py); operations of
    other processes (CLI subprocesses, Locust workers) are not seen."""

    def __init__(self, nodes: Iterable[Node], capacity: int = 200_000) -> None:
        super().__init__(capacity)
        self.addresses: dict[tuple[str, int, str], str] = {}
        for node in nodes:
            for port in {node.dicom_port, getattr(node, "access_port", None)}:
                if port:
                    self.addresses[(node.host, int(port), node.ae_title)] = node.name

    def observe(self, done: OperationDone) -> None:
        name = self.addresses.get((done.host, done.port, done.called_ae))
        if name is None or done.operation not in JOURNALLED:
            return
        self.record(done.started, name, done.called_ae, done.calling_ae,
                    done.operation,  # type: ignore[arg-type]
                    done.study_uid or "", done.ok, done.detail, done.finished)

    def journalled(self, host: str, port: int, called_ae: str) -> bool:
        return (host, port, called_ae) in self.addresses

    def start(self) -> None:
        add_operation_observer(self.observe, self.journalled)

    def stop(self) -> None:
        remove_operation_observer(self.observe)
