"""DIMSE client: C-ECHO, C-STORE over N parallel associations, C-FIND, C-MOVE, C-GET.

Every operation returns a typed result carrying the DIMSE status, so scenarios assert on what
a PACS answered rather than on exceptions. Failing to associate at all is an environment
problem (`DimseConnectionError`, exit 3) that names the peer.

TLS: pass `tls=TLSConfig(...)` to `DimseClient`; it becomes pynetdicom's `tls_args`.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, build_context, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalXRayImageStorageForPresentation,
    EncapsulatedPDFStorage,
    EnhancedSRStorage,
    MRImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    NuclearMedicineImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    PositronEmissionTomographyImageStorage,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    Verification,
    XRayAngiographicImageStorage,
)

from harness.dicom.names import sop_class_name, syntax_names, transfer_syntax_name
from harness.dicom.part10 import (
    DICOM_SUFFIXES,
    UNCOMPRESSED_SYNTAXES,
    BadFile,
    NotAnInstance,
    NotDicom,
    Part10,
    decode_dataset,
    encode_dataset,
    read_header,
    read_part10,
)
from harness.dicom.tcp import prompt_tcp
from harness.dicom.wire import (
    DEFAULT_LARGEST_DATASET,
    DEFAULT_MAX_MATCHES,
    DEFAULT_MAX_PENDING,
    DEFAULT_MIN_RATE,
    AssociationFailed,
    PeerFault,
    TransferFailed,
    WireAssociation,
    command_uid,
    command_us,
)
from harness.errors import EnvironmentProblem

HARNESS_AE_TITLE = "PACSHARNESS"
MAX_CONTEXTS = 128
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")

_FIND_MODELS = {
    "study": StudyRootQueryRetrieveInformationModelFind,
    "patient": PatientRootQueryRetrieveInformationModelFind,
}
_MOVE_MODELS = {
    "study": StudyRootQueryRetrieveInformationModelMove,
    "patient": PatientRootQueryRetrieveInformationModelMove,
}
_GET_MODELS = {
    "study": StudyRootQueryRetrieveInformationModelGet,
    "patient": PatientRootQueryRetrieveInformationModelGet,
}

#: Storage SOP classes of everyday studies (the connectivity scenario's table; the C-GET
#: fallback when a node cannot say which classes a study holds).
COMMON_STORAGE_CLASSES: tuple[str, ...] = (
    CTImageStorage,
    MRImageStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    NuclearMedicineImageStorage,
    PositronEmissionTomographyImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    XRayAngiographicImageStorage,
    SecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    BasicTextSRStorage,
    EnhancedSRStorage,
    EncapsulatedPDFStorage,
)
#: Every storage SOP class pynetdicom knows (what the harness accepts as a Storage SCP).
STORAGE_CLASSES: tuple[str, ...] = tuple(
    str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
)
#: The syntaxes of the connectivity table and of the fallback proposal (7 x 16 fit in 128).
RECEIVABLE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
#: What C-GET offers for each SOP class: every transfer syntax pydicom knows, each in its own
#: presentation context, uncompressed first. The SCP sends over the context that matches what
#: it holds (PS3.4 C.4.3.3), so nothing needs transcoding, whatever it stored.
RETRIEVE_TRANSFER_SYNTAXES: tuple[str, ...] = tuple(
    dict.fromkeys(
        [
            ExplicitVRLittleEndian,
            ImplicitVRLittleEndian,
            DeflatedExplicitVRLittleEndian,
            ExplicitVRBigEndian,
            *(str(ts) for ts in AllTransferSyntaxes),
        ]
    )
)
_QUERY_CONTEXTS = 4  # C-GET and C-FIND models, each in explicit and implicit VR little endian
_NON_IMAGE_CLASSES = {BasicTextSRStorage, EnhancedSRStorage, EncapsulatedPDFStorage}
_UNIQUE_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}


@dataclass(frozen=True)
class TLSConfig:
    """Client-side TLS settings; ready for nodes that require DICOM over TLS."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_hostname: str | None = None

    def tls_args(self) -> tuple[ssl.SSLContext, str | None]:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context, self.server_hostname


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


class DimseConnectionError(EnvironmentProblem):
    """The peer could not be reached or refused the association."""


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


# ---------------------------------------------------------------------------------------


def _identifier(level: str, keys: dict[str, Any] | Dataset | None) -> Dataset:
    level = level.upper()
    if level not in LEVELS:
        raise ValueError(f"query level {level!r} (allowed: {', '.join(LEVELS)})")
    if isinstance(keys, Dataset):
        ds = keys
    else:
        ds = Dataset()
        for keyword, value in (keys or {}).items():
            setattr(ds, keyword, "" if value is None else value)
    ds.QueryRetrieveLevel = level
    if "SpecificCharacterSet" not in ds:
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def iter_dicom_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Every file under the given files and folders (sorted, recursive)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")


@dataclass
class _StoreItem:
    source: str
    sop_class_uid: str  # the data set's own, which the C-STORE-RQ carries (PS3.7 9.3.1.1)
    sop_instance_uid: str
    transfer_syntax_uid: str
    payload: Dataset | Path


@dataclass
class _Prepared:
    """An item read and checked, ready for the wire (or the reason it is not)."""

    item: _StoreItem
    part: Part10 | None
    error: str | None = None


def _store_item(obj: Dataset | str | Path) -> _StoreItem:
    """Header of one thing to store (NotDicom, BadFile or OSError when it cannot be)."""
    if isinstance(obj, Dataset):
        meta = getattr(obj, "file_meta", None) or FileMetaDataset()
        ts = meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)
        return _StoreItem("<dataset>", obj.SOPClassUID, obj.SOPInstanceUID, ts, obj)
    path = Path(obj)
    header = read_header(path)
    return _StoreItem(
        str(path), header.sop_class_uid, header.sop_instance_uid, header.transfer_syntax_uid, path
    )


