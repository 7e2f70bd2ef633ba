"""Association probes: what a node negotiates before any operation (PS3.7 D.3.3, PS3.8 9.3).

Each probe proposes something in an A-ASSOCIATE-RQ and records what the A-ASSOCIATE-AC
answered. The associations are pynetdicom's (DimsePeer.associate): it sends the extended
negotiation sub-items (asynchronous operations window, role selection, SOP class extended
negotiation) and keeps the acceptor's user information items as received, so a sub-item the
node left out of its answer is told apart from one it answered.
"""

from __future__ import annotations

from typing import Any

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.pdu_primitives import (
    AsynchronousOperationsWindowNegotiation,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassExtendedNegotiation,
)
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from harness.conformance.model import (
    Observation,
    ProbeContext,
    conforms,
    differs,
    not_supported,
    probe,
)
from harness.dicom.contexts import COMMON_STORAGE_CLASSES, RECEIVABLE_TRANSFER_SYNTAXES

TIMEOUT_S = 20.0
#: besides the receivable syntaxes: Explicit VR Big Endian (retired) and JPEG Baseline
EXTRA_SYNTAXES = ("1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.50")
PROPOSED_WINDOW = (5, 5)
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def _name(uid: str) -> str:
    return UID(uid).name or uid


class _Answer:
    """What an A-ASSOCIATE-AC said: accepted contexts and the user information items."""

    def __init__(self, assoc: Any) -> None:
        self.accepted = [(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                         for cx in assoc.accepted_contexts]
        self.items = list(assoc.acceptor.user_information or [])

    def item(self, kind: type) -> Any:
        return next((i for i in self.items if isinstance(i, kind)), None)

    def all(self, kind: type) -> list[Any]:
        return [i for i in self.items if isinstance(i, kind)]

    def words(self) -> str:
        kinds = sorted({type(i).__name__ for i in self.items})
        return (f"A-ASSOCIATE-AC: {len(self.accepted)} contexts accepted; user information "
                f"items: {', '.join(kinds) or 'none'}")


def _associate(ctx: ProbeContext, contexts: list, ext_neg: list | None = None) -> _Answer:
    """One association to the node, released at once; DimseConnectionError if refused."""
    client = ctx.node.dimse(timeout_s=TIMEOUT_S)
    assoc = client.associate(contexts, ext_neg=ext_neg)
    try:
        return _Answer(assoc)
    finally:
        if assoc.is_established:
            assoc.release()


@probe(
    "association.storage-syntaxes",
    title="Storage SOP classes x transfer syntaxes",
    expected="every storage SOP class it accepts is accepted in Implicit VR Little Endian, "
    "the default transfer syntax every AE supports",
    reference="PS3.5 10.1; PS3.8 9.3.3.2",
)
def storage_syntaxes(ctx: ProbeContext) -> Observation:
    """One presentation context per (class, syntax): the table of what is accepted."""
    syntaxes = (*RECEIVABLE_TRANSFER_SYNTAXES, *EXTRA_SYNTAXES)
    pairs = [(sop, ts) for sop in COMMON_STORAGE_CLASSES for ts in syntaxes]
    accepted = ctx.node.dimse(timeout_s=TIMEOUT_S).negotiate(pairs)
    table = {_name(sop): [_name(ts) for ts in syntaxes if accepted[(sop, ts)]]
             for sop in COMMON_STORAGE_CLASSES}
    table = {sop: names for sop, names in table.items() if names}
    ctx.record(f"A-ASSOCIATE-RQ: {len(COMMON_STORAGE_CLASSES)} storage classes x "
               f"{len(syntaxes)} transfer syntaxes, one context each",
               "; ".join(f"{sop}: {', '.join(ts)}" for sop, ts in table.items()) or "none")
    implicit = _name(ImplicitVRLittleEndian)
    without = sorted(sop for sop, names in table.items() if implicit not in names)
    others = sorted({ts for names in table.values() for ts in names
                     if ts not in {_name(u) for u in UNCOMPRESSED}})
    facts = {"accepted": table, "classes_accepted": len(table),
             "without_implicit": without, "other_syntaxes": others}
    if not table:
        return not_supported("no storage SOP class accepted in any transfer syntax", **facts)
    summary = (f"{len(table)} of {len(COMMON_STORAGE_CLASSES)} storage classes accepted; "
               f"beyond Explicit/Implicit VR Little Endian: {', '.join(others) or 'none'}")
    if without:
        return differs(f"{summary}; not in Implicit VR Little Endian: {', '.join(without)}",
                       **facts)
    return conforms(summary, **facts)


@probe(
    "association.max-pdu",
    title="Maximum PDU length announced",
    expected="the A-ASSOCIATE-AC carries a Maximum Length sub-item (0: no limit)",
    reference="PS3.8 D.1; PS3.7 D.3.3.1",
)
def max_pdu(ctx: ProbeContext) -> Observation:
    answer = _associate(ctx, [build_context(CTImageStorage, list(UNCOMPRESSED))])
    item = answer.item(MaximumLengthNotification)
    ctx.record("A-ASSOCIATE-RQ: CT Image Storage; Maximum Length 0 (no limit)",
               answer.words() + (f"; Maximum Length {item.maximum_length_received}"
                                 if item is not None else "; no Maximum Length sub-item"))
    if item is None:
        return differs("no Maximum Length sub-item in the A-ASSOCIATE-AC", max_pdu=None)
    value = int(item.maximum_length_received)
    words = "0 (unlimited)" if value == 0 else f"{value} bytes"
    return conforms(f"announces a maximum PDU length of {words}", max_pdu=value)


@probe(
    "association.async-window",
    title="Asynchronous operations window",
    expected="the node answers the proposed window with the numbers it allows, or leaves the "
    "sub-item out (then one operation at a time: allowed)",
    reference="PS3.7 D.3.3.3",
)
def async_window(ctx: ProbeContext) -> Observation:
    proposal = AsynchronousOperationsWindowNegotiation()
    proposal.maximum_number_operations_invoked = PROPOSED_WINDOW[0]
    proposal.maximum_number_operations_performed = PROPOSED_WINDOW[1]
    answer = _associate(ctx, [build_context(CTImageStorage, list(UNCOMPRESSED))], [proposal])
    item = answer.item(AsynchronousOperationsWindowNegotiation)
    window = (None if item is None else
              [int(item.maximum_number_operations_invoked),
               int(item.maximum_number_operations_performed)])
    ctx.record(f"A-ASSOCIATE-RQ: asynchronous operations window {PROPOSED_WINDOW[0]}/"
               f"{PROPOSED_WINDOW[1]} (invoked/performed)",
               answer.words() + (f"; window {window[0]}/{window[1]}" if window
                                 else "; no window sub-item"))
    if window is None:
        return not_supported("no asynchronous operations window in its answer: one "
                             "operation at a time (the default, allowed)", window=None)
    if window[0] > PROPOSED_WINDOW[0] or window[1] > PROPOSED_WINDOW[1]:
        return differs(f"answered window {window[0]}/{window[1]}, more than the "
                       f"{PROPOSED_WINDOW[0]}/{PROPOSED_WINDOW[1]} proposed", window=window)
    if window == [1, 1]:
        return conforms("answered window 1/1: one operation at a time", window=window)
    return conforms(f"answered window {window[0]}/{window[1]}", window=window)


@probe(
    "association.get-scp-role",
    title="SCP role for C-GET storage",
    expected="on a C-GET association, the node grants the requestor the SCP role for a "
    "storage class it proposed (else a C-GET cannot send it anything)",
    reference="PS3.7 D.3.3.4; PS3.4 C.4.3",
)
def get_scp_role(ctx: ProbeContext) -> Observation:
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = CTImageStorage
    role.scu_role = False
    role.scp_role = True
    contexts = [build_context(StudyRootQueryRetrieveInformationModelGet, list(UNCOMPRESSED)),
                build_context(CTImageStorage, list(UNCOMPRESSED))]
    answer = _associate(ctx, contexts, [role])
    get_accepted = any(sop == StudyRootQueryRetrieveInformationModelGet
                       for sop, _ in answer.accepted)
    replies = [r for r in answer.all(SCP_SCU_RoleSelectionNegotiation)
               if str(r.sop_class_uid) == CTImageStorage]
    granted = bool(replies and replies[0].scp_role)
    ctx.record("A-ASSOCIATE-RQ: Study Root GET + CT Image Storage; role selection for CT: "
               "SCU no, SCP yes",
               answer.words() + ("; role selection for CT: "
                                 f"SCU {bool(replies[0].scu_role)}, SCP {granted}"
                                 if replies else "; no role selection sub-item for CT"))
    facts = {"get_accepted": get_accepted, "scp_role_granted": granted,
             "role_reply": bool(replies)}
    if not get_accepted:
        return not_supported("Study Root C-GET not accepted", **facts)
    if granted:
        return conforms("SCP role granted for CT Image Storage on a C-GET association", **facts)
    return differs("C-GET accepted, but the SCP role for CT Image Storage "
                   + ("refused" if replies else "not answered (default roles: SCU only)"),
                   **facts)


@probe(
    "association.relational-queries",
    title="Extended negotiation: relational queries",
    expected="the node answers the query/retrieve extended negotiation sub-item; relational "
    "queries (byte 1 = 1) are optional, so 0 or no answer means not supported",
    reference="PS3.4 C.5.1.1; PS3.7 D.3.3.5",
)
def relational_queries(ctx: ProbeContext) -> Observation:
    item = SOPClassExtendedNegotiation()
    item.sop_class_uid = StudyRootQueryRetrieveInformationModelFind
    item.service_class_application_information = b"\x01"  # relational queries
    answer = _associate(
        ctx, [build_context(StudyRootQueryRetrieveInformationModelFind, list(UNCOMPRESSED))],
        [item],
    )
    replies = [r for r in answer.all(SOPClassExtendedNegotiation)
               if str(r.sop_class_uid) == StudyRootQueryRetrieveInformationModelFind]
    info = bytes(replies[0].service_class_application_information or b"") if replies else None
    ctx.record("A-ASSOCIATE-RQ: Study Root FIND; SOP class extended negotiation 01 "
               "(relational queries)",
               answer.words() + (f"; extended negotiation for FIND: {info.hex() or 'empty'}"
                                 if info is not None else "; no extended negotiation answer"))
    relational = bool(info and info[0] == 1)
    facts = {"answered": info is not None, "relational": relational,
             "reply_hex": info.hex() if info is not None else None}
    if relational:
        return conforms("relational queries accepted (extended negotiation byte 1 = 1)",
                        **facts)
    if info is None:
        return not_supported("no extended negotiation answer: relational queries not "
                             "offered", **facts)
    return not_supported(f"answered {info.hex()}: relational queries refused", **facts)
