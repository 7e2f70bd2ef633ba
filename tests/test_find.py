"""C-FIND on the harness's wire layer against real Orthanc, dcmqrscp and the embedded PACS, and
against pynetdicom acceptors that answer badly (failure status, abort mid-answer, pending
forever).

What each node holds is read independently of C-FIND: Orthanc's REST API, the embedded PACS's
SQLite index, the files in dcmqrscp's storage area (pydicom).
"""

from __future__ import annotations

import multiprocessing
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from harness.dicom.client import DimseClient
from harness.dicom.dimse import NO_DATASET, encode_command
from harness.dicom.peer import DimseConnectionError
from harness.dicom.status import NO_STATUS
from harness.fixtures import pacs_cluster_factory
from harness.launch.ports import free_port
from synthetic_data.templates import clone_study, template_instance
from tests.helpers import LAUNCHABLE_KINDS, one_node_per_kind, store_into_every_node
from tests.test_wire import accept_then, hand_pdu, raw_peer, read_c_store

KINDS = LAUNCHABLE_KINDS
PATIENTS, STUDIES_PER_PATIENT, SERIES_PER_STUDY, IMAGES_PER_SERIES = 2, 2, 3, 4
LOAD_ROUNDS = 30  # IMAGE-level C-FINDs of every series, this many times, on one association
BURN_LIMIT_S = 300.0  # a CPU burner ends by itself after this, whatever happens to the test

Row = tuple[str, str, str, str]  # PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID


