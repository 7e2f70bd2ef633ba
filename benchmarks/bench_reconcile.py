"""Benchmark of reconciliation and of full-depth verification (run by hand, not a timed test).

    python benchmarks/bench_reconcile.py                  # 100k and 1M, then Orthanc vs getscu
    python benchmarks/bench_reconcile.py --sizes 100000   # smaller
    python benchmarks/bench_reconcile.py --skip-getscu    # ledgers only

1. Reconciliation: two ledgers of N instances each are built directly in SQLite (50 instances
   per study, 5 series per study, 2 studies per patient; realistic UIDs, digests and a small
   attrs_json per instance), the target with a handful of seeded defects. `reconcile` runs in
   a fresh process, which reports its wall time and peak RSS (resource.getrusage); the 100k and
   1M figures are printed side by side with the cost per instance, whose ratio shows whether
   the cost grows linearly. Targets: 1M x 1M under 10 s and under 1 GB.
2. Full depth against DCMTK: an Orthanc node with a few hundred instances is crawled at depth
   full (WADO-RS, and C-GET) and the same studies are retrieved with /usr/bin/getscu, one call
   per study as the crawl does; the ratio crawl/getscu must not exceed 1.
"""

from __future__ import annotations

import argparse
import copy
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.migration.ledger import Ledger  # noqa: E402
from harness.migration.normalise import INSTANCE_COLUMNS  # noqa: E402

INSTANCES_PER_SERIES = 10
SERIES_PER_STUDY = 5
STUDIES_PER_PATIENT = 2
ROOT = "1.2.826.0.1.3680043.10.543"
EXPECTED = {"missing_series": 1, "missing_instance": 5, "altered_attributes": 5,
            "altered_pixels": 3, "duplicate_instance": 1, "extra_series": 1}


def _h(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _instance(n: int, variant: str = "") -> tuple[tuple, tuple]:
    """(instances row, instance_attrs row) of synthetic instance number n."""
    series = n // INSTANCES_PER_SERIES
    study = series // SERIES_PER_STUDY
    patient = study // STUDIES_PER_PATIENT
    sop = f"{ROOT}.3.{n}.{n * 7919 % 1000003}"
    study_uid = f"{ROOT}.1.{study}.{study * 104729 % 1000003}"
    series_uid = f"{ROOT}.2.{series}.{series * 1299709 % 1000003}"
    attrs = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid,
             "SOPInstanceUID": sop, "InstanceNumber": n % INSTANCES_PER_SERIES + 1,
             "StudyDate": "20240101", "StudyDescription": "CT HEAD" + variant,
             "Modality": "CT", "SeriesNumber": series % SERIES_PER_STUDY + 1,
             "PatientID": f"P{patient:07d}", "PatientName": f"Name^{patient}"}
    row = (sop, series_uid, study_uid, f"P{patient:07d}", "SITE.MRN", f"Name^{patient}",
           "19700101", "F", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "ISO_IR 100",
           _h(f"k{n}"), _h(f"a{n}{variant}"), _h(f"p{n}"), "decoded", 1, None)
    return row, (sop, json.dumps(attrs, sort_keys=True))


