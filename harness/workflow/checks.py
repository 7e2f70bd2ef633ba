"""Checks of a scheduled workflow against what the archive and the MPPS SCP hold.

Each check reads back through a means other than the modality's own record: the MPPS steps
as the MPPS SCP kept them (`mpps_steps`), and the archive's C-FIND (PS3.4 C.6) for studies,
series and instances. What IHE SWF promises (RAD TF-1 3.3) becomes one finding per break:

* every scheduled step performed exactly once (one COMPLETED step naming its Scheduled
  Procedure Step ID; two are a double acquisition, none a lost order);
* the acquired study matches its order: the order's Study Instance UID holds the order's
  patient, accession number and procedure (Study Description = Requested Procedure
  Description), and no other study carries its accession number;
* each step lists exactly what the archive stored in its series (PS3.4 F.7.2.2, the
  Performed Series Sequence), the report aside;
* a discontinued step gives its reason (PS3.4 F.7.2.2.1); an unscheduled one has no order:
  both are counted and shown, a break only where the site's rules say so (`SiteRules`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset

from harness.dicom.client import DimseClient
from harness.workflow.modality import Performed
from harness.workflow.orders import Order

REPORT_MODALITY = "SR"


@dataclass(frozen=True)
class SiteRules:
    """How the site treats the cases IHE SWF leaves to it (RAD TF-1 3.4, 3.5)."""

    unscheduled_allowed: bool = True  # an acquisition without an order is accepted
    discontinued_allowed: bool = True  # a discontinued step (with a reason) is accepted
    report_required: bool = True  # every completed order has a report in the archive


DEFAULT_RULES = SiteRules()


@dataclass
class OrderRow:
    """One order (or unscheduled acquisition) through the chain."""

    label: str
    outcome: str  # performed / discontinued / unscheduled / not performed / performed N times
    patient_id: str = ""
    study_instance_uid: str = ""
    on_worklist: bool = False
    mpps: str = ""  # the step's status as the MPPS SCP holds it
    stored: int = 0  # instances the archive holds in the study (report aside)
    listed: int = 0  # instances the MPPS step lists
    committed: bool | None = None
    reported: bool = False
    breaks: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class WorkflowOutcome:
    rows: list[OrderRow]
    mpps_source: str  # how the MPPS steps were read back
    commitment_note: str = ""

    @property
    def breaks(self) -> list[str]:
        return [f"{row.label}: {b}" for row in self.rows for b in row.breaks]

    @property
    def ok(self) -> bool:
        return not self.breaks

    def counts(self) -> dict[str, int]:
        scheduled = [r for r in self.rows if r.outcome != "unscheduled"]
        return {
            "orders": len(scheduled),
            "worklist": sum(r.on_worklist for r in scheduled),
            "mpps": sum(bool(r.mpps) for r in self.rows),
            "stored": sum(r.stored > 0 for r in self.rows),
            "committed": sum(r.committed is True for r in self.rows),
            "reported": sum(r.reported for r in self.rows),
            "completed": sum(r.mpps == "COMPLETED" for r in self.rows),
            "discontinued": sum(r.outcome == "discontinued" for r in self.rows),
            "unscheduled": sum(r.outcome == "unscheduled" for r in self.rows),
        }

    def as_dict(self) -> dict[str, Any]:
        return {"counts": self.counts(), "breaks": self.breaks, "mpps_source": self.mpps_source,
                "commitment": self.commitment_note, "rows": [r.as_dict() for r in self.rows]}


def _scheduled(step: Dataset) -> Dataset:
    items = step.get("ScheduledStepAttributesSequence") or []
    return items[0] if len(items) else Dataset()


def listed_instances(step: Dataset) -> set[str]:
    """SOP Instance UIDs an MPPS step lists (Performed Series Sequence, PS3.4 F.7.2.2)."""
    found = set()
    for series in step.get("PerformedSeriesSequence") or []:
        for key in ("ReferencedImageSequence", "ReferencedNonImageCompositeSOPInstanceSequence"):
            for ref in series.get(key) or []:
                found.add(str(ref.ReferencedSOPInstanceUID))
    return found


def steps_as_sent(performed: list[Performed]) -> dict[str, tuple[str, Dataset]]:
    """The steps as the modality sent them: for an MPPS SCP the harness cannot read back
    (then the report says so: the MPPS check is the modality's word, not the SCP's)."""
    return {
        done.mpps_uid: (done.final_status, done.sent_step)
        for done in performed
        if done.sent_step is not None and done.mpps_final is not None and done.mpps_final.ok
    }


class ArchiveReader:
    """The archive's C-FIND answers for one study (an independent read of what it holds)."""

    def __init__(self, archive: DimseClient) -> None:
        self.archive = archive

    def studies(self, **keys: str) -> list[Dataset]:
        found = self.archive.find("STUDY", {**keys, "StudyInstanceUID": keys.get(
            "StudyInstanceUID"), "AccessionNumber": keys.get("AccessionNumber"),
            "PatientID": None, "StudyDescription": None})
        return list(found.matches) if found.ok else []

    def instances(self, study_uid: str) -> tuple[set[str], set[str]]:
        """(image SOP Instance UIDs, report SOP Instance UIDs) of the study."""
        series = self.archive.find("SERIES", {"StudyInstanceUID": study_uid,
                                              "SeriesInstanceUID": None, "Modality": None})
        images, reports = set(), set()
        for one in series.matches if series.ok else []:
            found = self.archive.find("IMAGE", {"StudyInstanceUID": study_uid,
                                                "SeriesInstanceUID": one.SeriesInstanceUID,
                                                "SOPInstanceUID": None})
            uids = {str(m.SOPInstanceUID) for m in found.matches}
            (reports if str(one.get("Modality", "")) == REPORT_MODALITY else images).update(uids)
        return images, reports


