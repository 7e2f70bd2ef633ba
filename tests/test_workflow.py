"""The scheduled workflow chain end to end, and each break caught alone.

Worklist from Orthanc's plugin, wlmscpfs (beside dcmqrscp) and the embedded PACS; MPPS on the
embedded PACS (the only kind here with an MPPS SCP); images into the archive of the same
topology. What the archive holds is read independently: Orthanc's REST API (its own tags of
a stored instance) and, for the embedded PACS, its SQLite MPPS record.
"""

from __future__ import annotations

import importlib.util

import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from harness.cluster import Cluster
from harness.config import parse_topology
from harness.launch.tools import find_binary
from harness.workflow.checks import DEFAULT_RULES, SiteRules, check_workflow
from harness.workflow.modality import Modality
from harness.workflow.orders import make_order, schedule
from harness.workflow.providers import mpps_client, read_mpps, worklist_client
from harness.workflow.run import STATION_AE_TITLE, run_workflow


@pytest.fixture(scope="module")
def cluster():
    missing = [p for p in ("Orthanc", "dcmqrscp", "wlmscpfs") if not find_binary(p)]
    if missing:
        pytest.skip(f"not installed: {missing} (apt-get install orthanc dcmtk)")
    topology = parse_topology("name: workflow\nnodes:\n  orthanc: {kind: orthanc}\n"
                              "  dcmqrscp: {kind: dcmqrscp}\n  embedded: {kind: embedded}\n")
    launched = Cluster.launch(topology)
    yield launched
    launched.stop()


def _modality(cluster, worklist: str, archive: str) -> Modality:
    return Modality(STATION_AE_TITLE, worklist_client(cluster.node(worklist), STATION_AE_TITLE),
                    mpps_client(cluster.node("embedded"), STATION_AE_TITLE),
                    cluster.node(archive).dimse(calling_ae=STATION_AE_TITLE),
                    commitment_report_port=cluster.harness_port,
                    commitment=cluster.node(archive).dimse())


def _check(cluster, orders, performed, archive: str, rules: SiteRules = DEFAULT_RULES):
    return check_workflow(orders, performed, cluster.node(archive).dimse(),
                          read_mpps(cluster.node("embedded")), rules)


@pytest.mark.parametrize("provider", ["orthanc", "dcmqrscp", "embedded"])
def test_the_chain_holds_on_each_worklist_provider(cluster, provider):
    """3 orders (the last discontinued after one image) and an unscheduled patient: every
    step performed once, each study as ordered, MPPS lists exactly what was stored."""
    seed = 5000 + 100 * ["orthanc", "dcmqrscp", "embedded"].index(provider)
    run = run_workflow(cluster.node(provider), cluster.node("embedded"),
                       cluster.node(provider), seed=seed,
                       commitment_report_port=cluster.harness_port)
    assert run.outcome.ok, run.outcome.breaks
    counts = run.outcome.counts()
    # storage commitment: where this harness has the SCU and the archive the SCP
    commits = (importlib.util.find_spec("harness.dicom.commitment") is not None
               and cluster.node(provider).capabilities.storage_commitment)
    assert counts == {"orders": 3, "worklist": 3, "mpps": 4, "stored": 4,
                      "committed": 4 if commits else 0, "reported": 3, "completed": 3,
                      "discontinued": 1, "unscheduled": 1}
    if not commits:
        assert "storage commitment not" in run.outcome.commitment_note
    outcomes = {row.label: row.outcome for row in run.outcome.rows}
    assert list(outcomes.values()) == ["performed", "performed", "discontinued", "unscheduled"]
    # the MPPS SCP's own record: the discontinued step says why (PS3.4 F.7.2.2.1)
    steps = read_mpps(cluster.node("embedded"))
    stopped = steps[run.performed[2].mpps_uid]
    assert stopped[0] == "DISCONTINUED"
    reason = stopped[1].PerformedProcedureStepDiscontinuationReasonCodeSequence[0]
    assert reason.CodeValue == "110513"
    unscheduled = steps[run.performed[3].mpps_uid][1].ScheduledStepAttributesSequence[0]
    assert unscheduled.AccessionNumber == "" and unscheduled.StudyInstanceUID == (
        run.performed[3].study_instance_uid)


