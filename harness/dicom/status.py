"""DIMSE status codes and the typed result of each operation.

Every operation answers with the status the peer sent (PS3.7 9.1, Annex C), so scenarios
assert on what a PACS answered rather than on exceptions; NO_STATUS stands for no answer at
all (an aborted association, no presentation context).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset

from harness.dicom.names import transfer_syntax_name
from harness.dicom.part10 import decode_dataset


@dataclass(frozen=True)
class Status:
    """A DIMSE status code with its category (PS3.7 Annex C)."""

    code: int

    @property
    def category(self) -> str:
        c = self.code
        if c == 0x0000:
            return "success"
        if c in (0xFF00, 0xFF01):
            return "pending"
        if c == 0xFE00:
            return "cancel"
        if c in (0x0001, 0x0107, 0x0116) or 0xB000 <= c <= 0xBFFF:
            return "warning"
        return "failure"

    @property
    def ok(self) -> bool:
        return self.category in ("success", "warning")

    def __str__(self) -> str:
        return f"0x{self.code:04X} ({self.category})"


#: Status used when no DIMSE status came back at all (association aborted, no context).
NO_STATUS = Status(0xFFFF)


@dataclass
class EchoResult:
    status: Status
    elapsed_s: float


@dataclass
class StoreResult:
    """One file or data set: stored, refused before sending (why), or failed on the wire.

    `transfer_syntax_uid` is what went on the wire; `original_transfer_syntax_uid` what
    the file holds (they differ after a conversion). `quirks` are what the file gets wrong
    that did not stop it (e.g. a file meta naming another SOP instance than its data set).
    """

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    status: Status
    source: str = ""
    error: str | None = None
    original_transfer_syntax_uid: str = ""
    quirks: list[str] = field(default_factory=list)
    refused: bool = False  # never sent: a bad file or no presentation context for it

    @property
    def ok(self) -> bool:
        return self.status.ok and self.error is None

    @property
    def conversion(self) -> tuple[str, str] | None:
        """(from, to) transfer syntax when the data set was converted before sending."""
        original = self.original_transfer_syntax_uid
        if not self.refused and original and original != self.transfer_syntax_uid:
            return original, self.transfer_syntax_uid
        return None

    def conversion_text(self) -> str:
        """E.g. "Explicit VR Little Endian -> Implicit VR Little Endian"."""
        if self.conversion is None:
            return ""
        original, sent = self.conversion
        return f"{transfer_syntax_name(original)} -> {transfer_syntax_name(sent)}"


@dataclass
class StoreReport:
    results: list[StoreResult] = field(default_factory=list)
    elapsed_s: float = 0.0
    associations: int = 1
    skipped: list[str] = field(default_factory=list)  # files that are not DICOM at all
    skip_reasons: dict[str, str] = field(default_factory=dict)  # file -> why

    @property
    def succeeded(self) -> list[StoreResult]:
        return [r for r in self.results if r.ok]

    @property
    def failed(self) -> list[StoreResult]:
        return [r for r in self.results if not r.ok]

    @property
    def refused(self) -> list[StoreResult]:
        """Files refused before sending, each with its reason."""
        return [r for r in self.results if r.refused]

    @property
    def converted(self) -> list[StoreResult]:
        return [r for r in self.results if r.conversion]

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass
class FindResult:
    status: Status
    matches: list[Dataset]
    elapsed_s: float
    error: str | None = None  # why the answer is not a success, naming the peer

    @property
    def ok(self) -> bool:
        return self.status.category == "success"


@dataclass
class RetrievedInstance:
    """One instance received by C-GET, as the PACS sent it.

    Kept encoded and decoded on first use of `dataset`: counting or relaying instances
    (load tests, availability probes) then costs no pydicom parsing.
    """

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    encoded: bytes = field(repr=False)
    file_meta: FileMetaDataset = field(repr=False)
    _decoded: Dataset | None = field(default=None, repr=False)

    @property
    def dataset(self) -> Dataset:
        if self._decoded is None:
            ds = decode_dataset(self.encoded, self.transfer_syntax_uid)
            ds.file_meta = self.file_meta
            self._decoded = ds
        return self._decoded


@dataclass
class RetrieveResult:
    status: Status
    completed: int
    failed: int
    warning: int
    elapsed_s: float
    instances: list[RetrievedInstance] = field(default_factory=list)
    failed_sop_instance_uids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status.category == "success" and self.failed == 0
