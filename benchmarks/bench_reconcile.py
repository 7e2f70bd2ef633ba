"""Benchmark of reconciliation and of full-depth verification (run by hand, not a timed test).

    python benchmarks/bench_reconcile.py                  # 1M and 10M, then Orthanc vs getscu
    python benchmarks/bench_reconcile.py --sizes 100000   # smaller
    python benchmarks/bench_reconcile.py --skip-getscu --workdir /work/tmp   # ledgers only

1. Reconciliation: two ledgers of N instances each are built directly in SQLite with the
   ledger's own schema (harness/migration/ledger.py; 10 instances per series, 5 series per
   study, 2 studies per patient; realistic UIDs, random 16-byte digests and a small JSON of
   attributes per instance), the target a copy with 16 seeded defects of 6 types, which every
   run must find. `reconcile` runs in a fresh process, which reports its wall time and peak
   RSS (/proc/self/status VmHWM); the sizes are printed side by side with the cost per instance,
   whose ratio shows whether the cost grows linearly. Target (issue 18): 10M x 10M within
   30 s and 500 MB. Then the worst case: the target's per-series sums are all made to differ
   (as when the two ledgers were crawled at different depths), so every instance is compared
   row by row; the same 16 findings must come out. Building the ledgers is timed apart (a
   crawl writes them, not reconcile).
   `fp` (ledger.py content_fingerprint) is random() here, as the digests are random blobs.
   The JSON of attributes is stored as text here (a crawl compresses it); the ledgers are
   deleted after each size.
2. Full depth against DCMTK: an Orthanc node with a few hundred instances is crawled at depth
   full (WADO-RS, and C-GET) and the same studies are retrieved with /usr/bin/getscu, one call
   per study as the crawl does; the ratio crawl/getscu must not exceed 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.migration.ledger import Ledger, fingerprint  # noqa: E402

INSTANCES_PER_SERIES = 10
SERIES_PER_STUDY = 5
STUDIES_PER_PATIENT = 2
ROOT = "1.2.826.0.1.3680043.10.543"
ISSUER = "SITE.MRN"
EXPECTED = {"missing_series": 1, "missing_instance": 5, "altered_attributes": 5,
            "altered_pixels": 3, "duplicate_instance": 1, "extra_series": 1}
LIMIT_S, LIMIT_MB, LIMIT_AT = 30.0, 500.0, 10_000_000


def study_uid(study: int) -> str:
    return f"{ROOT}.1.{study}.{study * 104729 % 1000003}"


def series_uid(series: int) -> str:
    return f"{ROOT}.2.{series}.{series * 1299709 % 1000003}"


def sop_uid(n: int) -> str:
    """Instance n's UID: `1` and 8 digits, so UID order is n's order (rows are appended)."""
    return f"{ROOT}.3.1{n:08d}.{n * 7919 % 1000003}"


def patient(p: int) -> tuple[str, str, str, str, str, str]:
    """An `identities` row (without its fingerprint)."""
    return (f"P{p:07d}", ISSUER, f"Name^{p}", "19700101", "F", "ISO_IR 100")


#: One instance row and its attributes, from the number n (`c.n`) and its series' numbers.
_INSTANCE_SQL = f"""
WITH RECURSIVE c(n) AS (SELECT :first UNION ALL SELECT n + 1 FROM c WHERE n + 1 < :end)
INSERT INTO {{table}}
SELECT printf('{ROOT}.3.1%08d.%d', n, n * 7919 % 1000003), {{columns}}
FROM c JOIN bench_series b ON b.no = n / {INSTANCES_PER_SERIES}
"""
_ROW_COLUMNS = ("b.place, b.ident, random(), '1.2.840.10008.5.1.4.1.1.2', '1.2.840.10008.1.2.1', "
                "randomblob(16), randomblob(16), randomblob(16), 'decoded', 1, NULL")
_ATTRS_COLUMNS = ("json_object('InstanceNumber', n % 10 + 1, 'Modality', 'CT', 'SeriesNumber', "
                  "b.no % 5 + 1, 'SeriesInstanceUID', b.series_uid, 'StudyDate', '20240101', "
                  "'StudyDescription', 'CT HEAD', 'StudyInstanceUID', b.study_uid, "
                  "'ImageType', json_array('ORIGINAL', 'PRIMARY', 'AXIAL'), "
                  "'SliceThickness', 1.25, 'Rows', 512, 'Columns', 512)")


def build_ledger(path: Path, count: int) -> None:
    """A finished ledger of `count` instances, written with SQL (no Python loop per instance)."""
    ledger = Ledger.create(path, {"node": path.stem, "kind": "synthetic", "ae_title": "BENCH",
                                  "depth": "full", "sample": "", "via": "dimse",
                                  "transfer_syntax": "stored"})
    conn = ledger.conn
    conn.execute("PRAGMA journal_mode = OFF")  # one transaction; no copy of it in a WAL
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -262144")
    series_count = -(-count // INSTANCES_PER_SERIES)
    studies = -(-series_count // SERIES_PER_STUDY)
    patients = -(-studies // STUDIES_PER_PATIENT)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO patients VALUES (?, ?, ?, ?, ?)",
                     (patient(p)[:5] for p in range(patients)))
    conn.executemany("INSERT INTO identities VALUES (?, ?, ?, ?, ?, ?, ?)",
                     ((fingerprint(*patient(p)), *patient(p)) for p in range(patients)))
    conn.executemany(
        "INSERT INTO studies (study_uid, patient_id, issuer, retrieve, state) "
        "VALUES (?, ?, ?, 1, 'done')",
        ((study_uid(s), patient(s // STUDIES_PER_PATIENT)[0], ISSUER) for s in range(studies)))
    conn.execute("CREATE TEMP TABLE bench_series (no INTEGER PRIMARY KEY, place INTEGER, "
                 "ident INTEGER, series_uid TEXT, study_uid TEXT)")
    rows = []
    for s in range(series_count):
        uid, study = series_uid(s), study_uid(s // SERIES_PER_STUDY)
        rows.append((s, fingerprint(uid, study),
                     fingerprint(*patient(s // SERIES_PER_STUDY // STUDIES_PER_PATIENT)),
                     uid, study))
    conn.executemany("INSERT INTO temp.bench_series VALUES (?, ?, ?, ?, ?)", rows)
    conn.execute("INSERT INTO series (series_uid, study_uid, modality) "
                 "SELECT series_uid, study_uid, 'CT' FROM temp.bench_series")
    conn.execute("INSERT INTO places SELECT place, series_uid, study_uid FROM temp.bench_series")
    for first in range(0, count, 1_000_000):
        bounds = {"first": first, "end": min(count, first + 1_000_000)}
        conn.execute(_INSTANCE_SQL.format(table="instance_rows", columns=_ROW_COLUMNS), bounds)
        conn.execute(_INSTANCE_SQL.format(table="instance_attrs", columns=_ATTRS_COLUMNS),
                     bounds)
    conn.execute("COMMIT")
    ledger.finish()
    ledger.close()


def seed_defects(path: Path, count: int) -> None:
    """One missing series, 5 missing instances, 5 altered attributes, 3 altered pixels,
    1 duplicate under a new UID, 1 extra series: 16 findings expected."""
    conn = sqlite3.connect(path, isolation_level=None)
    step = count // 20
    numbers = list(range(count)[::step])
    conn.execute("BEGIN")
    gone = fingerprint(series_uid(step * 2 // INSTANCES_PER_SERIES),
                       study_uid(step * 2 // INSTANCES_PER_SERIES // SERIES_PER_STUDY))
    conn.execute("DELETE FROM instance_attrs WHERE sop_uid IN "
                 "(SELECT sop_uid FROM instance_rows WHERE place = ?)", (gone,))
    assert conn.execute("DELETE FROM instance_rows WHERE place = ?",
                        (gone,)).rowcount == INSTANCES_PER_SERIES
    for n in numbers[4:9]:  # single instances
        assert conn.execute("DELETE FROM instance_rows WHERE sop_uid = ?",
                            (sop_uid(n),)).rowcount == 1
        conn.execute("DELETE FROM instance_attrs WHERE sop_uid = ?", (sop_uid(n),))
    for n in numbers[10:15]:  # attributes
        conn.execute("UPDATE instance_rows SET attrs_digest = randomblob(16), fp = random() "
                     "WHERE sop_uid = ?",
                     (sop_uid(n),))
        conn.execute("UPDATE instance_attrs SET attrs = json_set(attrs, '$.StudyDescription', "
                     "'CT HEAD (edited)') WHERE sop_uid = ?", (sop_uid(n),))
    for n in numbers[15:18]:  # pixels
        conn.execute("UPDATE instance_rows SET pixel_digest = randomblob(16), fp = random() "
                     "WHERE sop_uid = ?",
                     (sop_uid(n),))
    original = sop_uid(count - 1)  # a duplicate under a new SOP Instance UID
    conn.execute("INSERT INTO instance_rows SELECT sop_uid || '.99', place, ident, random(), "
                 "sop_class, "
                 "transfer_syntax, keys_digest, attrs_digest, pixel_digest, pixel_mode, "
                 "retrieved, retrieval_error FROM instance_rows WHERE sop_uid = ?", (original,))
    conn.execute("INSERT INTO instance_attrs SELECT sop_uid || '.99', attrs FROM instance_attrs "
                 "WHERE sop_uid = ?", (original,))
    new_series, study = f"{ROOT}.9.1", study_uid(0)  # a new series in an existing study
    place = fingerprint(new_series, study)
    conn.execute("INSERT INTO places VALUES (?, ?, ?)", (place, new_series, study))
    ident = fingerprint(*patient(0))
    for i in range(INSTANCES_PER_SERIES):
        uid = f"{ROOT}.3.2{i:08d}"
        conn.execute("INSERT INTO instance_rows VALUES (?, ?, ?, random(), "
                     "'1.2.840.10008.5.1.4.1.1.2', "
                     "'1.2.840.10008.1.2.1', randomblob(16), randomblob(16), randomblob(16), "
                     "'decoded', 1, NULL)", (uid, place, ident))
        conn.execute("INSERT INTO instance_attrs VALUES (?, ?)", (uid, json.dumps(
            {"SeriesInstanceUID": new_series, "StudyInstanceUID": study})))
    conn.execute("COMMIT")
    conn.close()
    with Ledger.open(path) as ledger:  # the sums per place, as a crawl's end writes them
        ledger.finish()


def reconcile_in_child(source: Path, target: Path) -> dict:
    """Run reconcile in a fresh process: its wall time, peak RSS and findings by type."""
    out = subprocess.run([sys.executable, __file__, "--child", str(source), str(target)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM, which starts afresh with exec (getrusage's
    ru_maxrss keeps the high-water mark of the parent that forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(source: str, target: str) -> None:
    from harness.migration.reconcile import reconcile

    start = time.perf_counter()
    findings = reconcile(source, target)
    elapsed = time.perf_counter() - start
    rss_mb = peak_rss_mb()
    print(json.dumps({"elapsed_s": elapsed, "peak_rss_mb": rss_mb,
                      "by_type": findings.by_type()}))


def bench_reconcile(sizes: list[int], workdir: Path) -> None:
    results = {}
    for count in sizes:
        source, target = workdir / f"source-{count}.sqlite", workdir / f"target-{count}.sqlite"
        try:
            start = time.perf_counter()
            build_ledger(source, count)
            shutil.copyfile(source, target)
            seed_defects(target, count)
            built = time.perf_counter() - start
            size_mb = source.stat().st_size / 1e6
            print(f"built 2 ledgers of {count:,} instances in {built:.1f} s "
                  f"({size_mb:,.0f} MB each)", flush=True)
            result = reconcile_in_child(source, target)
            with sqlite3.connect(target, isolation_level=None) as conn:  # every place differs
                conn.execute("UPDATE place_sums SET fp_low = fp_low + 1")
            worst = reconcile_in_child(source, target)
        finally:
            for path in (source, target):
                for suffix in ("", "-wal", "-shm", "-journal"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
        for run in (result, worst):
            assert run["by_type"] == EXPECTED, (count, run["by_type"])
            print(f"reconciled in {run['elapsed_s']:.2f} s, peak RSS "
                  f"{run['peak_rss_mb']:.0f} MB: {run['by_type']}", flush=True)
        results[count] = {**result, "built_s": built, "ledger_mb": size_mb, "worst": worst}
    print()

    def row(label: str, values: list[str]) -> None:
        print(f"{label:>26} " + " ".join(f"{v:>14}" for v in values))

    row("instances per ledger", [f"{n:,}" for n in sizes])
    row("build 2 ledgers (s)", [f"{results[n]['built_s']:.1f}" for n in sizes])
    row("ledger on disk (MB)", [f"{results[n]['ledger_mb']:,.0f}" for n in sizes])
    row("reconcile wall (s)", [f"{results[n]['elapsed_s']:.2f}" for n in sizes])
    row("peak RSS (MB)", [f"{results[n]['peak_rss_mb']:.0f}" for n in sizes])
    per = {n: results[n]["elapsed_s"] / n * 1e6 for n in sizes}
    row("us per instance", [f"{per[n]:.2f}" for n in sizes])
    row("every series differing (s)", [f"{results[n]['worst']['elapsed_s']:.2f}" for n in sizes])
    row("  its peak RSS (MB)", [f"{results[n]['worst']['peak_rss_mb']:.0f}" for n in sizes])
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        print(f"cost per instance {large:,} / {small:,}: {per[large] / per[small]:.2f} "
              "(1.00 = linear, below = better)")
    for n in sizes:
        if n >= LIMIT_AT:
            ok = results[n]["elapsed_s"] <= LIMIT_S and results[n]["peak_rss_mb"] <= LIMIT_MB
            print(f"{n:,} x {n:,} within {LIMIT_S:.0f} s / {LIMIT_MB:.0f} MB: "
                  f"{'yes' if ok else 'no'}")
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
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--workdir", default=None,
                        help="where the ledgers are built (default: the system's temp dir)")
    parser.add_argument("--instances", type=int, default=300,
                        help="instances on the Orthanc node for the getscu comparison")
    parser.add_argument("--skip-getscu", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="bench-reconcile-", dir=args.workdir) as tmp:
        bench_reconcile([int(s) for s in args.sizes.split(",")], Path(tmp))
        if not args.skip_getscu:
            bench_getscu(args.instances, Path(tmp))


if __name__ == "__main__":
    main()
