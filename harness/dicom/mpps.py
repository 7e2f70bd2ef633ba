"""Modality Performed Procedure Step SCU (PS3.4 F.7): N-CREATE and N-SET of one step.

A modality tells the department what it did: N-CREATE with status "IN PROGRESS" when it
starts (PS3.4 F.7.2.1), N-SET to "COMPLETED" or "DISCONTINUED" with the series and instances
it made (F.7.2.2). Each call is one association, bounded by a Watchdog.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom import Dataset
from pynetdicom import build_context
from pynetdicom.sop_class import ModalityPerformedProcedureStep

from harness.dicom.peer import DimsePeer
from harness.dicom.status import NO_STATUS, Status
from harness.dicom.watchdog import Watchdog

#: Modality Performed Procedure Step SOP Class (PS3.4 F.7.1)
MPPS_SOP_CLASS_UID = "1.2.840.10008.3.1.2.3.3"


@dataclass
class MppsResult:
    status: Status
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status.ok


class MppsClient(DimsePeer):
    """N-CREATE / N-SET of MPPS instances on one MPPS SCP."""

    def _send(self, operation: str, instance_uid: str, attributes: Dataset) -> MppsResult:
        assoc = self.associate([build_context(ModalityPerformedProcedureStep)])
        if not assoc.accepted_contexts:  # the peer has no MPPS SCP (PS3.8 9.3.3.2)
            assoc.release()
            return MppsResult(NO_STATUS, f"peer {self}: MPPS was not accepted")
        watchdog = Watchdog(lambda: assoc, self.timeout_s)
        try:
            if operation == "N-CREATE":
                rsp, _ = assoc.send_n_create(
                    attributes, ModalityPerformedProcedureStep, instance_uid
                )
            else:
                rsp, _ = assoc.send_n_set(attributes, ModalityPerformedProcedureStep, instance_uid)
        finally:
            watchdog.stop()
            if assoc.is_established:
                assoc.release()
        if watchdog.expired or rsp is None or "Status" not in rsp:
            return MppsResult(NO_STATUS, f"peer {self}: {operation} got no answer")
        status = Status(int(rsp.Status))
        error = None if status.ok else f"peer {self}: {operation} answered {status}"
        return MppsResult(status, error)

    def create(self, instance_uid: str, attributes: Dataset) -> MppsResult:
        """N-CREATE (PS3.4 F.7.2.1): the step starts, PerformedProcedureStepStatus IN PROGRESS."""
        return self._send("N-CREATE", instance_uid, attributes)

    def set(self, instance_uid: str, attributes: Dataset) -> MppsResult:
        """N-SET (PS3.4 F.7.2.2): the step's final state and what it produced."""
        return self._send("N-SET", instance_uid, attributes)
