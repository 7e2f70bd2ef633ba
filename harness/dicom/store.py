"""C-STORE over N parallel associations (PS3.4 Annex B, PS3.7 9.1.1), files checked first.

Each object is proposed in its own transfer syntax plus the lossless fallbacks, one
presentation context per (SOP class, transfer syntax) and at most MAX_CONTEXTS per
association (PS3.8 9.3.2.2), so objects go out unchanged whenever the peer accepts them.
"""

from __future__ import annotations

import queue
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from harness.dicom.contexts import FALLBACK_SYNTAXES, MAX_CONTEXTS
from harness.dicom.files import iter_dicom_files
from harness.dicom.names import sop_class_name, syntax_names, transfer_syntax_name
from harness.dicom.part10 import (
    DICOM_SUFFIXES,
    UNCOMPRESSED_SYNTAXES,
    BadFile,
    NotAnInstance,
    NotDicom,
    Part10,
    encode_dataset,
    read_header,
    read_part10,
)
from harness.dicom.peer import DimseConnectionError, DimsePeer, observed, utc_now
from harness.dicom.status import NO_STATUS, Status, StoreReport, StoreResult
from harness.dicom.wire import PeerFault, TransferFailed, WireAssociation


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
    study_uid: str = ""  # only while operations are observed (peer.add_operation_observer)


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


def _study_uid(payload: Dataset | Path) -> str:
    """The Study Instance UID of a data set or file ("" when it has none readable)."""
    try:
        if not isinstance(payload, Dataset):
            payload = dcmread(payload, stop_before_pixels=True, force=True,
                              specific_tags=["StudyInstanceUID"])
        return str(payload.get("StudyInstanceUID", "") or "")
    except Exception:  # noqa: BLE001 - only observers want it; the store goes on
        return ""


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
        pairs = [(sop_class, ts) for ts in dict.fromkeys([*syntaxes, *FALLBACK_SYNTAXES])]
        if chunks[-1] and len(chunks[-1]) + len(pairs) > MAX_CONTEXTS:
            chunks.append([])
        chunks[-1].extend(pairs[:MAX_CONTEXTS])
    return [chunk for chunk in chunks if chunk]


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


class StoreClient(DimsePeer):
    """The C-STORE side of DimseClient."""

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
        started = utc_now()
        studies: dict[str, list[bool]] | None = {} if observed(self) else None
        try:
            return self._store_all(objects, associations, on_result, decompress, convert,
                                   studies)
        finally:
            for study_uid, stored in (studies or {}).items():  # one per study (IHE ATNA)
                self.notify("C-STORE", study_uid or None, all(stored), started,
                            f"{sum(stored)} of {len(stored)} instances stored")

    def _store_all(
        self,
        objects: Iterable[Dataset | str | Path],
        associations: int,
        on_result: Callable[[StoreResult], None] | None,
        decompress: bool,
        convert: bool,
        studies: dict[str, list[bool]] | None,
    ) -> StoreReport:
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
            self._store_batch(batch, pairs, associations, report, on_result, decompress,
                              studies)
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
        studies: dict[str, list[bool]] | None = None,
    ) -> None:
        work: queue.Queue[_StoreItem] = queue.Queue()
        for item in batch:
            work.put(item)
        lock = threading.Lock()
        errors: list[BaseException] = []

        def record(result: StoreResult, study_uid: str) -> None:
            with lock:
                report.results.append(result)
                if studies is not None and not result.refused:  # it went to the peer
                    studies.setdefault(study_uid, []).append(result.ok)
            if on_result:
                on_result(result)

        def take() -> _Prepared | None:
            try:
                return self._prepare(work.get_nowait(), studies is not None)
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
                    record(self._store_one(assoc, current, read_ahead, decompress),
                           current.study_uid)
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

    @staticmethod
    def _prepare(item: _StoreItem, want_study: bool = False) -> _Prepared:
        """`item` read whole and checked (or why it cannot be sent); runs while the peer
        works on the previous instance. `want_study`: its Study Instance UID too."""
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
        return _Prepared(item, part, None, _study_uid(item.payload) if want_study else "")

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
