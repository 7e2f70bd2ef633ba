"""Node adapters, one module per kind; `make_node` picks the class for a spec (the kinds
are found by harness.nodes.catalog, each declaring its capabilities)."""

from __future__ import annotations

from harness.nodes.base import Node, NodeStatistics, Peer
from harness.nodes.catalog import make_node, node_class

__all__ = ["Node", "NodeStatistics", "Peer", "make_node", "node_class"]
