"""Benchmark: parallel inventory crawls against DCMTK's findscu and getscu (run by hand).

    python benchmarks/bench_crawl.py                      # 60 studies, workers 1 2 4, 3 runs
    python benchmarks/bench_crawl.py --studies 200 --runs 5 --json

One Orthanc (launched as the harness launches it) holds `--studies` small studies (3 series
of 2 tiny instances each). Over DIMSE, for workers 1, 2 and 4:

  * the harness's crawl (inventory.crawl, partition date) at depth `attributes` (C-FIND
    STUDY, then SERIES and IMAGE per study over one association) and depth `full` (also a
    C-GET of each study, every instance decoded and digested);
  * DCMTK, the same walk by subprocess, as many at once as the crawl has workers:
    /usr/bin/findscu for the study listing, then per study one findscu SERIES query and one
    findscu IMAGE query per series (one association per query: findscu cannot chain them);
    for `full`, also /usr/bin/getscu of each study into a scratch folder.

Runs are interleaved (crawl, DCMTK, next worker count, ...) so both sides see the same
load; each figure is the median of `--runs` runs; the ratio is crawl seconds / DCMTK seconds
(below 1: the crawl is faster). DCMTK runs with TCP_NODELAY=1. The machine may be shared:
compare ratios measured in one run, not absolute seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydicom import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.cluster import Cluster  # noqa: E402
from harness.config import parse_topology  # noqa: E402
from harness.dicom.peer import HARNESS_AE_TITLE  # noqa: E402
from harness.migration.inventory import crawl  # noqa: E402
from synthetic_data import GeneratorOptions, generate  # noqa: E402

FINDSCU = "/usr/bin/findscu"
GETSCU = "/usr/bin/getscu"
WORKERS = (1, 2, 4)
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
_UID = {tag: re.compile(rf"\({tag}\) UI \[([^\]]*)\]") for tag in ("0020,000d", "0020,000e",
                                                                      "0008,0018")}


def _dcmtk(node, *args: str, files: tuple[str, ...] = ()) -> str:
    proc = subprocess.run([*args, "-aet", HARNESS_AE_TITLE, "-aec", node.ae_title, "-to", "60",
                           node.host, str(node.dicom_port), *files],
                          capture_output=True, text=True, timeout=600, env=DCMTK_ENV)
    if proc.returncode:
        raise SystemExit(f"{args[0]} failed: {(proc.stderr or proc.stdout)[-500:]}")
    return proc.stdout + proc.stderr


def _uids(output: str, tag: str) -> list[str]:
    return [uid.rstrip("\0 ") for uid in _UID[tag].findall(output)]


def _find(node, level: str, *keys: str) -> str:
    args = [FINDSCU, "-v", "-S", "-k", f"QueryRetrieveLevel={level}"]
    for key in keys:
        args += ["-k", key]
    return _dcmtk(node, *args)


def _image_query(path: Path, study: str, series: str) -> Path:
    """An IMAGE-level query file for findscu (PS3.4 C.6.2: study and series unique keys)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "IMAGE"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.SOPClassUID = ds.InstanceNumber = ""
    ds.save_as(path, implicit_vr=False, little_endian=True)
    return path


def dcmtk_walk(node, workers: int, full: bool) -> tuple[float, int, int]:
    """(seconds, studies, instances) of DCMTK walking the node as the crawl does."""
    scratch = Path(tempfile.mkdtemp(prefix="bench-crawl-getscu-"))

    def one_study(study: str) -> int:
        series = _uids(_find(node, "SERIES", f"StudyInstanceUID={study}",
                             "SeriesInstanceUID"), "0020,000e")
        folder = scratch / study
        folder.mkdir()
        queries = [str(_image_query(folder / f"q{n}.dcm", study, uid))
                   for n, uid in enumerate(series)]
        count = len(_uids(_dcmtk(node, FINDSCU, "-v", "-S", files=tuple(queries)), "0008,0018")) \
            if queries else 0
        if full:
            _dcmtk(node, GETSCU, "-S", "-k", "QueryRetrieveLevel=STUDY",
                   "-k", f"StudyInstanceUID={study}", "-od", str(folder))
            shutil.rmtree(folder)
        return count

    start = time.perf_counter()
    try:
        studies = _uids(_find(node, "STUDY", "StudyInstanceUID", "PatientID", "StudyDate"),
                        "0020,000d")
        with ThreadPoolExecutor(workers) as pool:
            instances = sum(pool.map(one_study, studies))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return time.perf_counter() - start, len(studies), instances


