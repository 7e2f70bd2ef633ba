"""Ingest (phase pilot): what does each node do with awkward but valid data?

A synthetic archive covering every modality, character set and transfer syntax is stored into
each node and retrieved back. Per object the node either kept it exactly (`kept`), changed only
its encoding with equal pixels and attributes (`coerced`), changed its content (`altered`),
refused it (`rejected`), or acknowledged it and then could not return it (`lost`). A refusal is
the node's documented capability (reported, not failed); alteration and loss fail the gate.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from io import BytesIO

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element

from synthetic_data import GeneratorOptions, generate
from synthetic_data.options import MODALITIES

pytestmark = [pytest.mark.phase("pilot"), pytest.mark.scenario("ingest")]

CHARSETS = ("default", "ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 87", "ISO 2022 IR 149")
TRANSFER_SYNTAXES = (
    "implicit", "explicit", "deflated", "rle", "jpeg-lossless", "j2k-lossless", "j2k-lossy",
)


@pytest.fixture(scope="module")
def archive() -> list[Dataset]:
    """Every modality x charset x transfer syntax at least once (tiny objects)."""
    options = GeneratorOptions(
        patients=len(CHARSETS), studies_per_patient=3, modalities=list(MODALITIES),
        facilities=2, seed=7, scale="tiny", charsets=list(CHARSETS),
        transfer_syntaxes=list(TRANSFER_SYNTAXES), trap_rate=0.0,
    )
    return list(generate(options))


def _pixels_digest(ds: Dataset) -> str | None:
    if "PixelData" not in ds:
        return None
    try:
        return hashlib.sha256(np.ascontiguousarray(ds.pixel_array).tobytes()).hexdigest()
    except Exception:  # noqa: BLE001 - no decoder: compare the encoded bytes instead
        return hashlib.sha256(bytes(ds.PixelData)).hexdigest()


# top-level pixel data is compared decoded (`_pixels_digest`): its encoding may change
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _binary_digest(value: bytes, vr: str, little_endian: bool) -> str:
    """SHA-256 of a binary value in little endian order, so a byte order change of OW (PS3.5
    7.3) is not an alteration while any changed byte is."""
    data = bytes(value)
    if vr == "OW" and not little_endian and len(data) % 2 == 0:
        swapped = bytearray(data)
        swapped[0::2], swapped[1::2] = data[1::2], data[0::2]
        data = bytes(swapped)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _typed_like(elem: DataElement, other: DataElement, charset: object) -> DataElement:
    """A UN element decoded with the VR the other side gives the same tag: a private
    attribute of an implicit VR object reads as UN (PS3.5 6.2.2: its value, a sequence
    included, is implicit VR little endian), which is no change of content."""
    value = bytes(elem.value or b"")
    raw = RawDataElement(elem.tag, other.VR, len(value), value, 0, True, True)
    try:
        return convert_raw_data_element(raw, encoding=charset)
    except Exception:  # noqa: BLE001 - not decodable as that VR: compare the bytes
        return elem


def _normalise(ds: Dataset, like: Dataset | None, little_endian: bool, charset: object,
               top: bool) -> dict[str, object]:
    values: dict[str, object] = {}
    for elem in ds:
        if elem.tag.group == 0x0002 or elem.tag.element == 0x0000:  # meta, group lengths
            continue
        if top and elem.keyword in PIXEL_KEYWORDS:
            continue
        other = like.get(elem.tag) if like is not None else None
        if other is not None and elem.VR == "UN" and other.VR != "UN":
            elem = _typed_like(elem, other, charset)
        key = elem.keyword or str(elem.tag)
        if elem.VR == "SQ":
            if other is not None and other.VR == "UN":
                other = _typed_like(other, elem, charset)
            theirs = list(other.value) if other is not None and other.VR == "SQ" else []
            values[key] = [
                _normalise(item, theirs[n] if n < len(theirs) else None, little_endian,
                           charset, False)
                for n, item in enumerate(elem.value)
            ]
        elif isinstance(elem.value, (bytes, bytearray)):
            values[key] = _binary_digest(elem.value, elem.VR, little_endian)
        else:
            values[key] = "" if elem.value is None else str(elem.value)
    return values


def _content(ds: Dataset, like: Dataset | None = None) -> dict[str, object]:
    """Every attribute but the pixels, decoded (not bytes) so an encoding change is not an
    alteration: sequences item by item, recursively (an SR content tree, PS3.3 C.17.3),
    binary values (OB, OW, UN, ...: an encapsulated PDF) as digests. `like`: the object
    compared with, whose VRs decode this one's UN elements."""
    encoding = getattr(ds, "original_encoding", None)
    little_endian = True if not encoding or encoding[1] is None else bool(encoding[1])
    return _normalise(ds, like, little_endian, ds.get("SpecificCharacterSet"), True)


