"""Benchmark: the reference migrator (`pacs-harness migrate`) against DCMTK movescu (by hand).

    python benchmarks/bench_migrate.py             # 20 harness runs, 3-8 min
    python benchmarks/bench_migrate.py --runs 5    # quicker; --no-monitor, --json

Two launched Orthancs; the source holds 12 studies of 48 small synthetic CT (576 instances).
In one run, each timed around the whole copy, the target wiped through Orthanc's REST API
before each copy and its instances counted there afterwards (an independent means):
  (a) /usr/bin/movescu, one process per study, one study after the other, TCP_NODELAY=1,
      before the harness runs and again between every second pair of them (the machine's
      load changes during a run; the ratio uses the medians);
  (b) Orthanc's own REST push of every study to the target (a reference);
  (c) Migrator(method="move") at 1 and 4 workers, each study confirmed on the target (the
      target's IMAGE-level C-FIND lists every SOP Instance UID the source listed), with the
      availability monitor probing both nodes as `pacs-harness migrate` does by default.
The migration at 4 workers is repeated `--runs` times: median, max, max/median and the
outliers (a run over 3x the median) are printed, with per-study durations (p50, p99, max)
and the ratio movescu/harness (>= 1.0: the harness, confirmation included, is at least as
fast as the bare C-MOVEs). A study slower than 5 s is printed with its time by phase as
the runs go. The machine may be shared: compare ratios from one run.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.cluster import Cluster  # noqa: E402
from harness.config import parse_topology  # noqa: E402
from harness.dicom.peer import HARNESS_AE_TITLE  # noqa: E402
from harness.migration.migrator import Migrator  # noqa: E402
from harness.migration.monitor import AvailabilityMonitor  # noqa: E402
from harness.migration.state import percentile  # noqa: E402
from harness.nodes.base import Node  # noqa: E402
from synthetic_data.templates import clone_study, template_instance  # noqa: E402

MOVESCU = "/usr/bin/movescu"
TOPOLOGY = """name: bench-migrate
nodes:
  src: {kind: orthanc, ae_title: BENCHSRC}
  dst: {kind: orthanc, ae_title: BENCHDST}
"""
OUTLIER_FACTOR = 3.0
SLOW_STUDY_S = 5.0  # printed with its phases as the runs go
MOVESCU_EVERY = 2  # movescu again every 2nd harness run: both measured under the same load


def held(node: Node) -> int:
    """Instances the node holds, by Orthanc's REST API (not by the harness's C-FIND)."""
    rest = node.rest()
    assert rest is not None
    return int(rest.statistics()["CountInstances"])


def wipe(node: Node) -> None:
    rest = node.rest()
    assert rest is not None
    rest.delete_all()
    assert held(node) == 0


def movescu_all(source: Node, target: Node, studies: list[str]) -> float:
    """(a) one movescu process per study, one after the other; seconds."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    start = time.perf_counter()
    for uid in studies:
        subprocess.run(
            [MOVESCU, "-S", "-aet", HARNESS_AE_TITLE, "-aec", source.ae_title,
             "-aem", target.ae_title, "-k", "QueryRetrieveLevel=STUDY",
             "-k", f"StudyInstanceUID={uid}", source.host, str(source.dicom_port)],
            check=True, capture_output=True, timeout=300, env=env,
        )
    return time.perf_counter() - start


def rest_push(source: Node, target: Node) -> float:
    """(b) the source Orthanc pushes every study to the target over its REST API; seconds."""
    rest = source.rest()
    assert rest is not None
    ids = rest.get_json("/studies")
    start = time.perf_counter()
    rest.post_json(f"/modalities/{target.name}/store", {"Resources": ids, "Synchronous": True})
    return time.perf_counter() - start


