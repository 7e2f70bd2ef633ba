"""Phantom pixel data that looks like each modality, computed once and reused.

For a (kind, size, seed) we precompute a few structural slices and a small bank of noise
fields (all int16); an instance is one slice plus one noise field, clipped to the stored bit
range. That is two vectorised passes per object, so even 512x512 CT costs about a millisecond.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

MAX_SLICES = 24  # distinct structural slices per phantom; neighbours share one
NOISE_BANK = 3


@dataclass(frozen=True)
class PixelSpec:
    """Image Pixel module values plus which phantom to draw."""

    kind: str  # ct, mr, cr, dx, mg, us, usc, nm, pt, xa, sc
    rows: int
    columns: int
    frames: int = 1
    samples: int = 1
    photometric: str = "MONOCHROME2"
    bits_allocated: int = 16
    bits_stored: int = 12
    signed: bool = False
    spacing: tuple[float, float] = (1.0, 1.0)

    @property
    def high_bit(self) -> int:
        return self.bits_stored - 1

    @property
    def dtype(self) -> np.dtype:
        if self.bits_allocated == 8:
            return np.dtype(np.uint8)
        return np.dtype(np.int16 if self.signed else np.uint16)

    @property
    def value_range(self) -> tuple[int, int]:
        if self.signed:
            return -(2 ** (self.bits_stored - 1)), 2 ** (self.bits_stored - 1) - 1
        return 0, 2**self.bits_stored - 1

    @property
    def nbytes(self) -> int:
        return self.rows * self.columns * self.samples * self.frames * self.bits_allocated // 8


def _grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.linspace(-1.0, 1.0, rows, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, cols, dtype=np.float32)[None, :]
    return y, x


def _ellipse(y, x, cy, cx, ry, rx) -> np.ndarray:
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def _body_slice(y, x, z: float) -> np.ndarray:
    """Cross-section in HU: body, fat rim, lungs, spine, aorta, a liver-like organ."""
    s = max(0.35, float(np.sqrt(max(0.0, 1.0 - (z * 0.8) ** 2))))
    img = np.full(np.broadcast_shapes(y.shape, x.shape), -1000.0, dtype=np.float32)
    img[_ellipse(y, x, 0.0, 0.0, 0.62 * s, 0.88 * s)] = -90.0
    img[_ellipse(y, x, 0.0, 0.0, 0.56 * s, 0.82 * s)] = 40.0
    if z < 0.2:
        for cx in (-0.38, 0.38):
            img[_ellipse(y, x, -0.05, cx * s, 0.38 * s, 0.26 * s)] = -850.0
    else:
        img[_ellipse(y, x, -0.05, -0.3 * s, 0.3 * s, 0.35 * s)] = 60.0
    img[_ellipse(y, x, 0.38 * s, 0.0, 0.1 * s, 0.1 * s)] = 700.0
    img[_ellipse(y, x, 0.38 * s, 0.0, 0.05 * s, 0.05 * s)] = 250.0
    img[_ellipse(y, x, 0.15 * s, 0.06, 0.06 * s, 0.06 * s)] = 180.0
    return img


def _projection(y, x, kind: str) -> np.ndarray:
    """A chest/extremity-like projection radiograph, 0..1 attenuation."""
    img = np.zeros(np.broadcast_shapes(y.shape, x.shape), dtype=np.float32)
    img += 0.25 * _ellipse(y, x, 0.05, 0.0, 0.9, 0.75)
    for cx in (-0.33, 0.33):
        img -= 0.15 * _ellipse(y, x, -0.05, cx, 0.6, 0.25)
    for k in range(8):
        rib = np.abs(y - (-0.55 + 0.13 * k) - 0.08 * x**2) < 0.02
        img += 0.12 * (rib & (np.abs(x) < 0.7))
    img += 0.3 * (np.abs(x) < 0.05) * (y > -0.8)
    img += 0.05 * (y + 1.0)
    return np.clip(img, 0.0, 1.0)


def _structure(spec: PixelSpec, z: float, frame: int) -> np.ndarray:
    """Float image in the stored-value scale (before noise) for one slice or frame."""
    y, x = _grid(spec.rows, spec.columns)
    k = spec.kind
    lo, hi = spec.value_range
    if k == "ct":
        return _body_slice(y, x, z) + 1024.0  # stored = HU + 1024 (RescaleIntercept -1024)
    if k == "mr":
        hu = _body_slice(y, x, z)
        mr = np.select([hu < -500, hu < 0, hu < 100, hu < 400], [0.0, 900.0, 600.0, 1100.0],
                       250.0)
        return mr.astype(np.float32)
    if k in ("cr", "dx"):
        img = _projection(y, x, k) * (hi * 0.8) + hi * 0.05
        return img if spec.photometric == "MONOCHROME2" else hi - img
    if k == "mg":
        breast = ((y / 0.9) ** 2 + ((x + 1.0) / 1.6) ** 2) <= 1.0
        tissue = 0.5 + 0.2 * np.sin(9 * x + 5 * y) * np.cos(7 * y)
        return (breast * tissue * hi * 0.7 + hi * 0.02).astype(np.float32)
    if k in ("us", "usc"):
        r = np.sqrt((y + 1.0) ** 2 + x**2)
        theta = np.arctan2(x, y + 1.0)
        fan = (np.abs(theta) < 0.6) & (r < 1.9) & (r > 0.1)
        echo = 90 + 60 * np.sin(r * 12 + frame * 0.3) * (r < 1.3) + 40 * (np.abs(r - 1.5) < 0.05)
        img = fan * echo
        if k == "usc":
            return np.stack([img, img, np.minimum(img * 1.2, 255)], axis=-1).astype(np.float32)
        return img.astype(np.float32)
    if k in ("nm", "pt"):
        img = np.zeros(np.broadcast_shapes(y.shape, x.shape), dtype=np.float32)
        img += 100 * _ellipse(y, x, 0.0, 0.0, 0.6, 0.8)
        img += 600 * _ellipse(y, x, -0.1 + 0.2 * z, -0.3, 0.15, 0.2)  # liver/heart
        img += 1500 * _ellipse(y, x, 0.3, 0.35, 0.08, 0.08)  # hot lesion / bladder
        img += 400 * _ellipse(y, x, -0.5, 0.0, 0.12, 0.2) * (frame % 4 + 1) / 2
        return img
    if k == "xa":
        img = np.full(np.broadcast_shapes(y.shape, x.shape), 170.0, dtype=np.float32)
        contrast = min(1.0, frame / 6.0)
        vessel = np.abs(x - 0.3 * np.sin(3 * y)) < 0.03
        branch = np.abs(y - 0.5 * x - 0.1) < 0.02
        img -= 110 * contrast * (vessel | (branch & (x > 0)))
        img -= 30 * _ellipse(y, x, 0.1, 0.1, 0.6, 0.5)
        return img
    if k == "sc":
        rgb = np.empty((spec.rows, spec.columns, 3), dtype=np.float32)
        rgb[..., 0] = 128 + 120 * x
        rgb[..., 1] = 128 + 120 * y
        rgb[..., 2] = 200 * _ellipse(y, x, 0.0, 0.0, 0.5, 0.5)
        return rgb
    raise ValueError(f"unknown phantom kind {k}")


def _noise_sigma(kind: str, hi: int) -> float:
    return {"ct": 12.0, "mr": 25.0, "us": 18.0, "usc": 10.0, "nm": 30.0, "pt": 20.0,
            "xa": 4.0, "sc": 2.0}.get(kind, hi * 0.01)


_FLAT_KINDS = ("cr", "dx", "mg", "sc")


def slice_count(spec: PixelSpec, total: int) -> int:
    """How many distinct structural slices a series of `total` objects needs."""
    if spec.kind in _FLAT_KINDS:
        return 1
    return min(max(total * spec.frames, 1), MAX_SLICES)


@lru_cache(maxsize=16)
def phantom(spec: PixelSpec, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(structure slices, noise bank) as int16 arrays ready to add; cached per spec and seed.

    Stored values stay below 2**14 and noise is small, so int16 sums cannot overflow.
    """
    base = np.stack([
        _structure(spec, (2.0 * i / max(count - 1, 1) - 1.0) if count > 1 else 0.0, i)
        for i in range(count)
    ]).astype(np.int16)
    rng = np.random.default_rng([seed, spec.rows, spec.columns, len(spec.kind)])
    lo, hi = spec.value_range
    sigma = _noise_sigma(spec.kind, hi)
    noise = (rng.standard_normal((NOISE_BANK,) + base.shape[1:], dtype=np.float32) * sigma)
    return base, noise.astype(np.int16)


