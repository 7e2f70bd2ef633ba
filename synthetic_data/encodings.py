"""Transfer syntaxes: names users type, which ones can be encoded here, and the encoding.

Native syntaxes (implicit, explicit, deflated) need nothing. Compressed ones use pydicom 3's
encoders and their plugins: RLE Lossless (pylibjpeg-rle, or pydicom's slow native encoder),
JPEG 2000 (pylibjpeg-openjpeg). pydicom 3 has no JPEG Lossless encoder and no PyPI plugin
adds one, so JPEG Lossless SV1 is encoded by :mod:`synthetic_data.jpeg_lossless` (numpy).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
)

from harness.errors import ConfigError


@dataclass(frozen=True)
class Syntax:
    """One transfer syntax the generator can write."""

    name: str
    uid: str
    compressed: bool
    lossy: bool
    packages: tuple[str, ...]  # import names needed, empty when built in
    pypi: tuple[str, ...]  # what to pip install when missing


SYNTAXES: dict[str, Syntax] = {
    s.name: s
    for s in (
        Syntax("implicit", ImplicitVRLittleEndian, False, False, (), ()),
        Syntax("explicit", ExplicitVRLittleEndian, False, False, (), ()),
        Syntax("deflated", DeflatedExplicitVRLittleEndian, False, False, (), ()),
        Syntax("rle", RLELossless, True, False, (), ()),
        Syntax("jpeg-lossless", JPEGLosslessSV1, True, False, (), ()),
        Syntax("j2k-lossless", JPEG2000Lossless, True, False, ("openjpeg",),
               ("pylibjpeg", "pylibjpeg-openjpeg")),
        Syntax("j2k-lossy", JPEG2000, True, True, ("openjpeg",),
               ("pylibjpeg", "pylibjpeg-openjpeg")),
    )
}
_BY_UID = {s.uid: s for s in SYNTAXES.values()}
DEFAULT_SYNTAX = "explicit"


def resolve_syntax(name: str) -> Syntax:
    """Map a short name or UID to a Syntax; ConfigError if unknown or not encodable here."""
    key = name.strip()
    syntax = SYNTAXES.get(key.lower()) or _BY_UID.get(key)
    if syntax is None:
        allowed = ", ".join(SYNTAXES) + " or their UIDs"
        raise ConfigError(
            f"transfer_syntaxes: unknown transfer syntax {name!r} (allowed: {allowed})")
    missing = [p for p in syntax.packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(
            f"transfer_syntaxes: {syntax.name} is unavailable here: install "
            f"{' and '.join(syntax.pypi)} (PyPI)"
        )
    return syntax


def syntax_by_uid(uid: str) -> Syntax:
    return _BY_UID[uid]


def stored_photometric(syntax: Syntax, photometric: str, samples: int) -> str:
    """JPEG 2000 colour is written with its component transform (PS3.5 8.2.4)."""
    if samples == 3 and syntax.uid == JPEG2000Lossless:
        return "YBR_RCT"
    if samples == 3 and syntax.uid == JPEG2000:
        return "YBR_ICT"
    return photometric


def _rle_kwargs() -> dict:
    """Prefer the fast pylibjpeg-rle plugin; pydicom's native RLE encoder is pure Python."""
    if importlib.util.find_spec("rle") is not None:
        return {"encoding_plugin": "pylibjpeg"}
    return {}


def encode_pixels(arr: np.ndarray, syntax: Syntax, *, frames: int, rows: int, columns: int,
                  samples: int, bits_allocated: int, bits_stored: int, signed: bool,
                  photometric: str) -> bytes:
    """Encode native pixels (frames, rows, cols[, samples]) into encapsulated Pixel Data."""
    from pydicom.pixels.encoders.base import get_encoder

    photometric = stored_photometric(syntax, photometric, samples)
    kwargs = {
        "rows": rows, "columns": columns, "samples_per_pixel": samples,
        "bits_allocated": bits_allocated, "bits_stored": bits_stored,
        "pixel_representation": int(signed), "photometric_interpretation": photometric,
        "number_of_frames": 1, "planar_configuration": 0,
    }
    arr = arr.reshape((frames, rows, columns) + ((samples,) if samples > 1 else ()))
    out: list[bytes] = []
    if syntax.uid == JPEGLosslessSV1:
        from synthetic_data.jpeg_lossless import encode_jpeg_lossless

        out = [encode_jpeg_lossless(arr[i], bits_stored) for i in range(frames)]
        return encapsulate(out)
    encoder = get_encoder(syntax.uid)
    extra: dict = {}
    if syntax.uid == RLELossless:
        extra = _rle_kwargs()
    elif syntax.uid == JPEG2000:
        extra = {"j2k_cr": [15], "encoding_plugin": "pylibjpeg"}
    elif syntax.uid == JPEG2000Lossless:
        extra = {"encoding_plugin": "pylibjpeg"}
    if syntax.uid in (JPEG2000, JPEG2000Lossless) and samples == 3:
        extra["use_mct"] = True  # stored as YBR_RCT / YBR_ICT, see stored_photometric()
    for i in range(frames):
        out.append(encoder.encode(np.ascontiguousarray(arr[i]), **kwargs, **extra))
    return encapsulate(out)
