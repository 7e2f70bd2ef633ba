"""C-STORE SCP of the embedded PACS: which data sets are accepted, and the index row of each.

Storing the same SOP Instance UID again replaces row and file (status 0x0000). Only what can
be read back is stored: a data set that does not decode to its end (truncated, or mislabelled:
not in the negotiated syntax) is refused with 0xC000, one whose uncompressed pixel data is
shorter than its image attributes announce, or without Study/Series/SOP Instance UID, with
0xA900; each refusal carries an Error Comment naming the reason (PS3.4 B.2.3). Disk or database
errors give 0xA700. Refused C-STOREs leave no row; the log has one line each, no traceback.
A data set whose SOP Class/Instance UID differs from the request's is stored with 0xB007.
"""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from collections.abc import Callable
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

from harness.embedded_pacs.storage import DATASET_COLUMNS, Storage

LOG = logging.getLogger("harness.embedded_pacs")


def text(ds: Dataset, keyword: str) -> str:
    """An attribute as index text: '' when absent, multiple values joined by a backslash."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def refusal(status: int, reason: str) -> Dataset:
    """A C-STORE response status with its Error Comment (LO: 64 characters at most)."""
    answer = Dataset()
    answer.Status = status
    answer.ErrorComment = reason[:64]
    return answer


def unreadable(ds: Dataset) -> str:
    """Why a received data set cannot be read back in full ('' when it can)."""
    try:
        for elem in ds.iterall():  # decodes every element, sequence items included
            _ = elem.value
    except Exception as exc:
        return f"data set does not parse: {type(exc).__name__}"
    return ""


def mismatch(ds: Dataset) -> str:
    """Why a data set does not hold what its attributes announce ('' when it does): here,
    uncompressed pixel data shorter than its Image Pixel attributes require (PS3.5 8.1.1;
    YBR_FULL_422 takes two samples a pixel, PS3.3 C.7.6.3.1.2), which is how a truncated
    file shows once received."""
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    if "PixelData" not in ds or syntax.is_compressed:
        return ""
    try:
        expected = get_expected_length(ds, unit="bytes")
    except (AttributeError, KeyError, TypeError, ValueError):
        return "pixel data without Rows, Columns or Bits Allocated"
    if len(ds.PixelData) < expected:
        return f"pixel data {len(ds.PixelData)} bytes, expected {expected}"
    return ""


def handle_store(
    event: Any, storage: Storage, calling: str, note: Callable[[str], None]
) -> int | Dataset:
    """Store the bytes exactly as received, then index them (module docstring).

    ``calling`` is the requestor's AE title (indexed); ``note`` attaches a detail to the
    request's log line.
    """
    req = event.request
    try:
        data = event.encoded_dataset()
        ds = dcmread(BytesIO(data))
        problem = unreadable(ds)
    except Exception as exc:
        problem = f"data set does not decode: {type(exc).__name__}"
    if problem:
        note(f"refused: {problem}")
        return refusal(0xC000, problem)
    try:
        sop_instance = text(ds, "SOPInstanceUID")
        sop_class = text(ds, "SOPClassUID") or str(req.AffectedSOPClassUID)
        values = {col: text(ds, kw) for col, kw in DATASET_COLUMNS}
        charset = text(ds, "SpecificCharacterSet")
        problem = mismatch(ds)
    except Exception as exc:
        problem = f"attribute values do not decode: {type(exc).__name__}"
    if problem:
        note(f"refused: {problem}")
        return refusal(0xA900, problem)
    study, series = values["study_instance_uid"], values["series_instance_uid"]
    if not (sop_instance and study and series):
        note("refused: missing Study/Series/SOP Instance UID")
        return refusal(0xA900, "missing Study, Series or SOP Instance UID")
    status = 0x0000
    if sop_instance != str(req.AffectedSOPInstanceUID) or sop_class != str(
        req.AffectedSOPClassUID
    ):
        status = 0xB007
    row = {
        **values,
        "sop_instance_uid": sop_instance,
        "sop_class_uid": sop_class,
        "transfer_syntax_uid": str(event.context.transfer_syntax),
        "specific_character_set": charset,
        "path": storage.relative_path(study, series, sop_instance),
        "size_bytes": len(data),
        "received_at": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        "calling_ae_title": calling,
        "store_status": status,
    }
    try:
        replaced = storage.put(data, row)
    except (OSError, sqlite3.Error) as exc:
        LOG.error("C-STORE cannot be stored: %s: %s", type(exc).__name__, exc)
        return 0xA700
    if replaced:
        note("replaced")
    return status
