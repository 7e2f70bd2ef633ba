"""Storage fidelity probes: store one object per quirk, read it back, say what changed.

The base object is pydicom's own CT_small.dcm (a GE CT with private groups, Explicit VR
Little Endian, ISO_IR 100), given fresh UIDs each run; each probe adds one quirk, stores it
and reads it back with C-GET offering every transfer syntax (so the node sends what it
holds). What came back is compared with harness/interop/ingest.py (kept / coerced /
altered), decoded, so a change of encoding alone is not an alteration. A node without
C-GET cannot be read back object by object: those probes are then not tested.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from harness.conformance.model import (
    Observation,
    ProbeContext,
    conforms,
    differs,
    not_tested,
    probe,
)
from harness.conformance.retrieve import TIMEOUT_S, Refused, accepts_get, store_objects
from harness.dicom.contexts import RETRIEVE_TRANSFER_SYNTAXES
from harness.dicom.names import transfer_syntax_name
from harness.dicom.part10 import encode_dataset
from harness.dicom.status import RetrievedInstance, RetrieveResult
from harness.interop.ingest import as_received, classify, differences

BASE_FILE = "CT_small.dcm"  # shipped with pydicom (tests/realworld.py lists it)
PRIVATE_GROUP = 0x0099
PRIVATE_CREATOR = "PACSHARNESS PROBE"
LONG_TEXT_CHARS = 70_000  # more than a 16-bit length field holds (PS3.5 7.1.2)
LARGE_ROWS, LARGE_COLUMNS = 4096, 2560  # 16-bit pixels: 20 MiB of pixel data
MAX_LISTED = 20  # changed attributes named in the facts


def base_object(**values: Any) -> Dataset:
    """CT_small.dcm with fresh Study/Series/SOP Instance UIDs and `values` set."""
    ds = dcmread(get_testdata_file(BASE_FILE))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = "PHPROBE-STORAGE"
    # Data Set Trailing Padding belongs to a file, not to a data set on the network
    # (PS3.10 7.2): Orthanc and dcmqrscp drop it, which would mask every probe's own quirk
    del ds[0xFFFCFFFC]
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _keys(ds: Dataset) -> dict[str, Any]:
    return {"StudyInstanceUID": ds.StudyInstanceUID, "SeriesInstanceUID": ds.SeriesInstanceUID,
            "SOPInstanceUID": ds.SOPInstanceUID}


def read_back(ctx: ProbeContext, ds: Dataset,
              syntaxes: Sequence[str] = RETRIEVE_TRANSFER_SYNTAXES
              ) -> tuple[RetrieveResult, list[RetrievedInstance]]:
    """C-GET of one instance (IMAGE level) offering `syntaxes`; recorded."""
    got = ctx.node.dimse(timeout_s=TIMEOUT_S).get(
        "IMAGE", _keys(ds), sop_classes=[str(ds.SOPClassUID)], transfer_syntaxes=syntaxes)
    offered = ("every transfer syntax" if tuple(syntaxes) == RETRIEVE_TRANSFER_SYNTAXES
               else ", ".join(transfer_syntax_name(s) for s in syntaxes))
    ctx.record(f"C-GET IMAGE {ds.SOPInstanceUID} offering {offered}",
               f"status {got.status}; {len(got.instances)} instance(s) received"
               + "".join(f"; in {transfer_syntax_name(i.transfer_syntax_uid)}"
                         for i in got.instances))
    return got, got.instances


def _fidelity(original: Dataset, instance: RetrievedInstance) -> dict[str, Any]:
    """ingest.py's verdict on what came back, and the attributes that changed."""
    returned = instance.dataset
    changed = differences(as_received(original), returned)
    return {
        "fidelity": classify(original, returned, instance.transfer_syntax_uid),
        "changed": changed[:MAX_LISTED],
        "returned_syntax": instance.transfer_syntax_uid,
        "sop_instance_uid": str(original.SOPInstanceUID),
    }


