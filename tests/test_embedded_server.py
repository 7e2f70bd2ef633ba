"""The embedded PACS, exercised as a real subprocess by real clients (pynetdicom and DCMTK).

Every server binds to 127.0.0.1 only and is always terminated by a fixture finalizer.
A module-scoped pair of nodes (LEGACY with DEST as its C-MOVE peer) holds a fixed corpus
for the read-only tests; tests that write or stop a node get their own scratch node.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pynetdicom
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from harness.embedded_pacs import COLUMNS, open_index, statistics, wipe_storage
from harness.launch.images import harness_files_of, recipes
from harness.launch.ports import free_port

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
STORESCU = Path("/usr/bin/storescu")
ECHOSCU = Path("/usr/bin/echoscu")
FINDSCU = Path("/usr/bin/findscu")
needs_dcmtk = pytest.mark.skipif(
    not (STORESCU.exists() and ECHOSCU.exists() and FINDSCU.exists()),
    reason="DCMTK not installed (/usr/bin/storescu, echoscu, findscu absent)",
)
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")
PATIENT_NAMES = ("Müller", "Jürgen", "Smith", "Doe", "Dcmtk^")
PATIENT_IDS = ("PAT-001", "PAT-002", "PAT-003", "PAT-DCMTK")


# ---------------------------------------------------------------------------------------------
# Server processes
# ---------------------------------------------------------------------------------------------


@dataclass
class Node:
    ae_title: str
    storage: Path
    proc: subprocess.Popen[str]
    port: int = 0
    log: list[str] = field(default_factory=list)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop the server (never leaves it running); returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def file_of(self, ds: Dataset) -> Path:
        return (
            self.storage
            / "files"
            / ds.StudyInstanceUID
            / ds.SeriesInstanceUID
            / (f"{ds.SOPInstanceUID}.dcm")
        )


def start_node(
    ae_title: str,
    storage: Path,
    finalizer: Callable[[Callable[[], object]], None],
    peers: Path | None = None,
    port: int = 0,
    extra_args: tuple[str, ...] = (),
    code_root: Path = REPO,
) -> Node:
    """Start ``python -m harness.embedded_pacs`` and wait for its listening line.

    With another ``code_root`` the node runs as in the container image: only that directory
    and pydicom's and pynetdicom's on the path, ``-S`` keeping site-packages (and the
    editable install of the whole harness) out.
    """
    path = [str(code_root), os.environ.get("PYTHONPATH", "")]
    flags: list[str] = []
    if code_root != REPO:
        flags = ["-S"]
        path = [str(code_root), *{str(Path(m.__file__).parents[1]) for m in (pydicom, pynetdicom)}]
    cmd = [
        sys.executable,
        *flags,
        "-m",
        "harness.embedded_pacs",
        "--ae-title",
        ae_title,
        "--port",
        str(port),
        "--storage",
        str(storage),
        "--host",
        HOST,
        "--log-level",
        "debug",
    ]
    if peers is not None:
        cmd += ["--peers", str(peers)]
    cmd += extra_args
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.Popen(
        cmd,
        cwd=code_root,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    node = Node(ae_title, storage, proc)
    finalizer(node.stop)
    ready = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            node.log.append(line)
            if "listening on" in line and not ready.is_set():
                node.port = int(line.rsplit(":", 1)[1])
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(30) or node.port == 0:
        node.stop()
        pytest.fail(f"{ae_title} did not start:\n{''.join(node.log)}")
    assert f"embedded PACS {ae_title} listening on {HOST}:{node.port}" in "".join(node.log)
    if port:
        assert node.port == port
    return node


# Calling AE titles of this module's clients: a node with a peers file accepts only its peers.
CLIENT_TITLES = ("ECHOSCU", "STORESCU", "FINDSCU", "GETSCU", "MOVESCU", "DCMTKECHO", "DCMTKFIND")


def write_peers(path: Path, peers: dict[str, int]) -> None:
    """Replace the peers file atomically, as the harness does while the server runs; the
    clients' titles are listed too (port 9, discard: never a C-MOVE destination here)."""
    table = {title: {"host": HOST, "port": 9} for title in CLIENT_TITLES}
    table.update({title: {"host": HOST, "port": port} for title, port in peers.items()})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Data sets and clients
# ---------------------------------------------------------------------------------------------


def pixels(seed: int) -> np.ndarray:
    return ((np.arange(64, dtype=np.uint16).reshape(8, 8) * (seed + 3)) % 4096).astype(np.uint16)


