"""Scale model: per-instance costs measured on real servers, projected to 1M, 10M and 100M.

    python benchmarks/bench_scale.py                      # ~3000 small instances, 100k and 1M
    python benchmarks/bench_scale.py --instances 1000 --reconcile-sizes 100000 --json

One run, two launched Orthancs (source and target), the harness beside the reference tool
each time (DCMTK by absolute path, TCP_NODELAY=1 in its environment), ratios printed:

- crawl, depth attributes: `inventory.crawl(via="dimse")` vs /usr/bin/findscu, one IMAGE-level
  query per study; depth full: the crawl (C-GET, streamed) vs /usr/bin/getscu per study;
- where the time goes: the reference tool's time is what the PACS needs to serve the data
  (PACS cost); harness time minus that is the harness's cost. Orthanc's own REST
  (/tools/find at Instance level, /studies/{id}/archive) is timed too, as the PACS's floor;
- the PACS's parallel throughput: the reference tools at 1, 2 and 4 concurrent associations;
- transfer: `Migrator` (method move, 4 workers, confirmation on) vs /usr/bin/movescu per study;
- reconcile: ledgers of 100k and 1M instances per side, built by benchmarks/bench_reconcile.py
  (imported, so a faster builder or reconcile shows here), reconciled in a fresh process.

Then `project` turns the per-instance costs into times for 1M, 10M and 100M instances, with
one association and with P partitions, names the largest term (PACS or harness), and finds
how many partitions bring a 100M crawl under a week. docs/scale.md explains the model.
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
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

FINDSCU, GETSCU, MOVESCU = "/usr/bin/findscu", "/usr/bin/getscu", "/usr/bin/movescu"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
SIZES = (1_000_000, 10_000_000, 100_000_000)
WEEK_S = 7 * 24 * 3600
PARALLEL = (1, 2, 4)
MAX_PARTITIONS = 1024
TOPOLOGY = """name: bench-scale
nodes:
  source: {kind: orthanc, ae_title: SCALESRC}
  target: {kind: orthanc, ae_title: SCALEDST}
