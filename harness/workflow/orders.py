"""Orders as worklist entries: what a RIS puts on a node's Modality Worklist (PS3.4 K).

An order is one synthetic patient, an accession number, one requested procedure and one
scheduled procedure step (IHE RAD TF-2 4.5: the Study Instance UID is assigned at ordering, so
every image of the order lands in one study). It reaches a worklist provider as a DICOM file in
the provider's worklist folder: Orthanc's worklist plugin, DCMTK's wlmscpfs and the embedded
PACS all read such a folder, so one writer serves the three (a site's RIS feeds its own broker
instead; docs/workflow.md). Files are renamed into place, so a query never reads half a file.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from harness.errors import ConfigError

#: the file meta's Media Storage SOP Class of a worklist file (PS3.4 K.6.1)
WORKLIST_SOP_CLASS = "1.2.840.10008.5.1.4.31"
_FAMILY = ("ORDERLY", "RADIANT", "SCHEDULE", "WORKLIST", "ACCESSION", "STEPWISE")
_GIVEN = ("ANNA", "BORIS", "CLARA", "DAVID", "EMMA", "FELIX")
_PROCEDURES = {
    "CT": ("CT CHEST WITH CONTRAST", "CT CHEST"),
    "MR": ("MR BRAIN WITHOUT CONTRAST", "MR BRAIN"),
    "CR": ("XR CHEST 2 VIEWS", "XR CHEST"),
}


@dataclass(frozen=True)
class Order:
    """One order with one scheduled step (the unit IHE SWF tracks, RAD TF-1 3.3)."""

    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    accession_number: str
    requested_procedure_id: str
    procedure_description: str
    scheduled_step_id: str
    step_description: str
    modality: str
    station_ae_title: str
    start_date: str
    start_time: str
    study_instance_uid: str

    def describe(self) -> dict[str, str]:
        """For the report: what identifies the order (no patient name)."""
        return {"accession": self.accession_number, "patient_id": self.patient_id,
                "procedure": self.requested_procedure_id, "step": self.scheduled_step_id,
                "modality": self.modality}


def make_order(seed: int, station_ae_title: str, modality: str = "CT",
               date: str = "20260115") -> Order:
    """A deterministic synthetic order for `seed` (names and numbers marked synthetic)."""
    rng = random.Random(f"order-{seed}")
    if modality not in _PROCEDURES:
        raise ConfigError(f"order: modality {modality!r} (known: {', '.join(_PROCEDURES)})")
    procedure, step = _PROCEDURES[modality]
    return Order(
        patient_id=f"WFP{seed:06d}",
        patient_name=f"{rng.choice(_FAMILY)}^{rng.choice(_GIVEN)}^^^SYNTHETIC",
        birth_date=f"19{rng.randint(30, 99)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
        sex=rng.choice("MF"),
        accession_number=f"WFA{seed:07d}",
        requested_procedure_id=f"RP{seed:06d}",
        procedure_description=procedure,
        scheduled_step_id=f"SPS{seed:06d}",
        step_description=step,
        modality=modality,
        station_ae_title=station_ae_title,
        start_date=date,
        start_time=f"{8 + seed % 10:02d}{(seed * 7) % 60:02d}00",
        study_instance_uid=generate_uid(entropy_srcs=["pacs-harness-order", str(seed)]),
    )


def worklist_entry(order: Order) -> Dataset:
    """The order as a worklist item with every attribute DCMTK's wlmscpfs requires of a
    complete file (its file reject check) and Orthanc's plugin matches (PS3.4 K.6.1.2)."""
    step = Dataset()
    step.ScheduledStationAETitle = order.station_ae_title
    step.ScheduledProcedureStepStartDate = order.start_date
    step.ScheduledProcedureStepStartTime = order.start_time
    step.Modality = order.modality
    step.ScheduledPerformingPhysicianName = "TECHNOLOGIST^SYNTHETIC"
    step.ScheduledProcedureStepDescription = order.step_description
    step.ScheduledStationName = order.station_ae_title
    step.ScheduledProcedureStepLocation = "ROOM 1"
    step.ScheduledProcedureStepID = order.scheduled_step_id
    step.ScheduledProcedureStepStatus = "SCHEDULED"
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ScheduledProcedureStepSequence = Sequence([step])
    ds.RequestedProcedureID = order.requested_procedure_id
    ds.RequestedProcedureDescription = order.procedure_description
    ds.StudyInstanceUID = order.study_instance_uid
    ds.RequestedProcedurePriority = "ROUTINE"
    ds.AccessionNumber = order.accession_number
    ds.RequestingPhysician = "REQUESTER^SYNTHETIC"
    ds.ReferringPhysicianName = "REFERRER^SYNTHETIC"
    ds.AdmissionID = f"ADM{order.patient_id}"
    ds.CurrentPatientLocation = "WARD 1"
    ds.PatientName = order.patient_name
    ds.PatientID = order.patient_id
    ds.PatientBirthDate = order.birth_date
    ds.PatientSex = order.sex
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = WORKLIST_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=["pacs-harness-worklist", order.accession_number]
    )
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def worklist_folder(node: Any) -> Path:
    """The folder a node's worklist provider reads (`worklist_dir` of its kind), or a
    ConfigError naming the node when its kind serves no worklist."""
    folder = getattr(node, "worklist_dir", None)
    if folder is None or not node.capabilities.worklist:
        raise ConfigError(f"node {node.name} ({node.kind}) serves no Modality Worklist")
    return Path(folder)


def write_order(order: Order, folder: Path) -> Path:
    """The order as `<accession>.wl` in `folder`, renamed into place (never half a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{order.accession_number}.wl"
    partial = folder / f".{order.accession_number}.wl.partial"
    worklist_entry(order).save_as(partial, enforce_file_format=True)
    os.replace(partial, final)
    return final


def schedule(orders: list[Order], node: Any) -> list[Path]:
    """Put `orders` on `node`'s worklist."""
    folder = worklist_folder(node)
    return [write_order(order, folder) for order in orders]


def withdraw(order: Order, node: Any) -> None:
    """Take an order off `node`'s worklist (the RIS cancels it, or the step was performed)."""
    (worklist_folder(node) / f"{order.accession_number}.wl").unlink(missing_ok=True)