def build_ledger(path: Path, count: int) -> None:
    ledger = Ledger.create(path, {"node": path.stem, "kind": "synthetic", "ae_title": "BENCH",
                                  "depth": "full", "sample": "", "via": "dimse",
                                  "transfer_syntax": "stored"})
    conn = ledger.conn
    conn.execute("PRAGMA synchronous = OFF")
    placeholders = ", ".join("?" * len(INSTANCE_COLUMNS))
    studies = -(-count // (INSTANCES_PER_SERIES * SERIES_PER_STUDY))
    conn.execute("BEGIN")
    conn.executemany("INSERT OR IGNORE INTO patients VALUES (?, 'SITE.MRN', ?, '19700101', 'F')",
                     ((f"P{p:07d}", f"Name^{p}") for p in range(studies // STUDIES_PER_PATIENT
                                                                + 1)))
    conn.executemany(
        "INSERT INTO studies (study_uid, patient_id, issuer, retrieve, state) "
        "VALUES (?, ?, 'SITE.MRN', 1, 'done')",
        ((f"{ROOT}.1.{s}.{s * 104729 % 1000003}", f"P{s // STUDIES_PER_PATIENT:07d}")
         for s in range(studies)))
    conn.executemany(
        "INSERT INTO series (series_uid, study_uid, modality) VALUES (?, ?, 'CT')",
        ((f"{ROOT}.2.{s}.{s * 1299709 % 1000003}",
          f"{ROOT}.1.{s // SERIES_PER_STUDY}.{s // SERIES_PER_STUDY * 104729 % 1000003}")
         for s in range(-(-count // INSTANCES_PER_SERIES))))
    batch_rows, batch_attrs = [], []
    for n in range(count):
        row, attrs = _instance(n)
        batch_rows.append(row)
        batch_attrs.append(attrs)
        if len(batch_rows) == 50_000:
            conn.executemany(f"INSERT INTO instances VALUES ({placeholders})", batch_rows)
            conn.executemany("INSERT INTO instance_attrs VALUES (?, ?)", batch_attrs)
            batch_rows, batch_attrs = [], []
    conn.executemany(f"INSERT INTO instances VALUES ({placeholders})", batch_rows)
    conn.executemany("INSERT INTO instance_attrs VALUES (?, ?)", batch_attrs)
    conn.execute("COMMIT")
    ledger.finish()
    ledger.close()


def seed_defects(path: Path, count: int) -> None:
    """One missing series, 5 missing instances, 5 altered attributes, 3 altered pixels,
    1 duplicate under a new UID, 1 extra series: 16 findings expected."""
    conn = sqlite_connect(path)
    placeholders = ", ".join("?" * len(INSTANCE_COLUMNS))
    step = count // 20
    sops = [_instance(n)[0][0] for n in range(count)[::step]]
    conn.execute("BEGIN")
    series_uid = _instance(step * 2)[0][1]  # a whole series
    conn.execute("DELETE FROM instance_attrs WHERE sop_uid IN "
                 "(SELECT sop_uid FROM instances WHERE series_uid = ?)", (series_uid,))
    conn.execute("DELETE FROM instances WHERE series_uid = ?", (series_uid,))
    for sop in sops[4:9]:  # single instances
        conn.execute("DELETE FROM instances WHERE sop_uid = ?", (sop,))
        conn.execute("DELETE FROM instance_attrs WHERE sop_uid = ?", (sop,))
    for n in range(count)[::step][10:15]:  # attributes
        row, attrs = _instance(n, variant=" (edited)")
        conn.execute("UPDATE instances SET attrs_digest = ? WHERE sop_uid = ?", (row[12], row[0]))
        conn.execute("UPDATE instance_attrs SET attrs_json = ? WHERE sop_uid = ?",
                     (attrs[1], row[0]))
    for sop in sops[15:18]:  # pixels
        conn.execute("UPDATE instances SET pixel_digest = ? WHERE sop_uid = ?", (_h(sop), sop))
    row, attrs = _instance(count - 1)  # a duplicate under a new SOP Instance UID
    dup = (row[0] + ".99", *row[1:])
    conn.execute(f"INSERT INTO instances VALUES ({placeholders})", dup)
    conn.execute("INSERT INTO instance_attrs VALUES (?, ?)", (dup[0], attrs[1]))
    for n in range(count + 10_000_000, count + 10_000_000 + INSTANCES_PER_SERIES):  # new series
        row, attrs = _instance(n)
        row = (row[0], f"{ROOT}.9.1", _instance(0)[0][2], *row[3:])  # in an existing study
        conn.execute(f"INSERT INTO instances VALUES ({placeholders})", row)
        conn.execute("INSERT INTO instance_attrs VALUES (?, ?)", attrs)
    conn.execute("COMMIT")
    conn.close()


def sqlite_connect(path: Path):
    import sqlite3

    return sqlite3.connect(str(path), isolation_level=None)


def reconcile_in_child(source: Path, target: Path) -> dict:
    """Run reconcile in a fresh process: its wall time, peak RSS and findings by type."""
    out = subprocess.run([sys.executable, __file__, "--child", str(source), str(target)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def child(source: str, target: str) -> None:
    from harness.migration.reconcile import reconcile

    start = time.perf_counter()
    findings = reconcile(source, target)
    elapsed = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"elapsed_s": elapsed, "peak_rss_mb": rss_mb,
                      "by_type": findings.by_type()}))


def bench_reconcile(sizes: list[int], workdir: Path) -> None:
    results = {}
    for count in sizes:
        source, target = workdir / f"source-{count}.sqlite", workdir / f"target-{count}.sqlite"
        start = time.perf_counter()
        build_ledger(source, count)
        shutil.copyfile(source, target)
        seed_defects(target, count)
        built = time.perf_counter() - start
        size_mb = source.stat().st_size / 1e6
        print(f"built 2 ledgers of {count:,} instances in {built:.1f} s "
              f"({size_mb:.0f} MB each)", flush=True)
        result = reconcile_in_child(source, target)
        assert result["by_type"] == EXPECTED, result["by_type"]
        results[count] = result
        source.unlink()
        target.unlink()
    print()
    print(f"{'instances per ledger':>22} " + " ".join(f"{n:>14,}" for n in sizes))
    print(f"{'reconcile wall (s)':>22} " + " ".join(f"{results[n]['elapsed_s']:>14.2f}"
                                                   for n in sizes))
    print(f"{'peak RSS (MB)':>22} " + " ".join(f"{results[n]['peak_rss_mb']:>14.0f}"
                                              for n in sizes))
    per = {n: results[n]["elapsed_s"] / n * 1e6 for n in sizes}
    print(f"{'us per instance':>22} " + " ".join(f"{per[n]:>14.2f}" for n in sizes))
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        print(f"cost per instance {large:,} / {small:,}: {per[large] / per[small]:.2f} "
              "(1.00 = linear)")
    print(f"findings found in each run: {EXPECTED} (as seeded)")


def bench_getscu(instances: int, workdir: Path) -> None:
    from harness.cluster import Cluster
    from harness.config import parse_topology
    from harness.launch.tools import find_binary
    from harness.migration.inventory import crawl
    from synthetic_data import GeneratorOptions, generate

    getscu = "/usr/bin/getscu"
    if not os.access(getscu, os.X_OK) or not find_binary("Orthanc"):
        print("getscu comparison skipped: needs /usr/bin/getscu and Orthanc")
        return
    per_patient = 10  # about, for tiny CT and MR studies, 2 per patient (measured)
    options = GeneratorOptions(patients=max(1, instances // per_patient), studies_per_patient=2,
                               modalities=["CT", "MR"], seed=3, scale="tiny")
    data = [copy.deepcopy(ds) for ds in generate(options)]
    cluster = Cluster.launch(parse_topology("name: bench\nnodes:\n  pacs: {kind: orthanc}\n"))
    try:
        node = cluster.node("pacs")
        stored = node.dimse().store(data, associations=4)
        assert stored.ok, [r.error for r in stored.failed][:3]
        studies = sorted({ds.StudyInstanceUID for ds in data})
        print(f"\nOrthanc holding {len(data)} instances in {len(studies)} studies")
        timings = {}
        for via in ("auto", "dimse"):
            start = time.perf_counter()
            summary = crawl(node, workdir / f"full-{via}.sqlite", depth="full", via=via,
                            resume=False)
            timings[summary.via] = time.perf_counter() - start
            assert summary.instances_retrieved == len(data)
        out = workdir / "getscu"
        out.mkdir()
        start = time.perf_counter()
        for uid in studies:
            subprocess.run([getscu, "-aet", "GETSCU", "-aec", node.ae_title, node.host,
                            str(node.dicom_port), "-S", "-k", "QueryRetrieveLevel=STUDY",
                            "-k", f"StudyInstanceUID={uid}", "-od", str(out)],
                           check=True, capture_output=True)
        timings["getscu"] = time.perf_counter() - start
        assert len(list(out.iterdir())) == len(data)
    finally:
        cluster.stop()
    base = timings["getscu"]
    print(f"{'getscu (C-GET to disk)':>34}: {base:7.2f} s")
    for name, label in (("dicomweb", "crawl depth full, WADO-RS"),
                        ("dimse", "crawl depth full, C-GET")):
        print(f"{label:>34}: {timings[name]:7.2f} s   ratio to getscu "
              f"{timings[name] / base:.2f} (<= 1 required)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--instances", type=int, default=300,
                        help="instances on the Orthanc node for the getscu comparison")
    parser.add_argument("--skip-getscu", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="bench-reconcile-") as tmp:
        bench_reconcile([int(s) for s in args.sizes.split(",")], Path(tmp))
        if not args.skip_getscu:
            bench_getscu(args.instances, Path(tmp))


if __name__ == "__main__":
    main()
