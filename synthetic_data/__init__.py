"""Synthetic DICOM studies with ground truth (never real patient data).

    from synthetic_data import GeneratorOptions, generate, write_archive
    opts = GeneratorOptions(patients=2, modalities=["CT", "MR"], seed=0, scale="tiny")
    for ds in generate(opts): ...              # pydicom Datasets with file_meta set
    summary = write_archive(opts, out_dir)     # files + manifest.jsonl + manifest.json
"""

from synthetic_data.generator import generate
from synthetic_data.options import GeneratorOptions

__all__ = ["GeneratorOptions", "generate", "write_archive"]


def __getattr__(name: str):  # write_archive is imported lazily to keep `generate` light
    if name == "write_archive":
        from synthetic_data.writer import write_archive

        return write_archive
    raise AttributeError(name)
