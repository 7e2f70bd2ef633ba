"""Failover measurement: RTO, RPO and acknowledged loss of an HA pair behind a virtual address.

Why: "we have a standby" says nothing until a primary dies mid-stream. A bounded modality
workload (N instances over K associations, paced) stores through the virtual address and
retries what fails, as a modality would; after M acknowledged instances the primary is
killed. The harness then probes (C-STORE of a fresh probe, then C-GET of it) through the
virtual address until both succeed again:

* RTO: seconds from the fault until a probe store *and* retrieve succeed;
* RPO: instances acknowledged (C-STORE success) before the fault that the standby lacks;
* acknowledged loss: after failback (the primary started again), acknowledged instances
  absent from every node; must be zero.

Every attempt lands on a timeline `[{t, op, ok, latency_s}]` (t in seconds from the start of
the workload), with the fault events, so the report shows error rate and latency around it.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset
from pydicom.uid import generate_uid

from harness.dicom.client import DimseClient
from harness.dicom.part10 import dataset_bytes
from harness.dicom.status import Status
from harness.dicom.wire import WireAssociation
from harness.nodes.base import Node
from harness.resilience import node_faults


@dataclass
class FailoverPlan:
    """The bounded workload and fault: every count and time is capped."""

    instances: int = 150
    associations: int = 2
    kill_after: int = 50  # acknowledged instances before the fault
    rate_per_s: float = 25.0  # pacing of the workload, over all associations
    probe_interval_s: float = 0.25
    max_outage_s: float = 60.0  # give up on recovery after this
    deadline_s: float = 120.0  # the whole workload stops by then
    store_timeout_s: float = 5.0


def uids_on(node: Node, series: set[tuple[str, str]]) -> set[str]:
    """SOP Instance UIDs the node holds in the given (study, series), by IMAGE-level C-FIND."""
    client = node.dimse(timeout_s=15)
    found: set[str] = set()
    for study, one_series in sorted(series):
        result = client.find(
            "IMAGE",
            {"StudyInstanceUID": study, "SeriesInstanceUID": one_series, "SOPInstanceUID": None},
        )
        found |= {str(m.SOPInstanceUID) for m in result.matches}
    return found


def _with_new_uid(template: Dataset, number: int) -> Dataset:
    ds = copy.deepcopy(template)
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.InstanceNumber = number
    return ds


class _Recorder:
    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.lock = threading.Lock()
        self.timeline: list[dict[str, Any]] = []
        self.acked: dict[str, float] = {}  # SOP Instance UID -> monotonic ack time

    def add(self, op: str, ok: bool, started: float, **extra: Any) -> None:
        entry = {
            "t": round(started - self.t0, 3),
            "op": op,
            "ok": ok,
            "latency_s": round(time.monotonic() - started, 4),
            **extra,
        }
        with self.lock:
            self.timeline.append(entry)

    def ack(self, uid: str) -> int:
        with self.lock:
            self.acked[uid] = time.monotonic()
            return len(self.acked)


def _store_once(
    client: DimseClient, assoc: WireAssociation | None, ds: Dataset
) -> tuple[bool, WireAssociation | None]:
    """One C-STORE; returns (ok, association to reuse or None)."""
    pair = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    try:
        if assoc is None or not assoc.is_open:
            assoc = client.wire_association([pair])
        context_id = assoc.accepted.get(pair)
        ok = (
            context_id is not None
            and Status(
                assoc.store(
                    context_id, pair[0], str(ds.SOPInstanceUID), dataset_bytes(ds, pair[1])
                ).status
            ).ok
        )
    except Exception:  # noqa: BLE001 - any failure is a failed attempt on the timeline
        ok = False
    if not ok and assoc is not None:
        assoc.abort()
        assoc = None
    return ok, assoc


def measure_failover(
    virtual: tuple[str, int, str],
    primary: Node,
    standby: Node,
    workload: list[Dataset],
    probe_template: Dataset,
    plan: FailoverPlan | None = None,
    *,
    fault: Callable[[Node], None] = node_faults.kill,
    failback: Callable[[Node], None] | None = node_faults.start_again,
    settle_s: float = 1.0,
) -> dict[str, Any]:
    """Run the workload through `virtual`, fault the primary after `kill_after` acks, measure.

    Returns rto_s, rpo_instances, acknowledged_lost, error_rate (overall and during the
    outage), acked, attempts, failback_s, timeline and fault_events.
    """
    plan = plan or FailoverPlan()
    primary.require_disposable("kill it in a failover drill")
    host, port, ae = virtual
    client = DimseClient(host, port, ae, timeout_s=plan.store_timeout_s)
    t0 = time.monotonic()
    deadline = t0 + plan.deadline_s
    rec = _Recorder(t0)
    events: list[dict[str, Any]] = []
    series = {(str(d.StudyInstanceUID), str(d.SeriesInstanceUID)) for d in workload}
    series.add((str(probe_template.StudyInstanceUID), str(probe_template.SeriesInstanceUID)))
    pending = list(workload)
    pending_lock = threading.Lock()
    pace_lock = threading.Lock()
    next_slot = [t0]
    trigger = threading.Event()
    fault_at: list[float] = []
    recovered_at: list[float] = []
    stop = threading.Event()

    def paced() -> None:
        with pace_lock:
            slot = max(next_slot[0], time.monotonic())
            next_slot[0] = slot + 1.0 / plan.rate_per_s
        time.sleep(max(0.0, slot - time.monotonic()))

    def worker() -> None:
        assoc = None
        while not stop.is_set():
            with pending_lock:
                if not pending:
                    break
                ds = pending.pop(0)
            paced()
            while time.monotonic() < deadline and not stop.is_set():
                started = time.monotonic()
                ok, assoc = _store_once(client, assoc, ds)
                rec.add("store", ok, started)
                if ok:
                    if rec.ack(str(ds.SOPInstanceUID)) >= plan.kill_after:
                        trigger.set()
                    break
                time.sleep(0.1)  # a modality retries after a short pause
        if assoc is not None:
            assoc.release()

    def injector() -> None:
        if not trigger.wait(plan.deadline_s) or stop.is_set():
            return
        fault_at.append(time.monotonic())
        events.append(
            {
                "t": round(fault_at[0] - t0, 3),
                "what": fault.__name__,
                "target": primary.name,
                "duration_s": None,
            }
        )
        fault(primary)

    def prober() -> None:
        number = 10_000
        while not fault_at and not stop.wait(0.05):
            pass
        if not fault_at:
            return
        give_up = fault_at[0] + plan.max_outage_s
        while time.monotonic() < give_up and not stop.is_set():
            number += 1
            probe = _with_new_uid(probe_template, number)
            started = time.monotonic()
            stored, assoc = _store_once(client, None, probe)
            if assoc is not None:
                assoc.release()
            rec.add("probe-store", stored, started)
            if stored:
                rec.ack(str(probe.SOPInstanceUID))
                started = time.monotonic()
                try:
                    got = client.get(
                        "IMAGE",
                        {
                            "StudyInstanceUID": probe.StudyInstanceUID,
                            "SeriesInstanceUID": probe.SeriesInstanceUID,
                            "SOPInstanceUID": probe.SOPInstanceUID,
                        },
                    )
                    retrieved = got.ok and len(got.instances) == 1
                except Exception:  # noqa: BLE001
                    retrieved = False
                rec.add("probe-get", retrieved, started)
                if retrieved:
                    recovered_at.append(time.monotonic())
                    return
            time.sleep(plan.probe_interval_s)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(plan.associations)]
    threads += [threading.Thread(target=injector, daemon=True)]
    prober_thread = threading.Thread(target=prober, daemon=True)
    for thread in [*threads, prober_thread]:
        thread.start()
    try:
        for thread in threads[:-1]:
            thread.join(max(0.0, deadline - time.monotonic()) + 10)
        trigger.set()  # a workload smaller than kill_after still faults, at its end
        threads[-1].join(30)
        prober_thread.join(plan.max_outage_s + 30)
    finally:
        stop.set()
    rto_s = round(recovered_at[0] - fault_at[0], 3) if fault_at and recovered_at else None
    if fault_at:
        events.append(
            {
                "t": round((recovered_at[0] if recovered_at else time.monotonic()) - t0, 3),
                "what": "recovered" if recovered_at else "not-recovered",
                "target": "virtual",
                "duration_s": rto_s,
            }
        )

    time.sleep(settle_s)  # let the standby index what it received last
    on_standby = uids_on(standby, series)
    before_fault = {u for u, t in rec.acked.items() if fault_at and t < fault_at[0]}
    rpo_missing = sorted(before_fault - on_standby)

    failback_s = None
    on_primary: set[str] = set()
    if failback is not None and fault_at:
        started = time.monotonic()
        failback(primary)
        failback_s = round(time.monotonic() - started, 3)
        events.append(
            {
                "t": round(started - t0, 3),
                "what": "failback",
                "target": primary.name,
                "duration_s": failback_s,
            }
        )
        on_primary = uids_on(primary, series)
    lost = sorted(set(rec.acked) - on_standby - on_primary)

    attempts = [e for e in rec.timeline if e["op"] == "store"]
    failed = [e for e in attempts if not e["ok"]]
    outage = []
    if fault_at:
        start_t = fault_at[0] - t0
        end_t = (recovered_at[0] if recovered_at else time.monotonic()) - t0
        outage = [e for e in rec.timeline if start_t <= e["t"] <= end_t]
    latencies = sorted(e["latency_s"] for e in attempts if e["ok"])
    return {
        "rto_s": rto_s,
        "rpo_instances": len(rpo_missing),
        "acknowledged_lost": len(lost) if failback is not None else None,
        "acked": len(rec.acked),
        "acked_before_fault": len(before_fault),
        "workload_instances": len(workload),
        "workload_acked": len(set(rec.acked) & {str(d.SOPInstanceUID) for d in workload}),
        "attempts": len(attempts),
        "error_rate": round(len(failed) / len(attempts), 4) if attempts else 0.0,
        "error_rate_during_outage": (
            round(sum(1 for e in outage if not e["ok"]) / len(outage), 4) if outage else 0.0
        ),
        "store_latency_p50_s": latencies[len(latencies) // 2] if latencies else None,
        "store_latency_max_s": latencies[-1] if latencies else None,
        "failback_s": failback_s,
        "rpo_missing_uids": rpo_missing[:20],
        "lost_uids": lost[:20],
        "timeline": sorted(rec.timeline, key=lambda e: e["t"]),
        "fault_events": events,
    }
