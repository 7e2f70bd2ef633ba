"""Benchmark: the embedded PACS's store path against pynetdicom's storescp (run by hand).

    python benchmarks/bench_embedded_store.py                    # 200 realistic CT, 1 and 4 assocs
    python benchmarks/bench_embedded_store.py --scale small      # tiny instances: per-call cost
    python benchmarks/bench_embedded_store.py --instances 50 --json

The same files (synthetic CT of one study) go, with the harness's DimseClient.store over 1 and
then 4 associations, to

  * the embedded PACS (harness/embedded_pacs), launched as the harness launches it
    (Cluster.launch, wiped between runs): it checks each data set, writes the file and
    indexes it in SQLite before it answers;
  * pynetdicom's own storescp (`python -m pynetdicom storescp`, writing files into a temp
    directory): files only, no index, no checks.

Then the first 30 files one association each (per-file rows: p50 of a whole store call).
Per instance: the p50 of the time between consecutive C-STORE results on one association
(send + the peer's work + the response; the client reads the next file meanwhile).
Target (issue 13): embedded/storescp instances/s >= 0.5. --json for a dict.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_store import process_cpu_s, wait_for_echo, write_instances  # noqa: E402

from harness.cluster import Cluster  # noqa: E402
from harness.config import parse_topology  # noqa: E402
from harness.dicom.client import DimseClient  # noqa: E402
from harness.dicom.status import StoreResult  # noqa: E402
from harness.launch.ports import free_port  # noqa: E402

ASSOCIATIONS = (1, 4)
PER_FILE = 30  # files stored one association each


def timed_store(files: list[Path], host: str, port: int, ae: str, assocs: int) -> dict:
    """Store `files`; wall time and the p50/p90 interval between results per association."""
    last: dict[int, float] = {}
    intervals: list[float] = []
    lock = threading.Lock()

    def on_result(result: StoreResult) -> None:
        now, thread = time.perf_counter(), threading.get_ident()
        with lock:
            if thread in last:
                intervals.append(now - last[thread])
            last[thread] = now

    client = DimseClient(host, port, ae, timeout_s=120)
    start = time.perf_counter()
    report = client.store(files, associations=assocs, on_result=on_result)
    elapsed = time.perf_counter() - start
    if not report.ok:
        first = report.failed[0]
        raise SystemExit(f"store to {ae} failed: {first.status} {first.error or ''}")
    intervals.sort()
    return {
        "seconds": round(elapsed, 2),
        "instances_per_s": round(len(files) / elapsed, 1),
        "p50_ms": round(statistics.median(intervals) * 1000, 1) if intervals else None,
        "p90_ms": round(intervals[int(0.9 * (len(intervals) - 1))] * 1000, 1)
        if intervals else None,
    }


def per_association(files: list[Path], host: str, port: int, ae: str) -> dict:
    """One association per file (as a modality sending one image at a time, or the load
    engine's store operations): what association setup costs the server."""
    client = DimseClient(host, port, ae, timeout_s=120)
    times: list[float] = []
    for path in files:
        start = time.perf_counter()
        report = client.store([path])
        times.append(time.perf_counter() - start)
        if not report.ok:
            raise SystemExit(f"store of {path.name} to {ae} failed: {report.failed[0].status}")
    times.sort()
    return {"seconds": round(sum(times), 2), "instances_per_s": round(len(files) / sum(times), 1),
            "p50_ms": round(statistics.median(times) * 1000, 1),
            "p90_ms": round(times[int(0.9 * (len(times) - 1))] * 1000, 1)}


def bench_embedded(files: list[Path], record) -> None:
    cluster = Cluster.launch(parse_topology(
        "name: bench-embedded\nnodes:\n  pacs: {kind: embedded, ae_title: EMBEDDED}\n"))
    try:
        node = cluster.node("pacs")
        for assocs in ASSOCIATIONS:
            node.wipe()
            cpu = process_cpu_s(node.handle.pid)
            row = timed_store(files, node.host, node.dicom_port, node.ae_title, assocs)
            stored = node.statistics().instances
            if stored != len(files):
                raise SystemExit(f"embedded PACS indexes {stored} instances, expected {len(files)}")
            row["server_cpu_ms_per_instance"] = round(
                (process_cpu_s(node.handle.pid) - cpu) * 1000 / len(files), 2)
            record("embedded", assocs, row)
        node.wipe()
        cpu = process_cpu_s(node.handle.pid)
        row = per_association(files[:PER_FILE], node.host, node.dicom_port, node.ae_title)
        row["server_cpu_ms_per_instance"] = round(
            (process_cpu_s(node.handle.pid) - cpu) * 1000 / PER_FILE, 2)
        record("embedded", "per-file", row)
    finally:
        cluster.stop()


def bench_storescp(files: list[Path], record) -> None:
    out = Path(tempfile.mkdtemp(prefix="bench-storescp-"))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pynetdicom", "storescp", "--bind-address", "127.0.0.1",
         "--output-directory", str(out), "--ae-title", "STORESCP", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_echo(port)  # storescp answers any called AE title
        for assocs in ASSOCIATIONS:
            for old in out.iterdir():
                old.unlink()
            cpu = process_cpu_s(proc.pid)
            row = timed_store(files, "127.0.0.1", port, "STORESCP", assocs)
            written = len(list(out.iterdir()))
            if written != len(files):
                raise SystemExit(f"storescp wrote {written} files, expected {len(files)}")
            row["server_cpu_ms_per_instance"] = round(
                (process_cpu_s(proc.pid) - cpu) * 1000 / len(files), 2)
            record("storescp", assocs, row)
        cpu = process_cpu_s(proc.pid)
        row = per_association(files[:PER_FILE], "127.0.0.1", port, "STORESCP")
        row["server_cpu_ms_per_instance"] = round(
            (process_cpu_s(proc.pid) - cpu) * 1000 / PER_FILE, 2)
        record("storescp", "per-file", row)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--scale", default="realistic", choices=["small", "realistic"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="bench-embedded-"))
    rows: list[dict] = []
    try:
        megabytes = write_instances(folder, args.instances, args.scale)
        files = sorted(folder.glob("*.dcm"))

        def record(target: str, assocs: int | str, row: dict) -> None:
            rows.append({"target": target, "associations": assocs, **row})
            print(f"{target:9} assoc={assocs:<8}  {row['seconds']:6.2f} s  "
                  f"{row['instances_per_s']:6.1f} inst/s  p50 {row['p50_ms']} ms  "
                  f"p90 {row['p90_ms']} ms  server CPU "
                  f"{row['server_cpu_ms_per_instance']} ms/inst", flush=True)

        bench_embedded(files, record)
        bench_storescp(files, record)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    rate = {(r["target"], r["associations"]): r["instances_per_s"] for r in rows}
    ratios = {f"embedded_vs_storescp_{a}": round(rate[("embedded", a)] / rate[("storescp", a)], 2)
              for a in (*ASSOCIATIONS, "per-file")}
    print(f"\n{len(files)} instances ({args.scale}), {megabytes:.1f} MB, {os.cpu_count()} CPUs")
    for key, value in ratios.items():
        print(f"ratio {key}: {value} (target >= 0.5)")
    if args.json:
        print(json.dumps({"instances": len(files), "scale": args.scale,
                          "megabytes": round(megabytes, 1), "rows": rows, "ratios": ratios,
                          "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
