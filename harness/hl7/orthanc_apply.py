"""ADT^A08 and ADT^A40 applied to an Orthanc through its REST API, as a site's integration
engine would: Orthanc takes no HL7.

Measured on Orthanc 1.10.1 (tests/test_hl7_merge.py holds it to this):
* /patients/{id}/modify refuses a change without PatientID in Replace (HTTP 400): the A08
  replaces PatientID with itself. Without "Keep" it writes copies with new Study/Series/SOP
  Instance UIDs; with Keep + Force the instances are rewritten in place, but the patient's
  index tags (what C-FIND answers) keep the old name until /patients/{id}/reconstruct.
* /studies/{id}/modify refuses a new PatientID ("the parent PatientID cannot be manually
  modified"): the A40 modifies the prior *patient* to the surviving PatientID (Keep + Force).
  Orthanc then holds both the copies and the originals (the instance count grows by the
  prior's instances): the originals are deleted, and the survivor reconstructed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.dicom.orthanc_rest import OrthancRest
from harness.hl7.messages import PatientIdentity

MEANS = "applied through Orthanc's REST API, not HL7"
KEEP_UIDS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]


@dataclass
class RestApplied:
    applied: bool
    detail: str  # what was done, or why nothing was
    originals_deleted: int = 0  # instances Orthanc kept beside the modified copies


def _patient(rest: OrthancRest, patient_id: str) -> dict[str, Any] | None:
    """Orthanc's patient resource whose PatientID is exactly `patient_id`."""
    found = rest.post_json("/tools/find", {"Level": "Patient", "Expand": True,
                                           "Query": {"PatientID": patient_id}})
    exact = [p for p in found if p["MainDicomTags"].get("PatientID") == patient_id]
    return exact[0] if exact else None


def _replace(identity: PatientIdentity, fallback: dict[str, str]) -> dict[str, str]:
    values = {"PatientID": identity.patient_id,
              "PatientName": identity.name or fallback.get("PatientName", ""),
              "PatientBirthDate": identity.birth_date or fallback.get("PatientBirthDate", ""),
              "PatientSex": identity.sex or fallback.get("PatientSex", "")}
    return values


def apply_update(rest: OrthancRest, identity: PatientIdentity) -> RestApplied:
    """The A08: the patient's demographics replaced on every instance, UIDs kept."""
    patient = _patient(rest, identity.patient_id)
    if patient is None:
        return RestApplied(False, f"unknown patient {identity.patient_id!r} in Orthanc")
    body = {"Replace": _replace(identity, {}), "Keep": KEEP_UIDS, "Force": True}
    rest.post_json(f"/patients/{patient['ID']}/modify", body)
    rest.post_json(f"/patients/{patient['ID']}/reconstruct", {})
    return RestApplied(True, f"{MEANS}: /patients/{{id}}/modify (Replace, Keep UIDs, Force) "
                             "and /reconstruct")


def apply_merge(rest: OrthancRest, survivor: PatientIdentity, prior_id: str) -> RestApplied:
    """The A40: the prior patient's studies rewritten to the survivor, originals deleted."""
    prior = _patient(rest, prior_id)
    if prior is None:
        return RestApplied(False, f"unknown patient {prior_id!r} in Orthanc")
    existing = _patient(rest, survivor.patient_id)
    fallback = existing["MainDicomTags"] if existing else prior["MainDicomTags"]
    body = {"Replace": _replace(survivor, fallback), "Keep": KEEP_UIDS, "Force": True}
    before = int(rest.statistics()["CountInstances"])
    rest.post_json(f"/patients/{prior['ID']}/modify", body)
    kept = int(rest.statistics()["CountInstances"]) - before
    deleted = 0
    if _patient(rest, prior_id) is not None:  # 1.10.1 keeps the originals beside the copies
        deleted = len(rest.get_json(f"/patients/{prior['ID']}/instances"))
        rest.delete(f"/patients/{prior['ID']}")
    merged = _patient(rest, survivor.patient_id)
    if merged is not None:
        rest.post_json(f"/patients/{merged['ID']}/reconstruct", {})
    return RestApplied(True, f"{MEANS}: /patients/{{prior}}/modify to the surviving PatientID "
                             f"(Keep UIDs, Force) made {kept} copies beside the originals; "
                             f"{deleted} originals deleted", deleted)