def harness_crawl(node, workers: int, depth: str, folder: Path) -> tuple[float, int, int, float]:
    """(seconds, studies, instances, writer seconds) of one fresh crawl over DIMSE."""
    path = folder / f"crawl-{depth}-{workers}.sqlite"
    start = time.perf_counter()
    summary = crawl(node, path, depth=depth, via="dimse", workers=workers, resume=False)
    elapsed = time.perf_counter() - start
    if summary.issues:
        raise SystemExit(f"crawl at {depth} with {workers} workers: {summary.issues} issues")
    return elapsed, summary.counts["studies"], summary.counts["instances"], summary.writer_s


def _row(depth: str, workers: int, crawls: list, walks: list) -> dict:
    if {c[1:3] for c in crawls} != {w[1:] for w in walks}:
        raise SystemExit(f"crawl and DCMTK disagree: {crawls[0][1:3]} vs {walks[0][1:]} "
                         "(studies, instances)")
    row = {"depth": depth, "workers": workers, "studies": crawls[0][1],
           "instances": crawls[0][2],
           "crawl_s": round(statistics.median(c[0] for c in crawls), 3),
           "writer_s": round(statistics.median(c[3] for c in crawls), 3),
           "dcmtk_s": round(statistics.median(w[0] for w in walks), 3)}
    row["ratio"] = round(row["crawl_s"] / row["dcmtk_s"], 2)
    print(f"{depth:10} workers={workers}  crawl {row['crawl_s']:7.2f} s "
          f"(writer {row['writer_s']:.2f} s)  DCMTK {row['dcmtk_s']:7.2f} s  "
          f"ratio {row['ratio']}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=60)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    datasets = generate(GeneratorOptions(patients=args.studies, studies_per_patient=1,
                                         modalities=["CT", "MR", "CR"], scale="tiny", seed=18))
    cluster = Cluster.launch(parse_topology(
        "name: bench-crawl\nnodes:\n  pacs: {kind: orthanc, ae_title: BENCHCRAWL}\n"))
    folder = Path(tempfile.mkdtemp(prefix="bench-crawl-"))
    rows: list[dict] = []
    try:
        node = cluster.node("pacs")
        stored = node.dimse().store(datasets)
        if not stored.ok:
            raise SystemExit(f"store failed: {stored.failed[0].status}")
        for depth in ("attributes", "full"):
            crawls: dict[int, list] = {w: [] for w in WORKERS}
            walks: dict[int, list] = {w: [] for w in WORKERS}
            for _ in range(args.runs):  # interleaved: both sides see the same machine load
                for workers in WORKERS:
                    crawls[workers].append(harness_crawl(node, workers, depth, folder))
                    walks[workers].append(dcmtk_walk(node, workers, depth == "full"))
            for workers in WORKERS:
                rows.append(_row(depth, workers, crawls[workers], walks[workers]))
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)
    speedup = {f"{r['depth']}_{r['workers']}": round(
        next(x["crawl_s"] for x in rows if x["depth"] == r["depth"] and x["workers"] == 1)
        / r["crawl_s"], 2) for r in rows}
    print(f"\n{rows[0]['studies']} studies, {rows[0]['instances']} instances, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, median of {args.runs} runs; "
          "crawl speed-up over 1 worker: "
          + ", ".join(f"{k} x{v}" for k, v in speedup.items()))
    if args.json:
        print(json.dumps({"rows": rows, "speedup": speedup, "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