def _as_received(ds: Dataset) -> Dataset:
    """The object as a receiver decodes it (e.g. private tags of implicit VR become bytes)."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return dcmread(buffer)


def differences(original: Dataset, returned: Dataset) -> list[str]:
    before, after = _content(original, returned), _content(returned, original)
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def classify(original: Dataset, returned: Dataset | None, returned_ts: str | None) -> str:
    if returned is None:
        return "lost"
    original = _as_received(original)
    same_content = _content(returned, original) == _content(original, returned)
    same_encoding = returned_ts == original.file_meta.TransferSyntaxUID
    if same_encoding and returned.get("PixelData") == original.get("PixelData") and same_content:
        return "kept"
    if not same_content:
        return "altered"
    if _pixels_digest(returned) != _pixels_digest(original):
        # lossy originals may be re-encoded, but pixels must still decode the same
        return "altered"
    return "coerced"


def test_ingest_every_modality_charset_and_transfer_syntax(
    pacs_node, pacs_node_name, pacs_janitor, pacs_metrics, archive
):
    node = pacs_node(pacs_node_name)
    if not node.disposable:
        pytest.skip(f"{pacs_node_name} is not disposable: the harness does not write to it")
    # each object in its own syntax only: what the node does with it, not what our sender
    # converted (a refused syntax is the outcome "rejected")
    stored = node.dimse().store(archive, associations=4, convert=False)
    accepted = {r.sop_instance_uid for r in stored.succeeded}
    reasons = {r.sop_instance_uid: r.error for r in stored.failed}

    returned: dict[str, tuple[Dataset, str]] = {}
    for study_uid in sorted({ds.StudyInstanceUID for ds in archive}):
        got = node.dimse().get("STUDY", {"StudyInstanceUID": study_uid})
        for item in got.instances:
            returned[item.sop_instance_uid] = (item.dataset, item.transfer_syntax_uid)

    per_object = []
    for ds in archive:
        uid = ds.SOPInstanceUID
        if uid not in accepted:
            outcome = "rejected"
        else:
            dataset, ts = returned.get(uid, (None, None))
            outcome = classify(ds, dataset, ts)
            if outcome == "altered":
                reasons[uid] = "changed: " + ", ".join(differences(_as_received(ds), dataset))
        per_object.append({
            "sop_instance_uid": uid,
            "modality": ds.Modality,
            "charset": str(ds.get("SpecificCharacterSet", "default")),
            "transfer_syntax": ds.file_meta.TransferSyntaxUID.name,
            "outcome": outcome,
            **({"reason": reasons[uid]} if uid in reasons else {}),
        })
    counts = Counter(o["outcome"] for o in per_object)
    by_syntax: dict[str, Counter] = {}
    for o in per_object:
        by_syntax.setdefault(o["transfer_syntax"], Counter())[o["outcome"]] += 1
    pacs_metrics[f"ingest.{pacs_node_name}"] = {
        "objects": len(per_object),
        "outcomes": dict(counts),
        "by_transfer_syntax": {k: dict(v) for k, v in by_syntax.items()},
        "objects_not_kept": [o for o in per_object if o["outcome"] != "kept"][:200],
    }
    assert counts["lost"] == 0, f"{counts['lost']} acknowledged objects could not be retrieved"
    altered = [o for o in per_object if o["outcome"] == "altered"]
    assert not altered, f"{len(altered)} objects altered, first: {altered[0]}"
    assert counts["kept"] + counts["coerced"] > 0, "the node accepted nothing"
