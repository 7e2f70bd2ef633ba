"""Hypothesis strategies produce objects and values that pydicom writes and reads back."""

from __future__ import annotations

import math
import warnings
from io import BytesIO

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian

from harness.errors import ConfigError
from synthetic_data.strategies import SUPPORTED_VRS, datasets, patients, studies, vr_values

FAST = settings(max_examples=15, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _round_trip(ds: Dataset) -> Dataset:
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buf.getvalue()))


@FAST
@given(datasets())
def test_any_dataset_round_trips(ds):
    back = _round_trip(ds)
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert str(back.PatientName) == str(ds.PatientName)
    if "PixelData" in back:
        assert back.pixel_array.size > 0


@FAST
@given(studies(modality="MR"))
def test_study_objects_share_study_uid(objs):
    assert len({ds.StudyInstanceUID for ds in objs}) == 1
    assert len({ds.SOPInstanceUID for ds in objs}) == len(objs)


@FAST
@given(patients())
def test_patient_round_trips(ds):
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = "2.25.1"
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    back = _round_trip(ds)
    assert str(back.PatientName) == str(ds.PatientName)
    assert back.PatientID == ds.PatientID
    assert back.PatientBirthDate == ds.PatientBirthDate


_TAGS = {"AE": 0x00080054, "AS": 0x00101010, "AT": 0x00209165, "CS": 0x00080060,
         "DA": 0x00080020, "DS": 0x00101030, "DT": 0x0008002A, "FL": 0x00189087,
         "FD": 0x00189089, "IS": 0x00200013, "LO": 0x00081030, "LT": 0x00204000,
         "PN": 0x00100010, "SH": 0x00200010, "SL": 0x00186020,
         "SS": 0x00280106, "ST": 0x00080081, "TM": 0x00080030, "UC": 0x00081080,
         "UI": 0x00080018, "UL": 0x00081161, "UR": 0x00081190, "US": 0x00280010,
         "UT": 0x00180010}


def _value_ok(vr, value, got) -> bool:
    if vr in ("FL", "FD") and isinstance(value, float):
        return (math.isnan(value) and math.isnan(got)) or got == pytest.approx(value)
    if vr in ("OB", "OD", "OF", "OL", "OV", "OW", "UN", "SV", "UV", "AT"):
        return True
    return str(got).rstrip(" \x00") == str(value).rstrip(" \x00")


@FAST
@given(st.data())
@pytest.mark.parametrize("vr", SUPPORTED_VRS)
def test_vr_values_write_and_read(vr, data):
    value = data.draw(vr_values(vr))
    ds = Dataset()
    tag = _TAGS.get(vr, 0x00111010)  # private, explicit VR keeps the VR
    if tag == 0x00111010:
        ds.add_new(0x00110010, "LO", "HYPOTHESIS")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom warns on values invalid for the VR
        ds.add_new(tag, vr, value)
    buf = BytesIO()
    dcmwrite(buf, ds, implicit_vr=False, little_endian=True)
    back = pydicom.dcmread(BytesIO(buf.getvalue()), force=True)
    assert back[tag].VR == vr or vr in ("OB",)
    assert _value_ok(vr, value, back[tag].value)


def test_unknown_vr():
    with pytest.raises(ConfigError, match="vr_values"):
        vr_values("XX")