def test_orthanc_holds_the_scheduled_attributes(cluster):
    """Read with Orthanc's REST API: the stored image carries the order's accession, study
    and the Request Attributes Sequence (RAD TF-2 4.8.4.1.3)."""
    node = cluster.node("orthanc")
    order = make_order(5700, STATION_AE_TITLE)
    schedule([order], node)
    done = _modality(cluster, "orthanc", "orthanc").perform(order, seed=5700, instances=1)
    assert done.stored
    found = node.rest().lookup(done.stored[0])
    tags = node.rest().get_json(f"/instances/{found[0]['ID']}/tags", simplify="")
    assert tags["AccessionNumber"] == order.accession_number
    assert tags["StudyInstanceUID"] == order.study_instance_uid
    assert tags["PatientID"] == order.patient_id
    request = tags["RequestAttributesSequence"][0]
    assert request["RequestedProcedureID"] == order.requested_procedure_id
    assert request["ScheduledProcedureStepID"] == order.scheduled_step_id


def test_a_step_performed_twice_is_flagged(cluster):
    order = make_order(5800, STATION_AE_TITLE)
    schedule([order], cluster.node("embedded"))
    modality = _modality(cluster, "embedded", "embedded")
    performed = [modality.perform(order, seed=5800), modality.perform(order, seed=5801)]
    outcome = _check(cluster, [order], performed, "embedded")
    assert outcome.rows[0].outcome == "performed 2 times"
    assert any("performed 2 times" in b for b in outcome.breaks), outcome.breaks


def test_mpps_listing_an_instance_not_stored_is_flagged(cluster):
    """A step whose N-SET lists one image more than the archive received."""
    order = make_order(5810, STATION_AE_TITLE)
    schedule([order], cluster.node("embedded"))
    modality = _modality(cluster, "embedded", "embedded")
    real_store = modality.archive.store
    modality.archive.store = lambda objects: real_store(list(objects)[:1])  # one is lost
    try:
        done = modality.perform(order, seed=5810, instances=2, report=False)
    finally:
        modality.archive.store = real_store
    # the modality believed both went: it lists what it acquired (the classic lost image)
    ghost = next(ds for ds in done.acquired if ds.SOPInstanceUID not in done.stored)
    extra = Dataset()
    extra.ReferencedSOPClassUID = ghost.SOPClassUID
    extra.ReferencedSOPInstanceUID = ghost.SOPInstanceUID
    uid = generate_uid()
    step = done.sent_step.copy()
    step.PerformedProcedureStepStatus = "IN PROGRESS"
    client = mpps_client(cluster.node("embedded"))
    assert client.create(uid, step).ok
    final = Dataset()
    final.PerformedProcedureStepStatus = "COMPLETED"
    series = done.sent_step.PerformedSeriesSequence[0].copy()
    series.ReferencedImageSequence = Sequence([*series.ReferencedImageSequence, extra])
    final.PerformedSeriesSequence = Sequence([series])
    assert client.set(uid, final).ok
    # only the listing step counts (the first one listed what was stored)
    steps = {k: v for k, v in read_mpps(cluster.node("embedded")).items()
             if k != done.mpps_uid}
    outcome = check_workflow([order], [done], cluster.node("embedded").dimse(), steps,
                             SiteRules(report_required=False))
    assert outcome.breaks == [f"{order.accession_number}: MPPS lists 1 instance(s) the archive "
                              f"does not hold: {[ghost.SOPInstanceUID]}"]


def test_a_study_whose_accession_differs_from_its_order_is_flagged(cluster):
    order = make_order(5820, STATION_AE_TITLE)
    schedule([order], cluster.node("orthanc"))
    modality = _modality(cluster, "orthanc", "orthanc")
    real_acquire = modality.acquire

    def mislabelled(*args, **kwargs):
        objects = real_acquire(*args, **kwargs)
        for ds in objects:
            ds.AccessionNumber = "WRONG0001"
        return objects

    modality.acquire = mislabelled
    done = modality.perform(order, seed=5820)
    outcome = _check(cluster, [order], [done], "orthanc")
    assert outcome.breaks == [f"{order.accession_number}: study accession 'WRONG0001' does "
                              f"not match the order's {order.accession_number!r}"]


def test_n_set_after_completed_is_refused(cluster):
    """PS3.4 F.7.2.2.2: the performed step is final; the SCP keeps COMPLETED."""
    order = make_order(5830, STATION_AE_TITLE)
    schedule([order], cluster.node("embedded"))
    done = _modality(cluster, "embedded", "embedded").perform(order, seed=5830)
    assert done.mpps_final.ok
    late = Dataset()
    late.PerformedProcedureStepStatus = "DISCONTINUED"
    refused = mpps_client(cluster.node("embedded")).set(done.mpps_uid, late)
    assert refused.status.code == 0x0110
    assert read_mpps(cluster.node("embedded"))[done.mpps_uid][0] == "COMPLETED"


