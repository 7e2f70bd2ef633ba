"""Retrieval of the real-world corpus from every node kind with the harness's C-GET.

The corpus (tests/realworld.py: files nobody in this project wrote; every transfer syntax,
big endian, deflate, SEG, SR, RT, ECG) is put into each node by DCMTK's /usr/bin/storescu, an
independent sender. A file storescu cannot store into a node (e.g. dcmqrscp takes no
compressed syntax) is excluded for that node, with the reason printed. Then every study comes
back by the harness's C-GET, and is compared with what the node itself lists (Orthanc's REST
API, /usr/bin/findscu for dcmqrscp, the embedded PACS's index) and with the original files
(every attribute outside the file meta; pixels decoded by pydicom where a decoder exists).
"""

from __future__ import annotations

import re
import subprocess
from collections import defaultdict
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import UID

from harness.embedded_pacs import open_index
from harness.fixtures import pacs_cluster_factory
from harness.launch.tools import find_binary
from harness.performance.runner import _MoveSink
from tests.realworld import CorpusFile, valid_files

STORESCU, FINDSCU = "/usr/bin/storescu", "/usr/bin/findscu"
KINDS = [k for k, binary in (("embedded", None), ("dcmqrscp", "dcmqrscp"), ("orthanc", "Orthanc"))
         if binary is None or find_binary(binary)]