def make_image(
    *,
    sop_class: str,
    patient: tuple[str, str],
    study: str,
    series: str,
    modality: str,
    study_date: str,
    number: int,
    ts: str,
    charset: str | None = None,
    description: str = "Head routine",
) -> Dataset:
    """A small valid CT/MR image; RLE Lossless via pydicom's own encoder (no extra package)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    sop_instance = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.PatientName, ds.PatientID = patient
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.AccessionNumber = f"ACC{study[-6:]}"
    ds.StudyDescription = description
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels(number).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if ts == RLELossless else ts
    if ts == RLELossless:
        ds.compress(RLELossless)
    return ds


def client(title: str, *contexts: tuple[str, list[str] | str]) -> AE:
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, syntaxes)
    return ae


def store(node: Node, datasets: list[Dataset], title: str = "STORESCU") -> list[int]:
    pairs = dict.fromkeys((d.SOPClassUID, d.file_meta.TransferSyntaxUID) for d in datasets)
    ae = client(title, *pairs)
    assoc = ae.associate(HOST, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(d).Status) for d in datasets]
    finally:
        assoc.release()


def find(node: Node, model: str, **keys: object) -> tuple[list[Dataset], int]:
    query = Dataset()
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    assoc = client("FINDSCU", (model, [ExplicitVRLittleEndian])).associate(
        HOST, node.port, ae_title=node.ae_title
    )
    assert assoc.is_established
    found: list[Dataset] = []
    final = -1
    try:
        for status, identifier in assoc.send_c_find(query, model):
            if status.Status in (0xFF00, 0xFF01):
                found.append(identifier)
            else:
                final = int(status.Status)
    finally:
        assoc.release()
    return found, final


def uids(found: list[Dataset], keyword: str) -> set[str]:
    return {str(d.get(keyword)) for d in found}


def get(
    node: Node, storage_contexts: list[tuple[str, list[str]]], **keys: object
) -> tuple[Dataset, dict[str, tuple[str, Dataset]]]:
    """C-GET; returns the final status and {SOPInstanceUID: (transfer syntax, dataset)}."""
    ae = client(
        "GETSCU",
        (StudyRootQueryRetrieveInformationModelGet, [ExplicitVRLittleEndian]),
        *storage_contexts,
    )
    received: dict[str, tuple[str, Dataset]] = {}

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        received[ds.SOPInstanceUID] = (str(event.context.transfer_syntax), ds)
        return 0x0000

    roles = [build_role(abstract, scp_role=True) for abstract, _ in storage_contexts]
    assoc = ae.associate(
        HOST,
        node.port,
        ae_title=node.ae_title,
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    query = Dataset()
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    final = Dataset()
    try:
        for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            if status and status.Status not in (0xFF00, 0xFF01):
                final = status
    finally:
        assoc.release()
    return final, received


def move(node: Node, destination: str, **keys: object) -> Dataset:
    ae = client("MOVESCU", (StudyRootQueryRetrieveInformationModelMove, [ExplicitVRLittleEndian]))
    assoc = ae.associate(HOST, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    query = Dataset()
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    final = Dataset()
    try:
        for status, _ in assoc.send_c_move(
            query, destination, StudyRootQueryRetrieveInformationModelMove
        ):
            if status and status.Status not in (0xFF00, 0xFF01):
                final = status
    finally:
        assoc.release()
    return final


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    legacy: Node
    dest: Node
    peers: Path
    studies: dict[str, str]
    series: dict[str, str]
    images: dict[str, Dataset]  # name -> dataset as sent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Corpus:
    base = tmp_path_factory.mktemp("pacs")
    dest = start_node("DEST", base / "dest", request.addfinalizer)
    peers = base / "peers.json"
    write_peers(peers, {"DEST": dest.port})
    legacy = start_node(
        "LEGACY", base / "legacy", request.addfinalizer, peers=peers, port=free_port(HOST)
    )
    st = {k: generate_uid() for k in ("ST1", "ST2", "ST3", "ST4")}
    se = {k: generate_uid() for k in ("SE1", "SE2", "SE3", "SE4")}
    muller = ("Müller^Jürgen", "PAT-001")
    images = {
        "ct1": make_image(
            sop_class=CTImageStorage,
            patient=muller,
            study=st["ST1"],
            series=se["SE1"],
            modality="CT",
            study_date="20200315",
            number=1,
            ts=ImplicitVRLittleEndian,
            charset="ISO_IR 192",
        ),
        "ct2": make_image(
            sop_class=CTImageStorage,
            patient=muller,
            study=st["ST1"],
            series=se["SE1"],
            modality="CT",
            study_date="20200315",
            number=2,
            ts=ExplicitVRLittleEndian,
            charset="ISO_IR 192",
        ),
        "mr_rle": make_image(
            sop_class=MRImageStorage,
            patient=("Smith^John", "PAT-002"),
            study=st["ST2"],
            series=se["SE2"],
            modality="MR",
            study_date="20210610",
            number=1,
            ts=RLELossless,
            description="Knee",
        ),
        "ct3": make_image(
            sop_class=CTImageStorage,
            patient=("Doe^Jane", "PAT-003"),
            study=st["ST3"],
            series=se["SE3"],
            modality="CT",
            study_date="20190101",
            number=1,
            ts=ExplicitVRLittleEndian,
        ),
        "mr4": make_image(
            sop_class=MRImageStorage,
            patient=("Doe^Jane", "PAT-003"),
            study=st["ST4"],
            series=se["SE4"],
            modality="MR",
            study_date="20220202",
            number=1,
            ts=ExplicitVRLittleEndian,
        ),
    }
    assert store(legacy, list(images.values())) == [0] * len(images)
    return Corpus(legacy, dest, peers, st, se, images)


@pytest.fixture
def scratch(tmp_path: Path, request: pytest.FixtureRequest) -> Node:
    return start_node("SCRATCH", tmp_path / "scratch", request.addfinalizer)


# ---------------------------------------------------------------------------------------------
# Verification and storage
# ---------------------------------------------------------------------------------------------


def test_echo(corpus: Corpus) -> None:
    assoc = client("ECHOSCU", (Verification, [ExplicitVRLittleEndian])).associate(
        HOST, corpus.legacy.port, ae_title="LEGACY"
    )
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_store_writes_files_as_received_and_indexes_them(corpus: Corpus) -> None:
    legacy = corpus.legacy
    conn = open_index(legacy.storage / "index.sqlite")
    try:
        rows = {r["sop_instance_uid"]: r for r in conn.execute("SELECT * FROM instances")}
        names = [r[1] for r in conn.execute("PRAGMA table_info(instances)")]
    finally:
        conn.close()
    assert set(COLUMNS) <= set(names)
    assert len(rows) == 5
    for ds in corpus.images.values():
        path = legacy.file_of(ds)
        assert path.is_file()
        row = rows[ds.SOPInstanceUID]
        assert row["path"] == path.relative_to(legacy.storage).as_posix()
        assert row["size_bytes"] == path.stat().st_size
        assert row["transfer_syntax_uid"] == ds.file_meta.TransferSyntaxUID
        assert row["store_status"] == 0
        assert row["calling_ae_title"] == "STORESCU"
        stored = dcmread(path)
        assert stored.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert stored.PixelData == ds.PixelData  # compressed RLE fragments included
    ct1 = rows[corpus.images["ct1"].SOPInstanceUID]
    assert ct1["patient_name"] == "Müller^Jürgen"
    assert ct1["specific_character_set"] == "ISO_IR 192"
    assert (ct1["study_date"], ct1["modality"], ct1["instance_number"]) == ("20200315", "CT", "1")
    assert not list((legacy.storage / "tmp").iterdir())


# ---------------------------------------------------------------------------------------------
# C-FIND
# ---------------------------------------------------------------------------------------------


def test_find_patient_level(corpus: Corpus) -> None:
    model = PatientRootQueryRetrieveInformationModelFind
    found, status = find(
        corpus.legacy,
        model,
        QueryRetrieveLevel="PATIENT",
        SpecificCharacterSet="ISO_IR 192",
        PatientName="mü*",
        PatientID="",
        NumberOfPatientRelatedStudies="",
    )
    assert status == 0x0000
    assert len(found) == 1
    (hit,) = found
    assert str(hit.PatientName) == "Müller^Jürgen"  # non-ASCII round trip, PN case-insensitive
    assert hit.SpecificCharacterSet == "ISO_IR 192"
    assert (hit.PatientID, hit.QueryRetrieveLevel) == ("PAT-001", "PATIENT")
    assert int(hit.NumberOfPatientRelatedStudies) == 1

    found, status = find(
        corpus.legacy,
        model,
        QueryRetrieveLevel="PATIENT",
        PatientID="PAT-00?",
        NumberOfPatientRelatedStudies="",
        NumberOfPatientRelatedInstances="",
    )
    assert status == 0x0000
    counts = {
        d.PatientID: (int(d.NumberOfPatientRelatedStudies), int(d.NumberOfPatientRelatedInstances))
        for d in found
    }
    assert counts == {"PAT-001": (1, 2), "PAT-002": (1, 1), "PAT-003": (2, 2)}


def test_find_study_level(corpus: Corpus) -> None:
    st = corpus.studies
    model = StudyRootQueryRetrieveInformationModelFind

    def studies(**keys: object) -> set[str]:
        found, status = find(
            corpus.legacy, model, QueryRetrieveLevel="STUDY", StudyInstanceUID="", **keys
        )
        assert status == 0x0000
        return uids(found, "StudyInstanceUID")

    assert studies(StudyDate="20200101-20211231") == {st["ST1"], st["ST2"]}
    assert studies(StudyDate="-2020") == {st["ST1"], st["ST3"]}
    assert studies(StudyDate="2021-") == {st["ST2"], st["ST4"]}
    assert studies(StudyDate="20190101") == {st["ST3"]}
    assert studies(StudyDate="") == set(st.values())
    assert studies(ModalitiesInStudy="MR") == {st["ST2"], st["ST4"]}
    assert studies(StudyDescription="Head*") == {st["ST1"], st["ST3"], st["ST4"]}
    assert studies(StudyDescription="head*") == set()  # wildcards case-sensitive except PN
    assert studies(PatientName="DOE^*") == {st["ST3"], st["ST4"]}

    found, status = find(
        corpus.legacy,
        model,
        QueryRetrieveLevel="STUDY",
        StudyInstanceUID=st["ST1"],
        PatientName="",
        StudyDate="",
        ModalitiesInStudy="",
        NumberOfStudyRelatedSeries="",
        NumberOfStudyRelatedInstances="",
        SeriesInstanceUID="",
    )
    assert status == 0x0000
    (hit,) = found
    assert str(hit.PatientName) == "Müller^Jürgen"
    assert hit.StudyDate == "20200315"
    assert hit.ModalitiesInStudy == "CT"
    assert (int(hit.NumberOfStudyRelatedSeries), int(hit.NumberOfStudyRelatedInstances)) == (1, 2)
    assert hit.SeriesInstanceUID in ("", None)  # below the query level: returned empty
    assert hit.RetrieveAETitle == "LEGACY"


def test_find_series_level_uid_list(corpus: Corpus) -> None:
    st, se = corpus.studies, corpus.series
    model = StudyRootQueryRetrieveInformationModelFind
    found, status = find(
        corpus.legacy,
        model,
        QueryRetrieveLevel="SERIES",
        StudyInstanceUID=[st["ST1"], st["ST2"]],
        SeriesInstanceUID="",
        Modality="",
        NumberOfSeriesRelatedInstances="",
    )
    assert status == 0x0000
    got = {d.SeriesInstanceUID: (d.Modality, int(d.NumberOfSeriesRelatedInstances)) for d in found}
    assert got == {se["SE1"]: ("CT", 2), se["SE2"]: ("MR", 1)}

    found, status = find(
        corpus.legacy, model, QueryRetrieveLevel="SERIES", SeriesInstanceUID="", Modality="C?"
    )
    assert status == 0x0000
    assert uids(found, "SeriesInstanceUID") == {se["SE1"], se["SE3"]}


def test_find_image_level(corpus: Corpus) -> None:
    img = corpus.images
    model = StudyRootQueryRetrieveInformationModelFind
    wanted = [img["ct1"].SOPInstanceUID, img["ct2"].SOPInstanceUID, "1.2.3.4.5.404"]
    found, status = find(
        corpus.legacy,
        model,
        QueryRetrieveLevel="IMAGE",
        StudyInstanceUID=corpus.studies["ST1"],
        SeriesInstanceUID=corpus.series["SE1"],
        SOPInstanceUID=wanted,
        InstanceNumber="",
        SOPClassUID="",
    )
    assert status == 0x0000
    assert {d.SOPInstanceUID: int(d.InstanceNumber) for d in found} == {
        img["ct1"].SOPInstanceUID: 1,
        img["ct2"].SOPInstanceUID: 2,
    }
    assert uids(found, "SOPClassUID") == {CTImageStorage}

    found, status = find(
        corpus.legacy,
        model,
        QueryRetrieveLevel="IMAGE",
        SeriesInstanceUID=corpus.series["SE1"],
        SOPInstanceUID="",
        InstanceNumber="2",
    )
    assert status == 0x0000
    assert uids(found, "SOPInstanceUID") == {img["ct2"].SOPInstanceUID}


def test_find_rejects_invalid_identifiers(corpus: Corpus) -> None:
    _, status = find(
        corpus.legacy,
        StudyRootQueryRetrieveInformationModelFind,
        QueryRetrieveLevel="PATIENT",
        PatientID="",
    )
    assert status == 0xA900  # PATIENT level exists only in Patient Root
    _, status = find(corpus.legacy, StudyRootQueryRetrieveInformationModelFind, PatientID="")
    assert status == 0xA900


# ---------------------------------------------------------------------------------------------
# C-GET and C-MOVE
# ---------------------------------------------------------------------------------------------


def test_get_sends_stored_data_unchanged(corpus: Corpus) -> None:
    img = corpus.images
    final, received = get(
        corpus.legacy,
        [
            (CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
            (MRImageStorage, [RLELossless]),
        ],
        QueryRetrieveLevel="STUDY",
        StudyInstanceUID=[corpus.studies["ST1"], corpus.studies["ST2"]],
    )
    assert final.Status == 0x0000
    assert final.NumberOfCompletedSuboperations == 3
    assert set(received) == {img[k].SOPInstanceUID for k in ("ct1", "ct2", "mr_rle")}
    for key in ("ct1", "ct2", "mr_rle"):
        ts, ds = received[img[key].SOPInstanceUID]
        assert ds.PixelData == img[key].PixelData
    assert received[img["mr_rle"].SOPInstanceUID][0] == RLELossless


def test_get_decompresses_for_a_requestor_without_the_stored_syntax(corpus: Corpus) -> None:
    mr = corpus.images["mr_rle"]
    final, received = get(
        corpus.legacy,
        [(MRImageStorage, [ExplicitVRLittleEndian])],
        QueryRetrieveLevel="IMAGE",
        StudyInstanceUID=mr.StudyInstanceUID,
        SeriesInstanceUID=mr.SeriesInstanceUID,
        SOPInstanceUID=mr.SOPInstanceUID,
    )
    assert final.Status == 0x0000
    ts, ds = received[mr.SOPInstanceUID]
    assert ts == ExplicitVRLittleEndian
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    np.testing.assert_array_equal(ds.pixel_array, pixels(1))


def test_get_without_usable_context_is_a_failed_suboperation(corpus: Corpus) -> None:
    mr = corpus.images["mr_rle"]
    final, received = get(
        corpus.legacy,
        [(MRImageStorage, [JPEGBaseline8Bit])],
        QueryRetrieveLevel="SERIES",
        StudyInstanceUID=mr.StudyInstanceUID,
        SeriesInstanceUID=mr.SeriesInstanceUID,
    )
    assert received == {}
    assert final.Status == 0xA702  # all sub-operations failed
    assert final.NumberOfFailedSuboperations == 1
    test_echo(corpus)  # still serving


def test_get_requires_the_level_key(corpus: Corpus) -> None:
    final, _ = get(
        corpus.legacy,
        [(CTImageStorage, [ExplicitVRLittleEndian])],
        QueryRetrieveLevel="SERIES",
        StudyInstanceUID=corpus.studies["ST1"],
    )
    assert final.Status == 0xA900


def test_move_to_peer_arrives_byte_identical(corpus: Corpus) -> None:
    final = move(
        corpus.legacy,
        "DEST",
        QueryRetrieveLevel="STUDY",
        StudyInstanceUID=[corpus.studies["ST1"], corpus.studies["ST2"]],
    )
    assert final.Status == 0x0000
    assert final.NumberOfCompletedSuboperations == 3
    for key in ("ct1", "ct2", "mr_rle"):
        ds = corpus.images[key]
        sent = corpus.legacy.file_of(ds).read_bytes()
        arrived = corpus.dest.file_of(ds).read_bytes()
        assert arrived == sent, key
    conn = open_index(corpus.dest.storage)
    try:
        (calling,) = {r[0] for r in conn.execute("SELECT calling_ae_title FROM instances")}
    finally:
        conn.close()
    assert calling == "LEGACY"


def test_move_unknown_destination(corpus: Corpus) -> None:
    final = move(
        corpus.legacy, "NOWHERE", QueryRetrieveLevel="STUDY", StudyInstanceUID=corpus.studies["ST3"]
    )
    assert final.Status == 0xA801


def test_move_rereads_peers_file(corpus: Corpus) -> None:
    """A destination added to the peers file while the server runs is used at once (it
    answers to its own AE title: the embedded nodes check the called AE title)."""
    ct3 = corpus.images["ct3"]
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    scp = AE(ae_title="LATECOMER")
    scp.add_supported_context(ct3.SOPClassUID, ALL_TRANSFER_SYNTAXES)
    server = scp.start_server((HOST, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None
    try:
        write_peers(
            corpus.peers, {"DEST": corpus.dest.port, "LATECOMER": server.server_address[1]}
        )
        final = move(
            corpus.legacy,
            "LATECOMER",
            QueryRetrieveLevel="STUDY",
            StudyInstanceUID=corpus.studies["ST3"],
        )
    finally:
        write_peers(corpus.peers, {"DEST": corpus.dest.port})
        server.shutdown()
    assert final.Status == 0x0000
    assert ct3.SOPInstanceUID in received


def test_move_decompresses_for_a_peer_without_the_stored_syntax(corpus: Corpus) -> None:
    """A destination that only takes uncompressed MR gets the RLE instance decompressed."""
    mr = corpus.images["mr_rle"]
    received: dict[str, tuple[str, Dataset]] = {}

    def on_store(event: evt.Event) -> int:
        received[event.request.AffectedSOPInstanceUID] = (
            str(event.context.transfer_syntax),
            event.dataset,
        )
        return 0x0000

    scp = AE(ae_title="PLAIN")
    scp.add_supported_context(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = scp.start_server((HOST, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None
    try:
        write_peers(corpus.peers, {"DEST": corpus.dest.port, "PLAIN": server.server_address[1]})
        final = move(
            corpus.legacy, "PLAIN", QueryRetrieveLevel="STUDY", StudyInstanceUID=mr.StudyInstanceUID
        )
    finally:
        write_peers(corpus.peers, {"DEST": corpus.dest.port})
        server.shutdown()
    assert final.Status == 0x0000
    ts, ds = received[mr.SOPInstanceUID]
    assert ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    np.testing.assert_array_equal(ds.pixel_array, pixels(1))


def _big_endian_file() -> Path:
    """A real explicit VR big endian image (pydicom's test file, 16-bit OW pixel data)."""
    from tests.realworld import valid_files

    name = "pynetdicom/MRImageStorage_ExplicitVRBigEndian.dcm"
    (found,) = [f.path for f in valid_files() if f.name == name]
    return found


@pytest.mark.parametrize("accepted", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_get_converts_big_endian_for_a_requestor_without_it(scratch: Node, accepted: str) -> None:
    """Stored big endian, asked for by a requestor taking only a little endian syntax: the
    OW pixel data is byte-swapped, so the decoded pixels equal the original's."""
    original = dcmread(_big_endian_file())
    assert store(scratch, [original]) == [0x0000]
    final, received = get(
        scratch,
        [(MRImageStorage, [accepted])],
        QueryRetrieveLevel="STUDY",
        StudyInstanceUID=original.StudyInstanceUID,
    )
    assert final.Status == 0x0000
    ts, ds = received[original.SOPInstanceUID]
    assert ts == accepted
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)
    assert ds.PatientName == original.PatientName and ds.Rows == original.Rows


def test_move_converts_big_endian_for_a_destination_without_it(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    original = dcmread(_big_endian_file())
    received: dict[str, tuple[str, Dataset]] = {}

    def on_store(event: evt.Event) -> int:
        received[event.request.AffectedSOPInstanceUID] = (
            str(event.context.transfer_syntax),
            event.dataset,
        )
        return 0x0000

    scp = AE(ae_title="LITTLE")
    scp.add_supported_context(MRImageStorage, [ExplicitVRLittleEndian])
    server = scp.start_server((HOST, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None
    request.addfinalizer(server.shutdown)
    peers = tmp_path / "peers.json"
    write_peers(peers, {"LITTLE": server.server_address[1]})
    source = start_node("SOURCE", tmp_path / "source", request.addfinalizer, peers=peers)
    assert store(source, [original]) == [0x0000]
    final = move(
        source, "LITTLE", QueryRetrieveLevel="STUDY", StudyInstanceUID=original.StudyInstanceUID
    )
    assert final.Status == 0x0000
    ts, ds = received[original.SOPInstanceUID]
    assert ts == ExplicitVRLittleEndian
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)


def test_store_refuses_damaged_files_with_a_reason(scratch: Node) -> None:
    """The real-world corpus's invalid files that pydicom reads and pynetdicom sends as they
    are (the harness's own sender refuses them before the wire) are refused at C-STORE with
    an Error Comment naming the reason (PS3.4 B.2.3): nothing of them is stored, and the log
    has no traceback."""
    from tests.realworld import invalid_files

    sendable = {}
    for item in invalid_files():
        try:
            ds = dcmread(item.path)
        except Exception:  # noqa: BLE001 - not even pydicom reads it: nobody can send it
            continue
        uids = ("SOPClassUID", "SOPInstanceUID")
        if all(ds.get(k) for k in uids) and ds.file_meta.get("TransferSyntaxUID"):
            sendable[item.path.name] = ds
    assert "MR_truncated.dcm" in sendable
    answers = {}
    for name, ds in sendable.items():
        ae = client("STORESCU", (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID))
        assoc = ae.associate(HOST, scratch.port, ae_title=scratch.ae_title)
        assert assoc.is_established, name
        try:
            answers[name] = assoc.send_c_store(ds)
        finally:
            assoc.release()
    for name, rsp in answers.items():
        assert int(rsp.Status) in (0xA900, 0xC000), (name, rsp)
        assert str(rsp.get("ErrorComment", "")).strip(), name
    assert "pixel data 8130 bytes, expected 8192" in str(answers["MR_truncated.dcm"].ErrorComment)
    assert statistics(scratch.storage)["instances"] == 0
    assert list((scratch.storage / "files").rglob("*.dcm")) == []
    log = "".join(scratch.log)
    assert log.count("refused:") >= len(answers)
    assert "Traceback" not in log


# ---------------------------------------------------------------------------------------------
# Adapter API, replacement, shutdown
# ---------------------------------------------------------------------------------------------


def test_statistics_replace_and_wipe_while_running(scratch: Node) -> None:
    st1, st2, se1, se2, se3 = (generate_uid() for _ in range(5))
    common = {
        "modality": "CT",
        "study_date": "20230101",
        "ts": ExplicitVRLittleEndian,
        "sop_class": CTImageStorage,
    }
    a = make_image(patient=("Alpha^A", "P-A"), study=st1, series=se1, number=1, **common)
    b = make_image(patient=("Alpha^A", "P-A"), study=st1, series=se2, number=1, **common)
    c = make_image(patient=("Beta^B", "P-B"), study=st2, series=se3, number=1, **common)
    assert store(scratch, [a, b, c]) == [0, 0, 0]
    assert statistics(scratch.storage) == {"patients": 2, "studies": 2, "series": 3, "instances": 3}

    b.SeriesDescription = "replaced"
    assert store(scratch, [b]) == [0]  # same SOP Instance UID again: replaced, still 0x0000
    assert statistics(scratch.storage)["instances"] == 3
    conn = open_index(scratch.storage)
    try:
        (desc,) = conn.execute(
            "SELECT series_description FROM instances WHERE sop_instance_uid = ?",
            (b.SOPInstanceUID,),
        ).fetchone()
    finally:
        conn.close()
    assert desc == "replaced"

    assert wipe_storage(scratch.storage) == 3
    assert statistics(scratch.storage) == {"patients": 0, "studies": 0, "series": 0, "instances": 0}
    assert not [p for p in (scratch.storage / "files").rglob("*") if p.is_file()]
    found, status = find(
        scratch,
        StudyRootQueryRetrieveInformationModelFind,
        QueryRetrieveLevel="STUDY",
        StudyInstanceUID="",
    )
    assert (found, status) == ([], 0x0000)

    assert store(scratch, [c]) == [0]  # the running server keeps working after a wipe
    assert statistics(scratch.storage)["instances"] == 1
    assert scratch.file_of(c).is_file()
    assert scratch.stop(signal.SIGINT) == 0


def test_sigterm_exits_zero(scratch: Node) -> None:
    assert scratch.stop(signal.SIGTERM) == 0
    assert any("shutting down" in line for line in scratch.log)


def test_runs_from_the_container_images_files_alone(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The files the embedded image carries of the harness (harness/launch/images.py) are a
    working node on their own: any import of another harness module would fail here."""
    code = tmp_path / "opt-pacs-harness"
    for relative, content in harness_files_of(recipes()["embedded"]).items():
        (code / relative).parent.mkdir(parents=True, exist_ok=True)
        (code / relative).write_bytes(content)
    assert (code / "harness/__init__.py").read_bytes() == b""
    node = start_node("BOXED", tmp_path / "storage", request.addfinalizer, code_root=code)
    study, series = generate_uid(), generate_uid()
    image = make_image(
        sop_class=CTImageStorage,
        patient=("Boxed^B", "P-BOX"),
        study=study,
        series=series,
        modality="CT",
        study_date="20240102",
        number=1,
        ts=ExplicitVRLittleEndian,
    )
    assert store(node, [image]) == [0]
    found, status = find(
        node,
        StudyRootQueryRetrieveInformationModelFind,
        QueryRetrieveLevel="STUDY",
        StudyInstanceUID="",
    )
    assert (uids(found, "StudyInstanceUID"), status) == ({study}, 0x0000)
    assert dcmread(node.file_of(image)).SOPInstanceUID == image.SOPInstanceUID
    assert node.stop() == 0
    assert not any("Traceback" in line for line in node.log)


def test_an_index_of_a_newer_schema_version_is_refused_in_one_line(tmp_path: Path) -> None:
    """A storage directory a newer harness wrote: exit 2, one line naming the index, the file
    left as it was (checked with the sqlite3 module directly)."""
    storage = tmp_path / "storage"
    storage.mkdir()
    with sqlite3.connect(storage / "index.sqlite") as conn:
        conn.execute("PRAGMA user_version = 7")
    conn.close()
    result = subprocess.run(
        [sys.executable, "-m", "harness.embedded_pacs", "--ae-title", "LATER", "--port", "0"]
        + ["--storage", str(storage), "--host", HOST],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"embedded PACS LATER: embedded PACS index {storage / 'index.sqlite'}: schema version 7 "
        "is newer than this harness's 1 (written by a newer pacs-harness)"
    ]
    with sqlite3.connect(storage / "index.sqlite") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 7
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    conn.close()


# ---------------------------------------------------------------------------------------------
# DCMTK as an independent client
# ---------------------------------------------------------------------------------------------


def run(cmd: list[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=30, check=False, **kwargs
    )  # type: ignore[call-overload]


@needs_dcmtk
def test_dcmtk_echoscu(corpus: Corpus) -> None:
    result = run([ECHOSCU, "-aet", "DCMTKECHO", "-aec", "LEGACY", HOST, corpus.legacy.port])
    assert result.returncode == 0, result.stderr


@needs_dcmtk
def test_dcmtk_storescu(scratch: Node, tmp_path: Path) -> None:
    st, se = generate_uid(), generate_uid()
    plain = make_image(
        sop_class=CTImageStorage,
        patient=("Dcmtk^Test", "PAT-DCMTK"),
        study=st,
        series=se,
        modality="CT",
        study_date="20240101",
        number=1,
        ts=ExplicitVRLittleEndian,
    )
    rle = make_image(
        sop_class=MRImageStorage,
        patient=("Dcmtk^Test", "PAT-DCMTK"),
        study=st,
        series=se,
        modality="MR",
        study_date="20240101",
        number=2,
        ts=RLELossless,
    )
    paths = [tmp_path / "plain.dcm", tmp_path / "rle.dcm"]
    plain.save_as(paths[0], enforce_file_format=True)
    rle.save_as(paths[1], enforce_file_format=True)
    result = run(
        [STORESCU, "-xr", "-aet", "DCMTKSTORE", "-aec", "SCRATCH", HOST, scratch.port, *paths]
    )
    assert result.returncode == 0, result.stderr
    assert statistics(scratch.storage) == {"patients": 1, "studies": 1, "series": 1, "instances": 2}
    stored = dcmread(scratch.file_of(rle))
    assert stored.file_meta.TransferSyntaxUID == RLELossless
    assert stored.PixelData == rle.PixelData
    assert dcmread(scratch.file_of(plain)).PixelData == plain.PixelData


@needs_dcmtk
def test_dcmtk_findscu(corpus: Corpus, tmp_path: Path) -> None:
    def findscu(*keys: str) -> list[Dataset]:
        out = tmp_path / f"q{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        cmd: list[str | Path | int] = [
            FINDSCU,
            "-S",
            "-X",
            "-od",
            out,
            "-aet",
            "DCMTKFIND",
            "-aec",
            "LEGACY",
            HOST,
            corpus.legacy.port,
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID",
        ]
        for key in keys:
            cmd += ["-k", key]
        result = run(cmd)  # type: ignore[arg-type]
        assert result.returncode == 0, result.stderr
        return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]

    (hit,) = findscu("PatientName=M*", "StudyDate")
    assert str(hit.PatientName) == "Müller^Jürgen"
    assert hit.StudyInstanceUID == corpus.studies["ST1"]
    hits = findscu("StudyDate=20200101-20211231", "NumberOfStudyRelatedInstances")
    assert {h.StudyInstanceUID: int(h.NumberOfStudyRelatedInstances) for h in hits} == {
        corpus.studies["ST1"]: 2,
        corpus.studies["ST2"]: 1,
    }


# ---------------------------------------------------------------------------------------------
# Logs (runs last in this module: it reads everything the corpus nodes logged)
# ---------------------------------------------------------------------------------------------


def test_logs_name_requests_but_no_patient_identifiers(corpus: Corpus) -> None:
    log = "".join(corpus.legacy.log + corpus.dest.log)
    assert "association accepted calling=STORESCU" in log
    assert "C-STORE-RSP calling=STORESCU" in log and "status=0x0000" in log
    assert "C-FIND-RSP calling=FINDSCU" in log
    assert "C-MOVE-RSP calling=MOVESCU" in log and "status=0xA801" in log
    for identifier in PATIENT_NAMES + PATIENT_IDS:
        assert identifier not in log
