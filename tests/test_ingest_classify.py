"""The ingest scenario's verdict per object: kept, coerced, altered, lost."""

from __future__ import annotations

import copy

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from harness.interop.ingest import as_received, classify, differences
from synthetic_data.samples import sample_study


def _original():
    return sample_study(seed=3)[0]


def test_identical_object_is_kept():
    ds = _original()
    assert classify(ds, as_received(ds), ds.file_meta.TransferSyntaxUID) == "kept"


def test_lossless_transfer_syntax_change_is_coerced():
    ds = _original()
    returned = copy.deepcopy(ds)
    returned.compress(RLELossless, generate_instance_uid=False)
    assert classify(ds, as_received(returned), RLELossless) == "coerced"


def test_changed_name_is_altered():
    ds = _original()
    returned = copy.deepcopy(ds)
    returned.PatientName = "Someone^Else"
    assert classify(ds, as_received(returned), ExplicitVRLittleEndian) == "altered"


def test_changed_pixel_is_altered():
    ds = _original()
    returned = copy.deepcopy(ds)
    pixels = bytearray(returned.PixelData)
    pixels[0] ^= 1
    returned.PixelData = bytes(pixels)
    assert classify(ds, as_received(returned), ds.file_meta.TransferSyntaxUID) == "altered"


def test_missing_object_is_lost():
    assert classify(_original(), None, None) == "lost"


# -- sequences and binary values (SR content tree, encapsulated PDF) ----------------------


def _report():
    return sample_study(seed=3, modality="SR")[0]


def _pdf():
    return sample_study(seed=3, modality="DOC")[0]


def test_unchanged_report_and_document_are_kept():
    for ds in (_report(), _pdf()):
        assert classify(ds, as_received(ds), ds.file_meta.TransferSyntaxUID) == "kept"


def test_changed_sr_content_item_is_altered():
    ds = _report()
    returned = copy.deepcopy(ds)
    finding = returned.ContentSequence[0].ContentSequence[0]  # CONTAINER > TEXT
    assert finding.ValueType == "TEXT"
    finding.TextValue = finding.TextValue.replace("o", "0", 1)
    assert classify(ds, as_received(returned), ds.file_meta.TransferSyntaxUID) == "altered"
    assert differences(as_received(ds), as_received(returned)) == ["ContentSequence"]


def test_changed_code_deep_in_sr_tree_is_altered():
    ds = _report()
    returned = copy.deepcopy(ds)
    concept = returned.ContentSequence[1].ContentSequence[0].ConceptNameCodeSequence[0]
    concept.CodeMeaning = "Conclusion"
    assert classify(ds, as_received(returned), ds.file_meta.TransferSyntaxUID) == "altered"


def test_changed_encapsulated_document_byte_is_altered():
    ds = _pdf()
    returned = copy.deepcopy(ds)
    document = bytearray(returned.EncapsulatedDocument)
    document[len(document) // 2] ^= 0x01
    returned.EncapsulatedDocument = bytes(document)
    assert classify(ds, as_received(returned), ds.file_meta.TransferSyntaxUID) == "altered"
    assert differences(as_received(ds), as_received(returned)) == ["EncapsulatedDocument"]


def test_private_sequence_read_as_un_after_implicit_vr_is_coerced_not_altered():
    """Explicit VR -> implicit VR: the private sequence and texts come back as UN (PS3.5
    6.2.2), decoded with the original's VR they are the same content."""
    ds = _report()
    returned = copy.deepcopy(ds)
    returned.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    returned = as_received(returned)
    assert returned[0x00091010].VR == "UN"
    assert classify(ds, returned, ImplicitVRLittleEndian) == "coerced"
    changed = copy.deepcopy(ds)
    changed[0x00091010].value[0].CodeMeaning = "Vendor protocol 8"
    changed.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert classify(ds, as_received(changed), ImplicitVRLittleEndian) == "altered"