pytestmark = [
    pytest.mark.skipif(not Path(STORESCU).exists(), reason="DCMTK storescu not installed"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

#: storescu's option proposing a file's own compressed syntax (besides the uncompressed ones).
_PROPOSE = {
    "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu", "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.1.99": "-xd", "1.2.840.10008.1.2.2": "-xb",
}
#: Kinds that send what they hold when offered it (DCMTK's dcmqrscp sends over the first
#: context accepted for the class and converts uncompressed data to its syntax).
KEEP_SYNTAX = ("embedded", "orthanc")
_WORD_DTYPES = {"OW": "u2", "OF": "u4", "OL": "u4", "OD": "u8", "OV": "u8"}


def _storescu(node, item: CorpusFile) -> str:
    """Store one file with /usr/bin/storescu; '' when stored, else storescu's reason."""
    proc = subprocess.run(
        [STORESCU, "-R", _PROPOSE.get(item.transfer_syntax_uid, "-x="), "-aet", "PACSHARNESS",
         "-aec", node.ae_title, node.host, str(node.dicom_port), str(item.path)],
        capture_output=True, text=True, timeout=120,
    )
    if proc.returncode == 0:
        return ""
    lines = [line for line in proc.stderr.splitlines() if line.startswith(("E:", "F:"))]
    return lines[-1] if lines else f"exit {proc.returncode}"


launched = pacs_cluster_factory(
    "name: realworld\nnodes:\n" + "".join(
        f"  {kind}: {{kind: {kind}, ae_title: RW{kind.upper()[:14]}}}\n" for kind in KINDS),
    scope="module",
)


@pytest.fixture(scope="module")
def filled(launched):
    """Every kind, each filled with the corpus by storescu: (cluster, {kind: stored files})."""
    stored: dict[str, list[CorpusFile]] = {}
    for kind in KINDS:
        stored[kind] = []
        for item in valid_files():
            reason = _storescu(launched.node(kind), item)
            if reason:
                print(f"{kind}: excluded {item.name}: {reason}")
            else:
                stored[kind].append(item)
    return launched, stored


def _held(cluster, kind: str, study_uid: str) -> set[str]:
    """SOP Instance UIDs of a study as the node itself lists them (not the harness's C-FIND)."""
    node = cluster.node(kind)
    if kind == "orthanc":
        rest = node.rest()
        ids = rest._request("POST", "/tools/lookup", data=study_uid).json()
        held: set[str] = set()
        for match in ids:
            if match["Type"] == "Study":
                for instance in rest._request("GET", f"/studies/{match['ID']}/instances").json():
                    held.add(instance["MainDicomTags"]["SOPInstanceUID"])
        return held
    if kind == "embedded":
        conn = open_index(node.storage_dir)
        try:
            rows = conn.execute(
                "SELECT sop_instance_uid FROM instances WHERE study_instance_uid = ?", (study_uid,)
            ).fetchall()
        finally:
            conn.close()
        return {row[0] for row in rows}
    address = ["-aet", "PACSHARNESS", "-aec", node.ae_title, node.host, str(node.dicom_port)]
    series = _findscu(address, "SERIES", f"StudyInstanceUID={study_uid}", "SeriesInstanceUID")
    held = set()
    for one in series:
        held |= set(_findscu(address, "IMAGE", f"StudyInstanceUID={study_uid}",
                             f"SeriesInstanceUID={one}", "SOPInstanceUID"))
    return held


def _findscu(address: list[str], level: str, *keys: str) -> list[str]:
    """Values of the last key in every /usr/bin/findscu answer."""
    args = [FINDSCU, "-S", "-k", f"QueryRetrieveLevel={level}"]
    for key in keys:
        args += ["-k", key]
    proc = subprocess.run([*args, *address], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    wanted = keys[-1]
    tag = {"SeriesInstanceUID": "(0020,000e)", "SOPInstanceUID": "(0008,0018)"}[wanted]
    found = re.findall(re.escape(tag) + r" UI \[([^\]]+)\]", proc.stderr + proc.stdout)
    return [value.rstrip("\0 ") for value in found]


def _binary(value: bytes, vr: str, little: bool) -> np.ndarray:
    dtype = np.dtype(_WORD_DTYPES[vr]).newbyteorder("<" if little else ">")
    return np.frombuffer(value[: len(value) - len(value) % dtype.itemsize], dtype=dtype)


def _differences(original: Dataset, received: Dataset, path: str = "") -> list[str]:
    """Attributes whose values differ (binary words compared as numbers, whatever the byte
    order of each side's transfer syntax); pixel data is compared separately. Group lengths
    and trailing padding are encoding, not content (PS3.5 7.2, 7.5): senders drop them."""
    found = []
    tags = (set(original.keys()) | set(received.keys())) - {0x7FE00010}
    for tag in sorted(tags):
        if tag.group == 0x0002 or tag.element == 0x0000 or tag == 0xFFFCFFFC:
            continue
        if tag not in original or tag not in received:
            found.append(f"{path}{tag} only on one side")
            continue
        a, b = original[tag], received[tag]
        if a.VR == "SQ":
            if len(a.value) != len(b.value):
                found.append(f"{path}{tag} items {len(a.value)} != {len(b.value)}")
            for n, (x, y) in enumerate(zip(a.value, b.value, strict=False)):
                found += _differences(x, y, f"{path}{tag}[{n}].")
        elif a.VR in _WORD_DTYPES and isinstance(a.value, bytes) and isinstance(b.value, bytes):
            left = _binary(a.value, a.VR, original.original_encoding[1] is not False)
            right = _binary(b.value, a.VR, received.original_encoding[1] is not False)
            if not np.array_equal(left, right):
                found.append(f"{path}{tag} {a.VR} values differ")
        elif a.value != b.value:
            found.append(f"{path}{tag} {a.value!r:.40} != {b.value!r:.40}")
    return found


def _same_pixels(original: Dataset, received: Dataset) -> str:
    """'' when the pixels agree: decoded by pydicom, or the same bytes when no decoder."""
    if "PixelData" not in original:
        return "" if "PixelData" not in received else "pixel data appeared"
    try:
        expected = original.pixel_array
    except Exception:  # noqa: BLE001 - no decoder here: compare what was stored
        same = received.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        return "" if same and received.PixelData == original.PixelData else "pixel bytes differ"
    if not np.array_equal(received.pixel_array, expected):
        return "decoded pixels differ"
    return ""


@pytest.mark.parametrize("kind", KINDS)
def test_cget_returns_every_held_instance_unchanged(filled, kind):
    cluster, stored = filled
    client = cluster.node(kind).dimse(timeout_s=120)
    by_study: dict[str, list[CorpusFile]] = defaultdict(list)
    for item in stored[kind]:
        by_study[item.study_uid].append(item)
    assert by_study, f"{kind}: storescu stored nothing"
    retrieved = held_total = 0
    problems = []
    for study_uid, items in sorted(by_study.items()):
        held = _held(cluster, kind, study_uid)
        assert {i.sop_instance_uid for i in items} <= held, f"{kind}: {study_uid} not all held"
        got = client.get("STUDY", {"StudyInstanceUID": study_uid})
        received = {i.sop_instance_uid: i for i in got.instances}
        held_total += len(held)
        retrieved += len(received)
        if set(received) != held or not got.ok:
            problems.append(f"{study_uid}: {got.status}, {len(received)} of {len(held)} "
                            f"(failed {got.failed_sop_instance_uids})")
        for item in items:
            if item.sop_instance_uid not in received:
                continue
            syntax = received[item.sop_instance_uid].transfer_syntax_uid
            if kind in KEEP_SYNTAX and syntax != item.transfer_syntax_uid:
                problems.append(f"{item.name}: transcoded to {UID(syntax).name}")
            original = dcmread(item.path)
            copy = received[item.sop_instance_uid].dataset
            differ = _differences(original, copy)
            pixels = _same_pixels(original, copy)
            if differ or pixels:
                problems.append(f"{item.name} (came in {UID(syntax).name}): {pixels} {differ[:3]}")
    print(f"{kind}: retrieved {retrieved} of {held_total} held instances")
    assert not problems, "\n".join(problems)
    assert retrieved == held_total


def test_cmove_to_the_harness_receiver_delivers_every_instance(filled):
    """Orthanc moves each study to the harness's own Storage SCP, which takes every class in
    every syntax: nothing fails, every held instance arrives."""
    cluster, stored = filled
    if "orthanc" not in stored:
        pytest.skip("Orthanc not installed")
    sink = _MoveSink(cluster.harness_port)
    try:
        client = cluster.node("orthanc").dimse(timeout_s=120)
        held = moved = 0
        for study_uid in sorted({item.study_uid for item in stored["orthanc"]}):
            count = len(_held(cluster, "orthanc", study_uid))
            result = client.move("PACSHARNESS", "STUDY", {"StudyInstanceUID": study_uid})
            assert result.ok and result.failed == 0, (study_uid, result)
            held += count
            moved += result.completed
    finally:
        sink.stop()
    assert moved == held and sink.received == held


@pytest.mark.parametrize("kind", KINDS)
def test_one_cget_of_every_study_at_once(filled, kind):
    """All studies in one C-GET (a UID list): more SOP classes than one association can offer
    in every syntax, so the harness splits the retrieve by class; nothing is lost."""
    cluster, stored = filled
    studies = sorted({item.study_uid for item in stored[kind]})
    held = set().union(*(_held(cluster, kind, study) for study in studies))
    classes = {item.sop_class_uid for item in stored[kind]}
    assert len(classes) > 3  # more than fit in one association with every syntax
    got = cluster.node(kind).dimse(timeout_s=120).get("STUDY", {"StudyInstanceUID": studies})
    assert got.ok, (got.status, got.failed_sop_instance_uids)
    assert {i.sop_instance_uid for i in got.instances} == held
    assert got.completed == len(held)


def test_wado_returns_each_instance_in_its_stored_syntax(filled):
    """WADO-RS asks for transfer-syntax=*: Orthanc answers with what it holds, untranscoded."""
    cluster, stored = filled
    if "orthanc" not in stored:
        pytest.skip("Orthanc not installed")
    web = cluster.node("orthanc").dicomweb()
    assert web is not None
    expected = {item.sop_instance_uid: item.transfer_syntax_uid for item in stored["orthanc"]}
    seen = {}
    for study in sorted({item.study_uid for item in stored["orthanc"]}):
        for part in web.retrieve_study(study):
            meta = dcmread(BytesIO(part), stop_before_pixels=True)
            seen[str(meta.SOPInstanceUID)] = str(meta.file_meta.TransferSyntaxUID)
    assert seen == expected


def test_a_study_of_known_classes_costs_one_association(filled):
    """The look-up and the C-GET share the association once the peer's classes were met:
    retrieving a study again opens exactly one association (counted in the node's own log)."""
    cluster, stored = filled
    if "embedded" not in stored:
        pytest.skip("embedded PACS not started")
    node = cluster.node("embedded")
    study = next(item.study_uid for item in stored["embedded"]
                 if item.name == "pydicom/CT_small.dcm")
    client = node.dimse()
    assert client.get("STUDY", {"StudyInstanceUID": study}).ok  # meets CT Image Storage
    before = node.log_path.read_text().count("association accepted calling=PACSHARNESS")
    again = client.get("STUDY", {"StudyInstanceUID": study})
    after = node.log_path.read_text().count("association accepted calling=PACSHARNESS")
    assert again.ok and len(again.instances) == 1
    assert after - before == 1