"""

# ---------------------------------------------------------------------------------------
# the model (tests/test_scale_model.py)


@dataclass(frozen=True)
class Activity:
    """One activity's measured cost per instance, split into what the PACS needs (the
    reference tool over one association) and what the harness adds on top of it."""

    name: str
    pacs_s: float  # seconds per instance the PACS needs to serve the data
    harness_s: float  # seconds per instance the harness adds (harness time - PACS time, >= 0)
    pacs_kind: str = ""  # which parallel throughput limits it: listing, retrieval or ""


def activity_from_times(name: str, instances: int, harness_total_s: float,
                        reference_total_s: float, pacs_kind: str = "") -> Activity:
    """Per-instance costs from one measured run of the harness and of the reference tool."""
    pacs = reference_total_s / instances
    return Activity(name, pacs, max(0.0, harness_total_s / instances - pacs), pacs_kind)


def speedup(measured: dict[int, float], parallel: int) -> float:
    """How much faster the PACS serves over up to `parallel` associations than over one: the
    best measured throughput at P <= `parallel` over that at 1 (an operator uses no more
    associations than help). Beyond the largest P measured the PACS is taken as saturated:
    a gain not seen is not extrapolated."""
    return max(rate for p, rate in measured.items() if p <= parallel) / measured[1]


def project(activity: Activity, instances: int, *, pacs_speedup: float = 1.0,
            partitions: int = 1) -> dict[str, Any]:
    """Linear projection: PACS term = instances x PACS cost / its parallel speed-up; harness
    term = instances x harness cost / partitions (each partition runs its own harness,
    on its own machine or process). The bottleneck is the larger term."""
    pacs = instances * activity.pacs_s / pacs_speedup
    harness = instances * activity.harness_s / partitions
    return {"activity": activity.name, "instances": instances, "partitions": partitions,
            "pacs_s": pacs, "harness_s": harness, "total_s": pacs + harness,
            "bottleneck": largest_term({"PACS": pacs, "harness": harness})}


def largest_term(terms: dict[str, float]) -> str:
    """The name of the largest term (the first named on a tie)."""
    return max(terms, key=lambda name: terms[name])


def partitions_within(activity: Activity, instances: int, budget_s: float,
                      measured: dict[int, float], limit: int = MAX_PARTITIONS) -> int | None:
    """The fewest partitions that bring `activity` on `instances` within `budget_s`, or None
    when the PACS alone (at its best measured parallel throughput) needs longer."""
    for parallel in range(1, limit + 1):
        gain = speedup(measured, parallel) if activity.pacs_kind else 1.0
        if project(activity, instances, pacs_speedup=gain,
                   partitions=parallel)["total_s"] <= budget_s:
            return parallel
    return None


def verification(activities: Sequence[Activity], depth: str, instances: int,
                 gains: dict[str, dict[int, float]], partitions: int = 1) -> dict[str, Any]:
    """Verifying a migration at `depth`: crawl the source, crawl the target, reconcile. Three
    terms (PACS serving both crawls, harness crawling, reconcile); the largest is named."""
    by_name = {a.name: a for a in activities}
    crawl, rec = by_name[f"crawl {depth}"], by_name["reconcile"]
    one = project(crawl, instances, pacs_speedup=speedup(gains[crawl.pacs_kind], partitions),
                  partitions=partitions)
    terms = {"PACS": 2 * one["pacs_s"], "harness crawl": 2 * one["harness_s"],
             "reconcile": project(rec, instances)["harness_s"]}
    return {"activity": f"verify {depth}", "instances": instances, "partitions": partitions,
            "pacs_s": terms["PACS"], "harness_s": terms["harness crawl"] + terms["reconcile"],
            "total_s": sum(terms.values()), "bottleneck": largest_term(terms)}


def projection_table(activities: Sequence[Activity], gains: dict[str, dict[int, float]],
                     sizes: Sequence[int] = SIZES, partitions: int = 4) -> list[dict[str, Any]]:
    """Every activity at every size over one association and over `partitions`, then the
    verification of a migration (both crawls and the reconcile) at each depth."""
    rows = []
    for size in sizes:
        for activity in activities:
            rows.append(project(activity, size))
            if activity.pacs_kind:
                gain = speedup(gains[activity.pacs_kind], partitions)
                rows.append(project(activity, size, pacs_speedup=gain, partitions=partitions))
        for depth in ("attributes", "full"):
            rows.append(verification(activities, depth, size, gains))
            rows.append(verification(activities, depth, size, gains, partitions))
    return rows


def required_rate(bytes_total: float, period_s: float, instance_bytes: float) -> float:
    """Instances per second a PACS must sustain to move `bytes_total` in `period_s`."""
    return bytes_total / instance_bytes / period_s


# ---------------------------------------------------------------------------------------
# measurements


def _timed(action: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = action()
    return time.perf_counter() - start, value


def _run(argv: list[str], timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=timeout_s,
                          env=DCMTK_ENV)


def _in_parallel(work: Callable[[str], Any], studies: list[str], parallel: int
                 ) -> tuple[float, list[Any]]:
    """Seconds to run `work` once per study with `parallel` at a time, and its results."""
    start = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(work, studies))
    return time.perf_counter() - start, results


def _address(node: Any, calling: str) -> list[str]:
    return ["-aet", calling, "-aec", node.ae_title, node.host, str(node.dicom_port)]


def load_source(node: Any, instances: int) -> tuple[list[str], int, int]:
    """Store about `instances` small synthetic instances; (study UIDs, instances, bytes)."""
    from synthetic_data import GeneratorOptions, generate

    per_patient = 65  # measured mean of two small CT/MR/CR/DX studies (32 per study)
    options = GeneratorOptions(patients=max(1, round(instances / per_patient)),
                               studies_per_patient=2, modalities=["CT", "MR", "CR", "DX"],
                               seed=18, scale="small")
    data = list(generate(options))
    stored = node.dimse(timeout_s=120).store(data, associations=4)
    assert stored.ok, [r.error for r in stored.failed][:3]
    held = node.rest().statistics()
    return (sorted({str(ds.StudyInstanceUID) for ds in data}), int(held["CountInstances"]),
            int(held["TotalDiskSize"]))


def measure_crawls(node: Any, studies: list[str], instances: int, workdir: Path,
                   harness_ae: str) -> dict[str, Any]:
    """Crawl at both depths via DIMSE, the reference tools at 1, 2, 4 associations, REST."""
    from harness.migration.inventory import crawl

    result: dict[str, Any] = {"instances": instances, "studies": len(studies)}
    # one untimed pass first, so the harness does not pay alone for Orthanc's cold caches
    crawl(node, workdir / "warm-up.sqlite", depth="attributes", via="dimse", resume=False)
    for depth in ("attributes", "full"):
        elapsed, summary = _timed(lambda d=depth: crawl(
            node, workdir / f"crawl-{d}.sqlite", depth=d, via="dimse", resume=False))
        assert summary.counts["instances"] == instances, summary.counts
        result[f"harness_{depth}_s"] = elapsed

    def find(uid: str) -> int:
        out = _run([FINDSCU, "-S", "-k", "QueryRetrieveLevel=IMAGE",
                    "-k", f"StudyInstanceUID={uid}", "-k", "SeriesInstanceUID",
                    "-k", "SOPInstanceUID", "-k", "SOPClassUID", "-k", "InstanceNumber",
                    *_address(node, harness_ae)])
        return out.stderr.count("(Pending)")  # one per match, logged on stderr

    folder = workdir / "getscu"

    def get(uid: str) -> None:
        target = folder / uid
        target.mkdir(parents=True)
        _run([GETSCU, "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}",
              "-od", str(target), *_address(node, harness_ae)])

    listing, retrieval = {}, {}
    for parallel in PARALLEL:
        elapsed, matches = _in_parallel(find, studies, parallel)
        assert sum(matches) == instances, f"findscu listed {sum(matches)} of {instances}"
        listing[parallel] = instances / elapsed
        shutil.rmtree(folder, ignore_errors=True)
        retrieval[parallel] = instances / _in_parallel(get, studies, parallel)[0]
        got = sum(1 for _ in folder.rglob("*") if _.is_file())
        assert got == instances, f"getscu wrote {got} of {instances} files"
    shutil.rmtree(folder, ignore_errors=True)
    result["reference_attributes_s"] = instances / listing[1]
    result["reference_full_s"] = instances / retrieval[1]
    result["listing_per_s"] = listing
    result["retrieval_per_s"] = retrieval

    rest = node.rest()
    ids = {uid: rest.lookup(uid)[0]["ID"] for uid in studies}
    result["rest_attributes_s"], _ = _timed(lambda: [rest.post_json(
        "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": uid},
                        "Expand": True}) for uid in studies])

    def archive() -> int:
        size = 0
        for orthanc_id in ids.values():
            with rest.session.get(f"{rest.base_url}/studies/{orthanc_id}/archive",
                                  stream=True, timeout=300) as rsp:
                rsp.raise_for_status()
                size += sum(len(chunk) for chunk in rsp.iter_content(1 << 20))
        return size

    result["rest_full_s"], zipped = _timed(archive)
    assert zipped > 0
    return result


def measure_transfer(source: Any, target: Any, studies: list[str], instances: int,
                     workdir: Path, harness_ae: str) -> dict[str, Any]:
    """Migrator (move, 4 workers, confirmation) vs movescu per study, target wiped before each."""
    from harness.migration.migrator import Migrator

    target.wipe()
    with Migrator(source, target, "move", state_path=workdir / "migrate.sqlite",
                  workers=4) as migrator:
        harness_s, outcome = _timed(migrator.run)
    assert outcome.ok and outcome.migrated == len(studies), outcome
    assert int(target.rest().statistics()["CountInstances"]) == instances
    durations = [o.elapsed_s for o in outcome.outcomes]
    target.wipe()

    def move(uid: str) -> None:
        _run([MOVESCU, "-S", "-aem", target.ae_title, "-k", "QueryRetrieveLevel=STUDY",
              "-k", f"StudyInstanceUID={uid}", *_address(source, harness_ae)])

    reference_s = _in_parallel(move, studies, 1)[0]
    assert int(target.rest().statistics()["CountInstances"]) == instances
    target.wipe()
    return {"harness_s": harness_s, "reference_s": reference_s,
            "study_p50_s": statistics.median(durations), "study_max_s": max(durations)}


def measure_reconcile(sizes: Sequence[int], workdir: Path) -> dict[int, dict[str, Any]]:
    """bench_reconcile's ledgers (its builder and seeded defects), reconciled in a child."""
    import bench_reconcile

    results = {}
    for count in sizes:
        source, target = workdir / f"rs-{count}.sqlite", workdir / f"rt-{count}.sqlite"
        built_s, _ = _timed(lambda c=count, s=source: bench_reconcile.build_ledger(s, c))
        shutil.copyfile(source, target)
        bench_reconcile.seed_defects(target, count)
        child = bench_reconcile.reconcile_in_child(source, target)
        assert child["by_type"] == bench_reconcile.EXPECTED, child["by_type"]
        results[count] = {"build_one_ledger_s": built_s, "reconcile_s": child["elapsed_s"],
                          "peak_rss_mb": child["peak_rss_mb"]}
        source.unlink()
        target.unlink()
    return results


