"""A small vectorised JPEG Lossless encoder (ITU T.81 process 14, selection value 1).

pydicom 3 cannot encode JPEG Lossless and no PyPI plugin for it adds an encoder, so the
transfer syntax 1.2.840.10008.1.2.4.70 is written here: first-order (left) prediction,
point transform 0, one optimal Huffman table per component, one scan per component
(non-interleaved, which every baseline-lossless decoder accepts). Bit packing uses numpy only.
"""

from __future__ import annotations

import heapq
import struct

import numpy as np


def _predict(img: np.ndarray, precision: int) -> np.ndarray:
    """Differences to the SV1 predictor, as int64 in -32767..32768."""
    x = img.astype(np.int64)
    pred = np.empty_like(x)
    pred[:, 1:] = x[:, :-1]  # Ra, the sample to the left
    pred[1:, 0] = x[:-1, 0]  # first column: Rb, the sample above
    pred[0, 0] = 1 << (precision - 1)
    diff = (x - pred) & 0xFFFF
    diff[diff >= 0x8000] -= 0x10000
    diff[diff == -0x8000] = 0x8000
    return diff.ravel()


def _categories(diff: np.ndarray) -> np.ndarray:
    mag = np.abs(diff)
    cat = np.zeros(mag.shape, dtype=np.int64)
    nz = mag > 0
    cat[nz] = np.floor(np.log2(mag[nz])).astype(np.int64) + 1
    return cat


def _code_lengths(freq: np.ndarray) -> dict[int, int]:
    """Huffman code lengths for the used symbols, with JPEG's reserved all-ones code."""
    heap: list[tuple[int, int, list[int]]] = []
    for sym in np.nonzero(freq)[0]:
        heap.append((int(freq[sym]), int(sym), [int(sym)]))
    heap.append((0, 99, [99]))  # reserved symbol: takes the longest code (all ones)
    heapq.heapify(heap)
    lengths = dict.fromkeys([s for _, _, group in heap for s in group], 0)
    counter = 100
    while len(heap) > 1:
        f1, _, g1 = heapq.heappop(heap)
        f2, _, g2 = heapq.heappop(heap)
        for s in g1 + g2:
            lengths[s] += 1
        heapq.heappush(heap, (f1 + f2, counter, g1 + g2))
        counter += 1
    if max(lengths.values()) > 16:  # pathological skew: fall back to flat 5-bit codes
        lengths = {s: 5 for s in lengths}
    lengths.pop(99)
    return lengths


def _canonical(lengths: dict[int, int]) -> tuple[dict[int, tuple[int, int]], bytes]:
    """Canonical codes {symbol: (code, length)} and the DHT payload (counts + symbols)."""
    order = sorted(lengths, key=lambda s: (lengths[s], s))
    codes: dict[int, tuple[int, int]] = {}
    code = 0
    prev = 0
    for sym in order:
        code <<= lengths[sym] - prev
        prev = lengths[sym]
        codes[sym] = (code, prev)
        code += 1
    counts = bytes(sum(1 for s in order if lengths[s] == n) for n in range(1, 17))
    return codes, counts + bytes(order)


def _pack(values: np.ndarray, lengths: np.ndarray) -> bytes:
    """Concatenate variable-length big-endian bit codes, pad with ones, stuff 0xFF bytes."""
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    owner = np.repeat(np.arange(values.size), lengths)
    shift = ends[owner] - 1 - np.arange(total)
    bits = ((values[owner] >> shift) & 1).astype(np.uint8)
    pad = (-total) % 8
    if pad:
        bits = np.concatenate([bits, np.ones(pad, dtype=np.uint8)])
    data = np.packbits(bits)
    ff = np.nonzero(data == 0xFF)[0]
    if ff.size:
        data = np.insert(data, ff + 1, 0)
    return data.tobytes()


def encode_jpeg_lossless(image: np.ndarray, precision: int) -> bytes:
    """Encode one frame (rows, cols) or (rows, cols, 3) of unsigned or signed samples."""
    if image.ndim == 2:
        image = image[:, :, None]
    rows, cols, ncomp = image.shape
    precision = max(2, min(16, precision))
    if image.dtype.kind == "i":  # signed samples: encode the two's complement bit pattern
        image = image.astype(np.int64) & ((1 << precision) - 1)
    out = bytearray(b"\xff\xd8")
    sof = struct.pack(">BHHB", precision, rows, cols, ncomp)
    for c in range(ncomp):
        sof += bytes([c + 1, 0x11, 0])
    out += b"\xff\xc3" + struct.pack(">H", len(sof) + 2) + sof
    for c in range(ncomp):
        diff = _predict(image[:, :, c], precision)
        cat = _categories(diff)
        freq = np.bincount(cat, minlength=17)
        codes, table = _canonical(_code_lengths(freq))
        dht = bytes([c]) + table
        out += b"\xff\xc4" + struct.pack(">H", len(dht) + 2) + dht
        code_val = np.zeros(17, dtype=np.int64)
        code_len = np.zeros(17, dtype=np.int64)
        for sym, (cv, cl) in codes.items():
            code_val[sym], code_len[sym] = cv, cl
        extra = np.where(diff < 0, diff - 1, diff) & ((1 << cat) - 1)
        extra[cat == 16] = 0
        nbits_extra = np.where(cat == 16, 0, cat)
        values = (code_val[cat] << nbits_extra) | extra
        lengths = code_len[cat] + nbits_extra
        sos = bytes([1, c + 1, c << 4, 1, 0, 0])
        out += b"\xff\xda" + struct.pack(">H", len(sos) + 2) + sos
        out += _pack(values, lengths)
    out += b"\xff\xd9"
    return bytes(out)
