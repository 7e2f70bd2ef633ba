"""A modality simulator: the acquisition side of IHE Scheduled Workflow (RAD TF-1 3).

One `perform` is what a CT console does for one patient: pick the order from the worklist
(Modality Worklist C-FIND, PS3.4 K), start the Performed Procedure Step (MPPS N-CREATE "IN
PROGRESS", PS3.4 F.7.2.1), acquire images that carry the scheduled attributes (the worklist's
Study Instance UID and Accession Number, the Request Attributes Sequence with the Requested
Procedure ID and Scheduled Procedure Step ID: RAD TF-2 4.8.4.1.3), store them (C-STORE), end
the step (N-SET "COMPLETED" listing every instance in the Performed Series Sequence, or
"DISCONTINUED" with a reason, F.7.2.2), ask for storage commitment when the harness has it,
and store a report (Basic Text SR) linked to the order by its accession number.

Without an order (an emergency, or a patient not yet registered) it acquires "unscheduled":
its own Study Instance UID, no accession number, an empty Request Attributes Sequence.
"""

from __future__ import annotations

import copy
import datetime as dt
import importlib
import importlib.util
from dataclasses import dataclass, field

from pydicom import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from harness.dicom.client import DimseClient
from harness.dicom.mpps import MppsClient, MppsResult
from harness.dicom.worklist import WorklistClient, scheduled_step, worklist_identifier
from harness.errors import EnvironmentProblem
from harness.workflow.orders import Order
from synthetic_data.samples import sample_study

MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
#: why a step was discontinued (PS3.16 CID 9300): 110513 "Equipment failure"
DISCONTINUED_REASON = ("110513", "DCM", "Equipment failure")


@dataclass
class Performed:
    """What one acquisition did, step by step (None: the step was not reached)."""

    order: Order | None
    station_ae_title: str
    scheduled: bool  # from a worklist item (False: unscheduled)
    worklist_matches: int = 0
    worklist_error: str | None = None
    mpps_uid: str = ""
    mpps_created: MppsResult | None = None
    mpps_final: MppsResult | None = None
    final_status: str = ""  # COMPLETED / DISCONTINUED as sent
    study_instance_uid: str = ""
    accession_number: str = ""
    patient_id: str = ""
    acquired: list[Dataset] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)  # SOP Instance UIDs acknowledged
    listed: list[str] = field(default_factory=list)  # SOP Instance UIDs the N-SET listed
    store_errors: list[str] = field(default_factory=list)
    committed: bool | None = None  # None: not asked (no module, or the archive has no SCP)
    commitment_note: str = ""  # the commitment's summary, or why it was not asked
    commitment_problems: list[str] = field(default_factory=list)  # instances not committed
    report_uid: str = ""
    report_stored: bool = False
    sent_step: Dataset | None = None  # the N-CREATE attributes updated by the N-SET's


    @property
    def label(self) -> str:
        return self.order.accession_number if self.order else f"unscheduled {self.patient_id}"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _now() -> tuple[str, str]:
    now = dt.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


