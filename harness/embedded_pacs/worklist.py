"""Modality Worklist C-FIND SCP of the embedded PACS (PS3.4 K).

Worklist entries are DICOM files (``*.wl``) in ``DIR/worklist/``, the same drop folder form
as DCMTK's wlmscpfs and Orthanc's worklist plugin read, so a RIS feed (or the harness's
harness/workflow/orders.py) writes one format for every provider; an entry is visible from
the next query on (the folder is read per C-FIND: a worklist holds a day's orders, not 10^5).

Matching (PS3.4 K.6.1.2, C.2.2.2 through matching.py): top-level PatientID, PatientName,
AccessionNumber, RequestedProcedureID, StudyInstanceUID and the Scheduled Procedure Step
Sequence's Modality, ScheduledStationAETitle, ScheduledProcedureStepStartDate/-Time (ranges)
and ScheduledProcedureStepID. An empty key is universal; every key of the identifier is
returned (empty when the entry has none), the sequence item with the requested keys, all of
the entry's step when the item is empty (sequence matching, PS3.4 C.2.2.2.6).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence

from harness.embedded_pacs.matching import match_one

LOG = logging.getLogger("harness.embedded_pacs")

WORKLIST_FOLDER = "worklist"
MAX_ENTRIES = 10_000  # entries read per query: a drop folder beyond this is a feed gone wrong

#: matching keys and how they match (matching.match_one kinds)
TOP_KEYS = {
    "PatientID": "str", "PatientName": "pn", "AccessionNumber": "str",
    "RequestedProcedureID": "str", "StudyInstanceUID": "uid",
}
STEP_KEYS = {
    "Modality": "str", "ScheduledStationAETitle": "str",
    "ScheduledProcedureStepStartDate": "date", "ScheduledProcedureStepStartTime": "time",
    "ScheduledProcedureStepID": "str",
}


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if not isinstance(value, str | bytes) and hasattr(value, "__iter__"):
        return "\\".join(str(v) for v in value)
    return str(value)


def _matches(query: Dataset, entry: Dataset, keys: dict[str, str]) -> bool:
    for keyword, kind in keys.items():
        wanted, held = _text(query, keyword), _text(entry, keyword)
        if wanted and not any(match_one(kind, q, held) for q in wanted.split("\\")):
            return False
    return True


def _first_step(ds: Dataset) -> Dataset:
    steps = ds.get("ScheduledProcedureStepSequence") or []
    return steps[0] if len(steps) else Dataset()


def entry_matches(query: Dataset, entry: Dataset) -> bool:
    """Does a worklist entry match the C-FIND identifier (PS3.4 K.6.1.2)?"""
    return _matches(query, entry, TOP_KEYS) and _matches(
        _first_step(query), _first_step(entry), STEP_KEYS
    )


def answer_for(query: Dataset, entry: Dataset) -> Dataset:
    """The entry's values of the keys the identifier asked for."""
    answer = Dataset()
    for element in query:
        keyword = element.keyword
        if not keyword or keyword == "SpecificCharacterSet":
            continue
        if keyword == "ScheduledProcedureStepSequence":
            asked, step = _first_step(query), _first_step(entry)
            item = Dataset()
            for sub in asked or step:
                if sub.keyword and sub.keyword in step:
                    item[sub.tag] = step[sub.tag]
                elif sub.keyword:
                    item[sub.tag] = sub  # asked, the entry has none: returned empty
            answer.ScheduledProcedureStepSequence = Sequence([item])
        elif keyword in entry:
            answer[element.tag] = entry[element.tag]
        else:
            answer[element.tag] = element
    answer.SpecificCharacterSet = entry.get("SpecificCharacterSet", "ISO_IR 192")
    return answer


def read_entries(folder: Path) -> Iterator[tuple[Path, Dataset]]:
    """The readable worklist entries of `folder`; an unreadable file is logged and skipped."""
    if not folder.is_dir():
        return
    for count, path in enumerate(sorted(folder.glob("*.wl"))):
        if count >= MAX_ENTRIES:
            LOG.warning("worklist folder %s: more than %d entries, the rest ignored",
                        folder, MAX_ENTRIES)
            return
        try:
            entry = dcmread(path, force=True)  # files without a file meta too (dump2dcm -F)
            if "ScheduledProcedureStepSequence" not in entry:
                raise ValueError("no Scheduled Procedure Step Sequence")
        except (InvalidDicomError, OSError, ValueError, KeyError, TypeError) as exc:
            LOG.warning("worklist entry %s unreadable: %s", path.name, exc)
            continue
        yield path, entry


def handle_worklist_find(
    event: Any, storage_dir: Path, note: Callable[[str], None]
) -> Iterator[tuple[int, Dataset | None]]:
    """EVT_C_FIND on the worklist model: pending answers, then success (PS3.4 K.4.1.3)."""
    try:
        query = event.identifier
    except Exception as exc:  # noqa: BLE001 - an undecodable identifier is the caller's error
        note(f"worklist identifier undecodable: {exc}")
        yield 0xC000, None  # unable to process (PS3.4 K.4.1.1.4)
        return
    found = 0
    for _path, entry in read_entries(storage_dir / WORKLIST_FOLDER):
        if event.is_cancelled:
            yield 0xFE00, None
            return
        if entry_matches(query, entry):
            found += 1
            yield 0xFF00, answer_for(query, entry)
    note(f"worklist matches={found}")
    yield 0x0000, None