def migrate(source: Node, target: Node, workers: int, folder: Path, run: int,
            monitor: bool) -> dict:
    """(c) one migration with confirmation, a fresh state file, and (as `pacs-harness
    migrate` runs by default) the availability monitor probing both nodes; its timings."""
    state = folder / f"state-{workers}-{run}.sqlite"
    with Migrator(source, target, "move", state_path=state, workers=workers) as migrator:
        start = time.perf_counter()
        studies = migrator.plan()
        probes = (AvailabilityMonitor(source, target, studies, is_migrated=migrator.is_confirmed)
                  if monitor else None)
        if probes is not None:
            probes.start()
        try:
            result = migrator.run()
        finally:
            if probes is not None:
                probes.stop()
        elapsed = time.perf_counter() - start
    assert result.ok, result.errors
    return {"elapsed_s": elapsed, "retries": result.retries_used,
            "study_s": [o.elapsed_s for o in result.outcomes],
            "phases": [o.phases for o in result.outcomes]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="harness runs at 4 workers")
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--instances", type=int, default=48, help="per study")
    parser.add_argument("--no-monitor", action="store_true",
                        help="no availability monitor during the harness runs")
    parser.add_argument("--json", action="store_true", help="print one JSON dict")
    args = parser.parse_args()
    total = args.studies * args.instances
    cluster = Cluster.launch(parse_topology(TOPOLOGY))
    folder = Path(tempfile.mkdtemp(prefix="bench-migrate-"))
    figures: dict = {"studies": args.studies, "instances": total}
    try:
        source, target = cluster.node("src"), cluster.node("dst")
        template = template_instance("small", "CT")
        studies = []
        for n in range(args.studies):
            datasets = clone_study(template, args.instances, patient_id=f"MIG{n:03d}")
            assert source.dimse(timeout_s=120).store(datasets, associations=4).ok
            studies.append(str(datasets[0].StudyInstanceUID))
        assert held(source) == total

        movescu = []
        wipe(target)
        movescu.append(movescu_all(source, target, studies))
        figures["movescu_arrived"] = held(target)
        wipe(target)
        figures["rest_push_s"] = rest_push(source, target)
        figures["rest_push_arrived"] = held(target)
        wipe(target)
        one = migrate(source, target, 1, folder, 0, not args.no_monitor)
        figures["harness_1_worker_s"] = one["elapsed_s"]
        figures["harness_1_worker_arrived"] = held(target)
        runs = []
        for run in range(args.runs):
            if run % MOVESCU_EVERY == MOVESCU_EVERY - 1:  # the reference under the same load
                wipe(target)
                movescu.append(movescu_all(source, target, studies))
                assert held(target) == total
            wipe(target)
            runs.append(migrate(source, target, 4, folder, run + 1, not args.no_monitor))
            print(f"run {run + 1}: {runs[-1]['elapsed_s']:.2f} s", file=sys.stderr)
            for seconds, phases in zip(runs[-1]["study_s"], runs[-1]["phases"], strict=True):
                if seconds > SLOW_STUDY_S:  # what a slow study waited for, as it happens
                    print(f"  slow study {seconds:.2f} s: {phases}", file=sys.stderr)
            arrived = held(target)
            assert arrived == total, f"run {run + 1}: {arrived} of {total} on the target"
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)

    times = [r["elapsed_s"] for r in runs]
    figures["movescu_runs_s"] = [round(t, 3) for t in movescu]
    figures["movescu_s"] = statistics.median(movescu)
    median = statistics.median(times)
    study_s = sorted(s for r in runs for s in r["study_s"])
    phase_totals: dict[str, float] = {}
    for r in runs:
        for phases in r["phases"]:
            for phase, seconds in phases.items():
                phase_totals[phase] = phase_totals.get(phase, 0.0) + seconds
    figures.update({
        "harness_4_workers_runs_s": [round(t, 3) for t in times],
        "harness_4_workers_median_s": median,
        "harness_4_workers_max_s": max(times),
        "max_over_median": max(times) / median,
        "outliers": sum(t > OUTLIER_FACTOR * median for t in times),
        "retries": sum(r["retries"] for r in runs),
        "study_p50_s": percentile(study_s, 50),
        "study_p99_s": percentile(study_s, 99),
        "study_max_s": study_s[-1],
        "phase_share": {k: round(v / (sum(phase_totals.values()) or 1), 3)
                        for k, v in sorted(phase_totals.items())},
        "ratio_movescu_over_harness_4": figures["movescu_s"] / median,
        "ratio_movescu_over_harness_1": figures["movescu_s"] / figures["harness_1_worker_s"],
    })
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"{args.studies} studies, {total} small CT, two launched Orthancs; "
          "arrived = CountInstances of the target's REST API")
    print(f"(a) movescu, one study after the other: median {figures['movescu_s']:.2f} s of "
          f"{len(movescu)} runs {figures['movescu_runs_s']} (arrived {figures['movescu_arrived']})")
    print(f"(b) Orthanc REST push: {figures['rest_push_s']:.2f} s "
          f"(arrived {figures['rest_push_arrived']})")
    print(f"(c) harness move, 1 worker, confirmed: {figures['harness_1_worker_s']:.2f} s "
          f"(arrived {figures['harness_1_worker_arrived']})")
    print(f"(c) harness move, 4 workers, confirmed, {len(times)} runs: median {median:.2f} s, "
          f"max {max(times):.2f} s, max/median {figures['max_over_median']:.2f}, "
          f"outliers: {figures['outliers']} (> {OUTLIER_FACTOR:g}x median), "
          f"retries {figures['retries']}")
    print(f"per study (4 workers, all runs): p50 {figures['study_p50_s']:.3f} s, "
          f"p99 {figures['study_p99_s']:.3f} s, max {figures['study_max_s']:.3f} s; "
          f"time share by phase {figures['phase_share']}")
    print(f"ratio movescu/harness: 4 workers {figures['ratio_movescu_over_harness_4']:.2f} "
          f"(>= 1.0 required), 1 worker {figures['ratio_movescu_over_harness_1']:.2f}")


if __name__ == "__main__":
    main()
