"""Worklist providers and the embedded MPPS SCP against real servers.

Orthanc with its worklist plugin, DCMTK's wlmscpfs beside dcmqrscp and the embedded PACS each
serve the orders written into their folder; DCMTK's findscu -W (an independent worklist SCU)
sees the same items as the harness's client. The embedded PACS's MPPS follows PS3.4 F.7: a
finished step refuses an N-SET, checked with the harness's client and read back from its
SQLite file.
"""

from __future__ import annotations

import re
import subprocess

import pytest
from pydicom import Dataset

from harness.cluster import Cluster
from harness.config import parse_topology
from harness.dicom.peer import HARNESS_AE_TITLE
from harness.dicom.worklist import scheduled_step, worklist_identifier
from harness.embedded_pacs.mpps import read_steps
from harness.errors import ConfigError
from harness.launch.tools import find_binary
from harness.workflow.orders import make_order, schedule, withdraw, worklist_folder
from harness.workflow.providers import mpps_client, worklist_client

PROVIDERS = ("orthanc", "dcmqrscp", "embedded")
FINDSCU = "/usr/bin/findscu"


@pytest.fixture(scope="module")
def cluster():
    missing = [p for p in ("Orthanc", "dcmqrscp", "wlmscpfs", "findscu") if not find_binary(p)]
    if missing:
        pytest.skip(f"not installed: {missing} (apt-get install orthanc dcmtk)")
    topology = parse_topology(
        "name: worklists\nnodes:\n"
        + "".join(f"  {kind}: {{kind: {kind}}}\n" for kind in PROVIDERS)
    )
    launched = Cluster.launch(topology)
    yield launched
    launched.stop()