def _store_and_read(ctx: ProbeContext, ds: Dataset, what: str
                    ) -> RetrievedInstance | Observation:
    """Store `ds` and read it back; the probe's outcome instead when that cannot be done."""
    if not accepts_get(ctx):
        return not_tested("the node offers no C-GET to read the object back")
    try:
        store_objects(ctx, [ds], what)
    except Refused as exc:
        return differs(f"refused: {exc}", stored=False)
    got, instances = read_back(ctx, ds)
    if len(instances) != 1:
        return differs(f"stored, then not returned by C-GET ({got.status})", stored=True,
                       fidelity="lost")
    return instances[0]


def _summary(facts: dict[str, Any]) -> str:
    changed = facts.get("changed") or []
    text = f"{facts['fidelity']} (returned in {transfer_syntax_name(facts['returned_syntax'])})"
    return text + (f"; changed: {', '.join(changed)}" if changed else "")


# -- private attributes, UN ----------------------------------------------------------------


def _private_state(original: Dataset, returned: Dataset) -> dict[str, Any]:
    """Per private creator of the original: kept (same slot), moved (another slot of the
    group, PS3.5 7.8.1 lets a receiver re-slot a block) or dropped."""
    creators: dict[str, str] = {}
    for elem in original:
        if elem.tag.is_private_creator:
            name = str(elem.value).strip()
            slot = returned.get(elem.tag)
            if slot is not None and _text(slot.value) == name:
                creators[name] = "kept"
            elif any(e.tag.is_private_creator and e.tag.group == elem.tag.group
                     and _text(e.value) == name for e in returned):
                creators[name] = "moved"
            else:
                creators[name] = "dropped"
    private = [e.tag for e in original if e.tag.is_private and not e.tag.is_private_creator]
    present = sum(1 for tag in private if tag in returned)
    return {"creators": creators, "private_elements": len(private),
            "private_elements_returned": present}


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return value.decode("latin-1", "replace").strip(" \0")
    return str(value).strip(" \0")


@probe(
    "storage.private-tags",
    title="Private attributes and creators",
    expected="private attributes come back with their private creators, values unchanged "
    "(a Level 2 (Full) storage SCP keeps them; Levels 0/1 may discard them)",
    reference="PS3.4 B.4.1; PS3.5 7.8",
    writes=True,
)
def private_tags(ctx: ProbeContext) -> Observation:
    ds = base_object()
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", "probe private value")
    block.add_new(0x02, "US", 42)
    instance = _store_and_read(ctx, ds, f"{BASE_FILE} with a private block "
                               f"'{PRIVATE_CREATOR}' and its GE private groups")
    if isinstance(instance, Observation):
        return instance
    facts = {**_fidelity(ds, instance), **_private_state(ds, instance.dataset)}
    private_changed = [k for k in facts["changed"] if k.startswith("(")]
    facts["private_changed"] = private_changed
    states = set(facts["creators"].values())
    observed = (f"{facts['private_elements_returned']} of {facts['private_elements']} "
                f"private elements returned; creators: "
                + ", ".join(f"{c} {s}" for c, s in sorted(facts["creators"].items())))
    if states == {"kept"} and not private_changed:
        return conforms(observed, **facts)
    return differs(observed + (f"; changed: {', '.join(private_changed)}"
                               if private_changed else ""), **facts)


@probe(
    "storage.un-vr",
    title="Elements with VR UN",
    expected="the value of a UN element comes back byte for byte (a known standard tag may "
    "come back with its dictionary VR)",
    reference="PS3.5 6.2.2",
    writes=True,
)
def un_vr(ctx: ProbeContext) -> Observation:
    """A standard attribute (Institution Name) and a private one sent as UN."""
    ds = base_object()
    ds[0x00080080] = DataElement(0x00080080, "UN", b"PROBE HOSPITAL")
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "UN", b"\x01\x02\x03\x04")
    instance = _store_and_read(ctx, ds, f"{BASE_FILE} with Institution Name and a "
                               "private element as UN")
    if isinstance(instance, Observation):
        return instance
    returned = instance.dataset
    standard = returned.get(0x00080080)
    private_tag = block.get_tag(0x10)
    private = returned.get(private_tag)
    facts = {
        **_fidelity(ds, instance),
        "standard_value": _text(standard.value) if standard is not None else None,
        "standard_vr": standard.VR if standard is not None else None,
        "private_value_hex": bytes(private.value).hex() if private is not None
        and isinstance(private.value, bytes | bytearray) else None,
    }
    standard_ok = facts["standard_value"] == "PROBE HOSPITAL"
    private_ok = facts["private_value_hex"] == "01020304"
    observed = (f"Institution Name (UN) came back "
                f"{'as ' + repr(facts['standard_value']) if standard is not None else 'absent'}"
                f" (VR {facts['standard_vr']}); private UN "
                f"{'kept' if private_ok else 'changed or dropped'}")
    if standard_ok and private_ok:
        return conforms(observed, **facts)
    return differs(observed, **facts)


