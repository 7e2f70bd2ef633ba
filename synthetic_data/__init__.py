"""Synthetic DICOM studies with ground truth (never real patient data).

    from synthetic_data import GeneratorOptions, generate, write_archive
    opts = GeneratorOptions(patients=2, modalities=["CT", "MR"], seed=0, scale="tiny")
    for ds in generate(opts): ...              # pydicom Datasets with file_meta set
    summary = write_archive(opts, out_dir)     # files + manifest.jsonl + manifest.json

See synthetic_data/README.md for options, the manifest and the identity traps.
"""

from synthetic_data.generator import generate
from synthetic_data.options import GeneratorOptions
from synthetic_data.writer import write_archive

__all__ = ["GeneratorOptions", "generate", "write_archive"]
