"""Small building blocks shared by the scenario suites."""

from __future__ import annotations

import copy

from pydicom import Dataset
from pydicom.uid import generate_uid

from harness.nodes.base import HeldStatistics
from synthetic_data import GeneratorOptions, generate


def sample_study(seed: int = 0, instances: int = 1, modality: str = "CT") -> list[Dataset]:
    """`instances` objects of one series of one synthetic study, deterministic per seed.

    The generator's first object is the template; further instances are copies of it with
    their own SOP Instance UID and InstanceNumber (derived from the seed, so reproducible).
    """
    options = GeneratorOptions(
        patients=1, studies_per_patient=1, modalities=[modality], facilities=1,
        seed=seed, scale="tiny",
    )
    template = next(iter(generate(options)))
    study = [template]
    for number in range(1, instances):
        ds = copy.deepcopy(template)
        uid = generate_uid(entropy_srcs=[str(seed), template.SOPInstanceUID, str(number)])
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = number + 1
        study.append(ds)
    return study


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
