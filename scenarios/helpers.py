"""Small building blocks shared by the scenario suites."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread

from harness.nodes.base import NodeStatistics


@dataclass
class HeldCount:
    """What a node holds, counted without its query service (to hold C-FIND against)."""

    statistics: NodeStatistics
    means: str  # how it was counted, for the report
    unreadable: list[str] = field(default_factory=list)  # stored files that did not parse

    def as_dict(self) -> dict:
        return {**self.statistics.as_dict(), "means": self.means, "unreadable": self.unreadable}


def _dcmqrscp_storage(node) -> HeldCount:
    """dcmqrscp's storage area, every file read with pydicom (index.dat is its own index,
    the one its C-FIND answers from, so it is not what is counted)."""
    patients, studies, series, instances = set(), set(), set(), set()
    unreadable = []
    folder = Path(node.database_dir)
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "index.dat"):
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=list(_UID_KEYWORDS))
            keys = [str(ds[k].value) for k in _UID_KEYWORDS]
        except Exception as exc:  # noqa: BLE001 - a damaged file is reported, not fatal
            unreadable.append(f"{path.name}: {exc.__class__.__name__}")
            continue
        patients.add(keys[0])
        studies.add(keys[1])
        series.add((keys[1], keys[2]))
        instances.add(keys[3])
    counts = NodeStatistics(len(patients), len(studies), len(series), len(instances))
    return HeldCount(counts, f"files of dcmqrscp's storage area {folder} read with pydicom",
                     unreadable)


_UID_KEYWORDS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def independent_count(node) -> HeldCount | None:
    """The node's holdings by a means other than C-FIND, or None where it has none.

    Orthanc (and an external node with Orthanc's REST API): GET /statistics; the embedded
    PACS: its SQLite index; dcmqrscp: the files in its storage area. Counting with the
    same C-FIND the inventory uses would compare the query service with itself.
    """
    rest = node.rest()
    if rest is not None:
        stats = rest.statistics()
        counts = NodeStatistics(int(stats["CountPatients"]), int(stats["CountStudies"]),
                                int(stats["CountSeries"]), int(stats["CountInstances"]))
        return HeldCount(counts, "Orthanc REST API: GET /statistics")
    if node.kind == "embedded":
        from harness import embedded_pacs

        counts = NodeStatistics(**embedded_pacs.statistics(node.storage_dir))
        return HeldCount(counts, f"the embedded PACS's SQLite index in {node.storage_dir}")
    if node.kind == "dcmqrscp":
        return _dcmqrscp_storage(node)
    return None


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
