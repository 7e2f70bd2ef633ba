"""C-FIND (PS3.4 C.4.1, PS3.7 9.1.2) on the wire layer, and the look-up a C-GET runs first.

The look-up walks the hierarchy (PS3.4 C.4.1.2.1) to learn which SOP classes a retrieve
will meet, so C-GET can propose exactly those (PS3.8 9.3.2.2: at most 128 contexts).
"""

from __future__ import annotations

import datetime as dt
import struct
import time
from typing import Any

from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from harness.dicom.contexts import FIND_MODELS
from harness.dicom.part10 import decode_dataset, encode_dataset
from harness.dicom.peer import DimseConnectionError, DimsePeer, utc_now
from harness.dicom.status import NO_STATUS, FindResult, Status
from harness.dicom.wire import TransferFailed, WireAssociation

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
_UNIQUE_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}


def query_identifier(level: str, keys: dict[str, Any] | Dataset | None) -> Dataset:
    """The identifier of a C-FIND, C-GET or C-MOVE request (PS3.4 C.4.1.1.3): the keys
    (None: a return key), the level, and UTF-8 unless the keys name a character set."""
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


class QueryClient(DimsePeer):
    """The C-FIND side of DimseClient."""

    # -- C-FIND ----------------------------------------------------------------------
    def find(
        self,
        level: str,
        keys: dict[str, Any] | Dataset | None = None,
        *,
        model: str = "study",
        cancel_after: int | None = None,
    ) -> FindResult:
        """C-FIND at PATIENT, STUDY, SERIES or IMAGE level; keys with None are return keys.
        With `cancel_after`, a C-CANCEL once that many matches arrived (PS3.7 9.3.2.3)."""
        start = time.perf_counter()
        assoc = self.find_association(model)
        try:
            result = self.find_over(assoc, level, keys, model=model, cancel_after=cancel_after)
        finally:
            assoc.release()
        result.elapsed_s = time.perf_counter() - start
        return result

    def any_study_uid(self) -> str | None:
        """One Study Instance UID the peer holds, or None when it lists none.

        Why not list every study and take the first: a hospital archive holds 10^5+ of them.
        The study-level C-FIND is cancelled after its first match (PS3.7 9.3.2.3); a peer
        that ignores the C-CANCEL ends the query at the harness's pending-response bound,
        and then the query is narrowed to recent dates (StudyDate ranges, PS3.4 C.2.2.2.5),
        widened until one answers with a match.
        """
        first = self.find("STUDY", {"StudyInstanceUID": None}, cancel_after=1)
        uids = [str(m.get("StudyInstanceUID", "")) for m in first.matches]
        if uids and uids[0]:
            return uids[0]
        if first.status.category in ("success", "cancel"):
            return None  # it answered, with nothing
        today = utc_now().date()
        for days in (7, 365, 3650):
            since = (today - dt.timedelta(days=days)).strftime("%Y%m%d")
            found = self.find("STUDY", {"StudyInstanceUID": None, "StudyDate": f"{since}-"},
                              cancel_after=1)
            uids = [str(m.get("StudyInstanceUID", "")) for m in found.matches]
            if uids and uids[0]:
                return uids[0]
        return None

    def find_association(self, model: str = "study") -> WireAssociation:
        """An association for C-FINDs of `model` (explicit and implicit VR little endian), for
        find_over; the caller releases it. DimseConnectionError if the peer refuses the model."""
        sop_class = FIND_MODELS[model]
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
        cancel_after: int | None = None,
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
        started = utc_now()
        identifier = query_identifier(level, keys)
        reached = assoc.is_open  # else no request goes out: nothing to observe
        result = self._find_on(assoc, level, identifier, model, cancel_after)
        if reached:
            self.notify("C-FIND", single_study(identifier), result.ok, started,
                        f"status {result.status}")
        return result

    def _find_on(
        self,
        assoc: WireAssociation,
        level: str,
        identifier: Dataset,
        model: str,
        cancel_after: int | None = None,
    ) -> FindResult:
        start = time.perf_counter()
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
                cancel_after=cancel_after,
            )
        except TransferFailed as exc:
            assoc.abort()
            return FindResult(
                NO_STATUS, [], time.perf_counter() - start,
                f"peer {self}: {level} C-FIND broken off: {exc}",
            )
        status = Status(answer.status)
        error = None
        cancelled = cancel_after is not None and status.category == "cancel"  # as asked
        if status.category != "success" and not cancelled:
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


class Lookup:
    """C-FINDs over one association: what a C-GET will find, to propose the right contexts."""

    def __init__(
        self, client: QueryClient, model: str, assoc: WireAssociation | None = None
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
                named = (c for m in matches for c in element_values(m, "SOPClassesInStudy"))
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
    sop_class = FIND_MODELS[model]
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        if (sop_class, syntax) in assoc.accepted:
            return assoc.accepted[(sop_class, syntax)], syntax
    return None


def single_study(identifier: Dataset | None) -> str | None:
    """The one Study Instance UID an identifier names (None: no key, a list or a wildcard)."""
    value = identifier.get("StudyInstanceUID") if identifier is not None else None
    if isinstance(value, MultiValue):
        value = value[0] if len(value) == 1 else None
    text = str(value or "").strip()
    return text if text and not any(c in text for c in "*?\\") else None


def _model_levels(model: str) -> tuple[str, ...]:
    return LEVELS if model == "patient" else LEVELS[1:]


def element_values(ds: Dataset, keyword: str) -> list[str]:
    """The values of a possibly multi-valued element as strings (none when absent)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]