def _findscu(node, **keys: str) -> list[dict[str, str]]:
    """DCMTK's worklist query (findscu -W), its answers parsed from its log: one dict per
    item, keyword-less (tag -> value)."""
    port = getattr(node, "worklist_port", None) or node.dicom_port
    args = [FINDSCU, "-W", "-v", "-aet", HARNESS_AE_TITLE, "-aec", node.ae_title]
    for key, value in keys.items():
        args += ["-k", f"{key}={value}"]
    for key in ("AccessionNumber", "PatientID", "StudyInstanceUID"):  # return keys
        if key not in keys:
            args += ["-k", key]
    args += [node.host, str(port)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    items = []
    for block in done.stderr.split("Find Response:")[1:]:
        values = dict(re.findall(r"\((\w{4},\w{4})\) \w\w \[([^\]]*)\]", block))
        items.append({tag: value.strip() for tag, value in values.items()})
    return items


@pytest.mark.parametrize("kind", PROVIDERS)
def test_orders_written_are_served_and_seen_by_findscu(cluster, kind):
    """Each provider answers the orders of its folder; findscu -W sees the same ones."""
    node = cluster.node(kind)
    station = f"ST{PROVIDERS.index(kind)}"
    orders = [make_order(3000 + 10 * PROVIDERS.index(kind) + i, station) for i in range(3)]
    other = make_order(3900 + PROVIDERS.index(kind), "ELSEWHERE", modality="MR")
    schedule([*orders, other], node)
    client = worklist_client(node)

    mine = client.find_worklist(worklist_identifier(Modality="CT", ScheduledStationAETitle=station))
    assert mine.ok, mine.error
    assert sorted(str(m.AccessionNumber) for m in mine.matches) == sorted(
        o.accession_number for o in orders)
    item = next(m for m in mine.matches if m.AccessionNumber == orders[0].accession_number)
    assert item.PatientID == orders[0].patient_id
    assert item.StudyInstanceUID == orders[0].study_instance_uid
    assert item.RequestedProcedureID == orders[0].requested_procedure_id
    assert scheduled_step(item).ScheduledProcedureStepID == orders[0].scheduled_step_id

    seen = _findscu(node, AccessionNumber=orders[1].accession_number)
    assert [i["0010,0020"] for i in seen] == [orders[1].patient_id]
    assert seen[0]["0020,000d"] == orders[1].study_instance_uid

    withdraw(orders[1], node)  # the RIS cancels it: gone from the next query
    again = client.find_worklist(worklist_identifier(AccessionNumber=orders[1].accession_number))
    assert again.ok and again.matches == []
    assert _findscu(node, AccessionNumber=orders[1].accession_number) == []


def test_embedded_matches_date_ranges_and_patient(cluster):
    """PS3.4 K.6.1.2: ScheduledProcedureStepStartDate ranges and PatientID narrow the items."""
    node = cluster.node("embedded")
    early = make_order(3500, "RANGE", date="20250301")
    late = make_order(3501, "RANGE", date="20250320")
    schedule([early, late], node)
    client = worklist_client(node)

    def accessions(**keys: str) -> list[str]:
        found = client.find_worklist(worklist_identifier(ScheduledStationAETitle="RANGE", **keys))
        assert found.ok, found.error
        return sorted(str(m.AccessionNumber) for m in found.matches)

    both = sorted([early.accession_number, late.accession_number])
    assert accessions() == both
    assert accessions(ScheduledProcedureStepStartDate="20250301-20250310") == [
        early.accession_number]
    assert accessions(ScheduledProcedureStepStartDate="20250315-") == [late.accession_number]
    assert accessions(PatientID=late.patient_id) == [late.accession_number]
    assert accessions(Modality="MR") == []
    # the same range through DCMTK's findscu -W
    seen = _findscu(node, ScheduledProcedureStepSequence="",
                    **{"(0040,0100)[0].ScheduledProcedureStepStartDate": "-20250310",
                       "(0040,0100)[0].ScheduledStationAETitle": "RANGE"})
    assert [i["0008,0050"] for i in seen] == [early.accession_number]


def test_a_node_without_worklist_is_refused_with_its_name():
    spec = parse_topology("name: x\nnodes:\n  ext: {kind: external, host: 127.0.0.1, "
                          "dicom_port: 11112, ae_title: EXT}\n")
    from harness.nodes import make_node

    node = make_node(spec.nodes["ext"], None)
    with pytest.raises(ConfigError, match="node ext"):
        worklist_folder(node)
    with pytest.raises(ConfigError, match="node ext"):
        mpps_client(node)


def _step(status: str = "IN PROGRESS") -> Dataset:
    ds = Dataset()
    ds.PatientID = "MPPS1"
    ds.PerformedProcedureStepStatus = status
    ds.Modality = "CT"
    return ds


def test_embedded_mpps_follows_its_states(cluster):
    """PS3.4 F.7.2: IN PROGRESS -> COMPLETED; a second N-SET is refused 0x0110; a step
    created in another state 0x0106; a duplicate 0x0111; an unknown one 0x0112. Read back
    from the SCP's own file."""
    node = cluster.node("embedded")
    client = mpps_client(node)
    uid = "1.2.826.0.1.3680043.8.498.7100"
    assert client.create(uid, _step()).ok
    assert client.create(uid, _step()).status.code == 0x0111
    assert client.create(uid + ".1", _step("COMPLETED")).status.code == 0x0106
    assert client.set(uid + ".2", _step("COMPLETED")).status.code == 0x0112
    assert read_steps(node.storage_dir)[uid][0] == "IN PROGRESS"

    final = Dataset()
    final.PerformedProcedureStepStatus = "COMPLETED"
    final.PerformedProcedureStepEndDate = "20260115"
    assert client.set(uid, final).ok
    status, held = read_steps(node.storage_dir)[uid]
    assert status == "COMPLETED" and held.PerformedProcedureStepEndDate == "20260115"
    assert held.PatientID == "MPPS1"  # the N-CREATE's attributes are kept

    again = Dataset()
    again.PerformedProcedureStepStatus = "DISCONTINUED"
    refused = client.set(uid, again)
    assert refused.status.code == 0x0110
    assert read_steps(node.storage_dir)[uid][0] == "COMPLETED"


@pytest.mark.parametrize("kind", ("orthanc", "dcmqrscp"))
def test_kinds_without_mpps_refuse_it(cluster, kind):
    """Orthanc and dcmqrscp (with wlmscpfs) do not declare MPPS: asking is a ConfigError."""
    assert not cluster.node(kind).capabilities.mpps
    with pytest.raises(ConfigError, match="no MPPS SCP"):
        mpps_client(cluster.node(kind))


def test_embedded_skips_an_unreadable_entry(cluster):
    """A damaged file in the drop folder is skipped, even by a query with no key; the others
    are answered."""
    node = cluster.node("embedded")
    good = make_order(3600, "DAMAGED")
    schedule([good], node)
    (worklist_folder(node) / "broken.wl").write_bytes(b"\x00" * 10 + b"not DICOM")
    found = worklist_client(node).find_worklist(
        worklist_identifier(ScheduledStationAETitle="DAMAGED"))
    assert found.ok, found.error
    assert [str(m.AccessionNumber) for m in found.matches] == [good.accession_number]
    everything = worklist_client(node).find_worklist(worklist_identifier())
    assert everything.ok and everything.matches
    assert all(m.get("AccessionNumber") for m in everything.matches)