# ---------------------------------------------------------------------------------------
# report


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def build_model(crawls: dict[str, Any], transfer: dict[str, Any],
                reconciled: dict[int, dict[str, Any]]) -> list[Activity]:
    n = crawls["instances"]
    largest = max(reconciled)
    return [
        activity_from_times("crawl attributes", n, crawls["harness_attributes_s"],
                            crawls["reference_attributes_s"], "listing"),
        activity_from_times("crawl full", n, crawls["harness_full_s"],
                            crawls["reference_full_s"], "retrieval"),
        activity_from_times("transfer", n, transfer["harness_s"], transfer["reference_s"],
                            "retrieval"),
        Activity("reconcile", 0.0, reconciled[largest]["reconcile_s"] / largest),
    ]


def report(doc: dict[str, Any]) -> None:
    c, t, n = doc["crawl"], doc["transfer"], doc["crawl"]["instances"]
    print(f"Orthanc source: {n} instances in {c['studies']} studies "
          f"({doc['bytes_on_source'] / 1e6:.0f} MB on disk); {doc['when']}")
    print(f"\n{'activity':<18}{'harness':>9}{'reference':>11}{'ref/harness':>13}"
          f"{'REST':>8}   reference tool")
    for label, h, r, rest, tool in (
            ("crawl attributes", c["harness_attributes_s"], c["reference_attributes_s"],
             c["rest_attributes_s"], "findscu IMAGE per study"),
            ("crawl full", c["harness_full_s"], c["reference_full_s"], c["rest_full_s"],
             "getscu per study"),
            ("transfer", t["harness_s"], t["reference_s"], None, "movescu per study")):
        rest_text = f"{rest:7.2f}s" if rest is not None else f"{'-':>8}"
        print(f"{label:<18}{h:8.2f}s{r:10.2f}s{r / h:13.2f}{rest_text}   {tool}")
    print("\nPACS parallel throughput (reference tools, instances/s):")
    for kind in ("listing", "retrieval"):
        rates = c[f"{kind}_per_s"]
        print(f"  {kind:<10}" + "  ".join(f"{p} assoc {rates[p]:7.0f}" for p in PARALLEL))
    print("\nreconcile (bench_reconcile ledgers, fresh process):")
    for size, r in doc["reconcile"].items():
        print(f"  {int(size):>10,} per side: {r['reconcile_s']:.2f} s, {r['peak_rss_mb']:.0f} MB "
              f"(building one ledger {r['build_one_ledger_s']:.1f} s)")
    print(f"\nper instance (ms): {'PACS':>8} {'harness':>8}   bottleneck")
    for a in doc["activities"]:
        print(f"  {a['name']:<17}{a['pacs_s'] * 1e3:8.3f} {a['harness_s'] * 1e3:8.3f}   "
              f"{largest_term({'PACS': a['pacs_s'], 'harness': a['harness_s']})}")
    print(f"\nprojection (P = partitions; PACS speed-up at P from the measured throughput, "
          f"flat beyond {max(PARALLEL)}):")
    print(f"  {'instances':>12} {'activity':<17}{'P':>3} {'PACS':>9} {'harness':>9} "
          f"{'total':>9}  bottleneck")
    for row in doc["projection"]:
        print(f"  {row['instances']:>12,} {row['activity']:<17}{row['partitions']:>3} "
              f"{_duration(row['pacs_s']):>9} {_duration(row['harness_s']):>9} "
              f"{_duration(row['total_s']):>9}  {row['bottleneck']}")
    print("\n100M instances within a week:")
    for name, parts in doc["week_100m"].items():
        print(f"  {name:<17}" + (f"{parts} partition(s)" if parts else
                                 "not reachable: the PACS alone needs longer"))
    print(f"\nOne measurement of each, in one run; machine: {doc['machine']}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=3000,
                        help="small synthetic instances on the source Orthanc (default 3000)")
    parser.add_argument("--reconcile-sizes", default="100000,1000000")
    parser.add_argument("--partitions", type=int, default=4,
                        help="P for the parallel rows of the projection")
    parser.add_argument("--json", action="store_true", help="print one JSON document only")
    args = parser.parse_args()
    if args.instances < 50 or args.partitions < 1:
        parser.error("--instances must be >= 50 and --partitions >= 1")
    for tool in (FINDSCU, GETSCU, MOVESCU):
        if not os.access(tool, os.X_OK):
            print(f"bench_scale: {tool} is not installed (apt-get install dcmtk)",
                  file=sys.stderr)
            sys.exit(3)
    from harness.cluster import Cluster
    from harness.config import parse_topology
    from harness.dicom.peer import HARNESS_AE_TITLE

    sizes = [int(s) for s in args.reconcile_sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        workdir = Path(tmp)
        cluster = Cluster.launch(parse_topology(TOPOLOGY))
        try:
            source, target = cluster.node("source"), cluster.node("target")
            studies, instances, size = load_source(source, args.instances)
            crawls = measure_crawls(source, studies, instances, workdir, HARNESS_AE_TITLE)
            transfer = measure_transfer(source, target, studies, instances, workdir,
                                        HARNESS_AE_TITLE)
        finally:
            cluster.stop()
        reconciled = measure_reconcile(sizes, workdir)
    activities = build_model(crawls, transfer, reconciled)
    gains = {"listing": crawls["listing_per_s"], "retrieval": crawls["retrieval_per_s"]}
    doc = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPUs, loopback, shared with other jobs",
        "bytes_on_source": size, "crawl": crawls, "transfer": transfer,
        "reconcile": reconciled, "activities": [asdict(a) for a in activities],
        "projection": projection_table(activities, gains, partitions=args.partitions),
        "week_100m": {a.name: partitions_within(a, 100_000_000, WEEK_S, gains[a.pacs_kind])
                      for a in activities if a.pacs_kind},
    }
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        report(doc)


if __name__ == "__main__":
    main()
