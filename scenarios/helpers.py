"""Small building blocks shared by the scenario suites."""

from __future__ import annotations

from harness.nodes.base import HeldStatistics

#: what a node holds, counted without its query service (to hold C-FIND against)
HeldCount = HeldStatistics


def independent_count(node) -> HeldCount | None:
    """The node's holdings by a means other than C-FIND, or None where it has none.

    Each kind says how (`Node.held_statistics`): Orthanc (and an external node with
    Orthanc's REST API) GET /statistics, the embedded PACS its SQLite index, dcmqrscp the
    files in its storage area. Counting with the same C-FIND the inventory uses would
    compare the query service with itself.
    """
    return node.held_statistics()


def count_findings(name: str, held: HeldCount, answered: dict[str, int]) -> list[str]:
    """One line per level where the independent count and the query service disagree, and
    per stored file that could not be read."""
    findings = [
        f"{level}: {name} holds {getattr(held.statistics, level)} ({held.means}) "
        f"but its query service answers for {answered[level]}"
        for level in ("studies", "series", "instances")
        if getattr(held.statistics, level) != answered[level]
    ]
    return findings + [f"{name}: unreadable stored file {entry}" for entry in held.unreadable]
