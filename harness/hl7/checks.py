"""What a user checks after each ADT message, over DICOM (never the path that applied it).

* after an A08: every study of the patient shows the new demographics at C-FIND, and one
  C-GET'd instance, read with pydicom, carries them in its data set;
* after an A40: the prior PatientID finds no study, the survivor holds the sum of both
  (Study Instance UIDs counted before and after);
* a late image stored with the prior PatientID after the merge: where it is filed, judged by
  the site's `late_image_rule` (accept: it may stay under the prior ID; flag: it is a finding).

Each check returns {message, patient, applied, verified, observed} for
pacs_metrics["workflow.hl7"].
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from harness.errors import EnvironmentProblem
from harness.hl7.deliver import Delivery
from harness.hl7.messages import PatientIdentity
from harness.nodes import Node

LATE_IMAGE_RULES = ("accept", "flag")
DEMOGRAPHICS = ("PatientName", "PatientBirthDate", "PatientSex")


def _text(value: Any) -> str:
    return str(value or "").strip().rstrip("^").upper()


def _result(delivery: Delivery | None, message: str, patient: str, verified: bool,
            observed: list[str], **extra: Any) -> dict[str, Any]:
    return {"message": message, "patient": patient,
            "applied": delivery.applied if delivery else None,
            "means": delivery.means if delivery else "",
            "detail": delivery.detail if delivery else "",
            "verified": verified, "observed": observed or ["as expected"], **extra}


def studies_of(node: Node, patient_id: str) -> dict[str, Dataset]:
    """The node's studies of `patient_id` (C-FIND STUDY level, PS3.4 C.6.2) by UID."""
    keys = {"PatientID": patient_id, "StudyInstanceUID": None,
            **dict.fromkeys(DEMOGRAPHICS)}
    found = node.dimse().find("STUDY", keys)
    if not found.ok:
        raise EnvironmentProblem(f"node {node.name}: C-FIND of a patient's studies answered "
                                 f"{found.error or found.status}")
    return {str(m.StudyInstanceUID): m for m in found.matches
            if str(m.get("PatientID", "")) == patient_id}


def _retrieved_dataset(node: Node, study_uid: str) -> Dataset:
    """One instance of the study by C-GET, parsed by pydicom from the bytes received."""
    image = node.dimse().find("IMAGE", {"StudyInstanceUID": study_uid,
                                        "SeriesInstanceUID": None, "SOPInstanceUID": None})
    if not image.ok or not image.matches:
        raise EnvironmentProblem(f"node {node.name}: no instance of study {study_uid} found")
    first = image.matches[0]
    got = node.dimse().get("IMAGE", {"StudyInstanceUID": study_uid,
                                     "SeriesInstanceUID": first.SeriesInstanceUID,
                                     "SOPInstanceUID": first.SOPInstanceUID})
    if not got.ok or not got.instances:
        raise EnvironmentProblem(f"node {node.name}: C-GET of an instance of study {study_uid} "
                                 f"answered {got.status}")
    instance = got.instances[0]
    syntax = UID(instance.transfer_syntax_uid)
    return read_dataset(BytesIO(instance.encoded), syntax.is_implicit_VR,
                        syntax.is_little_endian, stop_when=lambda tag, *_: tag > 0x0010FFFF)


def check_update(node: Node, identity: PatientIdentity, study_uids: set[str],
                 delivery: Delivery | None = None) -> dict[str, Any]:
    """Every study in `study_uids` (the patient's, counted before the A08) shows `identity`."""
    expected = {"PatientName": identity.name, "PatientBirthDate": identity.birth_date,
                "PatientSex": identity.sex}
    observed: list[str] = []
    found = studies_of(node, identity.patient_id)
    for uid in sorted(study_uids - set(found)):
        observed.append(f"study {uid} no longer found under PatientID {identity.patient_id!r}")
    for uid, match in sorted(found.items()):
        for keyword, value in expected.items():
            if _text(match.get(keyword)) != _text(value):
                observed.append(f"study {uid} still has {keyword} "
                                f"{str(match.get(keyword, ''))!r} at C-FIND (expected {value!r})")
    if found:
        uid = sorted(found)[0]
        ds = _retrieved_dataset(node, uid)
        for keyword, value in expected.items():
            if _text(ds.get(keyword)) != _text(value):
                observed.append(f"study {uid}: the C-GET instance has {keyword} "
                                f"{str(ds.get(keyword, ''))!r} (expected {value!r})")
    return _result(delivery, "ADT^A08", identity.patient_id, not observed, observed,
                   studies=len(found))


def check_merge(node: Node, prior_id: str, survivor: PatientIdentity,
                before: dict[str, set[str]], delivery: Delivery | None = None
                ) -> dict[str, Any]:
    """After an A40: nothing under `prior_id`, the survivor holds both patients' studies
    (`before`: the study UIDs of each PatientID before the merge)."""
    expected = before.get(prior_id, set()) | before.get(survivor.patient_id, set())
    left = studies_of(node, prior_id)
    held = studies_of(node, survivor.patient_id)
    observed = [f"study {uid} still under the prior PatientID {prior_id!r}"
                for uid in sorted(left)]
    observed += [f"study {uid} missing from the surviving PatientID {survivor.patient_id!r}"
                 for uid in sorted(expected - set(held))]
    return _result(delivery, "ADT^A40", f"{prior_id} -> {survivor.patient_id}",
                   not observed, observed,
                   studies_before={"prior": len(before.get(prior_id, ())),
                                   "survivor": len(before.get(survivor.patient_id, ()))},
                   studies_after={"prior": len(left), "survivor": len(held)})


def check_late_image(node: Node, prior_id: str, survivor_id: str, late: Dataset,
                     rule: str) -> dict[str, Any]:
    """Store `late` (PatientID = `prior_id`) after the merge and report where it is filed:
    under `accept` it may stay under the prior ID; under `flag` that is the finding.
    `applied` says whether the node took the image (C-STORE)."""
    if rule not in LATE_IMAGE_RULES:
        raise ValueError(f"late_image_rule {rule!r} (allowed: {', '.join(LATE_IMAGE_RULES)})")
    stored = node.dimse().store([late])
    if not stored.ok:
        observed = [f"late image {late.SOPInstanceUID} refused: {stored.failed[0].error}"]
        return _result(None, "late image", prior_id, rule == "flag", observed, rule=rule,
                       filed_under="", applied=False)
    found = node.dimse().find("IMAGE", {"StudyInstanceUID": late.StudyInstanceUID,
                                        "SeriesInstanceUID": late.SeriesInstanceUID,
                                        "SOPInstanceUID": late.SOPInstanceUID})
    filed = studies_of(node, prior_id)
    under = prior_id if late.StudyInstanceUID in filed else survivor_id
    if not found.matches:
        under = ""
    if under == prior_id:
        note = (f"late image {late.SOPInstanceUID} filed under the merged-away PatientID "
                f"{prior_id!r}: " + ("accepted by the site rule" if rule == "accept"
                                     else "flagged for reconciliation (late_image_rule: flag)"))
        verified = rule == "accept"
    elif under:
        note = f"late image {late.SOPInstanceUID} filed under the survivor {survivor_id!r}"
        verified = True
    else:
        note, verified = f"late image {late.SOPInstanceUID} stored but not found", False
    return _result(None, "late image", prior_id, verified, [note], rule=rule, applied=True,
                   filed_under=under, flagged=under == prior_id and rule == "flag")
