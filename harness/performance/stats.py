"""Measurements of a load run: HdrHistogram latencies, counts, errors, a per-second timeline.

Latencies are kept in an HdrHistogram (3 significant digits, 1 us to 1 h) so that high
percentiles stay exact under millions of operations and the histogram itself can be
written into the evidence and merged or re-read later.
"""

from __future__ import annotations

import math
import os
import random
import threading
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hdrh.histogram import HdrHistogram

if TYPE_CHECKING:
    from harness.performance.workload import Group

HIGHEST_TRACKABLE_US = 3_600_000_000  # one hour in microseconds
PERCENTILES = (50, 90, 95, 99, 99.9)


class OperationStats:
    """Latency histogram (microseconds), counts, bytes and errors of one group."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.histogram = HdrHistogram(1, HIGHEST_TRACKABLE_US, 3)
        self.count = 0
        self.errors = 0
        self.instances = 0
        self.bytes = 0
        self.dropped = 0  # open model: arrivals never started before the end
        self.errors_by_status: Counter[str] = Counter()
        self.lock = threading.Lock()

    def record(self, latency_s: float, ok: bool, status: str, instances: int, nbytes: int) -> None:
        with self.lock:
            self.histogram.record_value(max(1, min(int(latency_s * 1e6), HIGHEST_TRACKABLE_US)))
            self.count += 1
            if ok:
                self.instances += instances
                self.bytes += nbytes
            else:
                self.errors += 1
                self.errors_by_status[status] += 1

    def percentile_ms(self, p: float) -> float:
        with self.lock:
            if not self.histogram.get_total_count():
                return 0.0
            return self.histogram.get_value_at_percentile(p) / 1000.0

    def as_dict(self, measured_s: float) -> dict[str, Any]:
        with self.lock:
            h, n = self.histogram, self.histogram.get_total_count()
            latency = {f"p{p:g}": round(h.get_value_at_percentile(p) / 1000.0, 3) if n else None
                       for p in PERCENTILES}
            latency["mean"] = round(h.get_mean_value() / 1000.0, 3) if n else None
            latency["max"] = round(h.get_max_value() / 1000.0, 3) if n else None
            encoded = h.encode()
            return {
                "operation": self.group.operation,
                "model": self.group.model,
                "users": self.group.users,
                "rate": self.group.rate,
                "count": self.count,
                "errors": self.errors,
                "dropped": self.dropped,
                "availability_pct": round(100.0 * (self.count - self.errors) / self.count, 4)
                if self.count else None,
                "instances": self.instances,
                "bytes": self.bytes,
                "ops_per_s": round(self.count / measured_s, 3),
                "instances_per_s": round(self.instances / measured_s, 3),
                "mb_per_s": round(self.bytes / measured_s / 1e6, 3),
                "latency_ms": latency,
                "errors_by_status": dict(self.errors_by_status),
                "hdr_histogram": encoded.decode() if isinstance(encoded, bytes) else encoded,
            }


class Timeline:
    """Per-second buckets of completed work (operations, errors, instances, bytes) and of
    latency (p50, p95, max of the operations that ended in that second).

    Why a sample and not a histogram per second: a run may last an hour, and a histogram per
    bucket would hold megabytes; at most SAMPLES_PER_SECOND latencies per second are kept
    (reservoir sampling, Vitter's algorithm R), so memory is bounded however fast the PACS
    answers, while the maximum is exact.
    """

    SAMPLES_PER_SECOND = 256

    def __init__(self, seed: int = 0) -> None:
        self.buckets: dict[int, list[int]] = {}
        self.latencies: dict[int, list[float]] = {}  # second -> sampled latencies (s)
        self.seen: dict[int, int] = {}  # second -> operations offered to the sample
        self.slowest: dict[int, float] = {}
        self.random = random.Random(seed)
        self.lock = threading.Lock()

    def add(self, second: int, ok: bool, instances: int, nbytes: int,
            latency_s: float | None = None) -> None:
        with self.lock:
            b = self.buckets.setdefault(second, [0, 0, 0, 0])
            b[0] += 1
            b[1] += 0 if ok else 1
            b[2] += instances if ok else 0
            b[3] += nbytes if ok else 0
            if latency_s is not None and ok:
                self._sample(second, latency_s)

    def _sample(self, second: int, latency_s: float) -> None:
        seen = self.seen.get(second, 0) + 1
        self.seen[second] = seen
        self.slowest[second] = max(self.slowest.get(second, 0.0), latency_s)
        sample = self.latencies.setdefault(second, [])
        if len(sample) < self.SAMPLES_PER_SECOND:
            sample.append(latency_s)
        else:
            slot = self.random.randrange(seen)
            if slot < self.SAMPLES_PER_SECOND:
                sample[slot] = latency_s

    def as_list(self) -> list[dict[str, Any]]:
        with self.lock:
            rows = []
            for s, b in sorted(self.buckets.items()):
                row: dict[str, Any] = {"t_s": s, "operations": b[0], "errors": b[1],
                                       "instances": b[2], "mb": round(b[3] / 1e6, 3)}
                sample = sorted(self.latencies.get(s, ()))
                if sample:
                    row["latency_ms"] = {
                        "p50": round(1000 * _nearest_rank(sample, 50), 3),
                        "p95": round(1000 * _nearest_rank(sample, 95), 3),
                        "max": round(1000 * self.slowest[s], 3),
                    }
                rows.append(row)
            return rows


def _nearest_rank(ordered: list[float], percentile: float) -> float:
    """The nearest-rank percentile of an ascending list (not empty)."""
    rank = max(1, math.ceil(percentile / 100 * len(ordered)))
    return ordered[rank - 1]


def process_cpu_s(pid: int) -> float | None:
    """utime + stime of another process (e.g. the PACS) from /proc, None when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system