class Modality:
    """A modality at `station_ae_title` using a worklist SCP, an MPPS SCP and an archive."""

    def __init__(self, station_ae_title: str, worklist: WorklistClient | None,
                 mpps: MppsClient | None, archive: DimseClient, modality: str = "CT", *,
                 commitment_report_port: int | None = None,
                 commitment_timeout_s: float = 30.0,
                 commitment: DimseClient | None = None) -> None:
        self.station_ae_title = station_ae_title
        self.worklist, self.mpps, self.archive = worklist, mpps, archive
        self.modality = modality
        # who asks for storage commitment: the archive sends a report on a new association
        # to the AE title that asked, so that title must be a peer it knows. A launched
        # archive knows the harness, not the simulated station: the harness asks in its
        # name (`commitment`); at a site the station's own title is configured there.
        self.commitment = commitment or archive
        # where the archive's N-EVENT-REPORT may come on a new association (the address the
        # launched nodes know for the calling AE title), None: on the N-ACTION's only
        self.commitment_report_port = commitment_report_port
        self.commitment_timeout_s = commitment_timeout_s

    # -- the steps -----------------------------------------------------------------------
    def pick(self, order: Order) -> tuple[Dataset | None, int, str | None]:
        """The worklist item of `order`, as the technologist picks it (PS3.4 K.6.1.2): this
        station's items for the modality, narrowed by the patient and accession number."""
        assert self.worklist is not None
        result = self.worklist.find_worklist(worklist_identifier(
            Modality=self.modality, ScheduledStationAETitle=self.station_ae_title,
            PatientID=order.patient_id, AccessionNumber=order.accession_number,
        ))
        if not result.ok:
            return None, 0, result.error
        return (result.matches[0] if len(result.matches) == 1 else None), len(result.matches), None

    def _step_attributes(self, item: Dataset | None, study_uid: str) -> Dataset:
        """One Scheduled Step Attributes Sequence item (PS3.4 F.7.2.1 Table F.7.2-1); an
        unscheduled step names the study the modality made (RAD TF-2 4.7.4.1.2.1)."""
        ref = Dataset()
        ref.StudyInstanceUID = study_uid
        ref.AccessionNumber = item.get("AccessionNumber", "") if item else ""
        ref.RequestedProcedureID = item.get("RequestedProcedureID", "") if item else ""
        ref.RequestedProcedureDescription = (
            item.get("RequestedProcedureDescription", "") if item else "")
        step = scheduled_step(item) if item else Dataset()
        ref.ScheduledProcedureStepID = step.get("ScheduledProcedureStepID", "")
        ref.ScheduledProcedureStepDescription = step.get("ScheduledProcedureStepDescription", "")
        ref.ReferencedStudySequence = Sequence()
        return ref

    def _create_attributes(self, patient: Dataset, item: Dataset | None, step_id: str,
                           study_uid: str) -> Dataset:
        """The N-CREATE data set: the step begins (PS3.4 F.7.2.1)."""
        date, time = _now()
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ScheduledStepAttributesSequence = Sequence([self._step_attributes(item, study_uid)])
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
            setattr(ds, keyword, patient.get(keyword, ""))
        ds.ReferencedPatientSequence = Sequence()
        ds.PerformedProcedureStepID = step_id
        ds.PerformedStationAETitle = self.station_ae_title
        ds.PerformedStationName = self.station_ae_title
        ds.PerformedLocation = "ROOM 1"
        ds.PerformedProcedureStepStartDate = date
        ds.PerformedProcedureStepStartTime = time
        ds.PerformedProcedureStepStatus = "IN PROGRESS"
        ds.PerformedProcedureStepDescription = item.get("RequestedProcedureDescription", "") \
            if item else "UNSCHEDULED"
        ds.PerformedProcedureTypeDescription = ""
        ds.ProcedureCodeSequence = Sequence()
        ds.PerformedProcedureStepEndDate = ""
        ds.PerformedProcedureStepEndTime = ""
        ds.Modality = self.modality
        ds.StudyID = step_id[:16]
        ds.PerformedProtocolCodeSequence = Sequence()
        ds.PerformedSeriesSequence = Sequence()
        return ds

    def acquire(self, patient: Dataset, item: Dataset | None, study_uid: str, mpps_uid: str,
                seed: int, instances: int) -> list[Dataset]:
        """Synthetic images carrying the scheduled attributes (RAD TF-2 4.8.4.1.3)."""
        template = sample_study(seed=seed, instances=instances, modality=self.modality)
        series_uid = generate_uid()
        request = Dataset()
        if item is not None:
            request.RequestedProcedureID = item.get("RequestedProcedureID", "")
            request.ScheduledProcedureStepID = scheduled_step(item).get(
                "ScheduledProcedureStepID", "")
            request.RequestedProcedureDescription = item.get("RequestedProcedureDescription", "")
            request.AccessionNumber = item.get("AccessionNumber", "")
        reference = Dataset()
        reference.ReferencedSOPClassUID = MPPS_SOP_CLASS
        reference.ReferencedSOPInstanceUID = mpps_uid
        acquired = []
        for ds in template:
            ds = copy.deepcopy(ds)
            for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
                setattr(ds, keyword, patient.get(keyword, ""))
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.AccessionNumber = item.get("AccessionNumber", "") if item else ""
            ds.StudyDescription = item.get("RequestedProcedureDescription", "") if item else ""
            ds.RequestAttributesSequence = Sequence([request] if item is not None else [])
            ds.ReferencedPerformedProcedureStepSequence = Sequence([reference])
            acquired.append(ds)
        return acquired

    def _final_attributes(self, status: str, series: dict[str, list[Dataset]]) -> Dataset:
        """The N-SET data set: the end of the step and what it made (PS3.4 F.7.2.2)."""
        date, time = _now()
        ds = Dataset()
        ds.PerformedProcedureStepStatus = status
        ds.PerformedProcedureStepEndDate = date
        ds.PerformedProcedureStepEndTime = time
        if status == "DISCONTINUED":
            ds.PerformedProcedureStepDiscontinuationReasonCodeSequence = Sequence(
                [_code(*DISCONTINUED_REASON)])
        items = []
        for series_uid, objects in series.items():
            entry = Dataset()
            entry.SeriesInstanceUID = series_uid
            entry.SeriesDescription = str(objects[0].get("SeriesDescription", ""))
            entry.PerformingPhysicianName = ""
            entry.OperatorsName = "OPERATOR^SYNTHETIC"
            entry.ProtocolName = str(objects[0].get("ProtocolName", "")) or "PROTOCOL"
            entry.RetrieveAETitle = self.archive.called_ae
            refs = []
            for obj in objects:
                ref = Dataset()
                ref.ReferencedSOPClassUID = obj.SOPClassUID
                ref.ReferencedSOPInstanceUID = obj.SOPInstanceUID
                refs.append(ref)
            entry.ReferencedImageSequence = Sequence(refs)
            entry.ReferencedNonImageCompositeSOPInstanceSequence = Sequence()
            items.append(entry)
        ds.PerformedSeriesSequence = Sequence(items)
        return ds

    def report(self, image: Dataset, seed: int) -> Dataset:
        """A Basic Text SR in the acquired study (`image` one of its images), linked by its
        accession number, with the study's patient and study attributes."""
        sr = copy.deepcopy(sample_study(seed=seed, instances=1, modality="SR")[0])
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                        "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
                        "StudyDescription", "ReferringPhysicianName", "AccessionNumber"):
            setattr(sr, keyword, image.get(keyword, ""))
        sr.SeriesInstanceUID = generate_uid()
        sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        return sr

    # -- the whole chain -----------------------------------------------------------------
    def perform(self, order: Order | None, *, seed: int, instances: int = 2,
                discontinue_after: int | None = None, report: bool = True,
                patient: Dataset | None = None) -> Performed:
        """The chain for one order (None: unscheduled, for `patient`). With
        `discontinue_after`, only that many images are stored and the step is DISCONTINUED
        (no report: nothing was completed to read)."""
        done = Performed(order, self.station_ae_title, scheduled=order is not None)
        item = None
        if order is not None:
            if self.worklist is None:
                done.worklist_error = "no worklist provider"
                return done
            item, done.worklist_matches, done.worklist_error = self.pick(order)
            if item is None:
                return done
            patient = item
        assert patient is not None, "an unscheduled acquisition needs a patient"
        done.patient_id = str(patient.get("PatientID", ""))
        done.mpps_uid = generate_uid()
        study_uid = str(item.StudyInstanceUID) if item is not None else generate_uid()
        step_id = f"PPS{seed:06d}"
        if self.mpps is not None:
            done.sent_step = self._create_attributes(patient, item, step_id, study_uid)
            done.mpps_created = self.mpps.create(done.mpps_uid, done.sent_step)
        acquired = self.acquire(patient, item, study_uid, done.mpps_uid, seed, instances)
        if discontinue_after is not None:
            acquired = acquired[:discontinue_after]
        done.acquired = acquired
        done.study_instance_uid = acquired[0].StudyInstanceUID
        done.accession_number = str(acquired[0].get("AccessionNumber", ""))
        stored = self.archive.store(acquired)
        done.stored = [r.sop_instance_uid for r in stored.succeeded]
        done.store_errors = [f"{r.sop_instance_uid}: {r.error or r.status}" for r in stored.failed]
        series: dict[str, list[Dataset]] = {}
        for ds in acquired:
            if ds.SOPInstanceUID in done.stored:
                series.setdefault(ds.SeriesInstanceUID, []).append(ds)
        done.listed = [ds.SOPInstanceUID for objs in series.values() for ds in objs]
        done.final_status = "DISCONTINUED" if discontinue_after is not None else "COMPLETED"
        if self.mpps is not None and done.mpps_created is not None and done.mpps_created.ok:
            final = self._final_attributes(done.final_status, series)
            done.mpps_final = self.mpps.set(done.mpps_uid, final)
            assert done.sent_step is not None
            for element in final:
                done.sent_step[element.tag] = element
        self.commit(done)
        if report and done.final_status == "COMPLETED" and done.stored:
            sr = self.report(acquired[0], seed)
            done.report_uid = sr.SOPInstanceUID
            done.report_stored = self.archive.store([sr]).ok
        return done

    def commit(self, done: Performed) -> None:
        """Storage commitment (PS3.4 J) of what was stored, through harness/dicom/commitment.py
        (another part of issue 17) when this harness has it; an archive without the service
        leaves `committed` None with "storage commitment not supported"."""
        if importlib.util.find_spec("harness.dicom.commitment") is None:
            done.commitment_note = "storage commitment not available in this harness"
            return
        commitment = importlib.import_module("harness.dicom.commitment")
        pairs = [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in done.acquired
                 if ds.SOPInstanceUID in done.stored]
        port = self.commitment_report_port
        try:
            result = commitment.request_commitment(
                self.commitment, pairs, report_address=("127.0.0.1", port) if port else None,
                timeout_s=self.commitment_timeout_s, node_name=self.archive.called_ae)
        except EnvironmentProblem as exc:
            done.committed, done.commitment_note = False, str(exc)
            return
        done.commitment_note = result.summary()
        if result.supported:
            done.committed = result.ok
            done.commitment_problems = list(result.problems())
