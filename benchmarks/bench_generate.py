"""Benchmark of synthetic_data generation (run by hand, not a timed test).

    python benchmarks/bench_generate.py            # full run (~1 minute, ~0.5 GB of disk)
    python benchmarks/bench_generate.py --quick    # smaller counts, no realistic CT

Prints, for tiny CT/MR objects and for realistic CT (512x512, 300-slice series):
  * generate():         datasets built per second (no I/O);
  * write_archive():    files + manifest written per second and MB/s;
  * plain pydicom loop: the same objects built element by element as a plain script would
    (Dataset() + add_new for every element, values captured from the generator beforehand,
    untimed) and written with dcmwrite(enforce_file_format=True) plus a SHA-256 of each file;
    its files are byte-identical to write_archive's, so the ratio compares like with like;
  * memory: peak RSS of write_archive for N and 4N instances, each in a fresh process.
Rates are given per wall second and per CPU second of this process (the machine may be shared);
write_archive is also timed into /dev/shm to separate CPU cost from the disk's system time.
Targets: tiny >= 1,000 instances/s on one core; realistic CT >= 200 MB/s; memory flat in N.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthetic_data import GeneratorOptions, generate, write_archive  # noqa: E402
from synthetic_data.manifest import read_manifest  # noqa: E402


class Timer:
    """Wall, CPU, user and system seconds of a block (all threads of this process)."""

    def __enter__(self) -> Timer:
        self.wall0 = time.perf_counter()
        self.usage0 = resource.getrusage(resource.RUSAGE_SELF)
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.user = usage.ru_utime - self.usage0.ru_utime
        self.sys = usage.ru_stime - self.usage0.ru_stime
        self.cpu = self.user + self.sys


def _recipe(ds: Dataset) -> tuple[list, list]:
    """(file meta elements, dataset elements) as (tag, VR, value) tuples."""
    meta = [(e.tag, e.VR, e.value) for e in ds.file_meta]
    return meta, [(e.tag, e.VR, e.value) for e in ds]


def plain_pydicom_loop(recipes: list[tuple[str, tuple[list, list]]], root: Path) -> list[str]:
    """What a straightforward script does: build each dataset, dcmwrite it, hash the file."""
    digests = []
    for rel, (meta_elems, elems) in recipes:
        meta = FileMetaDataset()
        for tag, vr, value in meta_elems:
            meta.add_new(tag, vr, value)
        ds = Dataset()
        for tag, vr, value in elems:
            ds.add_new(tag, vr, value)
        ds.file_meta = meta
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        dcmwrite(path, ds, enforce_file_format=True)
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    return digests


def bench_case(name: str, opts: GeneratorOptions, work: Path) -> dict:
    with Timer() as t_gen:
        count = sum(1 for _ in generate(opts))
    tmpfs = {}
    if Path("/dev/shm").is_dir():  # the same write to memory: what is CPU, what is the disk
        shm = Path(tempfile.mkdtemp(prefix="bench-synthetic-", dir="/dev/shm"))
        try:
            with Timer() as t_shm:
                write_archive(opts, shm / "a")
        finally:
            shutil.rmtree(shm, ignore_errors=True)
        tmpfs = {"write_to_tmpfs_per_s_wall": round(count / t_shm.wall),
                 "write_to_tmpfs_per_s_user_cpu": round(count / t_shm.user)}
    out = work / f"{name.replace(' ', '_').replace('/', '_')}-archive"
    with Timer() as t_write:
        counts = write_archive(opts, out)
    mbytes = counts["bytes"] / 1e6
    records = read_manifest(out)
    # the same objects for the plain loop: captured outside the timed block
    recipes = [(rec["path"], _recipe(ds)) for rec, ds in zip(records, generate(opts),
                                                              strict=True)]
    plain_root = work / f"{name.replace(' ', '_').replace('/', '_')}-plain"
    with Timer() as t_plain:
        digests = plain_pydicom_loop(recipes, plain_root)
    same = digests == [r["sha256"] for r in records]
    shutil.rmtree(out)
    shutil.rmtree(plain_root)
    return {
        "case": name, "instances": count, "megabytes": round(mbytes, 1),
        "generate_per_s_wall": round(count / t_gen.wall),
        "generate_per_s_cpu": round(count / t_gen.cpu),
        "write_per_s_wall": round(count / t_write.wall),
        "write_per_s_cpu": round(count / t_write.cpu),
        "write_mb_s_wall": round(mbytes / t_write.wall, 1),
        "write_mb_s_cpu": round(mbytes / t_write.cpu, 1),
        "write_user_s": round(t_write.user, 2),
        "write_system_s": round(t_write.sys, 2),
        **tmpfs,
        "plain_per_s_wall": round(count / t_plain.wall),
        "plain_mb_s_wall": round(mbytes / t_plain.wall, 1),
        "ratio_write_vs_plain_wall": round(t_plain.wall / t_write.wall, 2),
        "ratio_write_vs_plain_cpu": round(t_plain.cpu / t_write.cpu, 2),
        "plain_files_byte_identical": same,
    }


def _child_memory(patients: int, out: str) -> None:
    opts = GeneratorOptions(patients=patients, modalities=["CT", "MR"], seed=1, facilities=2)
    counts = write_archive(opts, out)
    # VmHWM: this process's peak RSS (ru_maxrss would include the parent's, kept over exec)
    status = Path("/proc/self/status")
    if status.exists():
        line = next(ln for ln in status.read_text().splitlines() if ln.startswith("VmHWM"))
        rss_mb = int(line.split()[1]) / 1024
    else:
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"instances": counts["instances"], "peak_rss_mb": round(rss_mb, 1)}))


def bench_memory(patients: int, work: Path) -> list[dict]:
    rows = []
    for n in (patients, patients * 4):
        out = work / f"mem-{n}"
        proc = subprocess.run([sys.executable, __file__, "--child-memory", str(n), str(out)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        shutil.rmtree(out)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller run, no realistic CT")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--child-memory", nargs=2, metavar=("PATIENTS", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        _child_memory(int(args.child_memory[0]), args.child_memory[1])
        return
    work = Path(tempfile.mkdtemp(prefix="bench-synthetic-", dir=args.dir))
    try:
        tiny_patients = 100 if args.quick else 400
        rows = [bench_case("tiny CT/MR", GeneratorOptions(
            patients=tiny_patients, modalities=["CT", "MR"], seed=1, facilities=2), work)]
        if not args.quick:
            rows.append(bench_case("realistic CT", GeneratorOptions(
                patients=1, modalities=["CT"], seed=1, facilities=1, scale="realistic",
                trap_rate=0.0), work))
        memory = bench_memory(50 if args.quick else 200, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.2f}")
    for row in rows:
        print(f"\n== {row.pop('case')}")
        for key, value in row.items():
            print(f"  {key:32s} {value}")
    print("\n== memory (peak RSS of write_archive in a fresh process)")
    for row in memory:
        print(f"  {row['instances']:6d} instances: {row['peak_rss_mb']} MB")


if __name__ == "__main__":
    main()
