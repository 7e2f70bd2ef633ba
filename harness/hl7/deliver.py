"""How an ADT message reaches a node: over MLLP when it takes HL7 (the embedded PACS), through
the REST API for an Orthanc (orthanc_apply.py), else not at all (said, never a pass)."""

from __future__ import annotations

from dataclasses import dataclass

from harness.errors import EnvironmentProblem
from harness.hl7 import orthanc_apply
from harness.hl7.messages import PatientIdentity, build_a08, build_a40
from harness.hl7.mllp import DEFAULT_TIMEOUT_S, send_message
from harness.nodes import Node


@dataclass
class Delivery:
    """One message and what the node did with it."""

    message: str  # "ADT^A08" or "ADT^A40"
    patient: str  # the PatientID updated, or "PRIOR -> SURVIVOR"
    applied: bool
    means: str  # "HL7 MLLP host:port" or orthanc_apply.MEANS
    detail: str  # the ACK (code and text) or what the REST calls did


def takes_hl7(node: Node) -> bool:
    return bool(node.capabilities.hl7 and getattr(node, "hl7_port", None))


def _means(node: Node) -> str:
    if takes_hl7(node):
        return "hl7"
    if node.rest() is not None:
        return "orthanc"
    raise EnvironmentProblem(f"node {node.name} ({node.kind}) takes no HL7 and has no Orthanc "
                             "REST API: patient updates cannot be applied to it")


def send_update(node: Node, identity: PatientIdentity,
                timeout_s: float = DEFAULT_TIMEOUT_S) -> Delivery:
    """ADT^A08 for `identity` to the node (or its REST equivalent)."""
    if _means(node) == "hl7":
        message, control = build_a08(identity, (node.ae_title, node.name))
        exchange = send_message(node.host, node.hl7_port, message, control, timeout_s)
        return Delivery("ADT^A08", identity.patient_id, exchange.ack.accepted,
                        f"HL7 MLLP {exchange.peer}", f"ACK {exchange.ack.describe()}")
    done = orthanc_apply.apply_update(node.rest(), identity)
    return Delivery("ADT^A08", identity.patient_id, done.applied, orthanc_apply.MEANS,
                    done.detail)


def send_merge(node: Node, survivor: PatientIdentity, prior_id: str,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> Delivery:
    """ADT^A40 merging `prior_id` into `survivor` on the node (or its REST equivalent)."""
    patient = f"{prior_id} -> {survivor.patient_id}"
    if _means(node) == "hl7":
        message, control = build_a40(survivor, prior_id, (node.ae_title, node.name))
        exchange = send_message(node.host, node.hl7_port, message, control, timeout_s)
        return Delivery("ADT^A40", patient, exchange.ack.accepted,
                        f"HL7 MLLP {exchange.peer}", f"ACK {exchange.ack.describe()}")
    done = orthanc_apply.apply_merge(node.rest(), survivor, prior_id)
    return Delivery("ADT^A40", patient, done.applied, orthanc_apply.MEANS, done.detail)
