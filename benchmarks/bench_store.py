"""Benchmark: the harness's C-STORE engine against DCMTK's storescu (run by hand).

    python benchmarks/bench_store.py                 # 200 realistic CT (512x512), ~1 min
    python benchmarks/bench_store.py --instances 50  # quicker

The same files (synthetic 512x512 CT, ~0.5 MB each) go to the same launched Orthanc node,
wiped between runs, in two TCP configurations of the DCMTK side:

  * `default`: Orthanc and storescu as Debian installs them (TCP_NODELAY=0). Debian's DCMTK
    leaves Nagle's algorithm on, so each C-STORE-RSP waits for the client's delayed ACK;
  * `nodelay`: both with TCP_NODELAY=1 (DCMTK's switch that turns Nagle's algorithm off, as
    Orthanc's own static builds do at compile time; nodes the harness launches get it).

In each: storescu over one association (one process for all files), then the harness's
DimseClient.store over 1 and 8 associations, each timed around the whole call (file scan
included). Then a pynetdicom Storage SCP sink in its own process, which discards what it
gets, shows each client's own ceiling when the server is not the limit.

Targets (issue 7), in both configurations: harness/storescu >= 1.0 at one association;
harness with 8 associations >= 3x storescu's single-association rate. --json for a dict.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.cluster import Cluster  # noqa: E402
from harness.config import parse_topology  # noqa: E402
from harness.dicom.client import DimseClient  # noqa: E402
from harness.dicom.peer import HARNESS_AE_TITLE  # noqa: E402
from harness.launch.ports import free_port  # noqa: E402
from synthetic_data.templates import clone_study, template_instance  # noqa: E402

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
    template = template_instance(scale, "CT")
    total = 0
    for number, ds in enumerate(clone_study(template, count)):
        path = folder / f"ct{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total / 1e6


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_cpu_s() -> float:
    """CPU seconds of this process plus its finished children (storescu)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_storescu(files: list[Path], host: str, port: int, ae: str, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        [STORESCU, "-aet", HARNESS_AE_TITLE, "-aec", ae, host, str(port), *map(str, files)],
        capture_output=True, text=True, timeout=900, env=env,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"storescu failed ({proc.returncode}): {proc.stderr[-500:]}")
    return elapsed


