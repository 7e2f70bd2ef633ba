"""The load engine: runs a workload's groups against one node, bounded in time and count.

A group with `users: N` is a closed model (N threads, one operation after the other); with
`rate: R` it is an open model (R arrivals per second, at most `max_in_flight` at once) whose
latency is measured from each operation's scheduled start (no coordinated omission). Every
operation has a deadline (the node's DIMSE/HTTP timeouts), so a peer that stalls, drips or
answers junk costs an error with its reason, never the end of the run.

Why threads: each operation blocks on the network, and pynetdicom is thread-safe per
association. The harness measures its own CPU (os.times) and says when it, not the PACS,
was the limit (Python runs ~1 core of bytecode at a time).
"""

from __future__ import annotations

import itertools
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pynetdicom
from pydicom import Dataset
from pydicom.uid import generate_uid

from harness.dicom.dicomweb import AuthenticationFailed
from harness.dicom.peer import HARNESS_AE_TITLE, DimseConnectionError
from harness.dicom.tcp import on_connection_open
from harness.errors import ConfigError, EnvironmentProblem, HarnessError
from harness.performance.stats import OperationStats, Timeline, own_cpu_s, process_cpu_s
from harness.performance.workload import WEB_OPERATIONS, Group, Workload
from synthetic_data.templates import clone_study, encode_part10, template_instance

#: Seconds one network step of an operation may take (association, each read, a C-FIND).
DEFAULT_OPERATION_TIMEOUT_S = 30.0
#: Open model: seconds queued arrivals may still start after the end (else dropped).
BACKLOG_MAX_S = 30.0


@dataclass
class Study:
    """A study on the node that reading groups retrieve and query."""

    study_uid: str
    patient_id: str
    series_uid: str
    sop_uids: list[str]
    bytes_total: int




@dataclass
class Outcome:
    ok: bool
    status: str
    instances: int = 0
    nbytes: int = 0


class _MoveSink:
    """The harness's own Storage SCP for C-MOVE destinations: counts, keeps nothing.
    Plain TCP on loopback even against a TLS node (Cluster.harness_peer: tls=False).

    As a responder it accepts whatever is proposed: every storage class pynetdicom knows in
    every transfer syntax, so the sender never has to transcode (and the 128-context limit of
    PS3.8 9.3.2.2 binds the sender's proposal, not this list)."""

    def __init__(self, port: int) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        self.received = 0
        self.lock = threading.Lock()
        ae = AE(ae_title=HARNESS_AE_TITLE)
        ae.maximum_associations = 64
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)

        def on_store(event: Any) -> int:
            with self.lock:
                self.received += 1
            return 0x0000

        try:
            self.server = ae.start_server(("127.0.0.1", port), block=False,
                                          evt_handlers=[(evt.EVT_C_STORE, on_store),
                                                        (evt.EVT_CONN_OPEN, on_connection_open)])
        except OSError as exc:
            raise EnvironmentProblem(
                f"harness C-MOVE receiver on 127.0.0.1:{port}: {exc}"
            ) from None

    def stop(self) -> None:
        self.server.shutdown()


#: Every transfer syntax pynetdicom knows (uncompressed, deflated, big endian, JPEG family,
#: JPEG-LS, JPEG 2000, HTJ2K, RLE, MPEG, HEVC, SMPTE 2110).
ALL_TRANSFER_SYNTAXES = list(pynetdicom.ALL_TRANSFER_SYNTAXES)