# -- odd length ------------------------------------------------------------------------------

_ODD = ((0x0008103E, "LO", b"ABC"), (0x00204000, "LT", b"XYZ"))  # two: the data set stays even


def _odd_length_bytes(ds: Dataset) -> bytes:
    """`ds` in Explicit VR Little Endian with the two _ODD values of length 3 (PS3.5 7.1.1
    requires even lengths; pydicom pads on writing, so the lengths are patched after)."""
    for tag, vr, value in _ODD:
        ds[tag] = DataElement(tag, vr, value.decode())
    data = encode_dataset(ds, ExplicitVRLittleEndian)
    for tag, vr, value in _ODD:
        head = Tag(tag).group.to_bytes(2, "little") + Tag(tag).element.to_bytes(2, "little")
        padded = head + vr.encode() + (4).to_bytes(2, "little") + value + b" "
        odd = head + vr.encode() + (3).to_bytes(2, "little") + value
        if data.count(padded) != 1:
            raise ValueError(f"odd-length probe: {Tag(tag)} not found once in the encoding")
        data = data.replace(padded, odd)
    return data


@probe(
    "storage.odd-length",
    title="Odd-length values",
    expected="the node refuses the object or stores it; what comes back has the same value, "
    "padded to even length",
    reference="PS3.5 7.1.1, 6.2",
    writes=True,
)
def odd_length(ctx: ProbeContext) -> Observation:
    if not accepts_get(ctx):
        return not_tested("the node offers no C-GET to read the object back")
    ds = base_object()
    data = _odd_length_bytes(ds)
    sop_class, uid = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    assoc = ctx.node.dimse(timeout_s=TIMEOUT_S).wire_association(
        [(sop_class, ExplicitVRLittleEndian)])
    try:
        context = assoc.accepted.get((sop_class, ExplicitVRLittleEndian))
        if context is None:
            return not_tested("CT Image Storage in Explicit VR Little Endian not accepted")
        answer = assoc.store(context, sop_class, uid, data)
    finally:
        assoc.release()
    ctx.record(f"C-STORE {uid}: {BASE_FILE} with Series Description 'ABC' (LO) and Image "
               "Comments 'XYZ' (LT), each of length 3", f"status 0x{answer.status:04X} "
               f"{answer.error_comment}".strip())
    if answer.status != 0 and (answer.status & 0xF000) != 0xB000:
        return conforms(f"refused with 0x{answer.status:04X}", policy="refused",
                        store_status=f"0x{answer.status:04X}", sop_instance_uid=uid)
    got, instances = read_back(ctx, ds)
    if len(instances) != 1:
        return differs(f"accepted, then not returned ({got.status})", policy="lost")
    returned = instances[0].dataset
    lengths, values = {}, {}
    for tag, _, value in _ODD:
        raw = returned.get_item(tag)
        name = str(Tag(tag))
        if raw is None:
            lengths[name], values[name] = None, None
            continue
        stored = raw.value if isinstance(raw, RawDataElement) else str(raw.value).encode()
        lengths[name] = raw.length if isinstance(raw, RawDataElement) else len(stored or b"")
        values[name] = _text(stored or b"") == value.decode()
    padded = all(n is not None and n % 2 == 0 for n in lengths.values())
    same = all(values.values())
    policy = "padded" if padded and same else "kept odd" if same else "changed"
    facts = {"policy": policy, "lengths": lengths, "values_kept": same,
             "store_status": f"0x{answer.status:04X}", "sop_instance_uid": uid}
    observed = f"accepted; returned lengths {lengths}, values {'kept' if same else 'changed'}"
    if policy == "padded":
        return conforms(observed, **facts)
    return differs(observed, **facts)


