"""Retrieval probes: C-MOVE and C-GET, their sub-operation counts and failed-UID lists.

Every probe first stores a small synthetic study of its own (fresh UIDs each run, so a study
another probe moved here never answers for this one), then retrieves it. Arrival at a C-MOVE
destination is checked with that node's own C-FIND, not with the mover's counts.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from typing import Any

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt

from harness.conformance.model import (
    Observation,
    ProbeContext,
    conforms,
    differs,
    not_supported,
    not_tested,
    probe,
)
from harness.dicom.contexts import GET_MODELS
from harness.dicom.peer import HARNESS_AE_TITLE
from harness.dicom.status import RetrievedInstance, RetrieveResult
from harness.security.access_control import MOVE_DESTINATION_UNKNOWN, UNKNOWN_DESTINATION
from synthetic_data.samples import sample_study

TIMEOUT_S = 60.0


class Refused(Exception):
    """The node refused what the probe stored first (the probe then is not tested)."""


def fresh_study(instances: int, modality: str = "CT") -> list[Dataset]:
    """A synthetic study with UIDs no earlier run used."""
    return sample_study(seed=secrets.randbelow(2**31), instances=instances, modality=modality)


def store_objects(ctx: ProbeContext, datasets: Sequence[Dataset], what: str) -> None:
    """C-STORE `datasets` into the probed node, recorded; Refused when any is not stored."""
    report = ctx.node.dimse(timeout_s=TIMEOUT_S).store(list(datasets))
    words = ", ".join(f"{r.sop_instance_uid}: {r.status}" + (f" ({r.error})" if r.error else "")
                      for r in report.results)
    ctx.record(f"C-STORE {len(datasets)} instance(s): {what}", words or "nothing sent")
    if not report.ok or len(report.results) != len(datasets):
        failed = report.failed[0].error if report.failed else "not sent"
        raise Refused(f"the node did not store the probe's {what}: {failed}")


def _study_keys(study: Sequence[Dataset]) -> dict[str, Any]:
    return {"StudyInstanceUID": study[0].StudyInstanceUID}


def _counts(result: RetrieveResult) -> dict[str, Any]:
    return {"status": f"0x{result.status.code:04X}", "completed": result.completed,
            "failed": result.failed, "warning": result.warning,
            "failed_uids": list(result.failed_sop_instance_uids)}


def _words(result: RetrieveResult) -> str:
    return (f"status {result.status}; completed {result.completed}, failed {result.failed}, "
            f"warning {result.warning}; failed SOP instance UIDs: "
            f"{', '.join(result.failed_sop_instance_uids) or 'none'}")


def _held_instances(node: Any, study: Sequence[Dataset]) -> set[str]:
    """SOP Instance UIDs of `study` that `node` answers for (its own C-FIND, IMAGE level)."""
    found = node.dimse(timeout_s=TIMEOUT_S).find(
        "IMAGE", {**_study_keys(study), "SeriesInstanceUID": None, "SOPInstanceUID": None})
    return {str(m.SOPInstanceUID) for m in found.matches if m.get("SOPInstanceUID")}


def accepts_get(ctx: ProbeContext) -> bool:
    """Does the node accept Study Root C-GET (PS3.4 C.4.3) at all?"""
    get = GET_MODELS["study"]
    pairs = [(get, ExplicitVRLittleEndian), (get, ImplicitVRLittleEndian)]
    return any(ctx.node.dimse(timeout_s=TIMEOUT_S).negotiate(pairs).values())


@probe(
    "retrieve.move-known",
    title="C-MOVE to a known destination",
    expected="every instance of the study arrives at the destination; the final response "
    "is Success with completed sub-operations = instances and none failed",
    reference="PS3.4 C.4.2.1.5, C.4.2.1.6-9, C.4.2.3.1",
    writes=True,
)
def move_known(ctx: ProbeContext) -> Observation:
    destination = ctx.move_destination
    if destination is None:
        return not_tested("no other node of the topology to move to")
    study = fresh_study(2)
    try:
        store_objects(ctx, study, "a 2-instance synthetic study")
    except Refused as exc:
        return not_tested(str(exc))
    moved = ctx.node.dimse(timeout_s=TIMEOUT_S).move(destination.ae_title, "STUDY",
                                                     _study_keys(study))
    ctx.record(f"C-MOVE STUDY {study[0].StudyInstanceUID} to {destination.ae_title}",
               _words(moved))
    expected = {str(ds.SOPInstanceUID) for ds in study}
    arrived = _held_instances(destination, study) & expected
    ctx.record(f"C-FIND IMAGE on {destination.name} for the study", f"{len(arrived)} of "
               f"{len(expected)} instances there")
    facts = {**_counts(moved), "destination": destination.name, "arrived": len(arrived),
             "instances": len(expected), "study": str(study[0].StudyInstanceUID)}
    summary = (f"to {destination.name}: {moved.status}, {moved.completed} completed, "
               f"{moved.failed} failed; {len(arrived)}/{len(expected)} arrived")
    if moved.status.code == 0 and moved.completed == len(expected) and arrived == expected:
        return conforms(summary, **facts)
    return differs(summary, **facts)


@probe(
    "retrieve.move-unknown",
    title="C-MOVE to an unknown destination",
    expected="refused with 0xA801 (Move Destination unknown)",
    reference="PS3.4 C.4.2.1.5",
    writes=True,
)
def move_unknown(ctx: ProbeContext) -> Observation:
    """On a study the node holds: a C-MOVE of nothing proves nothing (dcmqrscp answers it
    0x0000 without looking at the destination)."""
    study = fresh_study(1)
    try:
        store_objects(ctx, study, "a 1-instance synthetic study")
    except Refused as exc:
        return not_tested(str(exc))
    moved = ctx.node.dimse(timeout_s=TIMEOUT_S).move(UNKNOWN_DESTINATION, "STUDY",
                                                     _study_keys(study))
    ctx.record(f"C-MOVE STUDY {study[0].StudyInstanceUID} to {UNKNOWN_DESTINATION} "
               "(an AE title no node knows)", _words(moved))
    facts = {**_counts(moved), "study": str(study[0].StudyInstanceUID)}
    if moved.status.code == MOVE_DESTINATION_UNKNOWN:
        return conforms("refused with 0xA801", **facts)
    if moved.status.category == "failure":
        return differs(f"refused with {moved.status}, not 0xA801", **facts)
    return differs(f"answered {moved.status} to a move to an unknown AE title", **facts)


@probe(
    "retrieve.get-study",
    title="C-GET of a study",
    expected="every instance is sent back as a C-STORE sub-operation; the final response is "
    "Success with completed sub-operations = instances",
    reference="PS3.4 C.4.3.1.4, C.4.3.1.5-8, C.4.3.3",
    writes=True,
)
def get_study(ctx: ProbeContext) -> Observation:
    if not accepts_get(ctx):
        return not_supported("Study Root C-GET not accepted")
    study = fresh_study(3)
    try:
        store_objects(ctx, study, "a 3-instance synthetic study")
    except Refused as exc:
        return not_tested(str(exc))
    got = ctx.node.dimse(timeout_s=TIMEOUT_S).get("STUDY", _study_keys(study))
    expected = {str(ds.SOPInstanceUID) for ds in study}
    received = {i.sop_instance_uid for i in got.instances}
    ctx.record(f"C-GET STUDY {study[0].StudyInstanceUID}",
               f"{_words(got)}; {len(received & expected)} of {len(expected)} received")
    facts = {**_counts(got), "received": len(received & expected), "instances": len(expected),
             "study": str(study[0].StudyInstanceUID)}
    summary = (f"{got.status}, {got.completed} completed, {got.failed} failed; "
               f"{len(received & expected)}/{len(expected)} received")
    if got.status.code == 0 and got.completed == len(expected) and received == expected:
        return conforms(summary, **facts)
    return differs(summary, **facts)


@probe(
    "retrieve.failed-uid-list",
    title="Failed SOP Instance UID List",
    expected="when a sub-operation fails, the final response is a Warning (0xB000) or a "
    "Failure with the failed count, and lists the failed instance in (0008,0058)",
    reference="PS3.4 C.4.3.1.3.2, C.4.3.1.4",
    writes=True,
)
def failed_uid_list(ctx: ProbeContext) -> Observation:
    """Provoked on C-GET: the probe answers one C-STORE sub-operation with a failure
    (0xC211), so exactly one instance fails for a reason the probe controls."""
    if not accepts_get(ctx):
        return not_supported("Study Root C-GET not accepted (the probe fails a C-GET "
                             "sub-operation on purpose)")
    study = fresh_study(2)
    try:
        store_objects(ctx, study, "a 2-instance synthetic study")
    except Refused as exc:
        return not_tested(str(exc))
    refused_uid = str(study[1].SOPInstanceUID)

    def refuse_one(instance: RetrievedInstance) -> None:
        if instance.sop_instance_uid == refused_uid:
            raise ValueError("refused by the probe")

    got = ctx.node.dimse(timeout_s=TIMEOUT_S).get(
        "STUDY", _study_keys(study), sop_classes=[str(study[0].SOPClassUID)],
        on_instance=refuse_one)
    ctx.record(f"C-GET STUDY {study[0].StudyInstanceUID}, the C-STORE of {refused_uid} "
               "answered 0xC211", _words(got))
    facts = {**_counts(got), "refused_uid": refused_uid,
             "study": str(study[0].StudyInstanceUID)}
    listed = refused_uid in got.failed_sop_instance_uids
    counted = got.failed == 1 and got.completed == 1
    summary = (f"{got.status}, {got.completed} completed, {got.failed} failed; refused "
               f"instance {'listed' if listed else 'not listed'} in (0008,0058)")
    if counted and listed and got.status.category in ("warning", "failure"):
        return conforms(summary, **facts)
    return differs(summary, **facts)


class _RefusingDestination:
    """An AE on the harness's own C-MOVE address that rejects every association
    (calling AE title not recognised), counting the requests it got."""

    def __init__(self, port: int) -> None:
        self.requests = 0
        self._lock = threading.Lock()
        ae = AE(ae_title=HARNESS_AE_TITLE)
        ae.supported_contexts = AllStoragePresentationContexts[:100]
        ae.require_calling_aet = ["NOBODY-KNOWN"]
        ae.acse_timeout = ae.network_timeout = 10
        self.server = ae.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_CONN_OPEN, self._opened)])

    def _opened(self, event: Any) -> None:
        with self._lock:
            self.requests += 1

    def stop(self) -> None:
        self.server.shutdown()


def harness_peer(node: Any) -> Any | None:
    """The node's peer entry for the harness (Cluster.harness_peer: where a launched node
    sends C-MOVE sub-operations and storage commitment reports to the harness), or None
    for a node without a peer table (external, attached)."""
    return next((p for p in getattr(node, "peers", None) or []
                 if p.ae_title == HARNESS_AE_TITLE), None)


@probe(
    "retrieve.destination-refuses",
    title="C-MOVE when the destination refuses",
    expected="a failure or warning status, every instance counted failed and listed in the "
    "Failed SOP Instance UID List; never Success",
    reference="PS3.4 C.4.2.1.4.2, C.4.2.1.5, C.4.2.3.1",
    writes=True,
)
def destination_refuses(ctx: ProbeContext) -> Observation:
    """The destination is the harness's own AE title, which every launched node knows as a
    C-MOVE destination (Cluster.harness_peer): the probe listens there and rejects."""
    peer = harness_peer(ctx.node)
    if peer is None or peer.tls or peer.host != "127.0.0.1":
        return not_tested(f"the node knows no plain loopback C-MOVE destination "
                          f"{HARNESS_AE_TITLE} the probe could refuse from")
    study = fresh_study(2)
    try:
        store_objects(ctx, study, "a 2-instance synthetic study")
    except Refused as exc:
        return not_tested(str(exc))
    try:
        listener = _RefusingDestination(peer.port)
    except OSError as exc:
        return not_tested(f"cannot listen on 127.0.0.1:{peer.port} ({exc.strerror or exc}): "
                          "something else serves the harness's AE title")
    try:
        moved = ctx.node.dimse(timeout_s=TIMEOUT_S).move(HARNESS_AE_TITLE, "STUDY",
                                                         _study_keys(study))
    finally:
        listener.stop()
    ctx.record(f"C-MOVE STUDY {study[0].StudyInstanceUID} to {HARNESS_AE_TITLE} "
               f"(127.0.0.1:{peer.port}, which rejects every association)",
               f"{_words(moved)}; the destination got {listener.requests} association "
               "request(s)")
    expected = {str(ds.SOPInstanceUID) for ds in study}
    listed = expected <= set(moved.failed_sop_instance_uids)
    facts = {**_counts(moved), "association_requests": listener.requests,
             "all_listed": listed, "study": str(study[0].StudyInstanceUID)}
    summary = (f"{moved.status}, {moved.completed} completed, {moved.failed} failed; "
               f"failed UIDs {'all listed' if listed else 'not all listed'}")
    if moved.status.category in ("success", "pending") or moved.status.code == 0xFFFF:
        return differs(summary, **facts)
    if moved.failed == len(expected) and listed:
        return conforms(summary, **facts)
    return differs(summary, **facts)
