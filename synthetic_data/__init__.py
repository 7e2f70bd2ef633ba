"""Synthetic DICOM studies with ground truth (never real patient data).

    from synthetic_data import GeneratorOptions, generate, write_archive
    opts = GeneratorOptions(patients=2, modalities=["CT", "MR"], seed=0, scale="tiny")
    for ds in generate(opts): ...              # pydicom Datasets with file_meta set
    summary = write_archive(opts, out_dir)     # files + manifest.jsonl + manifest.json

See synthetic_data/README.md for options, the manifest and the identity traps.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["GeneratorOptions", "generate", "write_archive"]

# imported on first use (PEP 562), so light submodules (names, cli) load without pydicom
_HOMES = {
    "GeneratorOptions": "synthetic_data.options",
    "generate": "synthetic_data.generator",
    "write_archive": "synthetic_data.writer",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'synthetic_data' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
