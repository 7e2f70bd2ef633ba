"""Ledger rows per second: today's `normalise` beside the one at a base commit, one run.

    python benchmarks/bench_normalise.py                   # corpus and synthetic set, ~1 min
    python benchmarks/bench_normalise.py --crawl 1000      # and a crawl at depth full vs getscu

The old implementation is `git show <base>:harness/migration/normalise.py` loaded as a module
of its own at run time (scripts/record_normalise_digests.py `normalise_at`), never a copy.
Data: the real-world corpus with the synthetic set of the digest fixture, and the small
CT/MR/CR/DX instances benchmarks/bench_scale.py crawls. Each data set is read afresh before
each timed pass (as a retrieved one arrives: raw elements), only the row is timed.

`--crawl N` launches an Orthanc, stores about N small instances, then times
`inventory.crawl(depth="full", via="dimse")` with the old and with today's rows, and
/usr/bin/getscu per study over one association (TCP_NODELAY=1): the ratio getscu / crawl is
the one docs/scale.md quotes (1: the harness keeps pace with the PACS).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DEFAULT_BASE = "c9d1af4"
GETSCU = "/usr/bin/getscu"
REPEATS = 5


def _script(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


recorder = _script("record_normalise_digests", ROOT / "scripts" / "record_normalise_digests.py")


def small_instances(patients: int = 6) -> list[bytes]:
    """The kind of instance bench_scale crawls (synthetic scale `small`, CT/MR/CR/DX)."""
    from pydicom import dcmwrite

    from synthetic_data import GeneratorOptions, generate

    out = []
    options = GeneratorOptions(patients=patients, studies_per_patient=2,
                               modalities=["CT", "MR", "CR", "DX"], seed=18, scale="small")
    for ds in generate(options):
        buffer = BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def rows_per_s(action: Callable[[Any], Any], files: list[bytes]) -> float:
    """Median over REPEATS passes of instances per second (reading not timed)."""
    rates = []
    for _ in range(REPEATS):
        datasets = [recorder.read(data) for data in files]
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for ds in datasets:
                action(ds)
        rates.append(len(datasets) / (time.perf_counter() - start))
    return statistics.median(rates)


def compare_rows(base: str) -> None:
    from harness.migration import normalise as new

    old = recorder.normalise_at(base)
    sets = {"corpus (real-world + synthetic)": [d for _, d in recorder.corpus()],
            "bench_scale small CT/MR/CR/DX": small_instances()}
    print(f"{'data':34} {'what':17} {'n':>4} {base + '/s':>10} {'now/s':>10} {'speed-up':>8}")
    for label, files in sets.items():
        for what in ("normalise", "row_from_dataset"):
            before = rows_per_s(getattr(old, what), files)
            after = rows_per_s(getattr(new, what), files)
            print(f"{label:34} {what:17} {len(files):4} {before:10.0f} {after:10.0f} "
                  f"{after / before:8.2f}")


def compare_crawl(base: str, instances: int) -> None:
    """Crawl full with the old rows, with today's, and getscu per study, on one Orthanc."""
    from harness.cluster import Cluster
    from harness.config import parse_topology
    from harness.dicom.peer import HARNESS_AE_TITLE
    from harness.migration import inventory
    from harness.migration import normalise as new

    bench = _script("bench_scale", ROOT / "benchmarks" / "bench_scale.py")
    old = recorder.normalise_at(base)
    with tempfile.TemporaryDirectory(prefix="bench-normalise-") as tmp:
        workdir = Path(tmp)
        cluster = Cluster.launch(parse_topology(bench.TOPOLOGY))
        try:
            node = cluster.node("source")
            studies, stored, _ = bench.load_source(node, instances)
            inventory.crawl(node, workdir / "warm.sqlite", depth="attributes", via="dimse",
                            resume=False)

            def crawl_with(module: Any, label: str) -> float:
                inventory.row_from_dataset, inventory.normalise = (module.row_from_dataset,
                                                                   module.normalise)
                try:
                    elapsed, summary = bench._timed(lambda: inventory.crawl(
                        node, workdir / f"{label}.sqlite", depth="full", via="dimse",
                        resume=False))
                finally:
                    inventory.row_from_dataset, inventory.normalise = (new.row_from_dataset,
                                                                       new.normalise)
                assert summary.counts["instances"] == stored, summary.counts
                return elapsed

            def get(uid: str) -> None:
                target = workdir / "getscu" / uid
                target.mkdir(parents=True)
                bench._run([bench.GETSCU, "-S", "-k", "QueryRetrieveLevel=STUDY",
                            "-k", f"StudyInstanceUID={uid}", "-od", str(target),
                            *bench._address(node, HARNESS_AE_TITLE)])

            getscu_s = bench._in_parallel(get, studies, 1)[0]
            old_s = crawl_with(old, "old")
            new_s = crawl_with(new, "new")
        finally:
            cluster.stop()
    print(f"\ncrawl depth full, {stored} instances in {len(studies)} studies, one association")
    print(f"  getscu per study      {getscu_s:7.1f} s")
    print(f"  crawl, {base} rows   {old_s:7.1f} s   getscu/crawl {getscu_s / old_s:.2f}")
    print(f"  crawl, today's rows   {new_s:7.1f} s   getscu/crawl {getscu_s / new_s:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=DEFAULT_BASE,
                        help=f"commit of the old normalise.py (default {DEFAULT_BASE})")
    parser.add_argument("--crawl", type=int, default=0, metavar="N",
                        help="also crawl about N small instances on a launched Orthanc")
    args = parser.parse_args()
    if args.crawl and args.crawl < 50:
        parser.error("--crawl needs at least 50 instances")
    if args.crawl and not os.access(GETSCU, os.X_OK):
        print(f"bench_normalise: {GETSCU} is not installed (apt-get install dcmtk)",
              file=sys.stderr)
        sys.exit(3)
    try:
        recorder.normalise_at(args.base)
    except subprocess.CalledProcessError as exc:
        parser.error(f"--base {args.base}: git has no harness/migration/normalise.py there "
                     f"({exc.stderr.strip().splitlines()[-1] if exc.stderr else 'git failed'})")
    compare_rows(args.base)
    if args.crawl:
        compare_crawl(args.base, args.crawl)


if __name__ == "__main__":
    main()