def test_unscheduled_is_a_break_where_the_site_allows_none(cluster):
    from harness.workflow.run import unscheduled_patient

    modality = _modality(cluster, "embedded", "embedded")
    done = modality.perform(None, seed=5840, patient=unscheduled_patient(5840))
    allowed = _check(cluster, [], [done], "embedded")
    assert allowed.ok and [r.outcome for r in allowed.rows] == ["unscheduled"]
    refused = _check(cluster, [], [done], "embedded", SiteRules(unscheduled_allowed=False))
    assert refused.breaks == ["unscheduled WFU005840: unscheduled acquisition (the site's "
                              "rules allow none)"]


def test_an_order_never_performed_is_flagged(cluster):
    order = make_order(5850, STATION_AE_TITLE)
    schedule([order], cluster.node("embedded"))
    outcome = _check(cluster, [order], [], "embedded")
    assert outcome.breaks == [f"{order.accession_number}: scheduled step "
                              f"{order.scheduled_step_id} not performed"]


def test_the_report_section_shows_the_chain_and_its_breaks(cluster, tmp_path):
    """A real run with one order never performed, rendered: the counts per link, the break
    naming its order, the HL7 helper's rows; nothing falls into "Other figures"."""
    import json

    from harness.report.html import write_html_report

    lost = make_order(5950, STATION_AE_TITLE)
    run = run_workflow(cluster.node("embedded"), cluster.node("embedded"),
                       cluster.node("embedded"), seed=5960, orders=2)
    outcome = check_workflow([*run.orders, lost], run.performed,
                             cluster.node("embedded").dimse(), read_mpps(cluster.node("embedded")))
    metrics = {
        "workflow": {"counts": outcome.counts(), "breaks": outcome.breaks,
                     "runs": [{**outcome.as_dict(), "nodes": {
                         "worklist": "embedded", "mpps": "embedded", "archive": "embedded"}}]},
    }
    hl7 = [[{"node": node, "message": message, "patient": "P1 <- P2", "applied": True,
             "verified": node == "legacy", "observed": ["P2 still <answers>", "1 study"]}]
           for node, message in (("legacy", "ADT^A08"), ("target", "ADT^A40"))]
    metrics["workflow.hl7"] = hl7[-1]  # the scenario's merged metrics keep the last test's
    tests = [{"nodeid": f"scenarios/test_workflow_hl7.py::test_hl7[{rows[0]['node']}]",
              "scenario": "workflow", "phase": "pilot", "duration_s": 0.1, "outcome": "passed",
              "message": "", "metrics": {"workflow.hl7": rows}} for rows in hl7]
    report = {
        "verdict": "fail", "started": "2026-12-02T07:00:00+0000",
        "finished": "2026-12-02T07:01:00+0000", "harness_version": "test", "phase": "pilot",
        "topology": {"name": "wf", "source": "wf.yaml", "nodes": []},
        "scenarios": [{"name": "workflow", "phase": "pilot", "outcome": "failed",
                       "duration_s": 1.0, "metrics": metrics, "tests": tests}],
        "counts": {"passed": 0, "failed": 1, "error": 0, "skipped": 0},
    }
    (tmp_path / "report.json").write_text(json.dumps(report))
    page = write_html_report(tmp_path).read_text()
    counts = outcome.counts()  # 1 order and the unscheduled acquisition completed
    assert counts["orders"] == 3 and counts["completed"] == 2
    assert f"{lost.accession_number}: scheduled step {lost.scheduled_step_id} not performed" \
        in page
    assert "Scheduled workflow" in page and "On the worklist" in page
    assert "ADT^A08" in page and "ADT^A40" in page  # both nodes' HL7 checks
    assert "P2 still &lt;answers&gt;; 1 study" in page
    assert "Other figures" not in page


def test_an_order_missing_from_the_worklist_is_flagged(cluster):
    """The RIS's order never reached the worklist: nothing is acquired, both links break."""
    from harness.workflow.orders import withdraw

    order = make_order(5860, STATION_AE_TITLE)
    schedule([order], cluster.node("dcmqrscp"))
    withdraw(order, cluster.node("dcmqrscp"))
    done = _modality(cluster, "dcmqrscp", "dcmqrscp").perform(order, seed=5860)
    assert done.acquired == [] and done.mpps_created is None
    outcome = _check(cluster, [order], [done], "dcmqrscp")
    assert outcome.breaks == [
        f"{order.accession_number}: the worklist answered 0 item(s) for the order (one "
        "expected)",
        f"{order.accession_number}: scheduled step {order.scheduled_step_id} not performed"]
