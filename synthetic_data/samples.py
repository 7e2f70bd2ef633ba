"""Small deterministic studies for tests and scenarios: one series, N instances, one seed."""

from __future__ import annotations

import copy

from pydicom import Dataset
from pydicom.uid import generate_uid

from synthetic_data.generator import generate
from synthetic_data.options import GeneratorOptions


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
