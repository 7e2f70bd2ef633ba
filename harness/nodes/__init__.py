"""Node adapters, one module per kind; `make_node` picks the class for a spec."""

from __future__ import annotations

from pathlib import Path

from harness.config import NodeSpec
from harness.nodes.base import Node, NodeStatistics, Peer

__all__ = ["Node", "NodeStatistics", "Peer", "make_node", "node_class"]


def node_class(kind: str) -> type[Node]:
    from harness.nodes.dcm4chee import Dcm4cheeNode
    from harness.nodes.dcmqrscp import DcmqrscpNode
    from harness.nodes.embedded import EmbeddedNode
    from harness.nodes.external import ExternalNode
    from harness.nodes.orthanc import OrthancNode

    return {
        "orthanc": OrthancNode,
        "dcmqrscp": DcmqrscpNode,
        "embedded": EmbeddedNode,
        "dcm4chee": Dcm4cheeNode,
        "external": ExternalNode,
    }[kind]


def make_node(spec: NodeSpec, workdir: Path | None) -> Node:
    return node_class(spec.kind)(spec, workdir)
