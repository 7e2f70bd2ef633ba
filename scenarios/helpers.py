"""Small building blocks shared by the scenario suites."""

from __future__ import annotations

from itertools import islice

from pydicom import Dataset

from synthetic_data import GeneratorOptions, generate


def sample_study(seed: int = 0, instances: int = 1, modality: str = "CT") -> list[Dataset]:
    """The first `instances` objects of one synthetic tiny study (deterministic per seed)."""
    options = GeneratorOptions(
        patients=1,
        studies_per_patient=1,
        modalities=[modality],
        facilities=1,
        seed=seed,
        scale="tiny",
    )
    study = list(islice(generate(options), instances))
    if len(study) < instances:
        raise ValueError(f"a tiny {modality} study has fewer than {instances} instances")
    return study