def _is_convertible(syntax: str) -> bool:
    """An uncompressed syntax the harness re-encodes itself (PS3.5 A.1-A.5)."""
    return syntax in UNCOMPRESSED_SYNTAXES


def _proposals(items: list[_StoreItem]) -> list[list[tuple[str, str]]]:
    """Presentation contexts, at most MAX_CONTEXTS per association: for each SOP class,
    every transfer syntax its items have (proposed first), then the lossless fallbacks
    Explicit and Implicit VR Little Endian."""
    by_class: dict[str, list[str]] = {}
    for item in items:
        syntaxes = by_class.setdefault(item.sop_class_uid, [])
        if item.transfer_syntax_uid not in syntaxes:
            syntaxes.append(item.transfer_syntax_uid)
    chunks: list[list[tuple[str, str]]] = [[]]
    for sop_class, syntaxes in by_class.items():
        pairs = [(sop_class, ts) for ts in dict.fromkeys([*syntaxes, *_FALLBACK_SYNTAXES])]
        if chunks[-1] and len(chunks[-1]) + len(pairs) > MAX_CONTEXTS:
            chunks.append([])
        chunks[-1].extend(pairs[:MAX_CONTEXTS])
    return [chunk for chunk in chunks if chunk]


_FALLBACK_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def _shut_down(assoc: Any) -> None:
    """Shut a failed pynetdicom association's socket down (its reader thread then ends)."""
    raw = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if raw is not None:
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return f"cannot read: {exc.strerror or exc}"
    return str(exc)


def _refusal(source: str, reason: str, item: _StoreItem | None = None) -> StoreResult:
    """A file refused before sending, named with its reason."""
    return StoreResult(
        item.sop_instance_uid if item else "",
        item.sop_class_uid if item else "",
        item.transfer_syntax_uid if item else "",
        NO_STATUS,
        source=source,
        error=f"{source}: {reason}",
        original_transfer_syntax_uid=item.transfer_syntax_uid if item else "",
        refused=True,
    )


def _choose_syntax(
    assoc: WireAssociation, sop_class: str, own: str, decompress: bool
) -> str | None:
    """The transfer syntax to send in: the data set's own if accepted, else an accepted
    uncompressed one it converts to losslessly (compressed data only with `decompress`)."""
    if (sop_class, own) in assoc.accepted:
        return own
    if not _is_convertible(own) and not decompress:
        return None
    for candidate in UNCOMPRESSED_SYNTAXES:
        if (sop_class, candidate) in assoc.accepted:
            return candidate
    return None