def run_harness(files: list[Path], host: str, port: int, ae: str, associations: int) -> float:
    client = DimseClient(host, port, ae, timeout_s=120)
    start = time.perf_counter()
    report = client.store(files, associations=associations)
    elapsed = time.perf_counter() - start
    if not report.ok:
        raise SystemExit(f"harness store failed: {report.failed[0].error}")
    return elapsed


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
    sink = None
    orthanc_version = ""
    try:
        megabytes = write_instances(folder, args.instances, args.scale)
        files = sorted(folder.glob("*.dcm"))
        n = len(files)

        def record(target: str, tool: str, assocs: int, elapsed: float,
                   client_cpu: float, server_cpu: float | None) -> None:
            row = {"target": target, "tool": tool, "associations": assocs,
                   "seconds": round(elapsed, 2), "instances_per_s": round(n / elapsed, 1),
                   "mb_per_s": round(megabytes / elapsed, 1),
                   "client_cpu_ms_per_instance": round(client_cpu * 1000 / n, 2)}
            server = ""
            if server_cpu is not None:
                row["server_cpu_ms_per_instance"] = round(server_cpu * 1000 / n, 2)
                server = f"  server CPU {row['server_cpu_ms_per_instance']:5.2f} ms/inst"
            rows.append(row)
            print(f"{target:16} {tool:9} assoc={assocs}  {elapsed:6.2f} s  "
                  f"{n / elapsed:6.1f} inst/s  {megabytes / elapsed:6.1f} MB/s  "
                  f"client CPU {row['client_cpu_ms_per_instance']:5.2f} ms/inst{server}",
                  flush=True)

        for config in ("default", "nodelay"):
            # launched nodes default to TCP_NODELAY=1 (harness/nodes/base.py); 0 reproduces
            # Orthanc and storescu as Debian ships them
            env = {**os.environ, "TCP_NODELAY": "1" if config == "nodelay" else "0"}
            orthanc_version = store_to_orthanc(files, env, f"orthanc-{config}", record)

        port = free_port()
        sink = subprocess.Popen([sys.executable, "-c", SINK, str(port), "900"])
        wait_for_echo(port)
        for tool, assocs in (("storescu", 1), ("harness", 1), ("harness", 8)):
            cpu = client_cpu_s()
            if tool == "storescu":
                elapsed = run_storescu(files, "127.0.0.1", port, "SINK", dict(os.environ))
            else:
                elapsed = run_harness(files, "127.0.0.1", port, "SINK", assocs)
            record("sink", tool, assocs, elapsed, client_cpu_s() - cpu, None)
    finally:
        if sink is not None:
            sink.terminate()
            sink.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)

    rate = {(r["target"], r["tool"], r["associations"]): r["instances_per_s"] for r in rows}
    ratios: dict[str, float] = {}
    targets: dict[str, float] = {}
    for target in ("orthanc-default", "orthanc-nodelay", "sink"):
        base = rate[(target, "storescu", 1)]
        key1, key8 = f"{target}_harness1_vs_storescu1", f"{target}_harness8_vs_storescu1"
        ratios[key1] = round(rate[(target, "harness", 1)] / base, 2)
        ratios[key8] = round(rate[(target, "harness", 8)] / base, 2)
        if target != "sink":
            targets[key1], targets[key8] = 1.0, 3.0
    print(f"\n{n} instances, {megabytes:.1f} MB, Orthanc {orthanc_version}, "
          f"{os.cpu_count()} CPUs")
    for key, value in ratios.items():
        target = f" (target >= {targets[key]})" if key in targets else ""
        print(f"ratio {key}: {value}{target}")
    # What the machine allows: Orthanc's CPU per instance bounds its rate on these cores.
    ceilings = {}
    for target in ("orthanc-default", "orthanc-nodelay"):
        row = next(r for r in rows if r["target"] == target and r["associations"] == 8)
        ceilings[target] = round(
            (os.cpu_count() or 1) * 1000 / max(row["server_cpu_ms_per_instance"], 0.01), 1)
        print(f"{target}: Orthanc used {row['server_cpu_ms_per_instance']} ms CPU per instance;"
              f" {os.cpu_count()} CPUs cap it near {ceilings[target]} inst/s with a free client")
    if args.json:
        print(json.dumps({"instances": n, "megabytes": round(megabytes, 1), "rows": rows,
                          "ratios": ratios, "orthanc_ceilings": ceilings,
                          "orthanc": orthanc_version, "cpus": os.cpu_count()}, indent=2))


def store_to_orthanc(files: list[Path], env: dict, target: str, record) -> str:
    """storescu, harness x1, harness x8 to one Orthanc started with `env`; its version."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the node process inherits the harness's environment
    try:
        cluster = Cluster.launch(parse_topology(
            "name: bench-store\nnodes:\n  orthanc: {kind: orthanc, ae_title: BENCH}\n"))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        node = cluster.node("orthanc")
        for tool, assocs in (("storescu", 1), ("harness", 1), ("harness", 8)):
            node.wipe()
            cpu, server_cpu = client_cpu_s(), process_cpu_s(node.handle.pid)
            if tool == "storescu":
                elapsed = run_storescu(files, node.host, node.dicom_port, node.ae_title, env)
            else:
                elapsed = run_harness(files, node.host, node.dicom_port, node.ae_title, assocs)
            stored = node.statistics().instances
            if stored != len(files):
                raise SystemExit(f"{tool}: Orthanc holds {stored} instances, expected {len(files)}")
            record(target, tool, assocs, elapsed, client_cpu_s() - cpu,
                   process_cpu_s(node.handle.pid) - server_cpu)
        return node.version()
    finally:
        cluster.stop()


def wait_for_echo(port: int) -> None:
    deadline = time.monotonic() + 20
    client = DimseClient("127.0.0.1", port, "SINK", timeout_s=5)
    while True:
        try:
            client.echo()
            return
        except Exception:  # noqa: BLE001 - not listening yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


if __name__ == "__main__":
    main()