# -- text and character sets ------------------------------------------------------------------


def _text_probe(ctx: ProbeContext, ds: Dataset, keywords: Sequence[str],
                what: str) -> Observation:
    """Store, read back, compare the decoded values of `keywords`."""
    instance = _store_and_read(ctx, ds, what)
    if isinstance(instance, Observation):
        return instance
    returned = instance.dataset
    facts = _fidelity(ds, instance)
    facts["returned_charset"] = str(returned.get("SpecificCharacterSet", "") or "")
    changed = [k for k in keywords if str(returned.get(k, "")) != str(ds.get(k, ""))]
    facts["values_changed"] = changed
    for keyword in keywords:
        value = returned.get(keyword)
        facts[f"returned_{keyword}"] = None if value is None else str(value)[:120]
        facts[f"returned_{keyword}_chars"] = None if value is None else len(str(value))
    if not changed:
        return conforms(f"{', '.join(keywords)} kept; " + _summary(facts), **facts)
    return differs(f"changed: {', '.join(changed)}; " + _summary(facts), **facts)


@probe(
    "storage.long-text",
    title="Long text (UT, 70 kB)",
    expected="a UT value longer than 64 kB comes back whole (UT lengths take 32 bits)",
    reference="PS3.5 6.2 (UT), 7.1.2",
    writes=True,
)
def long_text(ctx: ProbeContext) -> Observation:
    # no trailing space: UT's trailing spaces may be dropped (PS3.5 6.2), which is no change
    text = ("Probe long text. " * (LONG_TEXT_CHARS // 17 + 1))[: LONG_TEXT_CHARS - 3] + "END"
    ds = base_object(ReasonForVisit=text)
    return _text_probe(ctx, ds, ["ReasonForVisit"],
                       f"{BASE_FILE} with Reason for Visit (UT) of {len(text)} chars")


@probe(
    "storage.charset-latin1",
    title="ISO_IR 100 (Latin-1) text",
    expected="names and text in ISO_IR 100 come back with the same characters",
    reference="PS3.5 6.1.2.3; PS3.3 C.12.1.1.2",
    writes=True,
)
def charset_latin1(ctx: ProbeContext) -> Observation:
    ds = base_object(SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jürgen",
                     InstitutionName="Hôpital Saint-Éloi")
    return _text_probe(ctx, ds, ["PatientName", "InstitutionName"],
                       f"{BASE_FILE} with ISO_IR 100 names")


@probe(
    "storage.charset-iso2022",
    title="ISO 2022 (Japanese) text",
    expected="a name in ISO 2022 IR 87 with escape sequences comes back with the same "
    "characters",
    reference="PS3.5 6.1.2.5; PS3.3 C.12.1.1.2",
    writes=True,
)
def charset_iso2022(ctx: ProbeContext) -> Observation:
    ds = base_object(SpecificCharacterSet=["", "ISO 2022 IR 87"],
                     PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう")
    return _text_probe(ctx, ds, ["PatientName"],
                       f"{BASE_FILE} with an ISO 2022 IR 87 patient name")


# -- encoding details -------------------------------------------------------------------------


def _with_group_lengths(ds: Dataset, groups: Sequence[int]) -> Dataset:
    """`ds` with correct group length elements (gggg,0000) for `groups` in Explicit VR LE."""
    for group in groups:
        members = Dataset()
        for elem in ds.group_dataset(group):
            if elem.tag.element != 0:
                members.add(copy.deepcopy(elem))
        length = len(encode_dataset(members, ExplicitVRLittleEndian))
        ds[(group << 16)] = DataElement(group << 16, "UL", length)
    return ds


@probe(
    "storage.group-length",
    title="Group length elements",
    expected="group lengths (gggg,0000) may be dropped or recomputed; the other attributes "
    "come back unchanged",
    reference="PS3.5 7.2",
    writes=True,
)
def group_length(ctx: ProbeContext) -> Observation:
    ds = _with_group_lengths(base_object(), (0x0008, 0x0010, 0x0020))
    instance = _store_and_read(ctx, ds, f"{BASE_FILE} with group lengths for groups "
                               "0008, 0010, 0020")
    if isinstance(instance, Observation):
        return instance
    returned = instance.dataset
    states = {}
    for group in (0x0008, 0x0010, 0x0020):
        elem = returned.get(group << 16)
        if elem is None:
            states[f"{group:04X}"] = "dropped"
        elif int(elem.value) == int(ds[group << 16].value):
            states[f"{group:04X}"] = "kept"
        else:
            states[f"{group:04X}"] = "recomputed"
    facts = {**_fidelity(ds, instance), "group_lengths": states}
    observed = "group lengths " + ", ".join(f"{g}: {s}" for g, s in states.items())
    if facts["fidelity"] in ("kept", "coerced"):
        return conforms(observed + "; " + _summary(facts), **facts)
    return differs(observed + "; " + _summary(facts), **facts)


@probe(
    "storage.retired-element",
    title="Retired attributes",
    expected="a retired attribute comes back unchanged (Level 2 keeps every standard "
    "attribute; retired ones may be dropped at Level 0/1)",
    reference="PS3.4 B.4.1; PS3.5 7.1 (retired elements)",
    writes=True,
)
def retired_element(ctx: ProbeContext) -> Observation:
    ds = base_object()
    ds.RecognitionCode = "PROBE-RETIRED"  # (0008,0010), retired
    ds.ImagePosition = [1, 2, 3]  # (0020,0030), retired
    instance = _store_and_read(ctx, ds, f"{BASE_FILE} with Recognition Code and "
                               "Image Position (retired)")
    if isinstance(instance, Observation):
        return instance
    returned = instance.dataset
    kept = {k: str(returned.get(k, "")) == str(ds.get(k)) for k in ("RecognitionCode",
                                                                     "ImagePosition")}
    facts = {**_fidelity(ds, instance), "retired_kept": kept}
    observed = ", ".join(f"{k} {'kept' if v else 'changed or dropped'}" for k, v in kept.items())
    if all(kept.values()):
        return conforms(observed, **facts)
    return differs(observed, **facts)


@probe(
    "storage.large-object",
    title="Large object (20 MiB)",
    expected="a 20 MiB instance is stored and comes back with identical pixels",
    reference="PS3.4 B.2; PS3.5 8.1.1",
    writes=True,
)
def large_object(ctx: ProbeContext) -> Observation:
    ds = base_object(Rows=LARGE_ROWS, Columns=LARGE_COLUMNS, BitsAllocated=16, BitsStored=16,
                     HighBit=15, PixelRepresentation=0)
    pixels = (np.arange(LARGE_ROWS * LARGE_COLUMNS, dtype=np.uint32) * 7 % 65521)
    ds.PixelData = pixels.astype("<u2").tobytes()
    digest = hashlib.sha256(ds.PixelData).hexdigest()
    instance = _store_and_read(ctx, ds, f"{BASE_FILE} resized to {LARGE_ROWS}x"
                               f"{LARGE_COLUMNS} 16-bit ({len(ds.PixelData)} bytes of "
                               "pixel data)")
    if isinstance(instance, Observation):
        return instance
    facts = {**_fidelity(ds, instance), "pixel_bytes": len(ds.PixelData),
             "returned_bytes": len(instance.encoded)}
    returned = instance.dataset.get("PixelData")
    same_bytes = returned is not None and hashlib.sha256(bytes(returned)).hexdigest() == digest
    facts["pixels_identical"] = same_bytes or facts["fidelity"] in ("kept", "coerced")
    if facts["fidelity"] in ("kept", "coerced"):
        return conforms(_summary(facts), **facts)
    return differs(_summary(facts), **facts)


@probe(
    "storage.transcoding",
    title="Transcoding on retrieval",
    expected="an object stored in Explicit VR Little Endian comes back in it when every "
    "syntax is offered, and in Implicit VR Little Endian (same content) when only that is "
    "offered: every AE supports the default syntax",
    reference="PS3.5 10.1; PS3.4 C.4.3.3",
    writes=True,
)
def transcoding(ctx: ProbeContext) -> Observation:
    ds = base_object()
    instance = _store_and_read(ctx, ds, f"{BASE_FILE} (Explicit VR Little Endian)")
    if isinstance(instance, Observation):
        return instance
    all_offered = _fidelity(ds, instance)
    got, implicit = read_back(ctx, ds, [ImplicitVRLittleEndian])
    facts: dict[str, Any] = {"all_offered": all_offered, "implicit_status":
                             f"0x{got.status.code:04X}"}
    if len(implicit) != 1:
        return differs(f"every syntax offered: {_summary(all_offered)}; Implicit VR only: "
                       f"nothing received ({got.status})", **facts, implicit_only=None)
    implicit_only = _fidelity(ds, implicit[0])
    facts["implicit_only"] = implicit_only
    observed = (f"every syntax offered: {_summary(all_offered)}; Implicit VR only: "
                f"{_summary(implicit_only)}")
    same_syntax = all_offered["returned_syntax"] == ExplicitVRLittleEndian
    if same_syntax and implicit_only["fidelity"] in ("kept", "coerced") and \
            all_offered["fidelity"] in ("kept", "coerced"):
        return conforms(observed, **facts)
    return differs(observed, **facts)


# -- duplicates ---------------------------------------------------------------------------------

FIRST, SECOND = "PROBE FIRST VERSION", "PROBE SECOND VERSION"


@probe(
    "storage.duplicate-uid",
    title="Duplicate SOP Instance UID",
    expected="a second object with the same SOP Instance UID and other content is either "
    "refused, ignored or replaces the first (the SCP decides); never kept beside it",
    reference="PS3.4 B.4.1; PS3.3 C.12.1.1.1",
    writes=True,
)
def duplicate_uid(ctx: ProbeContext) -> Observation:
    if not accepts_get(ctx):
        return not_tested("the node offers no C-GET to read the object back")
    first = base_object(ImageComments=FIRST)
    second = copy.deepcopy(first)
    second.ImageComments = SECOND
    try:
        store_objects(ctx, [first], "the first version (Image Comments "
                      f"'{FIRST}')")
    except Refused as exc:
        return not_tested(str(exc))
    report = ctx.node.dimse(timeout_s=TIMEOUT_S).store([second])
    status = report.results[0].status if report.results else None
    ctx.record(f"C-STORE {second.SOPInstanceUID} again, Image Comments '{SECOND}'",
               f"status {status}" if status else "nothing sent")
    found = ctx.node.dimse(timeout_s=TIMEOUT_S).find(
        "IMAGE", {**_keys(first), "ImageComments": None})
    ctx.record(f"C-FIND IMAGE {first.SOPInstanceUID}", f"{len(found.matches)} match(es)")
    _, instances = read_back(ctx, first)
    comments = [str(i.dataset.get("ImageComments", "")) for i in instances]
    second_ok = status is not None and status.ok
    if len(found.matches) > 1 or len(instances) > 1:
        policy = "keep-both"
    elif comments == [SECOND]:
        policy = "overwrite"
    elif comments == [FIRST]:
        policy = "keep-first" if second_ok else "reject"
    else:
        policy = "lost" if not comments else "unknown"
    facts = {"duplicate_policy": policy, "second_status": str(status) if status else None,
             "matches": len(found.matches), "returned_comments": comments,
             "sop_instance_uid": str(first.SOPInstanceUID)}
    observed = (f"second C-STORE answered {status}; {len(found.matches)} match(es); "
                f"returned: {comments}: {policy}")
    if policy in ("overwrite", "keep-first", "reject"):
        return conforms(observed, **facts)
    return differs(observed, **facts)