class DimseClient:
    """A DIMSE service user talking to one peer (host, port, AE title)."""

    def __init__(
        self,
        host: str,
        port: int,
        called_ae: str,
        calling_ae: str = HARNESS_AE_TITLE,
        *,
        tls: TLSConfig | None = None,
        timeout_s: float = 30.0,
        max_pdu: int = 0,
        max_store_associations: int | None = None,
        max_find_matches: int = DEFAULT_MAX_MATCHES,
        find_deadline_s: float = 3600.0,
        min_rate: float = DEFAULT_MIN_RATE,
        max_dataset_bytes: int = DEFAULT_LARGEST_DATASET,
    ) -> None:
        self.host, self.port, self.called_ae = host, port, called_ae
        self.calling_ae = calling_ae
        self.tls = tls
        self.timeout_s = timeout_s
        self.max_pdu = max_pdu
        self.max_store_associations = max_store_associations
        self.max_find_matches = max_find_matches  # more is an error, not a memory exhaustion
        self.find_deadline_s = find_deadline_s  # a whole C-FIND, however the peer trickles
        # every operation's deadline: timeout_s + the bytes it moves at min_rate (bytes/s),
        # see harness/dicom/wire.py OperationDeadline and docs/safety.md
        self.min_rate = min_rate
        self.max_dataset_bytes = max_dataset_bytes  # one C-GET sub-operation, in memory

    def __repr__(self) -> str:
        return f"{self.called_ae}@{self.host}:{self.port}"

    # -- association -----------------------------------------------------------------
    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = self.timeout_s
        ae.dimse_timeout = self.timeout_s
        ae.network_timeout = self.timeout_s
        ae.connection_timeout = min(self.timeout_s, 10.0)
        ae.maximum_pdu_size = self.max_pdu
        return ae

    def associate(
        self,
        contexts: Sequence[PresentationContext],
        *,
        ext_neg: list | None = None,
        evt_handlers: list | None = None,
    ):
        """Open an association or raise DimseConnectionError naming the peer."""
        ae = self._ae()
        kwargs: dict[str, Any] = {
            "ae_title": self.called_ae,
            "contexts": list(contexts),
            "max_pdu": self.max_pdu,
        }
        if ext_neg:
            kwargs["ext_neg"] = ext_neg
        opened: list[Any] = []  # the association, from its connection's opening
        kwargs["evt_handlers"] = [
            *(evt_handlers or []),
            (evt.EVT_CONN_OPEN, lambda event: opened.append(event.assoc)),
            (evt.EVT_ACSE_SENT, self._closing),
        ]
        if self.tls:
            kwargs["tls_args"] = self.tls.tls_args()
        # the A-ASSOCIATE-AC within timeout_s, however a peer drips it (see _Watchdog)
        watchdog = _Watchdog(lambda: opened[0] if opened else None, self.timeout_s)
        try:
            assoc = ae.associate(self.host, self.port, **kwargs)
        finally:
            watchdog.stop()
        if not assoc.is_established:
            # pynetdicom's reader thread may still block in recv() on a peer that announced a
            # long junk PDU and went quiet; shutting the socket down lets that thread end
            _shut_down(assoc)
            reason = (
                f"not established within {self.timeout_s:g} s"
                if watchdog.expired
                else "rejected"
                if assoc.is_rejected
                else "aborted"
                if assoc.is_aborted
                else ("no answer")
            )
            raise DimseConnectionError(
                f"peer {self}: association {reason} (calling AE {self.calling_ae})"
            )
        # pynetdicom reads and writes PDUs on a blocking socket once associated: a peer that
        # stalls mid-PDU (a cut or blackholed link, a frozen PACS) would hang this thread and
        # any kill() of the association forever. With a timeout, the read fails, pynetdicom
        # treats it as a closed transport, and the operation reports a failure instead.
        transport = getattr(getattr(assoc, "dul", None), "socket", None)
        if transport is not None and getattr(transport, "socket", None) is not None:
            transport.socket.settimeout(self.timeout_s)
            prompt_tcp(transport)  # no 40 ms Nagle/delayed-ACK stall per message
        return assoc

    def _closing(self, event: Any) -> None:
        """EVT_ACSE_SENT: once we release or abort, the association must end within
        2 x timeout_s. A peer dripping bytes keeps pynetdicom's reader thread in recv() (each
        byte restarts the socket timeout) and release()/abort() waiting for it forever; past
        that bound the socket is shut down, which ends both."""
        if type(getattr(event, "primitive", None)).__name__ in ("A_RELEASE", "A_ABORT",
                                                               "A_P_ABORT"):
            watchdog = threading.Timer(2 * self.timeout_s, _shut_down, [event.assoc])
            watchdog.daemon = True
            watchdog.start()

    # -- C-ECHO ----------------------------------------------------------------------
    def echo(self) -> EchoResult:
        start = time.perf_counter()
        assoc = self.associate([build_context(Verification)])
        watchdog = _Watchdog(lambda: assoc, self.timeout_s)  # the answer, dripped or not
        try:
            rsp = assoc.send_c_echo()
            status = Status(rsp.Status) if rsp and "Status" in rsp else NO_STATUS
        finally:
            watchdog.stop()
            if assoc.is_established:
                assoc.release()
        if watchdog.expired:
            status = NO_STATUS
        return EchoResult(status, time.perf_counter() - start)

    def negotiate(self, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], bool]:
        """Which (SOP class, transfer syntax) pairs the peer accepts, as one context each."""
        pairs = list(dict.fromkeys(pairs))
        accepted: dict[tuple[str, str], bool] = {}
        for start in range(0, len(pairs), MAX_CONTEXTS):
            chunk = pairs[start : start + MAX_CONTEXTS]
            assoc = self.associate([build_context(sop, [ts]) for sop, ts in chunk])
            try:
                for cx in assoc.accepted_contexts:
                    accepted[(cx.abstract_syntax, cx.transfer_syntax[0])] = True
            finally:
                assoc.release()
        return {pair: accepted.get(pair, False) for pair in pairs}

    # -- C-STORE ---------------------------------------------------------------------
    def store(
        self,
        objects: Iterable[Dataset | str | Path],
        *,
        associations: int = 1,
        on_result: Callable[[StoreResult], None] | None = None,
        decompress: bool = False,
        convert: bool = True,
    ) -> StoreReport:
        """Send datasets and files (folders are walked) over N parallel associations.

        Every file is read and checked before it is sent (harness/dicom/part10.py): a
        truncated or unparsable one is refused with its reason, never sent. Each object is
        proposed in its own transfer syntax first, then in Explicit and Implicit VR Little
        Endian; when the peer refuses the original, an uncompressed data set is converted
        (recorded in the result), a compressed one only with `decompress`; `convert=False`
        sends each object in its own syntax only (to measure what a node accepts). Files
        that are not DICOM at all are skipped, each named in `skipped` with its reason.
        """
        if associations < 1:
            raise ValueError("associations must be >= 1")
        if self.max_store_associations:
            associations = min(associations, self.max_store_associations)
        start = time.perf_counter()
        items: list[_StoreItem] = []
        report = StoreReport(associations=associations)
        for obj in objects:
            expanded = iter_dicom_files([obj]) if isinstance(obj, str | Path) else [obj]
            for one in expanded:
                try:
                    items.append(_store_item(one))
                except NotDicom as exc:
                    suffix = Path(str(one)).suffix.lower()
                    if isinstance(exc, NotAnInstance) or suffix not in DICOM_SUFFIXES:
                        report.skipped.append(str(one))
                        report.skip_reasons[str(one)] = str(exc)
                        continue
                    refused = _refusal(str(one), f"{exc} (though named {suffix})")
                    report.results.append(refused)
                    if on_result:
                        on_result(refused)
                except (BadFile, OSError) as exc:
                    refused = _refusal(str(one), _reason(exc))
                    report.results.append(refused)
                    if on_result:
                        on_result(refused)
        for pairs in _proposals(items):
            classes = {sop_class for sop_class, _ in pairs}
            batch = [i for i in items if i.sop_class_uid in classes]
            if not convert:
                own = {(i.sop_class_uid, i.transfer_syntax_uid) for i in batch}
                pairs = [pair for pair in pairs if pair in own]
            self._store_batch(batch, pairs, associations, report, on_result, decompress)
        report.elapsed_s = time.perf_counter() - start
        return report

    def _store_batch(
        self,
        batch: list[_StoreItem],
        pairs: list[tuple[str, str]],
        associations: int,
        report: StoreReport,
        on_result: Callable[[StoreResult], None] | None,
        decompress: bool = False,
    ) -> None:
        work: queue.Queue[_StoreItem] = queue.Queue()
        for item in batch:
            work.put(item)
        lock = threading.Lock()
        errors: list[BaseException] = []

        def record(result: StoreResult) -> None:
            with lock:
                report.results.append(result)
            if on_result:
                on_result(result)

        def take() -> _Prepared | None:
            try:
                return self._prepare(work.get_nowait())
            except queue.Empty:
                return None

        def worker() -> None:
            # While the peer works on one instance, the next one is read and encoded, so
            # one association runs at the peer's pace (the client's cost is off the path).
            assoc: WireAssociation | None = None
            upcoming: list[_Prepared | None] = []

            def read_ahead() -> None:
                upcoming.append(take())

            current = take()
            try:
                while current is not None:
                    if assoc is None or not assoc.is_open:
                        assoc = self.wire_association(pairs)
                    upcoming.clear()
                    record(self._store_one(assoc, current, read_ahead, decompress))
                    current = upcoming[0] if upcoming else take()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller thread
                errors.append(exc)
                if current is not None:
                    work.put(current.item)  # not stored: another worker (or the caller) sees it
            finally:
                if assoc is not None:
                    assoc.release()

        threads = [
            threading.Thread(target=worker, name=f"store-{n}", daemon=True)
            for n in range(min(associations, max(1, len(batch))))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # A PACS that serves one association at a time (dcmqrscp --single-process) lets
        # the extra associations time out; that only matters if work was left undone.
        if errors and not work.empty():
            raise errors[0]

    def wire_association(
        self, pairs: list[tuple[str, str]], scp_roles: Sequence[str] = ()
    ) -> WireAssociation:
        """An association for C-STORE / C-GET (harness/dicom/wire.py) or DimseConnectionError."""
        try:
            return WireAssociation(
                self.host,
                self.port,
                self.called_ae,
                self.calling_ae,
                pairs,
                timeout_s=self.timeout_s,
                tls=self.tls.tls_args() if self.tls else None,
                scp_roles=scp_roles,
                min_rate=self.min_rate,
                max_dataset_bytes=self.max_dataset_bytes,
            )
        except AssociationFailed as exc:
            raise DimseConnectionError(
                f"peer {self}: association {exc} (calling AE {self.calling_ae})"
            ) from None

    @staticmethod
    def _prepare(item: _StoreItem) -> _Prepared:
        """`item` read whole and checked (or why it cannot be sent); runs while the peer
        works on the previous instance."""
        try:
            if isinstance(item.payload, Dataset):
                ds, syntax = item.payload, item.transfer_syntax_uid
                part = Part10(
                    item.source, encode_dataset(ds, syntax), syntax,
                    item.sop_class_uid, item.sop_instance_uid, lambda: ds,
                )
            else:
                part = read_part10(item.payload)
        except (BadFile, NotDicom, OSError) as exc:
            return _Prepared(item, None, _reason(exc))
        except (ValueError, TypeError, AttributeError, struct.error) as exc:
            return _Prepared(item, None, f"cannot encode: {exc}")
        return _Prepared(item, part)

    def _store_one(
        self,
        assoc: WireAssociation,
        prepared: _Prepared,
        meanwhile: Callable[[], None],
        decompress: bool = False,
    ) -> StoreResult:
        """Store one prepared instance; `meanwhile` runs while the peer processes it."""
        item, part = prepared.item, prepared.part
        if part is None:
            return _refusal(item.source, prepared.error or "unreadable", item)
        own = part.transfer_syntax_uid
        result = StoreResult(
            part.sop_instance_uid,
            part.sop_class_uid,
            own,
            NO_STATUS,
            source=item.source,
            original_transfer_syntax_uid=own,
            quirks=list(part.quirks),
        )
        target = _choose_syntax(assoc, part.sop_class_uid, own, decompress)
        named = "" if isinstance(item.payload, Dataset) else f"{item.source}: "
        if target is None:
            result.refused = True
            refusal = self._context_refusal(assoc, part.sop_class_uid, own, decompress)
            result.error = named + refusal
            return result
        try:
            data = part.framed() if target == own else part.converted(target, decompress=True)
        except BadFile as exc:
            result.refused = True
            conversion = f"{transfer_syntax_name(own)} -> {transfer_syntax_name(target)}"
            result.error = f"{named}{conversion}: {exc}"
            return result
        result.transfer_syntax_uid = target
        context_id = assoc.accepted[(part.sop_class_uid, target)]
        try:
            assoc.send_store(context_id, part.sop_class_uid, part.sop_instance_uid, data)
            meanwhile()
            answer = assoc.read_store_response()
        except PeerFault as exc:  # the peer, not this instance: stop sending to it (exit 3)
            assoc.abort()
            raise DimseConnectionError(
                f"peer {self}: C-STORE of {item.source} broken off: {exc}"
            ) from None
        except TransferFailed as exc:
            assoc.abort()
            result.error = f"{named}peer {self}: no C-STORE response ({exc})"
            return result
        result.status = Status(answer.status)
        if not result.status.ok:
            comment = f"{named}peer {self} answered {result.status} {answer.error_comment}"
            result.error = comment.strip()
        return result

    def _context_refusal(
        self, assoc: WireAssociation, sop_class: str, syntax: str, decompress: bool
    ) -> str:
        """Why an instance has no presentation context, by name (PS3.8 9.3.3.2)."""
        accepted = [ts for (cls, ts) in assoc.accepted if cls == sop_class]
        message = (
            f"peer {self} did not accept SOP class {sop_class_name(sop_class)} "
            f"with {transfer_syntax_name(syntax)}"
        )
        if not accepted:
            return message + " (nor with any transfer syntax proposed)"
        message += f"; it accepts {syntax_names(accepted)}"
        if not _is_convertible(syntax) and not decompress:
            message += " (store --decompress would send it decompressed)"
        return message

    # -- C-FIND ----------------------------------------------------------------------
    def find(
        self, level: str, keys: dict[str, Any] | Dataset | None = None, *, model: str = "study"
    ) -> FindResult:
        """C-FIND at PATIENT, STUDY, SERIES or IMAGE level; keys with None are return keys."""
        start = time.perf_counter()
        assoc = self.find_association(model)
        try:
            result = self.find_over(assoc, level, keys, model=model)
        finally:
            assoc.release()
        result.elapsed_s = time.perf_counter() - start
        return result

    def find_association(self, model: str = "study") -> WireAssociation:
        """An association for C-FINDs of `model` (explicit and implicit VR little endian), for
        find_over; the caller releases it. DimseConnectionError if the peer refuses the model."""
        sop_class = _FIND_MODELS[model]
        assoc = self.wire_association(
            [(sop_class, ExplicitVRLittleEndian), (sop_class, ImplicitVRLittleEndian)]
        )
        if _find_context(assoc, model) is None:
            assoc.release()
            raise DimseConnectionError(
                f"peer {self} does not accept C-FIND ({model} root information model)"
            )
        return assoc

    def find_over(
        self,
        assoc: WireAssociation | Any,
        level: str,
        keys: dict[str, Any] | Dataset | None = None,
        *,
        model: str = "study",
    ) -> FindResult:
        """C-FIND over an association from find_association(model): walking a study series
        by series costs one association instead of one per query.

        The responses are read on the harness's wire layer (PS3.7 9.1.2), so none can go
        astray between back-to-back queries. Anything the peer breaks (abort, timeout, more
        than `max_find_matches`, past `find_deadline_s`) is NO_STATUS with `error` naming
        the peer; the association is then closed. Any other association (a pynetdicom one)
        is not used: the query gets a wire association of its own.
        """
        if not isinstance(assoc, WireAssociation):
            return self.find(level, keys, model=model)
        start = time.perf_counter()
        identifier = _identifier(level, keys)
        if not assoc.is_open:
            return FindResult(NO_STATUS, [], 0.0, f"peer {self}: no open C-FIND association")
        context = _find_context(assoc, model)
        if context is None:
            return FindResult(
                NO_STATUS, [], 0.0,
                f"peer {self}: association without C-FIND ({model} root information model)",
            )
        context_id, syntax = context
        try:
            answer = assoc.find(
                context_id,
                encode_dataset(identifier, syntax),
                max_matches=self.max_find_matches,
                deadline_s=self.find_deadline_s,
            )
        except TransferFailed as exc:
            assoc.abort()
            return FindResult(
                NO_STATUS, [], time.perf_counter() - start,
                f"peer {self}: {level} C-FIND broken off: {exc}",
            )
        status = Status(answer.status)
        error = None
        if status.category != "success":
            comment = f" ({answer.error_comment})" if answer.error_comment else ""
            error = f"peer {self}: {level} C-FIND answered {status}{comment}"
        try:
            matches = [decode_dataset(data, syntax) for data in answer.matches]
        except (ValueError, TypeError, EOFError, struct.error) as exc:
            return FindResult(
                NO_STATUS, [], time.perf_counter() - start,
                f"peer {self}: {level} C-FIND match that cannot be decoded: {exc}",
            )
        return FindResult(status, matches, time.perf_counter() - start, error)

    # -- C-MOVE ----------------------------------------------------------------------
    def move(
        self,
        destination_ae: str,
        level: str,
        keys: dict[str, Any] | Dataset,
        *,
        model: str = "study",
    ) -> RetrieveResult:
        """Ask the peer to send matching instances to `destination_ae` (a peer it knows)."""
        identifier = _identifier(level, keys)
        sop_class = _MOVE_MODELS[model]
        start = time.perf_counter()
        assoc = self.associate([build_context(sop_class)])
        last: Dataset | None = None
        last_identifier: Dataset | None = None
        done = -1
        pending_in_a_row = 0
        watchdog = _Watchdog(lambda: assoc, self.timeout_s)
        try:
            for rsp_status, rsp_identifier in assoc.send_c_move(
                identifier, destination_ae, sop_class
            ):
                if rsp_status is None or "Status" not in rsp_status:
                    break
                last, last_identifier = rsp_status, rsp_identifier
                counts = sum(int(rsp_status.get(keyword, 0) or 0) for keyword in _SUB_COUNTS)
                if counts > done:  # a sub-operation ended: a fresh budget
                    done, pending_in_a_row = counts, 0
                    watchdog.progress()
                elif Status(rsp_status.Status).category == "pending":
                    pending_in_a_row += 1
                    if pending_in_a_row > DEFAULT_MAX_PENDING:
                        watchdog.expire()
                        break
        finally:
            watchdog.stop()
            if assoc.is_established:
                assoc.release()
        result = _retrieve_result(last, last_identifier, time.perf_counter() - start)
        if watchdog.expired:
            result.status = NO_STATUS
        return result

    # -- C-GET -----------------------------------------------------------------------
    def get(
        self,
        level: str,
        keys: dict[str, Any] | Dataset,
        *,
        model: str = "study",
        sop_classes: Sequence[str] | None = None,
        transfer_syntaxes: Sequence[str] = RETRIEVE_TRANSFER_SYNTAXES,
        on_instance: Callable[[RetrievedInstance], None] | None = None,
        keep: bool = True,
    ) -> RetrieveResult:
        """Retrieve matching instances (C-GET), as the PACS holds them.

        Sub-operations can only use presentation contexts the requestor proposed, at most 128
        per association (PS3.8 9.3.2.2): far fewer than every storage class in every syntax.
        So the study's SOP classes are looked up first (C-FIND: SOPClassesInStudy, else
        SOPClassUID at IMAGE level; `sop_classes` skips this), and each class is offered in
        every transfer syntax so the PACS sends what it holds unchanged. Classes that do not
        fit in one association get IMAGE-level C-GETs of their own. A node that reports no
        classes (DCMTK's dcmqrscp) gets the everyday classes first, then the instances it
        failed are asked again with the other storage classes, until every class was offered.

        `keep=False` with `on_instance` streams instead of collecting every dataset in
        memory; an `on_instance` that raises makes us answer that sub-operation with a
        failure (0xC211), which the PACS counts as failed.
        """
        identifier = _identifier(level, keys)
        syntaxes = list(dict.fromkeys(str(ts) for ts in transfer_syntaxes))
        per_association = (MAX_CONTEXTS - _QUERY_CONTEXTS) // max(1, len(syntaxes))
        if per_association < 1:
            raise ValueError(
                f"C-GET: {len(syntaxes)} transfer syntaxes leave no room in "
                f"{MAX_CONTEXTS} presentation contexts"
            )
        start = time.perf_counter()
        receive = _Receiver(on_instance, keep)
        if sop_classes:
            classes = list(dict.fromkeys(sop_classes))
            if len(classes) <= per_association:
                result = self._get_once(identifier, model, _pairs(classes, syntaxes), receive)
                result.elapsed_s = time.perf_counter() - start
                result.instances = receive.kept
                return result
        # The look-up runs on the C-GET's own association, which also proposes the classes
        # this peer's last retrieve met: a series of similar studies costs one association each.
        peer = (self.host, self.port, self.called_ae, model)
        remembered = _CLASSES_SEEN.get(peer, [])
        seen = remembered[:per_association]
        assoc, query = self._get_association(model, _pairs(seen, syntaxes), find=True)
        lookup = _Lookup(self, model, assoc)
        result: RetrieveResult | None = None
        rows: list[dict[str, str]] | None = None
        try:
            if not sop_classes:
                classes = lookup.classes(identifier)
            fits = classes is not None and len(classes) <= per_association
            if fits:  # most recently met first
                recent = dict.fromkeys([*(classes or ()), *remembered])
                _CLASSES_SEEN[peer] = list(recent)[:per_association]
            if fits and set(classes or ()) <= set(seen):
                lookup.assoc = None  # _get_over releases it
                result = self._get_over(assoc, query, identifier, receive)
            elif not fits:
                rows = lookup.instances(identifier)
        finally:
            lookup.close()
        if result is not None:
            pass
        elif classes is not None and len(classes) <= per_association:
            result = self._get_once(identifier, model, _pairs(classes, syntaxes), receive)
        elif rows is not None and all(row["SOPClassUID"] for row in rows):
            result = self._get_by_class(identifier, model, rows, syntaxes, per_association, receive)
        else:
            result = self._get_by_rounds(identifier, model, rows, receive)
        result.elapsed_s = time.perf_counter() - start
        result.instances = receive.kept
        return result

    def _get_by_class(
        self,
        identifier: Dataset,
        model: str,
        rows: list[dict[str, str]],
        syntaxes: list[str],
        per_association: int,
        receive: _Receiver,
    ) -> RetrieveResult:
        """One IMAGE-level C-GET per series and group of classes that fits an association."""
        classes = list(dict.fromkeys(row["SOPClassUID"] for row in rows))
        parts: list[RetrieveResult] = []
        for first in range(0, len(classes), per_association):
            group = set(classes[first : first + per_association])
            pairs = _pairs(sorted(group), syntaxes)
            for keys in _image_keys([row for row in rows if row["SOPClassUID"] in group]):
                parts.append(self._get_once(_identifier("IMAGE", keys), model, pairs, receive))
        return _combine(parts, retried=[0] * len(parts))

    def _get_by_rounds(
        self,
        identifier: Dataset,
        model: str,
        rows: list[dict[str, str]] | None,
        receive: _Receiver,
    ) -> RetrieveResult:
        """For a node that cannot say which classes it holds: the everyday classes first, then
        the instances it failed (named in its Failed SOP Instance UID List) with the others."""
        parts = [
            self._get_once(
                identifier, model, _pairs(COMMON_STORAGE_CLASSES, RECEIVABLE_TRANSFER_SYNTAXES),
                receive,
            )
        ]
        retried = [0]
        where = {row["SOPInstanceUID"]: row for row in rows or []}
        others = [c for c in STORAGE_CLASSES if c not in COMMON_STORAGE_CLASSES]
        per_association = (MAX_CONTEXTS - _QUERY_CONTEXTS) // len(_FALLBACK_SYNTAXES)
        for first in range(0, len(others), per_association):
            failed = [uid for uid in parts[-1].failed_sop_instance_uids if uid in where]
            if not failed:
                break
            retried[-1] = len(failed)
            pairs = _pairs(others[first : first + per_association], _FALLBACK_SYNTAXES)
            round_parts = [
                self._get_once(_identifier("IMAGE", keys), model, pairs, receive)
                for keys in _image_keys([where[uid] for uid in failed])
            ]
            parts.append(_combine(round_parts, retried=[0] * len(round_parts)))
            retried.append(0)
        return _combine(parts, retried=retried)

    def _get_once(
        self,
        identifier: Dataset,
        model: str,
        pairs: list[tuple[str, str]],
        receive: _Receiver,
    ) -> RetrieveResult:
        """One C-GET over its own association proposing `pairs` (storage class, syntax)."""
        assoc, query = self._get_association(model, pairs)
        return self._get_over(assoc, query, identifier, receive)

    def _get_association(
        self, model: str, pairs: list[tuple[str, str]], *, find: bool = False
    ) -> tuple[WireAssociation, tuple[str, str]]:
        """An association for C-GET (and C-FIND if `find`) with SCP roles for the storage
        classes of `pairs`, and the accepted C-GET context."""
        get_class, find_class = _GET_MODELS[model], _FIND_MODELS[model]
        query_pairs = [(get_class, ExplicitVRLittleEndian), (get_class, ImplicitVRLittleEndian)]
        find_pairs = [(find_class, ts) for _, ts in query_pairs] if find else []
        classes = list(dict.fromkeys(storage_class for storage_class, _ in pairs))
        assoc = self.wire_association([*query_pairs, *find_pairs, *pairs], scp_roles=classes)
        query = next((pair for pair in query_pairs if pair in assoc.accepted), None)
        if query is None:
            assoc.release()
            raise DimseConnectionError(
                f"peer {self} does not accept C-GET ({model} root information model)"
            )
        return assoc, query

    def _get_over(
        self,
        assoc: WireAssociation,
        query: tuple[str, str],
        identifier: Dataset,
        receive: _Receiver,
    ) -> RetrieveResult:
        """One C-GET over `assoc` (context `query`), then release it."""
        start = time.perf_counter()
        delivered_before = receive.delivered
        try:
            final, data = assoc.get(
                assoc.accepted[query],
                encode_dataset(identifier, query[1]),
                lambda context_id, command, data: receive(assoc, context_id, command, data),
            )
        except PeerFault as exc:  # a peer that breaks the protocol or a bound: exit 3
            assoc.abort()
            raise DimseConnectionError(f"peer {self}: C-GET broken off: {exc}") from None
        except TransferFailed:
            assoc.abort()
            completed = receive.delivered - delivered_before
            return RetrieveResult(NO_STATUS, completed, 0, 0, time.perf_counter() - start)
        assoc.release()
        return RetrieveResult(
            status=Status(command_us(final, 0x00000900)),
            completed=command_us(final, 0x00001021),
            failed=command_us(final, 0x00001022),
            warning=command_us(final, 0x00001023),
            elapsed_s=time.perf_counter() - start,
            failed_sop_instance_uids=_failed_uids(decode_dataset(data, query[1]) if data else None),
        )


_SUB_COUNTS = (
    "NumberOfCompletedSuboperations",
    "NumberOfFailedSuboperations",
    "NumberOfWarningSuboperations",
)


class _Watchdog:
    """Ends a pynetdicom association whose step outlives its budget (`budget_s` from the
    start or the last `progress()`): sends an A-ABORT and shuts the socket down.

    pynetdicom's timeouts do not bound a dripping or chatty peer: its reactor thread reads a
    PDU to its announced end, a read at a time (each within the socket timeout), and checks
    the ARTIM timer and dimse_timeout only between PDUs; and a C-MOVE answered by pending
    responses forever is one message within dimse_timeout after another. Shutting the socket
    down ends the reactor's read at once (PS3.8 9.2, AA-2: the transport is closed).
    """

    def __init__(self, assoc: Callable[[], Any], budget_s: float) -> None:
        self.assoc = assoc  # the association once there is one (None before it is opened)
        self.budget_s = budget_s
        self.expired = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self.progress()

    def progress(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.budget_s, self.expire)
            self._timer.daemon = True
            self._timer.start()

    def expire(self) -> None:
        """End the association now; whatever waits for it wakes at once."""
        self.expired = True
        assoc = self.assoc()
        if assoc is None:
            return
        transport = getattr(getattr(assoc, "dul", None), "socket", None)
        raw = getattr(transport, "socket", None)
        if raw is not None:
            try:  # A-ABORT, source service-user (PS3.8 9.3.8), if the peer takes it at once
                raw.send(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00", socket.MSG_DONTWAIT)
            except (OSError, ValueError):  # ValueError: TLS sockets take no flags
                pass
            try:
                raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        assoc.dimse.msg_queue.put((None, None))  # as pynetdicom does when a peer aborts

    def stop(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()


#: The SOP classes met most recently in retrieves from each peer (host, port, AE title,
#: model), as many as fit an association: the next C-GET proposes them up front, so its
#: look-up and retrieve share one association when the study holds nothing else.
_CLASSES_SEEN: dict[tuple[str, int, str, str], list[str]] = {}

#: Syntaxes offered in the rounds for classes a node did not name: the uncompressed ones the
#: SCP can convert anything uncompressed to (63 classes fit in one association).
_FALLBACK_SYNTAXES: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def _pairs(classes: Iterable[str], syntaxes: Sequence[str]) -> list[tuple[str, str]]:
    """(class, syntax) for every class in every syntax; non-image classes uncompressed only."""
    pairs: list[tuple[str, str]] = []
    for storage_class in classes:
        offered = syntaxes
        if storage_class in _NON_IMAGE_CLASSES:
            offered = [ts for ts in syntaxes if not UID(ts).is_compressed]
        pairs += [(storage_class, ts) for ts in offered]
    return pairs


def _image_keys(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """IMAGE-level retrieve keys, one set per series, for instance rows of a look-up."""
    by_series: dict[tuple[str, ...], list[str]] = {}
    for row in rows:
        parent = tuple((k, row[k]) for k in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")
                       if k in row)
        by_series.setdefault(parent, []).append(row["SOPInstanceUID"])
    return [{**dict(parent), "SOPInstanceUID": uids} for parent, uids in by_series.items()]


def _combine(parts: list[RetrieveResult], retried: list[int]) -> RetrieveResult:
    """One result for several C-GETs; `retried[i]` failures of part i were asked again later.

    A failure status that is not about sub-operations (no answer, refused identifier, cancel)
    wins; otherwise what still failed decides between success, warning (0xB000) and 0xA702.
    """
    completed = sum(p.completed for p in parts)
    warning = sum(p.warning for p in parts)
    failed = sum(max(p.failed - again, 0) for p, again in zip(parts, retried, strict=True))
    failed_uids = [
        uid
        for p, again in zip(parts, retried, strict=True)
        if not again
        for uid in p.failed_sop_instance_uids
    ]
    elapsed = sum(p.elapsed_s for p in parts)
    for part in parts:
        category = part.status.category
        if part.status == NO_STATUS or category == "cancel" or (
            category == "failure" and part.failed == 0
        ):
            return RetrieveResult(part.status, completed, failed, warning, elapsed,
                                  failed_sop_instance_uids=failed_uids)
    if failed:
        status = Status(0xB000 if completed else 0xA702)
    elif warning or any(p.status.category == "warning" and not again
                        for p, again in zip(parts, retried, strict=True)):
        status = Status(0xB000)
    else:
        status = Status(0x0000)
    return RetrieveResult(status, completed, failed, warning, elapsed,
                          failed_sop_instance_uids=failed_uids)


class _Receiver:
    """The requestor's side of C-GET sub-operations: wraps each received data set."""

    def __init__(
        self, on_instance: Callable[[RetrievedInstance], None] | None, keep: bool
    ) -> None:
        self.on_instance = on_instance
        self.keep = keep
        self.kept: list[RetrievedInstance] = []
        self.delivered = 0

    def __call__(
        self, assoc: WireAssociation, context_id: int, command: dict[int, bytes], data: bytes
    ) -> int:
        storage_class, syntax = assoc.contexts.get(context_id, ("", ""))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = command_uid(command, 0x00000002) or storage_class
        meta.MediaStorageSOPInstanceUID = command_uid(command, 0x00001000)
        meta.TransferSyntaxUID = syntax
        instance = RetrievedInstance(
            sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
            sop_class_uid=str(meta.MediaStorageSOPClassUID),
            transfer_syntax_uid=syntax,
            encoded=data,
            file_meta=meta,
        )
        if self.on_instance:
            try:
                self.on_instance(instance)
            except Exception:  # noqa: BLE001 - the caller's problem becomes the status
                return 0xC211
        if self.keep:
            self.kept.append(instance)
        self.delivered += 1
        return 0x0000


class _Lookup:
    """C-FINDs over one association: what a C-GET will find, to propose the right contexts."""

    def __init__(
        self, client: DimseClient, model: str, assoc: WireAssociation | None = None
    ) -> None:
        self.client = client
        self.model = model
        self.assoc = assoc
        self.walked: dict[str, list[dict[str, str]] | None] = {}

    def close(self) -> None:
        if self.assoc is not None:
            self.assoc.release()
            self.assoc = None

    def find(self, level: str, keys: dict[str, Any]) -> list[Dataset] | None:
        """Matches of one C-FIND, or None when the node cannot answer it."""
        if self.assoc is None:
            try:
                self.assoc = self.client.find_association(self.model)
            except DimseConnectionError:
                return None
        result = self.client.find_over(self.assoc, level, keys, model=self.model)
        return result.matches if result.ok else None

    def classes(self, identifier: Dataset) -> list[str] | None:
        """The storage SOP classes the retrieve will meet, or None when the node cannot say."""
        level = str(identifier.QueryRetrieveLevel)
        if level in ("PATIENT", "STUDY"):
            keys = self._fixed(identifier, "STUDY")
            keys.setdefault("StudyInstanceUID", None)
            matches = self.find("STUDY", {**keys, "SOPClassesInStudy": None})
            if matches is not None and all(m.get("SOPClassesInStudy") for m in matches):
                named = (c for m in matches for c in _values(m, "SOPClassesInStudy"))
                return list(dict.fromkeys(named))
        rows = self.instances(identifier)
        if rows is None or not all(row["SOPClassUID"] for row in rows):
            return None
        return list(dict.fromkeys(row["SOPClassUID"] for row in rows))

    def instances(self, identifier: Dataset) -> list[dict[str, str]] | None:
        """Unique keys and SOP class of every instance the retrieve selects (a hierarchical
        walk down to IMAGE level), or None when the node cannot answer."""
        done = identifier.to_json()
        if done not in self.walked:
            self.walked[done] = self._walk(identifier)
        return self.walked[done]

    def _walk(self, identifier: Dataset) -> list[dict[str, str]] | None:
        level = str(identifier.QueryRetrieveLevel)
        levels = _model_levels(self.model)
        if level not in levels:
            return None
        frontier = [self._fixed(identifier, level)]
        for depth in range(levels.index(level), len(levels)):
            current = levels[depth]
            key = _UNIQUE_KEYS[current]
            below: list[dict[str, Any]] = []
            for keys in frontier:
                query = {**keys, key: keys.get(key)}
                if current == "IMAGE":
                    query["SOPClassUID"] = None
                matches = self.find(current, query)
                if matches is None:
                    return None
                for match in matches:
                    value = str(match.get(key, "") or "")
                    if not value:
                        return None
                    child = {**keys, key: value}
                    if current == "IMAGE":
                        child["SOPClassUID"] = str(match.get("SOPClassUID", "") or "")
                    below.append(child)
            frontier = below
        return frontier

    def _fixed(self, identifier: Dataset, level: str) -> dict[str, Any]:
        """The identifier's unique keys at `level` and above (the model's levels only)."""
        levels = _model_levels(self.model)
        wanted = levels[: levels.index(level) + 1] if level in levels else levels
        return {
            _UNIQUE_KEYS[lvl]: identifier.get(_UNIQUE_KEYS[lvl])
            for lvl in wanted
            if identifier.get(_UNIQUE_KEYS[lvl])
        }


def _find_context(assoc: WireAssociation, model: str) -> tuple[int, str] | None:
    """The accepted C-FIND context of `model` (context id, transfer syntax), explicit VR
    little endian first."""
    sop_class = _FIND_MODELS[model]
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        if (sop_class, syntax) in assoc.accepted:
            return assoc.accepted[(sop_class, syntax)], syntax
    return None


def _model_levels(model: str) -> tuple[str, ...]:
    return LEVELS if model == "patient" else LEVELS[1:]


def _values(ds: Dataset, keyword: str) -> list[str]:
    """The values of a possibly multi-valued element as strings (none when absent)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _failed_uids(identifier: Dataset | None) -> list[str]:
    """Failed SOP Instance UID List of a final C-GET/C-MOVE response identifier, if any."""
    if identifier is None:
        return []
    # pydicom gives one str for a single UID, a MultiValue (not a list) for several
    return [uid for uid in _values(identifier, "FailedSOPInstanceUIDList") if uid]


def _retrieve_result(
    last: Dataset | None, identifier: Dataset | None, elapsed: float
) -> RetrieveResult:
    if last is None:
        return RetrieveResult(NO_STATUS, 0, 0, 0, elapsed)
    return RetrieveResult(
        status=Status(last.Status),
        completed=int(last.get("NumberOfCompletedSuboperations", 0) or 0),
        failed=int(last.get("NumberOfFailedSuboperations", 0) or 0),
        warning=int(last.get("NumberOfWarningSuboperations", 0) or 0),
        elapsed_s=elapsed,
        failed_sop_instance_uids=_failed_uids(identifier),
    )
