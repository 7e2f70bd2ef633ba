"""Storage commitment (PS3.4 J) against real servers: Orthanc and the embedded PACS as SCPs,
dcmqrscp without the service, and an SCP of the test's own that never reports.

What was committed is checked by independent means: Orthanc's REST API lists the instance,
the embedded PACS's stored file reads back with pydicom; which association a report came on,
by the embedded PACS's own log. Each negative case stands alone: one instance deleted from
the target, the report on a new association, no report at all, no service.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pynetdicom import AE, evt

from harness.dicom.commitment import (
    COMMITTED,
    NO_ANSWER,
    NOT_SUPPORTED,
    STORAGE_COMMITMENT,
    SYNTAXES,
    commit_on_node,
    request_commitment,
)
from harness.dicom.peer import DimsePeer
from harness.embedded_pacs import open_index
from harness.fixtures import pacs_cluster_factory
from harness.launch.ports import free_port
from synthetic_data.samples import sample_study
from tests.helpers import external_topology, login_env, run_cli

NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
SCPS = ("embedded", "orthanc")

cluster = pacs_cluster_factory(
    "name: commitment\nnodes:\n"
    "  embedded: {kind: embedded, ae_title: COMMITEMB}\n"
    "  orthanc: {kind: orthanc, ae_title: COMMITORTHANC}\n"
    "  dcmqrscp: {kind: dcmqrscp, ae_title: COMMITDQ}\n",
    scope="module", requires=("Orthanc", "dcmqrscp"),
)


def _stored(node, seed: int, instances: int = 3) -> list[tuple[str, str]]:
    """A fresh study stored into `node`; its (SOP class, SOP instance) pairs."""
    study = sample_study(seed=seed, instances=instances)
    report = node.dimse().store(study)
    assert report.ok, [r.error for r in report.failed]
    return [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in study]


def _held(node, uid: str) -> bool:
    """Does the node hold `uid`? Orthanc: its REST API; embedded: a stored file that reads
    back with pydicom as that instance (neither is the code the SCP checks with)."""
    if node.kind == "orthanc":
        return any(m["Type"] == "Instance" for m in node.rest().lookup(uid))
    return any(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) == uid
               for path in (node.storage_dir / "files").rglob("*.dcm"))


def _delete(node, uid: str) -> None:
    """Delete one instance behind the SCP's back: Orthanc REST DELETE; the embedded PACS's
    index row and file."""
    if node.kind == "orthanc":
        (match,) = [m for m in node.rest().lookup(uid) if m["Type"] == "Instance"]
        node.rest().delete(f"/instances/{match['ID']}")
        return
    conn = open_index(node.storage_dir)
    try:
        (path,) = conn.execute("SELECT path FROM instances WHERE sop_instance_uid = ?",
                               (uid,)).fetchone()
        conn.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (uid,))
    finally:
        conn.close()
    (node.storage_dir / path).unlink()


def _log(node) -> str:
    return Path(node.log_path).read_text(errors="replace")


@pytest.mark.parametrize("name", SCPS)
def test_all_committed(cluster, name):
    node = cluster.node(name)
    references = _stored(node, seed=701 + SCPS.index(name))
    result = commit_on_node(node, references, report_port=cluster.harness_port)
    assert result.ok, result.problems()
    assert [(o.sop_class_uid, o.sop_instance_uid, o.state) for o in result.outcomes] == [
        (c, i, COMMITTED) for c, i in references]
    assert all(_held(node, uid) for _, uid in references)
    (transaction,) = result.transactions
    assert transaction.event_type == 1  # all committed (PS3.4 J.3.3.1)


@pytest.mark.parametrize("name", SCPS)
def test_instance_deleted_from_the_target_is_reported_failed(cluster, name):
    node = cluster.node(name)
    references = _stored(node, seed=711 + SCPS.index(name))
    gone = references[1][1]
    _delete(node, gone)
    assert not _held(node, gone)
    result = commit_on_node(node, references, report_port=cluster.harness_port)
    assert not result.ok
    (failed,) = result.failed
    assert (failed.sop_instance_uid, failed.failure_reason) == (gone, NO_SUCH_OBJECT_INSTANCE)
    assert failed.reason == "0x0112 no such object instance"
    assert sorted(o.sop_instance_uid for o in result.committed) == sorted(
        uid for _, uid in references if uid != gone)
    assert result.transactions[0].event_type == 2  # failures exist
    assert f"{gone} ({references[1][0]}): failed: 0x0112" in "\n".join(result.problems())


@pytest.mark.parametrize("name", SCPS)
def test_instance_stored_under_another_class_is_a_conflict(cluster, name):
    node = cluster.node(name)
    references = _stored(node, seed=721 + SCPS.index(name), instances=1)
    mr_image = "1.2.840.10008.5.1.4.1.1.4"
    result = commit_on_node(node, [(mr_image, references[0][1])],
                            report_port=cluster.harness_port)
    (failed,) = result.failed
    assert failed.failure_reason == CLASS_INSTANCE_CONFLICT


def test_embedded_reports_on_a_new_association_once_the_requester_released(cluster):
    """The requester releases right after the N-ACTION-RSP: the report comes on a new
    association to the harness's address, which the embedded PACS's log confirms."""
    node = cluster.node("embedded")
    references = _stored(node, seed=731)
    result = commit_on_node(node, references, report_port=cluster.harness_port,
                            release_after_request=True)
    assert result.ok, result.problems()
    (transaction,) = result.transactions
    assert transaction.report_via == f"on a new association from {node.ae_title}"
    assert f"transaction={transaction.transaction_uid} committed=3 failed=0 on a new " \
           "association" in _log(node)


def test_embedded_reports_on_the_same_association_while_it_is_open(cluster):
    node = cluster.node("embedded")
    references = _stored(node, seed=732)
    result = commit_on_node(node, references, report_port=None)  # no listener at all
    assert result.ok, result.problems()
    (transaction,) = result.transactions
    assert transaction.report_via == "on the N-ACTION's association"
    assert f"transaction={transaction.transaction_uid} committed=3 failed=0 on the same " \
           "association" in _log(node)


def test_orthanc_reports_only_on_a_new_association(cluster):
    """Orthanc sends its report to the requester's DicomModalities entry (the harness's
    address): with nobody listening there, the open association gets nothing."""
    node = cluster.node("orthanc")
    references = _stored(node, seed=741)
    without = commit_on_node(node, references, report_port=None, timeout_s=3)
    assert [o.state for o in without.outcomes] == [NO_ANSWER] * 3
    listened = commit_on_node(node, references, report_port=cluster.harness_port)
    assert listened.ok, listened.problems()
    assert listened.transactions[0].report_via == f"on a new association from {node.ae_title}"


def test_large_lists_are_split_into_several_transactions(cluster):
    node = cluster.node("embedded")
    references = _stored(node, seed=751, instances=5)
    result = commit_on_node(node, references, report_port=cluster.harness_port, batch_size=2)
    assert result.ok, result.problems()
    assert [len(t.references) for t in result.transactions] == [2, 2, 1]
    log = _log(node)
    assert all(f"transaction={t.transaction_uid} instances={len(t.references)}" in log
               for t in result.transactions)


def test_dcmqrscp_is_not_supported(cluster):
    node = cluster.node("dcmqrscp")
    references = _stored(node, seed=761, instances=1)
    result = commit_on_node(node, references, report_port=cluster.harness_port, timeout_s=5)
    assert not result.supported and not result.ok
    assert result.summary() == f"dcmqrscp: {NOT_SUPPORTED}"
    assert result.problems() == [f"dcmqrscp: {NOT_SUPPORTED}"]
    nothing = commit_on_node(node, [], report_port=None)  # nothing to commit: no pass either
    assert not nothing.supported and not nothing.ok


def _raw_action(node, info, action_type: int = 1,
                instance: str = "1.2.840.10008.1.20.1.1") -> int:
    """One N-ACTION as given, on pynetdicom directly; the status the node answers."""
    ae = AE(ae_title="PACSHARNESS")
    ae.add_requested_context(STORAGE_COMMITMENT, SYNTAXES)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate(node.host, node.dicom_port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_action(info, action_type, STORAGE_COMMITMENT, instance)
        return int(status.Status)
    finally:
        assoc.release()


def _action_info(**values) -> Dataset:
    info = Dataset()
    for keyword, value in values.items():
        setattr(info, keyword, value)
    return info


def test_embedded_refuses_malformed_requests_with_their_status(cluster):
    """PS3.7 10.1.4.1.10: no such action 0x0123, invalid object instance 0x0117, invalid
    argument value 0x0115 (no Transaction UID, no references); the node keeps serving."""
    node = cluster.node("embedded")
    item = _action_info(ReferencedSOPClassUID="1.2.840.10008.5.1.4.1.1.2",
                        ReferencedSOPInstanceUID="1.2.3.4")
    good = _action_info(TransactionUID="1.2.3.99", ReferencedSOPSequence=[item])
    assert _raw_action(node, good, action_type=2) == 0x0123
    assert _raw_action(node, good, instance="1.2.3.5") == 0x0117
    assert _raw_action(node, _action_info(ReferencedSOPSequence=[item])) == 0x0115
    assert _raw_action(node, _action_info(TransactionUID="1.2.3.98",
                                          ReferencedSOPSequence=[])) == 0x0115
    assert node.dimse().echo().status.ok


class _SilentScp:
    """An SCP that takes every N-ACTION (0x0000) and never sends a report."""

    def __init__(self) -> None:
        self.transactions: list[str] = []
        self.taken = threading.Event()
        ae = AE(ae_title="SILENTSCP")
        ae.add_supported_context(STORAGE_COMMITMENT, SYNTAXES)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_N_ACTION, self._take)])
        self.port = self.server.server_address[1]

    def _take(self, event: Any) -> tuple[int, None]:
        self.transactions.append(str(event.action_information.TransactionUID))
        self.taken.set()
        return 0x0000, None


@pytest.fixture
def silent_scp():
    scp = _SilentScp()
    yield scp
    scp.server.shutdown()


def test_no_report_within_the_timeout_ends_at_the_deadline(silent_scp):
    peer = DimsePeer("127.0.0.1", silent_scp.port, "SILENTSCP", timeout_s=10)
    references = [("1.2.840.10008.5.1.4.1.1.2", f"1.2.3.999.{n}") for n in range(3)]
    result = request_commitment(peer, references, timeout_s=2,
                                report_address=("127.0.0.1", free_port("127.0.0.1")))
    assert silent_scp.taken.is_set()
    (transaction,) = result.transactions
    assert silent_scp.transactions == [transaction.transaction_uid]
    assert transaction.action_status == "0x0000" and transaction.report_via == ""
    assert [(o.state, o.reason) for o in result.outcomes] == [
        (NO_ANSWER, "no report within 2 s")] * 3
    assert not result.ok and result.supported


# -- pacs-harness verify --commit ----------------------------------------------------------------


def test_verify_commit_exit_codes(pacs_launch, tmp_path):
    """A copy on the embedded PACS is committed (exit 0, counts in --json); once one of its
    files is lost behind its index's back, verify still passes but that instance is listed
    failed with its reason (exit 1); the same copy on dcmqrscp passes verify but is "storage
    commitment not supported" (exit 1)."""
    launched = pacs_launch("name: verifycommit\nnodes:\n"
                           "  src: {kind: embedded, ae_title: VCSRC}\n"
                           "  dst: {kind: embedded, ae_title: VCDST}\n"
                           "  dq: {kind: dcmqrscp, ae_title: VCDQ}\n")
    study = sample_study(seed=771, instances=3)
    for node in launched.nodes.values():
        assert node.dimse().store(study).ok
    topology = external_topology(tmp_path / "topology.yaml", "verifycommit",
                                 launched.nodes.values(), "VC",
                                 {n: ", synthetic: true" for n in launched.nodes})
    env = login_env(launched, "VC", tmp_path / "state")

    def verify(target: str, *extra: str):
        return run_cli("verify", "-t", str(topology), "--source", "src", "--target", target,
                       "--out", str(tmp_path / target), "--commit", *extra, env=env,
                       timeout=600)

    passed = verify("dst", "--json")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    printed = json.loads(passed.stdout)
    assert printed["verdict"] == "pass"
    assert printed["commitment"]["committed"] == 3 and printed["commitment"]["ok"]
    saved = json.loads((tmp_path / "dst" / "commitment.json").read_text())
    assert saved["committed"] == 3

    # the index still lists it (verify at attributes depth passes), its file is gone:
    # the target cannot commit to it
    lost = str(study[2].SOPInstanceUID)
    (lost_file,) = [p for p in (launched.node("dst").storage_dir / "files").rglob("*.dcm")
                    if str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) == lost]
    lost_file.unlink()
    failed = verify("dst")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert f"{lost} ({study[2].SOPClassUID}): failed: 0x0112 no such object instance" \
        in failed.stdout
    assert "2 committed, 1 failed, 0 no answer" in failed.stdout
    assert json.loads((tmp_path / "dst" / "findings.json").read_text())["verdict"] == "pass"

    refused = verify("dq")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert f"dq: {NOT_SUPPORTED}" in refused.stdout
    assert "Traceback" not in refused.stderr
    assert json.loads((tmp_path / "dq" / "findings.json").read_text())["verdict"] == "pass"