def _archive() -> list[Dataset]:
    """Known content: PATIENTS x STUDIES x SERIES x IMAGES tiny CT instances."""
    template = template_instance("tiny", "CT")
    datasets = []
    for patient in range(PATIENTS):
        for _ in range(STUDIES_PER_PATIENT):
            study = clone_study(template, SERIES_PER_STUDY * IMAGES_PER_SERIES,
                                patient_id=f"FIND{patient}")
            series_uids = [generate_uid() for _ in range(SERIES_PER_STUDY)]
            for number, ds in enumerate(study):
                ds.SeriesInstanceUID = series_uids[number // IMAGES_PER_SERIES]
                ds.SeriesNumber = number // IMAGES_PER_SERIES + 1
            datasets += study
    return datasets


def _held(node) -> set[Row]:
    """Every instance the node holds, read without C-FIND."""
    if node.kind == "orthanc":
        rest = node.rest()
        studies = {s["ID"]: s for s in rest.get_json("/studies", expand="")}
        series = {s["ID"]: s for s in rest.get_json("/series", expand="")}
        rows = set()
        for instance in rest.get_json("/instances", expand=""):
            one_series = series[instance["ParentSeries"]]
            study = studies[one_series["ParentStudy"]]
            rows.add((study["PatientMainDicomTags"]["PatientID"],
                      study["MainDicomTags"]["StudyInstanceUID"],
                      one_series["MainDicomTags"]["SeriesInstanceUID"],
                      instance["MainDicomTags"]["SOPInstanceUID"]))
        return rows
    if node.kind == "embedded":
        index = sqlite3.connect(f"file:{node.storage_dir / 'index.sqlite'}?mode=ro", uri=True)
        try:
            return set(index.execute("SELECT patient_id, study_instance_uid, "
                                     "series_instance_uid, sop_instance_uid FROM instances"))
        finally:
            index.close()
    rows = set()
    for path in (node.workdir / "db").rglob("*"):
        if not path.is_file() or path.name == "index.dat":
            continue
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError):
            continue
        rows.add((ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    return rows


@pytest.fixture(scope="module")
def archive() -> list[Dataset]:
    return _archive()


launched = pacs_cluster_factory(one_node_per_kind("find"), scope="module")


@pytest.fixture(scope="module")
def cluster(launched, archive):
    """One node of each launchable kind, each holding the archive."""
    return store_into_every_node(launched, archive)


def _walk(client: DimseClient, model: str) -> set[Row]:
    """Every instance, by a hierarchical C-FIND walk (PS3.4 C.4.1.3.1) on one association."""
    assoc = client.find_association(model)
    rows: set[Row] = set()

    def find(level: str, keys: dict) -> list[Dataset]:
        found = client.find_over(assoc, level, keys, model=model)
        assert found.ok, found.error
        return found.matches

    try:
        if model == "patient":
            patients = [str(p.PatientID) for p in find("PATIENT", {"PatientID": None})]
        else:
            patients = [None]
        for patient in patients:
            keys = {"PatientID": patient} if patient else {"PatientID": None}
            for study in find("STUDY", {**keys, "StudyInstanceUID": None}):
                study_keys = {**({"PatientID": patient} if patient else {}),
                              "StudyInstanceUID": study.StudyInstanceUID}
                for series in find("SERIES", {**study_keys, "SeriesInstanceUID": None}):
                    for image in find("IMAGE", {**study_keys,
                                                "SeriesInstanceUID": series.SeriesInstanceUID,
                                                "SOPInstanceUID": None}):
                        rows.add((patient or str(study.PatientID), str(study.StudyInstanceUID),
                                  str(series.SeriesInstanceUID), str(image.SOPInstanceUID)))
    finally:
        assoc.release()
    return rows


@pytest.mark.parametrize("model", ["study", "patient"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_walk_at_every_level_finds_what_the_node_holds(cluster, archive, kind, model):
    node = cluster.node(kind)
    held = _held(node)
    stored = {(ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
              for ds in archive}
    assert stored <= held
    assert _walk(node.dimse(), model) == held


@pytest.mark.parametrize("kind", KINDS)
def test_a_single_find_returns_the_matches_and_their_attributes(cluster, archive, kind):
    first = archive[0]
    found = cluster.node(kind).dimse().find(
        "IMAGE", {"StudyInstanceUID": first.StudyInstanceUID,
                  "SeriesInstanceUID": first.SeriesInstanceUID,
                  "SOPInstanceUID": None, "InstanceNumber": None})
    assert found.ok and found.error is None
    expected = {ds.SOPInstanceUID: int(ds.InstanceNumber) for ds in archive
                if ds.SeriesInstanceUID == first.SeriesInstanceUID}
    assert {m.SOPInstanceUID: int(m.InstanceNumber) for m in found.matches} == expected


@pytest.mark.parametrize("kind", KINDS)
def test_a_cancelled_find_stops_and_leaves_the_association_in_step(cluster, archive, kind):
    """C-CANCEL after the first match (PS3.7 9.3.2.3): one match kept, a Cancel or Success
    final status, and the next C-FIND on the same association gets its own full answer
    (no stray response of the cancelled one)."""
    client = cluster.node(kind).dimse()
    held_studies = {row[1] for row in _held(cluster.node(kind))}
    assoc = client.find_association("study")
    try:
        cancelled = client.find_over(assoc, "STUDY", {"StudyInstanceUID": None},
                                     cancel_after=1)
        whole = client.find_over(assoc, "STUDY", {"StudyInstanceUID": None})
    finally:
        assoc.release()
    assert cancelled.error is None, cancelled.error
    assert cancelled.status.category in ("cancel", "success"), cancelled.status
    assert len(cancelled.matches) == 1
    assert str(cancelled.matches[0].StudyInstanceUID) in held_studies
    assert whole.ok and {str(m.StudyInstanceUID) for m in whole.matches} == held_studies
    assert len(held_studies) >= PATIENTS * STUDIES_PER_PATIENT > 1


@pytest.mark.parametrize("kind", KINDS)
def test_any_study_uid_names_a_study_the_node_holds(cluster, archive, kind):
    node = cluster.node(kind)
    assert node.dimse().any_study_uid() in {row[1] for row in _held(node)}


empty_launched = pacs_cluster_factory("name: empty\nnodes:\n  e: {kind: embedded}\n")


def test_any_study_uid_of_an_empty_node_is_none(empty_launched) -> None:
    assert empty_launched.node("e").dimse().any_study_uid() is None


def _burn(seconds: float, stop: multiprocessing.synchronize.Event) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop.is_set():
        pass


@contextmanager
def _busy_machine(client: DimseClient) -> Iterator[list[int]]:
    """Two CPU burners and a C-STORE stream to the node, ended on exit (burners also end
    after BURN_LIMIT_S by themselves); yields the count of stored instances."""
    stop_burning = multiprocessing.Event()
    burners = [multiprocessing.Process(target=_burn, args=(BURN_LIMIT_S, stop_burning),
                                       daemon=True) for _ in range(2)]
    stop_storing = threading.Event()
    stored = [0]
    template = template_instance("tiny", "MR")

    def store_stream() -> None:
        while not stop_storing.is_set():
            stored[0] += len(client.store(clone_study(template, 5, patient_id="LOAD")).succeeded)

    stream = threading.Thread(target=store_stream, daemon=True)
    for burner in burners:
        burner.start()
    stream.start()
    try:
        yield stored
    finally:
        stop_storing.set()
        stop_burning.set()
        stream.join(timeout=120)
        for burner in burners:
            burner.join()


@pytest.mark.parametrize("kind", KINDS)
def test_back_to_back_finds_on_one_association_lose_nothing_under_load(cluster, archive, kind):
    """pynetdicom 3.0.4 lost matches here (its association thread took responses off the
    queue): 16 of 2880 on Orthanc in benchmarks/repro_find_loss.py, and here 3 to 6 of 720
    with 15 rounds on Orthanc and the embedded PACS."""
    node = cluster.node(kind)
    series: dict[tuple[str, str], set[str]] = {}
    for ds in archive:
        series.setdefault((ds.StudyInstanceUID, ds.SeriesInstanceUID), set()).add(
            ds.SOPInstanceUID)
    client = node.dimse()
    missing: list[str] = []
    queries = 0
    with _busy_machine(node.dimse()) as stored_meanwhile:
        assoc = client.find_association()
        try:
            for _ in range(LOAD_ROUNDS):
                for (study, one_series), uids in series.items():
                    found = client.find_over(assoc, "IMAGE", {
                        "StudyInstanceUID": study, "SeriesInstanceUID": one_series,
                        "SOPInstanceUID": None})
                    queries += 1
                    assert found.ok, found.error
                    got = [str(m.SOPInstanceUID) for m in found.matches]
                    assert len(got) == len(set(got))
                    missing += sorted(uids - set(got))
        finally:
            assoc.release()
    assert queries == LOAD_ROUNDS * PATIENTS * STUDIES_PER_PATIENT * SERIES_PER_STUDY
    assert stored_meanwhile[0] > 0  # the load did run alongside
    assert missing == []


# -- peers that answer badly ---------------------------------------------------------------


@contextmanager
def find_scp(
    on_find: Callable,
    models: tuple[str, ...] = (StudyRootQueryRetrieveInformationModelFind,
                               PatientRootQueryRetrieveInformationModelFind),
) -> Iterator[DimseClient]:
    """A pynetdicom Query/Retrieve Find SCP on 127.0.0.1 answering with `on_find`; yields a
    client for it (short timeouts), always shut down."""
    ae = AE(ae_title="FINDSCP")
    for model in models:
        ae.add_supported_context(model)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        yield DimseClient("127.0.0.1", port, "FINDSCP", timeout_s=5.0)
    finally:
        server.shutdown()


def _match(number: int) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = f"1.2.3.{number}"
    return ds


def test_a_failure_status_is_the_result_with_the_peer_and_its_comment() -> None:
    def on_find(event):
        status = Dataset()
        status.Status = 0xA900
        status.ErrorComment = "no such key"
        yield status, None

    with find_scp(on_find) as client:
        found = client.find("STUDY", {"StudyInstanceUID": None})
    assert found.status.code == 0xA900 and not found.ok
    assert found.matches == []
    assert "FINDSCP@127.0.0.1" in found.error and "0xA900" in found.error
    assert "no such key" in found.error


def test_a_peer_aborting_mid_answer_is_a_clear_error_and_the_association_closed() -> None:
    def on_find(event):
        for number in range(3):
            yield 0xFF00, _match(number)
        event.assoc.abort()

    with find_scp(on_find) as client:
        assoc = client.find_association()
        found = client.find_over(assoc, "STUDY", {"StudyInstanceUID": None})
        again = client.find_over(assoc, "STUDY", {"StudyInstanceUID": None})
    assert found.status == NO_STATUS and not found.ok
    assert "FINDSCP@127.0.0.1" in found.error and "aborted" in found.error
    assert not assoc.is_open
    assert again.status == NO_STATUS and "no open C-FIND association" in again.error


def test_a_peer_pending_forever_is_stopped_at_the_match_limit() -> None:
    def on_find(event):
        number = 0
        while event.assoc.is_established:  # ends when we abort
            number += 1
            yield 0xFF00, _match(number)

    with find_scp(on_find) as client:
        client.max_find_matches = 200
        found = client.find("STUDY", {"StudyInstanceUID": None})
    assert found.status == NO_STATUS
    assert "more than 200 matches" in found.error and "FINDSCP@127.0.0.1" in found.error


def test_a_peer_trickling_pending_answers_is_stopped_at_the_deadline() -> None:
    def on_find(event):
        number = 0
        while event.assoc.is_established:
            number += 1
            time.sleep(0.2)  # each answer well within the read timeout
            yield 0xFF00, _match(number)

    with find_scp(on_find) as client:
        client.find_deadline_s = 2.0
        found = client.find("STUDY", {"StudyInstanceUID": None})
    assert found.status == NO_STATUS
    assert "not finished within 2 s" in found.error


def test_a_peer_without_the_find_model_is_a_connection_error() -> None:
    with find_scp(lambda event: iter(()), models=(PatientRootQueryRetrieveInformationModelFind,)
                  ) as client, pytest.raises(DimseConnectionError) as refused:
        client.find_association("study")
    assert "FINDSCP@127.0.0.1" in str(refused.value)
    assert "does not accept C-FIND (study root" in str(refused.value)


def _find_rsp(message_id: int, status: int) -> bytes:
    """A C-FIND-RSP command (PS3.7 9.3.2.2) on presentation context 1, in one P-DATA-TF."""
    command = encode_command({0x00000002: StudyRootQueryRetrieveInformationModelFind,
                              0x00000100: 0x8020, 0x00000120: message_id,
                              0x00000800: NO_DATASET, 0x00000900: status})
    return hand_pdu(0x04, struct.pack(">IBB", len(command) + 2, 1, 0x03) + command)


def test_a_response_to_another_message_is_refused_naming_both() -> None:
    def answer_for_another_message(conn: socket.socket, peer) -> None:
        read_c_store(conn)  # the C-FIND-RQ, up to its last identifier fragment
        conn.sendall(_find_rsp(99, 0x0000))

    with raw_peer(accept_then(answer_for_another_message)) as peer:
        client = DimseClient("127.0.0.1", peer.port, "PEER", timeout_s=30)
        found = client.find("STUDY", {"StudyInstanceUID": None})
        assert found.status == NO_STATUS
        assert found.error == (f"peer PEER@127.0.0.1:{peer.port}: STUDY C-FIND broken off: "
                               "C-FIND-RSP to message 99, the request was message 1")
        assert peer.eof.wait(60)
        assert peer.after_script == [hand_pdu(0x07, bytes(4))]  # A-ABORT, service-user
