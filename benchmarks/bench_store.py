"""Benchmark: the harness's C-STORE engine against DCMTK's storescu (run by hand).

    python benchmarks/bench_store.py                 # 200 realistic CT (512x512), ~2 min
    python benchmarks/bench_store.py --instances 50  # quicker

The same files (synthetic 512x512 CT, ~0.5 MB each) go to the same launched Orthanc node,
wiped between runs, then to a pynetdicom Storage SCP sink in its own process (which
discards what it gets) to show the client's own ceiling when the server is not the limit:

  * storescu, one association (DCMTK /usr/bin/storescu, one process for all files);
  * harness DimseClient.store, 1 association, then 8 associations.

Targets (issue 7): harness/storescu >= 1.0 at one association; harness with 8 associations
>= 3x storescu's single-association rate. Prints a table and the ratios; --json for a dict.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.cluster import Cluster, free_port  # noqa: E402
from harness.config import parse_topology  # noqa: E402
from harness.dicom.dimse import HARNESS_AE_TITLE, DimseClient  # noqa: E402
from harness.load import DatasetSpec, clone_study, template_instance  # noqa: E402

STORESCU = "/usr/bin/storescu"
SINK = textwrap.dedent(
    """
    import sys, time
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification
    ae = AE(ae_title="SINK")
    ae.maximum_associations = 32
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    ae.add_supported_context(Verification)
    ae.start_server(("127.0.0.1", int(sys.argv[1])), block=False,
                    evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000)])
    time.sleep(float(sys.argv[2]))
    """
)


def write_instances(folder: Path, count: int, scale: str) -> float:
    """`count` CT files of one study; returns their total size in MB."""
    template = template_instance(DatasetSpec(scale=scale, modality="CT"))
    total = 0
    for number, ds in enumerate(clone_study(template, count)):
        path = folder / f"ct{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total / 1e6


def run_storescu(files: list[Path], host: str, port: int, ae: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        [STORESCU, "-aet", HARNESS_AE_TITLE, "-aec", ae, host, str(port), *map(str, files)],
        capture_output=True, text=True, timeout=900,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"storescu failed ({proc.returncode}): {proc.stderr[-500:]}")
    return elapsed


def run_harness(files: list[Path], host: str, port: int, ae: str, associations: int) -> float:
    client = DimseClient(host, port, ae, timeout_s=120)
    report = client.store(files, associations=associations)
    if not report.ok:
        raise SystemExit(f"harness store failed: {report.failed[0].error}")
    return report.elapsed_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--scale", default="realistic", choices=["small", "realistic"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not os.path.exists(STORESCU):
        raise SystemExit(f"{STORESCU} not found (apt-get install dcmtk)")

    folder = Path(tempfile.mkdtemp(prefix="bench-store-"))
    rows: list[dict] = []
    cluster = sink = None
    try:
        megabytes = write_instances(folder, args.instances, args.scale)
        files = sorted(folder.glob("*.dcm"))
        n = len(files)
        cluster = Cluster.launch(parse_topology(
            "name: bench-store\nnodes:\n  orthanc: {kind: orthanc, ae_title: BENCH}\n"))
        node = cluster.node("orthanc")
        orthanc_version = node.version()

        def record(target: str, tool: str, assocs: int, elapsed: float) -> None:
            rows.append({"target": target, "tool": tool, "associations": assocs,
                         "seconds": round(elapsed, 2), "instances_per_s": round(n / elapsed, 1),
                         "mb_per_s": round(megabytes / elapsed, 1)})
            print(f"{target:8} {tool:9} assoc={assocs}  {elapsed:7.2f} s  "
                  f"{n / elapsed:7.1f} inst/s  {megabytes / elapsed:6.1f} MB/s", flush=True)

        for tool, assocs in (("storescu", 1), ("harness", 1), ("harness", 8)):
            node.wipe()
            if tool == "storescu":
                elapsed = run_storescu(files, node.host, node.dicom_port, node.ae_title)
            else:
                elapsed = run_harness(files, node.host, node.dicom_port, node.ae_title, assocs)
            stored = node.statistics().instances
            if stored != n:
                raise SystemExit(f"{tool}: Orthanc holds {stored} instances, expected {n}")
            record("orthanc", tool, assocs, elapsed)
        cluster.stop()
        cluster = None

        port = free_port()
        sink = subprocess.Popen([sys.executable, "-c", SINK, str(port), "900"])
        deadline = time.monotonic() + 20
        client = DimseClient("127.0.0.1", port, "SINK", timeout_s=5)
        while True:
            try:
                client.echo()
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        for tool, assocs in (("storescu", 1), ("harness", 1), ("harness", 8)):
            if tool == "storescu":
                elapsed = run_storescu(files, "127.0.0.1", port, "SINK")
            else:
                elapsed = run_harness(files, "127.0.0.1", port, "SINK", assocs)
            record("sink", tool, assocs, elapsed)
    finally:
        if sink is not None:
            sink.terminate()
            sink.wait(timeout=10)
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)

    rate = {(r["target"], r["tool"], r["associations"]): r["instances_per_s"] for r in rows}
    ratios = {
        "orthanc_harness1_vs_storescu": round(
            rate[("orthanc", "harness", 1)] / rate[("orthanc", "storescu", 1)], 2),
        "orthanc_harness8_vs_storescu1": round(
            rate[("orthanc", "harness", 8)] / rate[("orthanc", "storescu", 1)], 2),
        "sink_harness1_vs_storescu": round(
            rate[("sink", "harness", 1)] / rate[("sink", "storescu", 1)], 2),
        "sink_harness8_vs_storescu1": round(
            rate[("sink", "harness", 8)] / rate[("sink", "storescu", 1)], 2),
    }
    print(f"\n{n} instances, {megabytes:.1f} MB, Orthanc {orthanc_version}, "
          f"{os.cpu_count()} CPUs")
    for key, value in ratios.items():
        target = {"orthanc_harness1_vs_storescu": " (target >= 1.0)",
                  "orthanc_harness8_vs_storescu1": " (target >= 3.0)"}.get(key, "")
        print(f"ratio {key}: {value}{target}")
    if args.json:
        print(json.dumps({"instances": n, "megabytes": round(megabytes, 1), "rows": rows,
                          "ratios": ratios, "orthanc": orthanc_version}, indent=2))


if __name__ == "__main__":
    main()
