"""The reference HA setup forwards, HAProxy fails over (also from a frozen primary), the
failover measurement gives sane numbers, and nothing is left running afterwards."""

from __future__ import annotations

import os
import time

import pytest

from harness.launch.tools import find_binary
from harness.resilience import node_faults
from harness.resilience.failover import FailoverPlan, measure_failover, uids_on
from harness.resilience.ha import ReferenceHA, associate_rq
from synthetic_data.samples import sample_study
from tests.helpers import processes_mentioning

pytestmark = pytest.mark.skipif(
    not (find_binary("Orthanc") and find_binary("haproxy")),
    reason="needs Orthanc and haproxy (apt-get install orthanc haproxy)",
)


def test_associate_rq_is_a_valid_pdu():
    pdu = associate_rq("HAPACS")
    assert pdu[0] == 0x01 and int.from_bytes(pdu[2:6], "big") == len(pdu) - 6
    assert pdu[10:26] == b"HAPACS".ljust(16)


def _echo(ha: ReferenceHA) -> bool:
    try:
        return ha.client(timeout_s=2).echo().status.ok
    except Exception:  # noqa: BLE001
        return False


def _wait(predicate, timeout_s: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.1)
    return None


def test_forwarding_failover_and_cleanup(tmp_path):
    root = tmp_path / "ha"
    with ReferenceHA(root=root) as ha:
        study = sample_study(seed=41, instances=4)
        series = {(study[0].StudyInstanceUID, study[0].SeriesInstanceUID)}
        assert ha.client().store(study).ok
        wanted = {d.SOPInstanceUID for d in study}
        # the primary received them and forwards to the standby
        assert uids_on(ha.primary, series) == wanted
        assert _wait(lambda: uids_on(ha.standby, series) == wanted, 120) is not None

        # a frozen primary still accepts TCP; the DICOM health check must see it down
        node_faults.pause(ha.primary)
        try:
            took = _wait(lambda: _echo(ha), 120)
            assert took is not None, "virtual address did not fail over from a frozen primary"
        finally:
            node_faults.resume(ha.primary)
        assert _wait(lambda: _echo(ha), 120) is not None

        # killed primary: the standby answers through the virtual address (how fast is
        # measured by the failover scenario against its RTO, not asserted on this machine)
        node_faults.kill(ha.primary)
        assert _wait(lambda: _echo(ha), 120) is not None
        extra = sample_study(seed=42, instances=1)
        assert ha.client().store(extra).ok
        node_faults.start_again(ha.primary)
        assert _echo(ha)
        pids = [ha.haproxy.handle.pid, ha.primary.handle.pid, ha.standby.handle.pid]
    assert not processes_mentioning(str(root)), "a process of the HA setup outlived it"
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}/cmdline") or "Orthanc" not in open(
            f"/proc/{pid}/cmdline"
        ).read(), pid
    assert not ha.tcp_open()


def test_measurement_gives_sane_numbers(tmp_path):
    work = sample_study(seed=43, instances=30)
    probe = sample_study(seed=44)[0]
    plan = FailoverPlan(instances=30, associations=2, kill_after=10, rate_per_s=30)
    with ReferenceHA(root=tmp_path / "ha") as ha:
        result = measure_failover(ha.virtual, ha.primary, ha.standby, work, probe, plan)
    assert result["rto_s"] is not None and result["rto_s"] > 0
    assert 0 <= result["rpo_instances"] <= result["acked_before_fault"] == 10
    assert result["acknowledged_lost"] == 0
    assert result["workload_acked"] == 30
    assert 0 <= result["error_rate"] < 1
    assert [e["what"] for e in result["fault_events"]] == ["kill", "recovered", "failback"]
    ops = {e["op"] for e in result["timeline"]}
    assert {"store", "probe-store", "probe-get"} <= ops
    assert any(not e["ok"] for e in result["timeline"]), "the kill caused no failed attempt"
    assert not processes_mentioning(str(tmp_path))