def frame_plan(spec: PixelSpec, position: int, total: int, noise_index: int
               ) -> tuple[tuple[int, int], ...]:
    """(structure slice, noise field) of each frame of object `position` of `total`."""
    count = slice_count(spec, total)
    plan = []
    for f in range(spec.frames):
        idx = ((position * spec.frames + f) * count) // max(total * spec.frames, 1)
        plan.append((min(idx, count - 1), (noise_index + f) % NOISE_BANK))
    return tuple(plan)


def render(spec: PixelSpec, position: int, total: int, noise_index: int, seed: int) -> np.ndarray:
    """Pixels of one object: frames x rows x cols [x samples], dtype per the spec."""
    base, noise = phantom(spec, slice_count(spec, total), seed)
    frames = [base[b] + noise[n] for b, n in frame_plan(spec, position, total, noise_index)]
    arr = np.stack(frames) if spec.frames > 1 else frames[0][None]
    lo, hi = spec.value_range
    np.clip(arr, max(lo, -32768), min(hi, 32767), out=arr)
    return arr.astype(spec.dtype)


def pixel_sha256(arr: np.ndarray) -> str:
    """Hash of the native little-endian pixel bytes: equal for a lossless round trip."""
    native = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
    return hashlib.sha256(memoryview(native).cast("B")).hexdigest()


class BytesCache:
    """A small LRU cache bounded by the total size of its values (encoded pixel data).

    A 300-slice CT series is drawn from 24 structure slices x 3 noise fields, so most
    objects' pixel data (and its hash, and its compressed form) repeat; encoding them once
    is what makes realistic scales fast.
    """

    def __init__(self, budget: int = 192 * 1024 * 1024) -> None:
        self._items: OrderedDict[tuple, tuple[bytes, str]] = OrderedDict()
        self._size = 0
        self._budget = budget

    def get(self, key: tuple) -> tuple[bytes, str] | None:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
        return hit

    def put(self, key: tuple, value: tuple[bytes, str]) -> None:
        size = len(value[0])
        if size > self._budget:
            return
        self._items[key] = value
        self._size += size
        while self._size > self._budget:
            _, (old, _) = self._items.popitem(last=False)
            self._size -= len(old)