class LoadRun:
    """One bounded run of a workload against one node; `run()` returns the results dict."""

    def __init__(
        self,
        workload: Workload,
        node: Any,
        *,
        duration_s: float | None = None,
        move_port: int | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        seed: int = 0,
        operation_timeout_s: float = DEFAULT_OPERATION_TIMEOUT_S,
    ) -> None:
        self.workload = workload
        self.node = node
        self.duration_s = float(duration_s if duration_s is not None else workload.duration_s)
        self.move_port = move_port
        self.on_progress = on_progress
        self.random = random.Random(seed)
        self.stats = {g.name: OperationStats(g) for g in workload.groups}
        self.timeline = Timeline()
        self.studies: list[Study] = []
        self.dataset_stored = False
        self.template: Dataset | None = None
        self.template_bytes = 0
        self.stop_event = threading.Event()
        self.started_ops = 0
        self.count_lock = threading.Lock()
        self.t0 = 0.0  # monotonic start of the measured phase
        self.auth_failure: AuthenticationFailed | None = None  # the first HTTP 401/403
        self.operation_timeout_s = float(operation_timeout_s)
        # how long past the end the run waits for operations still running (each is bounded
        # by its timeouts: association, each read, a whole C-FIND); those still running then
        # are errors, so a peer that stalls or drips costs errors, never the end of the run
        self.grace_s = max(BACKLOG_MAX_S, 3 * self.operation_timeout_s + 5)
        self.in_flight: dict[int, tuple[Group, float]] = {}
        self.tokens = itertools.count()

    # -- preparation ------------------------------------------------------------------
    def prepare(self) -> None:
        """Store the read dataset (untimed) and check every operation can be attempted."""
        needs_web = [g.name for g in self.workload.groups if g.operation in WEB_OPERATIONS]
        if needs_web and self.node.dicomweb() is None:
            raise ConfigError(
                f"{self.workload.source}: groups {', '.join(needs_web)}: node {self.node.name} "
                "serves no DICOMweb"
            )
        moves = [g for g in self.workload.groups if g.operation == "c-move" and not g.destination]
        if moves and self.move_port is None:
            raise ConfigError(
                f"{self.workload.source}: group {moves[0].name}: c-move needs a destination "
                "(the harness's receiver port is unknown for this node; set destination:)"
            )
        self.workload.require_permissions(self.node)
        spec = self.workload.dataset
        self.template = template_instance(spec.scale, spec.modality)
        self.template_bytes = len(encode_part10(self.template))
        if not self.workload.stores_dataset(self.node.writable):
            # queries of a read-only node ask for a harness patient ID it does not hold
            self.studies = [Study(study_uid=generate_uid(), patient_id="LOAD00000",
                                  series_uid=generate_uid(), sop_uids=[], bytes_total=0)]
            return
        self.dataset_stored = True
        client = self._dimse()
        for number in range(spec.studies):
            datasets = clone_study(self.template, spec.instances_per_study,
                                   patient_id=f"LOAD{number:05d}")
            report = client.store(datasets, associations=min(4, len(datasets)))
            if not report.ok:
                raise EnvironmentProblem(
                    f"node {self.node.name}: storing the workload's dataset failed: "
                    f"{report.failed[0].error}"
                )
            first = datasets[0]
            self.studies.append(Study(
                study_uid=str(first.StudyInstanceUID), patient_id=f"LOAD{number:05d}",
                series_uid=str(first.SeriesInstanceUID),
                sop_uids=[str(d.SOPInstanceUID) for d in datasets],
                bytes_total=self.template_bytes * len(datasets),
            ))

    def check_http_login(self) -> None:
        """One untimed QIDO-RS before a Locust load: a refused login (HTTP 401/403) stops
        here (its workers would only count it as failed requests); the harness's own engine
        stops at the first refusal during the load."""
        if not any(g.operation in WEB_OPERATIONS for g in self.workload.groups):
            return
        try:
            self.node.dicomweb().search_studies(limit=1)
        except AuthenticationFailed:
            raise
        except HarnessError:
            pass  # any other answer is measured by the load itself

    # -- operations -------------------------------------------------------------------
    def _dimse(self) -> Any:
        """A DIMSE client whose every read, association and whole C-FIND is bounded by the
        operation timeout (a peer dripping bytes resets per-read timers, not the C-FIND's)."""
        client = self.node.dimse(timeout_s=self.operation_timeout_s)
        client.find_deadline_s = self.operation_timeout_s
        return client

    def operation(self, group: Group) -> Outcome:
        """One operation of the group (raises on association failure); not recorded."""
        study = self.random.choice(self.studies)
        op = group.operation
        if op == "c-echo":
            result = self._dimse().echo()
            return Outcome(result.status.ok, str(result.status) if result.status.ok
                           else f"C-ECHO answered {result.status}")
        if op == "c-store":
            datasets = clone_study(self.template, group.instances)
            report = self._dimse().store(datasets, associations=group.associations)
            failed = report.failed
            status = str(failed[0].status) if failed else "0x0000 (success)"
            return Outcome(not failed, status, len(report.succeeded),
                           len(report.succeeded) * self.template_bytes)
        if op == "c-find":
            keys: dict[str, Any] = {"StudyInstanceUID": study.study_uid}
            if group.level == "PATIENT":
                keys = {"PatientID": study.patient_id, "PatientName": None}
                result = self._dimse().find("PATIENT", keys, model="patient")
            else:
                if group.level == "STUDY":
                    keys = {"PatientID": study.patient_id, "StudyInstanceUID": None,
                            "StudyDate": None, "ModalitiesInStudy": None}
                elif group.level == "SERIES":
                    keys["SeriesInstanceUID"] = None
                    keys["Modality"] = None
                else:
                    keys.update(SeriesInstanceUID=study.series_uid, SOPInstanceUID=None)
                result = self._dimse().find(group.level, keys)
            return Outcome(result.ok and (bool(result.matches) or not self.dataset_stored),
                           str(result.status) if result.ok else _short(result.error)
                           or str(result.status))
        if op == "c-get":
            received = [0]

            def count(_instance: Any) -> None:
                received[0] += 1

            result = self._dimse().get("STUDY", {"StudyInstanceUID": study.study_uid},
                                           keep=False, on_instance=count)
            ok = result.ok and received[0] == len(study.sop_uids)
            return Outcome(ok, str(result.status), received[0], received[0] * self.template_bytes)
        if op == "c-move":
            result = self._dimse().move(group.destination or HARNESS_AE_TITLE, "STUDY",
                                            {"StudyInstanceUID": study.study_uid})
            ok = result.ok and result.completed == len(study.sop_uids)
            return Outcome(ok, str(result.status), result.completed,
                           result.completed * self.template_bytes)
        web = self.node.dicomweb()
        if op == "qido-rs":
            found = web.search_studies(PatientID=study.patient_id)
            return Outcome(bool(found) or not self.dataset_stored, "HTTP 200")
        if op == "wado-rs":
            parts = web.retrieve_study(study.study_uid)
            ok = len(parts) == len(study.sop_uids)
            return Outcome(ok, "HTTP 200" if ok else "HTTP 200 (incomplete)", len(parts),
                           sum(len(p) for p in parts))
        if op == "stow-rs":
            payload = [encode_part10(ds) for ds in clone_study(self.template, group.instances)]
            answer = web.store(payload)
            failed = answer.get("00081198", {}).get("Value", []) if isinstance(answer, dict) else []
            return Outcome(not failed, "HTTP 200" if not failed else "STOW failed instances",
                           len(payload) - len(failed), sum(len(p) for p in payload))
        raise AssertionError(op)

    def _execute(self, group: Group, scheduled: float) -> None:
        """Run one operation and record it (latency from `scheduled`) unless in warm-up."""
        token = next(self.tokens)
        with self.count_lock:
            self.in_flight[token] = (group, scheduled)
        try:
            outcome = self.operation(group)
        except DimseConnectionError as exc:
            outcome = Outcome(False, f"association failed: {str(exc)[:80]}")
        except AuthenticationFailed as exc:  # every later request is refused too: stop
            with self.count_lock:
                self.auth_failure = self.auth_failure or exc
            self.stop_event.set()
            return
        except HarnessError as exc:
            outcome = Outcome(False, str(exc).rsplit(" answered ", 1)[-1][:80])
        except Exception as exc:  # noqa: BLE001 - one failed operation must not stop the load
            outcome = Outcome(False, f"{type(exc).__name__}: {str(exc)[:60]}")
        finally:
            with self.count_lock:
                abandoned = self.in_flight.pop(token, None) is None
        if not abandoned:  # else already counted as unfinished at the end of the run
            self._record(group, scheduled, outcome, time.monotonic())

    def _record(self, group: Group, scheduled: float, outcome: Outcome, end: float) -> None:
        if scheduled < self.t0:  # started during the warm-up
            return
        self.stats[group.name].record(end - scheduled, outcome.ok, outcome.status,
                                      outcome.instances, outcome.nbytes)
        self.timeline.add(int(end - self.t0), outcome.ok, outcome.instances, outcome.nbytes,
                          end - scheduled)

    def _count_unfinished(self) -> None:
        """Operations still running after the grace period are errors, with that reason."""
        with self.count_lock:
            left, self.in_flight = list(self.in_flight.values()), {}
        end = time.monotonic()
        reason = f"no answer {self.grace_s:g} s after the end of the run"
        for group, scheduled in left:
            self._record(group, scheduled, Outcome(False, reason), end)

    def _take_slot(self) -> bool:
        """Count one more operation; False once the count bound is reached."""
        with self.count_lock:
            if self.started_ops >= self.workload.max_operations:
                self.stop_event.set()
                return False
            self.started_ops += 1
            return True

    def _closed_user(self, group: Group, deadline: float) -> None:
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            start = time.monotonic()
            if start >= self.t0 and not self._take_slot():
                return
            self._execute(group, start)
            if group.think_s:
                self.stop_event.wait(group.think_s)

    def _open_arrivals(self, group: Group, start: float, deadline: float) -> None:
        """Arrivals every 1/rate s, run by at most max_in_flight daemon workers; a worker
        the peer keeps busy never holds up the end of the run (see grace_s)."""
        interval = 1.0 / float(group.rate)
        arrivals: queue.Queue[float | None] = queue.Queue()
        workers = [threading.Thread(target=self._open_worker, args=(group, arrivals),
                                    name=f"load-{group.name}-{n}", daemon=True)
                   for n in range(group.max_in_flight)]
        for worker in workers:
            worker.start()
        n = 0
        try:
            while not self.stop_event.is_set():
                scheduled = start + n * interval
                if scheduled >= deadline:
                    break
                delay = scheduled - time.monotonic()
                if delay > 0 and self.stop_event.wait(delay):
                    break
                if scheduled >= self.t0 and not self._take_slot():
                    break
                arrivals.put(scheduled)
                n += 1
        finally:
            # arrivals queued at the end get a grace period to run (their latency shows the
            # backlog); those that still have not started are counted as dropped, not run
            backlog_until = time.monotonic() + min(BACKLOG_MAX_S, max(5.0, self.duration_s))
            while arrivals.unfinished_tasks and time.monotonic() < backlog_until:
                time.sleep(0.05)
            dropped = 0
            while True:
                try:
                    arrivals.get_nowait()
                except queue.Empty:
                    break
                arrivals.task_done()
                dropped += 1
            self.stats[group.name].dropped += dropped
            for _ in workers:
                arrivals.put(None)
            for worker in workers:  # running operations: bounded by their timeouts, and here
                worker.join(max(0.0, deadline + self.grace_s - time.monotonic()))

    def _open_worker(self, group: Group, arrivals: queue.Queue[float | None]) -> None:
        while (scheduled := arrivals.get()) is not None:
            try:
                self._execute(group, scheduled)
            finally:
                arrivals.task_done()

    # -- run --------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Prepare, warm up, measure, stop; the results as a dict (see module docstring)."""
        self.prepare()
        sink = _MoveSink(self.move_port) if self.move_port and any(
            g.operation == "c-move" and not g.destination for g in self.workload.groups) else None
        pacs_pid = getattr(getattr(self.node, "handle", None), "pid", None)
        started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        begin = time.monotonic()
        self.t0 = begin + self.workload.warmup_s
        deadline = self.t0 + self.duration_s
        cpu0 = cpu_measured0 = own_cpu_s()
        pacs0 = process_cpu_s(pacs_pid) if pacs_pid else None
        threads = []
        for group in self.workload.groups:
            if group.model == "closed":
                for n in range(group.users or 1):
                    threads.append(threading.Thread(
                        target=self._closed_user, args=(group, deadline),
                        name=f"load-{group.name}-{n}", daemon=True))
            else:
                threads.append(threading.Thread(
                    target=self._open_arrivals, args=(group, begin, deadline),
                    name=f"load-{group.name}-arrivals", daemon=True))
        try:
            for thread in threads:
                thread.start()
            warm = False
            while any(t.is_alive() for t in threads):
                now = time.monotonic()
                if not warm and now >= self.t0:
                    warm = True
                    cpu_measured0 = own_cpu_s()
                    pacs0 = process_cpu_s(pacs_pid) if pacs_pid else None
                if now > deadline + self.grace_s:  # operations outlive their timeouts
                    self.stop_event.set()
                    break
                if self.on_progress and warm:
                    self.on_progress(self.snapshot(now))
                time.sleep(0.5 if self.on_progress else 0.1)
                if now >= deadline:
                    self.stop_event.set()
        finally:
            self.stop_event.set()
            self._count_unfinished()
            if sink is not None:
                sink.stop()
        if self.auth_failure is not None:
            raise self.auth_failure
        end = time.monotonic()
        measured_s = max(1e-6, min(end, deadline) - self.t0) if end > self.t0 else 1e-6
        wall_measured = max(1e-6, end - self.t0)
        cpu_measured = own_cpu_s() - cpu_measured0
        pacs_cpu = None
        if pacs_pid and pacs0 is not None:
            after = process_cpu_s(pacs_pid)
            pacs_cpu = None if after is None else round((after - pacs0) / wall_measured, 3)
        return self._results(started_at, measured_s, cpu_measured / wall_measured,
                             own_cpu_s() - cpu0, pacs_cpu, sink)

    def snapshot(self, now: float) -> dict[str, Any]:
        """Live figures for a progress display: throughput, p95, errors so far."""
        elapsed = max(1e-6, now - self.t0)
        instances = sum(s.instances for s in self.stats.values())
        mb = sum(s.bytes for s in self.stats.values()) / 1e6
        return {
            "elapsed_s": round(elapsed, 1),
            "duration_s": self.duration_s,
            "instances_per_s": round(instances / elapsed, 1),
            "mb_per_s": round(mb / elapsed, 2),
            "errors": sum(s.errors for s in self.stats.values()),
            "p95_ms": {name: round(s.percentile_ms(95), 1) for name, s in self.stats.items()},
        }

    def _results(self, started_at: str, measured_s: float, cpu_cores: float, cpu_total_s: float,
                 pacs_cores: float | None, sink: _MoveSink | None) -> dict[str, Any]:
        from harness import __version__

        operations = {name: s.as_dict(measured_s) for name, s in self.stats.items()}
        warnings = []
        # Python executes bytecode on ~1 core at a time; near that, the harness is the limit.
        saturated = cpu_cores >= 0.85 or cpu_cores >= 0.85 * (os.cpu_count() or 1)
        if saturated and (pacs_cores is None or pacs_cores < cpu_cores):
            warnings.append(
                f"the harness used {cpu_cores:.2f} CPU cores (Python runs ~1 at a time) while "
                f"the PACS used {'unknown' if pacs_cores is None else f'{pacs_cores:.2f}'}: the "
                "harness saturated before the PACS did; these figures understate the PACS "
                "(use --locust with more processes)"
            )
        for name, op in operations.items():
            if op["dropped"]:
                warnings.append(f"{name}: {op['dropped']} arrivals never started before the end "
                                "(the PACS or the harness could not keep up with the rate)")
        count = sum(op["count"] for op in operations.values())
        return {
            "workload": self.workload.describe(),
            "node": self.node.describe() | {"version": _version(self.node)},
            "harness_version": __version__,
            "started": started_at,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "measured_s": round(measured_s, 3),
            "operations": operations,
            "totals": {
                "operations": count,
                "errors": sum(op["errors"] for op in operations.values()),
                "instances": sum(op["instances"] for op in operations.values()),
                "instances_per_s": round(sum(op["instances"] for op in operations.values())
                                         / measured_s, 3),
                "mb_per_s": round(sum(op["bytes"] for op in operations.values())
                                  / measured_s / 1e6, 3),
                "bounded_by": "max_operations" if self.started_ops >= self.workload.max_operations
                else "duration",
            },
            "timeline": self.timeline.as_list(),
            "harness": {"cpu_cores": round(cpu_cores, 3), "cpu_s_total": round(cpu_total_s, 3),
                        "saturated": saturated, "cpu_count": os.cpu_count()},
            "pacs": {"cpu_cores": pacs_cores},
            "move_received": sink.received if sink else None,
            "dataset_stored": self.dataset_stored,
            "warnings": warnings,
        }


def _short(error: str | None) -> str | None:
    """An error without the peer's address (the node is named once in the results)."""
    return None if error is None else error.split(": ", 1)[-1][:80]


def _version(node: Any) -> str | None:
    try:
        return node.version()
    except Exception:  # noqa: BLE001 - a version is nice to have, never required
        return None


def run_workload(
    workload: Workload,
    node: Any,
    *,
    duration_s: float | None = None,
    move_port: int | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    operation_timeout_s: float = DEFAULT_OPERATION_TIMEOUT_S,
) -> dict[str, Any]:
    """Run `workload` against `node` (bounded in time and count) and return the results."""
    return LoadRun(workload, node, duration_s=duration_s, move_port=move_port,
                   on_progress=on_progress, operation_timeout_s=operation_timeout_s).run()
