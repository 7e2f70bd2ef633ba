"""The ingest scenario's verdict per object: kept, coerced, altered, lost."""

from __future__ import annotations

import copy

from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from scenarios.helpers import sample_study
from scenarios.test_ingest import _as_received, classify


def _original():
    return sample_study(seed=3)[0]


def test_identical_object_is_kept():
    ds = _original()
    assert classify(ds, _as_received(ds), ds.file_meta.TransferSyntaxUID) == "kept"


def test_lossless_transfer_syntax_change_is_coerced():
    ds = _original()
    returned = copy.deepcopy(ds)
    returned.compress(RLELossless, generate_instance_uid=False)
    assert classify(ds, _as_received(returned), RLELossless) == "coerced"


def test_changed_name_is_altered():
    ds = _original()
    returned = copy.deepcopy(ds)
    returned.PatientName = "Someone^Else"
    assert classify(ds, _as_received(returned), ExplicitVRLittleEndian) == "altered"


def test_changed_pixel_is_altered():
    ds = _original()
    returned = copy.deepcopy(ds)
    pixels = bytearray(returned.PixelData)
    pixels[0] ^= 1
    returned.PixelData = bytes(pixels)
    assert classify(ds, _as_received(returned), ds.file_meta.TransferSyntaxUID) == "altered"


def test_missing_object_is_lost():
    assert classify(_original(), None, None) == "lost"
