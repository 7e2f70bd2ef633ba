"""Template instances for load and protocol tests: one synthetic instance, cloned cheaply.

A load run needs thousands of distinct instances without spending the harness's CPU on
making them: `clone_study` shares every element of one generated template and makes only
the UIDs new (PS3.3 C.7.2.1 Study, C.7.3.1 Series, C.12.1 SOP Common), so a 512x512 CT
study costs microseconds and never holds real data.
"""

from __future__ import annotations

import copy
from io import BytesIO

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.uid import generate_uid

from synthetic_data.generator import generate
from synthetic_data.options import GeneratorOptions

_UI_TAGS = {
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
    "SOPInstanceUID": 0x00080018,
}


def encode_part10(ds: Dataset) -> bytes:
    """The dataset as a Part 10 file (PS3.10 7.1), e.g. one STOW-RS part."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def template_instance(scale: str = "small", modality: str = "CT", seed: int = 0) -> Dataset:
    """One synthetic instance of the requested scale (tiny, small, realistic) and modality."""
    options = GeneratorOptions(
        patients=1, studies_per_patient=1, modalities=[modality], facilities=1,
        seed=seed, scale=scale, trap_rate=0.0,
    )
    return next(iter(generate(options)))


def clone_study(template: Dataset, instances: int, patient_id: str | None = None) -> list[Dataset]:
    """`instances` copies of the template in one new study, sharing the pixel bytes.

    Only the UID elements (and InstanceNumber, PatientID) are new objects, so a 512x512 CT
    study costs microseconds to make and the harness spends its CPU on the network.
    """
    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for number in range(instances):
        ds = Dataset()
        for elem in template:
            ds.add(elem)  # shared, never mutated below
        sop_uid = generate_uid()
        for keyword, value in (("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid),
                               ("SOPInstanceUID", sop_uid)):
            tag = _UI_TAGS[keyword]
            ds[tag] = DataElement(tag, "UI", value)
        ds[0x00200013] = DataElement(0x00200013, "IS", number + 1)
        if patient_id is not None:
            ds[0x00100020] = DataElement(0x00100020, "LO", patient_id)
        ds.file_meta = copy.copy(template.file_meta)
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        out.append(ds)
    return out
