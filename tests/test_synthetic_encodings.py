"""Every transfer syntax reads back; lossless ones decode to exactly the generated pixels."""

from __future__ import annotations

import hashlib
import importlib.util
from io import BytesIO

import numpy as np
import pydicom
import pytest
from pydicom.filewriter import dcmwrite

from harness.errors import ConfigError
from synthetic_data import GeneratorOptions
from synthetic_data import encodings as enc
from synthetic_data.encodings import SYNTAXES, resolve_syntax
from synthetic_data.generator import iter_instances
from synthetic_data.jpeg_lossless import encode_jpeg_lossless
from synthetic_data.strategies import available_syntaxes

IMAGE_MODALITIES = ["CT", "MR", "CR", "DX", "US", "NM", "PT", "MG", "XA", "SC"]


def _can_decode(name: str) -> bool:
    if name == "jpeg-lossless":
        return importlib.util.find_spec("libjpeg") is not None
    if name.startswith("j2k"):
        return importlib.util.find_spec("openjpeg") is not None
    return True


@pytest.mark.parametrize("name", available_syntaxes())
def test_syntax_round_trip(name):
    if not _can_decode(name):
        pytest.skip(f"no decoder for {name} (pip install pylibjpeg-libjpeg)")
    syntax = SYNTAXES[name]
    opts = GeneratorOptions(patients=len(IMAGE_MODALITIES), modalities=IMAGE_MODALITIES,
                            transfer_syntaxes=[name], seed=3, trap_rate=0.0, facilities=1)
    seen = set()
    for inst in iter_instances(opts):
        buf = BytesIO()
        dcmwrite(buf, inst.dataset, enforce_file_format=True)
        back = pydicom.dcmread(BytesIO(buf.getvalue()))
        assert back.file_meta.TransferSyntaxUID == syntax.uid
        arr = back.pixel_array
        key = (inst.record["series"]["modality"], arr.dtype.str, back.SamplesPerPixel)
        if key in seen:
            continue
        seen.add(key)
        if syntax.lossy:
            assert back.LossyImageCompression == "01"
            continue
        digest = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
        assert digest == inst.record["pixel_sha256"], key
    assert {k[0] for k in seen} == {m if m != "SC" else "OT" for m in IMAGE_MODALITIES}


def test_names_and_uids_are_accepted():
    assert resolve_syntax("JPEG-Lossless").name == "jpeg-lossless"
    assert resolve_syntax("1.2.840.10008.1.2.5").name == "rle"
    opts = GeneratorOptions(transfer_syntaxes="1.2.840.10008.1.2,explicit")
    assert opts.syntax_list == ("implicit", "explicit")


def test_unknown_syntax_is_a_config_error():
    with pytest.raises(ConfigError, match="transfer_syntaxes"):
        GeneratorOptions(transfer_syntaxes=["jpeg-xl"])


def test_missing_encoder_names_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(enc.importlib.util, "find_spec",
                        lambda n, *a: None if n == "openjpeg" else real(n, *a))
    with pytest.raises(ConfigError, match="pylibjpeg-openjpeg"):
        GeneratorOptions(transfer_syntaxes=["j2k-lossless"])


@pytest.mark.skipif(importlib.util.find_spec("libjpeg") is None, reason="needs libjpeg")
@pytest.mark.parametrize("shape,dtype,bits", [
    ((7, 9), np.uint8, 8), ((16, 16), np.uint16, 16), ((12, 10, 3), np.uint8, 8),
    ((20, 20), np.int16, 16), ((33, 17), np.uint16, 12),
])
def test_jpeg_lossless_encoder_edges(shape, dtype, bits):
    from libjpeg import decode

    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    lo, hi = (info.min, info.max) if bits == 16 or dtype == np.uint8 else (0, 2**bits - 1)
    img = rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)
    img.flat[0], img.flat[-1] = lo, hi  # extreme differences (category 16)
    out = decode(encode_jpeg_lossless(img, bits))
    if dtype == np.int16:
        out = out.astype(np.uint16).view(np.int16)
    assert np.array_equal(out.reshape(shape).astype(dtype), img)
