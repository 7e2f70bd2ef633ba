"""Availability monitor: can users still find and open studies while a migration runs?

Why it exists: a migration is only acceptable if the archives stay usable meanwhile. While
the migrator (or the site's own tool) works, a background thread probes randomly chosen
studies, on the source always and on the target once `is_migrated(study)` says the study
is there, and records what a user would have seen.

One probe of one node = a study-level C-FIND for the study, then a C-GET of *one instance*
of it (light, yet a real retrieval of pixel data). Which instance: the first of the first
series, found once per study with SERIES and IMAGE C-FINDs and cached (the same UIDs exist on
both nodes). A probe is *ok* when the C-FIND found the study and the C-GET delivered the
instance; its latency is the wall time of the whole probe.

Every probe is bounded in time: each network read by `timeout_s`, a whole C-FIND by
`timeout_s` too (a peer that drips bytes resets per-read timers), and the whole probe by
`probe_deadline_s` (3 x `timeout_s` by default), after which it is recorded as failed and left
behind in its daemon thread. A stalled or hostile node therefore costs failed samples at a
steady pace, never the sampling loop, and `stop()` returns without waiting for a probe.

Summary figures: `inaccessible_share` per node is failed probes / probes of that node;
latency percentiles are over the successful probes only (a refused connection is fast and
would flatter the figures).
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from harness.migration.state import percentile
from harness.nodes.base import Node

ROLES = ("source", "target")


@dataclass
class Sample:
    """One probe of one node."""

    t: float  # seconds since the monitor started
    node: str  # "source" or "target"
    study: str
    found: bool
    retrieved: bool
    latency_s: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.found and self.retrieved


@dataclass(frozen=True)
class _InstanceRef:
    series: str
    sop_instance: str
    sop_class: str | None


class AvailabilityMonitor:
    """Background prober of source (and target) availability; use as a context manager.

    Stops when the context exits, or by itself after `max_duration_s` or `max_samples`.
    The thread never raises: a failed probe is a sample with its error.
    """

    def __init__(
        self,
        source: Node,
        target: Node | None,
        studies: list[str],
        interval_s: float = 0.5,
        seed: int = 0,
        is_migrated: Callable[[str], bool] | None = None,
        *,
        max_duration_s: float = 6 * 3600.0,
        max_samples: int = 100_000,
        timeline_points: int = 200,
        timeout_s: float = 10.0,
        probe_deadline_s: float | None = None,
    ) -> None:
        self.nodes: dict[str, Node | None] = {"source": source, "target": target}
        self.studies = list(studies)
        self.interval_s = interval_s
        self.random = random.Random(seed)
        self.is_migrated = is_migrated or (lambda _study: False)
        self.max_duration_s = max_duration_s
        self.max_samples = max_samples
        self.timeline_points = timeline_points
        self.timeout_s = timeout_s
        self.probe_deadline_s = probe_deadline_s if probe_deadline_s is not None else 3 * timeout_s
        self._samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._stopped: float | None = None
        self._refs: dict[str, _InstanceRef] = {}
        self.thread_error: str | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> AvailabilityMonitor:
        if self._thread is None:
            self._started = time.monotonic()
            self._thread = threading.Thread(target=self._loop, name="availability", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s)  # the loop leaves a running probe at once
        if self._stopped is None:
            self._stopped = time.monotonic()

    def __enter__(self) -> AvailabilityMonitor:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """True while the probing thread runs (it may stop by itself at its bounds)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    # -- probing -------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stop.is_set() and self.studies:
                if time.monotonic() - self._started >= self.max_duration_s:
                    break
                study = self.random.choice(self.studies)
                self._record(self._bounded_probe("source", study))
                if self.nodes["target"] is not None and self._migrated(study):
                    self._record(self._bounded_probe("target", study))
                if len(self._samples) >= self.max_samples:
                    break
                self._stop.wait(self.interval_s)
        except Exception as exc:  # noqa: BLE001 - the monitor must never take the run down
            self.thread_error = f"{exc.__class__.__name__}: {exc}"
        finally:
            self._stopped = time.monotonic()

    def _migrated(self, study: str) -> bool:
        try:
            return bool(self.is_migrated(study))
        except Exception:  # noqa: BLE001 - a broken callback means: do not probe the target
            return False

    def _record(self, sample: Sample | None) -> None:
        if sample is None:  # stopped while probing
            return
        with self._lock:
            if len(self._samples) < self.max_samples:
                self._samples.append(sample)

    def _bounded_probe(self, role: str, study: str) -> Sample | None:
        """`_probe` in a daemon thread, waited for at most `probe_deadline_s` (or until
        stop()): a probe the peer keeps busy is a failed sample, and the loop goes on."""
        outcome: list[Sample] = []
        t = time.monotonic() - self._started
        start = time.perf_counter()
        prober = threading.Thread(target=lambda: outcome.append(self._probe(role, study)),
                                  name=f"availability-{role}", daemon=True)
        prober.start()
        deadline = time.monotonic() + self.probe_deadline_s
        while prober.is_alive() and time.monotonic() < deadline and not self._stop.is_set():
            prober.join(0.1)
        if outcome:
            return outcome[0]
        if self._stop.is_set():
            return None
        return Sample(t, role, study, False, False, time.perf_counter() - start,
                      f"probe unfinished after {self.probe_deadline_s:g} s (peer kept it busy)")

    def _probe(self, role: str, study: str) -> Sample:
        node = self.nodes[role]
        assert node is not None
        t = time.monotonic() - self._started
        start = time.perf_counter()
        found = retrieved = False
        error = None
        try:
            client = node.dimse(timeout_s=self.timeout_s)
            client.find_deadline_s = self.timeout_s  # a whole C-FIND, however the peer drips
            matches = client.find("STUDY", {"StudyInstanceUID": study})
            found = matches.ok and len(matches.matches) > 0
            if not found:
                error = f"study-level C-FIND: {len(matches.matches)} matches, {matches.status}"
            else:
                ref = self._instance(client, study)
                got = client.get(
                    "IMAGE",
                    {
                        "StudyInstanceUID": study,
                        "SeriesInstanceUID": ref.series,
                        "SOPInstanceUID": ref.sop_instance,
                    },
                    sop_classes=[ref.sop_class] if ref.sop_class else None,
                )
                retrieved = got.ok and any(
                    i.sop_instance_uid == ref.sop_instance for i in got.instances
                )
                if not retrieved:
                    error = f"C-GET of one instance: {got.status}, completed {got.completed}"
        except Exception as exc:  # noqa: BLE001 - recorded as an unavailable sample
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            error = f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__
        return Sample(t, role, study, found, retrieved, time.perf_counter() - start, error)

    def _instance(self, client, study: str) -> _InstanceRef:
        """The instance to retrieve for a study: looked up once, then cached."""
        if study in self._refs:
            return self._refs[study]
        series = client.find("SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": None})
        for one in series.matches:
            series_uid = str(one.get("SeriesInstanceUID", ""))
            images = client.find(
                "IMAGE",
                {
                    "StudyInstanceUID": study,
                    "SeriesInstanceUID": series_uid,
                    "SOPInstanceUID": None,
                    "SOPClassUID": None,
                },
            )
            for image in images.matches:
                if image.get("SOPInstanceUID"):
                    ref = _InstanceRef(
                        series_uid,
                        str(image.SOPInstanceUID),
                        str(image.get("SOPClassUID", "")) or None,
                    )
                    self._refs[study] = ref
                    return ref
        raise LookupError(f"study {study}: no instance listed by SERIES/IMAGE C-FIND")

    # -- figures -------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Figures for report.json: unavailability share, latency, a bounded timeline."""
        samples = self.samples
        end = self._stopped if self._stopped is not None else time.monotonic()
        out: dict[str, Any] = {
            "samples": len(samples),
            "nodes": {role: (n.name if n else None) for role, n in self.nodes.items()},
            "probe": "study-level C-FIND + C-GET of one instance",
            "interval_s": self.interval_s,
            "duration_s": round(max(0.0, end - self._started), 3) if self._started else 0.0,
            "studies_probed": len({s.study for s in samples}),
            "inaccessible_share": {},
            "probes": {},
            "latency_s": {},
            "errors": {},
            "timeline": [],
        }
        if self.thread_error:
            out["monitor_error"] = self.thread_error
        for role in ROLES:
            mine = [s for s in samples if s.node == role]
            failed = [s for s in mine if not s.ok]
            out["probes"][role] = {"total": len(mine), "failed": len(failed)}
            out["inaccessible_share"][role] = round(len(failed) / len(mine), 4) if mine else None
            good = [s.latency_s for s in mine if s.ok]
            out["latency_s"][role] = (
                {
                    "p50": round(percentile(good, 50), 4),
                    "p95": round(percentile(good, 95), 4),
                    "max": round(max(good), 4),
                }
                if good
                else None
            )
            errors: dict[str, int] = {}
            for s in failed:
                key = s.error or "unknown"
                errors[key] = errors.get(key, 0) + 1
            out["errors"][role] = dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5])
            out["timeline"].extend(self._timeline(mine))
        out["timeline"].sort(key=lambda row: row[0])
        return out

    def _timeline(self, samples: list[Sample]) -> list[list[Any]]:
        """[t, node, ok, latency] rows, at most timeline_points/2 per node.

        Consecutive samples are merged into buckets: t of the first, ok only if every
        probe in the bucket was ok (an outage never disappears), the worst latency.
        """
        if not samples:
            return []
        per_node = max(1, self.timeline_points // len(ROLES))
        size = math.ceil(len(samples) / per_node)
        rows = []
        for start in range(0, len(samples), size):
            bucket = samples[start : start + size]
            rows.append(
                [
                    round(bucket[0].t, 3),
                    bucket[0].node,
                    all(s.ok for s in bucket),
                    round(max(s.latency_s for s in bucket), 4),
                ]
            )
        return rows

    def samples_as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(s) for s in self.samples]