def check_workflow(
    orders: list[Order],
    performed: list[Performed],
    archive: DimseClient,
    mpps_steps: dict[str, tuple[str, Dataset]] | None,
    rules: SiteRules = DEFAULT_RULES,
) -> WorkflowOutcome:
    """Every order and unscheduled acquisition, checked (module docstring)."""
    source = "the MPPS SCP's own record"
    if mpps_steps is None:
        mpps_steps, source = steps_as_sent(performed), "as the modality sent them (no read-back)"
    reader = ArchiveReader(archive)
    # the SCP holds other days' steps too: the orders' steps, and this run's unscheduled ones
    ours = {d.mpps_uid for d in performed}
    step_ids = {order.scheduled_step_id for order in orders}
    by_step: dict[str, list[tuple[str, Dataset]]] = {}
    unscheduled: list[tuple[str, Dataset]] = []
    for uid, (status, step) in sorted(mpps_steps.items()):
        step_id = str(_scheduled(step).get("ScheduledProcedureStepID", ""))
        if step_id in step_ids:
            by_step.setdefault(step_id, []).append((status, step))
        elif not step_id and uid in ours:
            unscheduled.append((status, step))
    done_by_accession = {d.order.accession_number: d for d in performed if d.order}
    rows = [_order_row(order, by_step.get(order.scheduled_step_id, []),
                       done_by_accession.get(order.accession_number), reader, rules)
            for order in orders]
    for status, step in unscheduled:
        rows.append(_unscheduled_row(status, step, performed, reader, rules))
    # why storage commitment was not asked (no module, or no SCP on the archive)
    notes = {d.commitment_note for d in performed if d.committed is None and d.commitment_note}
    return WorkflowOutcome(rows, source, "; ".join(sorted(notes)))


def _compare_listed(row: OrderRow, step: Dataset, study_uid: str, reader: ArchiveReader) -> None:
    listed = listed_instances(step)
    images, reports = reader.instances(study_uid) if study_uid else (set(), set())
    row.listed, row.stored, row.reported = len(listed), len(images), bool(reports)
    if listed - images:
        row.breaks.append(f"MPPS lists {len(listed - images)} instance(s) the archive does not "
                          f"hold: {sorted(listed - images)[:3]}")
    if images - listed:
        row.breaks.append(f"archive holds {len(images - listed)} instance(s) of the study no "
                          f"MPPS step lists: {sorted(images - listed)[:3]}")


