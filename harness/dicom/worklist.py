"""Modality Worklist C-FIND (PS3.4 K.4), the query a modality sends before it acquires.

Kept out of query.py: the worklist model has no Query/Retrieve Level and its keys live in the
Scheduled Procedure Step Sequence (PS3.4 K.6.1.2), so nothing of the Q/R identifier applies.
Runs over pynetdicom with the harness's deadlines: a Watchdog bounds the whole query however a
peer trickles its answers, and `max_find_matches` bounds what is kept in memory.
"""

from __future__ import annotations

import time
from typing import Any

from pydicom import Dataset
from pydicom.sequence import Sequence
from pynetdicom import build_context
from pynetdicom.sop_class import ModalityWorklistInformationFind

from harness.dicom.peer import DimsePeer
from harness.dicom.status import NO_STATUS, FindResult, Status
from harness.dicom.watchdog import Watchdog

#: Modality Worklist Information Model - FIND (PS3.4 K.6.1)
WORKLIST_FIND_UID = "1.2.840.10008.5.1.4.31"

#: return keys of the Scheduled Procedure Step Sequence a modality needs (PS3.4 K.6.1.2.2)
STEP_RETURN_KEYS = (
    "Modality", "ScheduledStationAETitle", "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepStartTime", "ScheduledProcedureStepID",
    "ScheduledProcedureStepDescription",
)
#: top-level return keys (patient, visit, requested procedure, imaging service request)
TOP_RETURN_KEYS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
    "RequestedProcedureID", "RequestedProcedureDescription", "StudyInstanceUID",
)


def worklist_identifier(**matching: Any) -> Dataset:
    """A worklist C-FIND identifier: every return key of a modality, with `matching` values.

    Keys of the Scheduled Procedure Step Sequence (Modality, ScheduledStationAETitle,
    ScheduledProcedureStepStartDate, ...) go into its one item; the others at top level.
    """
    step = Dataset()
    for keyword in STEP_RETURN_KEYS:
        setattr(step, keyword, matching.pop(keyword, "") or "")
    ds = Dataset()
    for keyword in TOP_RETURN_KEYS:
        setattr(ds, keyword, matching.pop(keyword, "") or "")
    for keyword, value in matching.items():  # any other key, as given
        setattr(ds, keyword, value)
    ds.ScheduledProcedureStepSequence = Sequence([step])
    return ds


class WorklistClient(DimsePeer):
    """A modality's worklist query to one worklist SCP (RIS, broker or archive)."""

    def find_worklist(self, identifier: Dataset) -> FindResult:
        """C-FIND on the worklist model (PS3.4 K.4.1); `matches` are the worklist items."""
        start = time.perf_counter()
        assoc = self.associate([build_context(ModalityWorklistInformationFind)])
        if not assoc.accepted_contexts:  # the peer serves no worklist (PS3.8 9.3.3.2)
            assoc.release()
            return FindResult(NO_STATUS, [], time.perf_counter() - start,
                              f"peer {self}: the worklist model was not accepted")
        watchdog = Watchdog(lambda: assoc, self.find_deadline_s)
        matches: list[Dataset] = []
        status, error = NO_STATUS, None
        try:
            for rsp, answer in assoc.send_c_find(identifier, ModalityWorklistInformationFind):
                if rsp is None or "Status" not in rsp:
                    error = f"peer {self}: worklist C-FIND got no answer"
                    break
                status = Status(int(rsp.Status))
                if status.category != "pending":
                    break
                if answer is not None:
                    matches.append(answer)
                if len(matches) > self.max_find_matches:
                    error = f"peer {self}: more than {self.max_find_matches} worklist items"
                    assoc.abort()
                    status = NO_STATUS
                    break
        finally:
            watchdog.stop()
            if assoc.is_established:
                assoc.release()
        if watchdog.expired:
            status = NO_STATUS
            error = f"peer {self}: worklist C-FIND past {self.find_deadline_s:g} s"
        if status.category != "success" and error is None:
            error = f"peer {self}: worklist C-FIND answered {status}"
        return FindResult(status, matches, time.perf_counter() - start, error)


def scheduled_step(item: Dataset) -> Dataset:
    """The (first) Scheduled Procedure Step of a worklist item, or an empty data set."""
    steps = item.get("ScheduledProcedureStepSequence") or []
    return steps[0] if len(steps) else Dataset()
