"""Connectivity (phase infrastructure): can every node be reached, fed and read back?

For each node: C-ECHO; which storage SOP classes and transfer syntaxes it accepts (a table in
report.json); store one instance, find it, retrieve it with pixel data byte-identical. For
every ordered pair of nodes the harness can fill: C-MOVE a study from one to the other.
"""

from __future__ import annotations

import pytest
from pydicom.uid import UID

from harness.dicom.contexts import COMMON_STORAGE_CLASSES, RECEIVABLE_TRANSFER_SYNTAXES
from synthetic_data.samples import sample_study

pytestmark = [pytest.mark.phase("infrastructure"), pytest.mark.scenario("connectivity")]

EXTRA_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.50")  # big endian, JPEG


def test_echo(pacs_node, pacs_node_name, pacs_metrics):
    result = pacs_node(pacs_node_name).dimse().echo()
    pacs_metrics[f"echo_ms.{pacs_node_name}"] = round(result.elapsed_s * 1000, 1)
    assert result.status.ok, f"{pacs_node_name} answered C-ECHO with {result.status}"


def test_accepted_sop_classes_and_transfer_syntaxes(pacs_node, pacs_node_name, pacs_metrics):
    node = pacs_node(pacs_node_name)
    syntaxes = (*RECEIVABLE_TRANSFER_SYNTAXES, *EXTRA_TRANSFER_SYNTAXES)
    pairs = [(sop, ts) for sop in COMMON_STORAGE_CLASSES for ts in syntaxes]
    accepted = node.dimse().negotiate(pairs)
    table = {
        UID(sop).name: [UID(ts).name for ts in syntaxes if accepted[(sop, ts)]]
        for sop in COMMON_STORAGE_CLASSES
    }
    pacs_metrics[f"accepted.{pacs_node_name}"] = table
    basic = [UID(ts).name for ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")]
    assert set(basic) & set(table[UID(COMMON_STORAGE_CLASSES[0]).name]), (
        f"{pacs_node_name} accepts CT Image Storage in no uncompressed transfer syntax"
    )


def test_store_find_retrieve(pacs_node, pacs_node_name, pacs_janitor, pacs_metrics):
    node = pacs_node(pacs_node_name)
    if not node.disposable:
        pytest.skip(f"{pacs_node_name} is not disposable: the harness does not write to it")
    instance = sample_study(seed=1)[0]
    client = node.dimse()

    stored = client.store([instance])
    assert stored.ok, f"C-STORE to {pacs_node_name} failed: {stored.failed[0].error}"

    found = client.find(
        "IMAGE",
        {
            "StudyInstanceUID": instance.StudyInstanceUID,
            "SeriesInstanceUID": instance.SeriesInstanceUID,
            "SOPInstanceUID": None,
        },
    )
    assert found.ok, f"C-FIND on {pacs_node_name} answered {found.status}"
    assert [m.SOPInstanceUID for m in found.matches] == [instance.SOPInstanceUID]

    got = client.get(
        "IMAGE",
        {
            "StudyInstanceUID": instance.StudyInstanceUID,
            "SeriesInstanceUID": instance.SeriesInstanceUID,
            "SOPInstanceUID": instance.SOPInstanceUID,
        },
    )
    assert got.ok and len(got.instances) == 1, f"C-GET from {pacs_node_name}: {got.status}"
    assert got.instances[0].dataset.PixelData == instance.PixelData, "pixel data changed"
    pacs_metrics[f"store_find_get_ms.{pacs_node_name}"] = round(
        (stored.elapsed_s + found.elapsed_s + got.elapsed_s) * 1000, 1
    )

    web = node.dicomweb()
    if web is not None:
        raw = web.retrieve_instance(
            instance.StudyInstanceUID, instance.SeriesInstanceUID, instance.SOPInstanceUID
        )
        from io import BytesIO

        from pydicom import dcmread

        assert dcmread(BytesIO(raw)).PixelData == instance.PixelData, "WADO-RS pixels changed"


def test_move_between_nodes(pacs_node, pacs_node_pair, pacs_janitor, pacs_metrics):
    source_name, destination_name = pacs_node_pair
    source, destination = pacs_node(source_name), pacs_node(destination_name)
    study = sample_study(seed=2, instances=2)
    assert source.dimse().store(study).ok

    moved = source.dimse().move(
        destination.ae_title, "STUDY", {"StudyInstanceUID": study[0].StudyInstanceUID}
    )
    assert moved.ok, (
        f"C-MOVE {source_name} -> {destination_name}: {moved.status}, "
        f"{moved.completed} completed, {moved.failed} failed"
    )
    assert moved.completed == len(study)
    got = destination.dimse().get("STUDY", {"StudyInstanceUID": study[0].StudyInstanceUID})
    received = {i.sop_instance_uid: i.dataset.PixelData for i in got.instances}
    assert received == {ds.SOPInstanceUID: ds.PixelData for ds in study}
    pacs_metrics[f"move_ms.{source_name}->{destination_name}"] = round(moved.elapsed_s * 1000, 1)