def _order_row(order: Order, steps: list[tuple[str, Dataset]], done: Performed | None,
               reader: ArchiveReader, rules: SiteRules) -> OrderRow:
    row = OrderRow(order.accession_number, "not performed", order.patient_id,
                   order.study_instance_uid)
    if done is not None:
        row.on_worklist = done.worklist_matches == 1
        row.committed = done.committed
        row.breaks += [f"not committed: {p}" for p in done.commitment_problems]
        row.breaks += [f"C-STORE failed: {e}" for e in done.store_errors]
        if done.worklist_error:
            row.breaks.append(f"worklist query failed: {done.worklist_error}")
        elif done.worklist_matches != 1:
            row.breaks.append(f"the worklist answered {done.worklist_matches} item(s) for the "
                              "order (one expected)")
    completed = [s for status, s in steps if status == "COMPLETED"]
    discontinued = [s for status, s in steps if status == "DISCONTINUED"]
    in_progress = [s for status, s in steps if status == "IN PROGRESS"]
    if len(completed) > 1:
        row.outcome = f"performed {len(completed)} times"
        row.breaks.append(f"scheduled step {order.scheduled_step_id} performed "
                          f"{len(completed)} times (IHE SWF: exactly once)")
    elif completed:
        row.outcome = "performed"
    elif discontinued:
        row.outcome = "discontinued"
    elif in_progress:
        row.outcome = "in progress"
        row.breaks.append("MPPS step never ended (still IN PROGRESS)")
    else:
        row.breaks.append(f"scheduled step {order.scheduled_step_id} not performed")
    final = completed + discontinued
    if final:
        row.mpps = "COMPLETED" if completed else "DISCONTINUED"
        listed_step = Dataset()
        listed_step.PerformedSeriesSequence = [
            series for step in final for series in step.get("PerformedSeriesSequence") or []]
        _compare_listed(row, listed_step, order.study_instance_uid, reader)
        procedure = {str(_scheduled(s).get("RequestedProcedureID", "")) for s in final}
        if procedure - {order.requested_procedure_id, ""}:
            row.breaks.append(f"MPPS names procedure {sorted(procedure)}, the order "
                              f"{order.requested_procedure_id}")
    for step in discontinued:
        if not step.get("PerformedProcedureStepDiscontinuationReasonCodeSequence"):
            row.breaks.append("discontinued without a reason (PS3.4 F.7.2.2.1)")
        if not rules.discontinued_allowed:
            row.breaks.append("discontinued step (the site's rules allow none)")
    if row.stored or final:
        _match_order(row, order, reader)
    if row.outcome == "performed" and rules.report_required and not row.reported:
        row.breaks.append("no report in the study")
    return row


def _match_order(row: OrderRow, order: Order, reader: ArchiveReader) -> None:
    """The order's study in the archive holds the order's patient, accession, procedure;
    no other study carries its accession number."""
    held = reader.studies(StudyInstanceUID=order.study_instance_uid)
    if not held:
        row.breaks.append(f"the order's study {order.study_instance_uid} is not in the archive")
    for study in held:
        for label, want, got in (
            ("patient", order.patient_id, str(study.get("PatientID", ""))),
            ("accession", order.accession_number, str(study.get("AccessionNumber", ""))),
            ("procedure", order.procedure_description, str(study.get("StudyDescription", ""))),
        ):
            if want != got:
                row.breaks.append(f"study {label} {got!r} does not match the order's {want!r}")
    others = [str(s.StudyInstanceUID) for s in reader.studies(
        AccessionNumber=order.accession_number) if s.StudyInstanceUID != order.study_instance_uid]
    if others:
        row.breaks.append(f"accession {order.accession_number} also on other studies {others}")


def _unscheduled_row(status: str, step: Dataset, performed: list[Performed],
                     reader: ArchiveReader, rules: SiteRules) -> OrderRow:
    study_uid = str(_scheduled(step).get("StudyInstanceUID", ""))
    row = OrderRow(f"unscheduled {step.get('PatientID', '')}", "unscheduled",
                   str(step.get("PatientID", "")), study_uid, mpps=status)
    for done in performed:
        if done.study_instance_uid == study_uid:
            row.committed = done.committed
            row.breaks += [f"not committed: {p}" for p in done.commitment_problems]
    _compare_listed(row, step, study_uid, reader)
    if not rules.unscheduled_allowed:
        row.breaks.append("unscheduled acquisition (the site's rules allow none)")
    return row
