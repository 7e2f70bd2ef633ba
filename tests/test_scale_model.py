"""The scale model (benchmarks/bench_scale.py) and partition ledgers merged into one
(harness/migration/merge.py), docs/scale.md.

The model is arithmetic on measured costs: it must project linearly, divide by the measured
parallel gain and no more, and name the largest term. The merge runs on real crawls of an
Orthanc node, one partition per date range (the node holds only that range when the
partition is crawled), and must give the ledger a one-shot crawl of all of them gives:
the same rows, and no finding when the two are reconciled; the instances are those of the
generated files, read with pydicom.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest

from harness.errors import ConfigError
from harness.fixtures import pacs_cluster_factory
from harness.migration.inventory import crawl
from harness.migration.merge import merge_ledgers
from harness.migration.reconcile import reconcile, sample_bound
from synthetic_data import GeneratorOptions, generate
from tests.helpers import run_cli

ROOT = Path(__file__).parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scale",
                                                  ROOT / "benchmarks" / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _bench()

# -------------------------------------------------------------------------------------
# the projection


def test_projection_is_linear_and_names_the_largest_term() -> None:
    crawl_full = bench.Activity("crawl full", pacs_s=0.003, harness_s=0.001,
                                pacs_kind="retrieval")
    at_1m = bench.project(crawl_full, 1_000_000)
    at_10m = bench.project(crawl_full, 10_000_000)
    assert at_1m["pacs_s"] == pytest.approx(3000)
    assert at_1m["harness_s"] == pytest.approx(1000)
    assert at_10m["total_s"] == pytest.approx(10 * at_1m["total_s"])
    assert at_1m["bottleneck"] == "PACS"
    slow_harness = bench.Activity("crawl full", pacs_s=0.001, harness_s=0.004)
    assert bench.project(slow_harness, 1_000_000)["bottleneck"] == "harness"


def test_harness_cost_is_its_time_beyond_the_reference_tool() -> None:
    activity = bench.activity_from_times("crawl attributes", 1000, harness_total_s=3.0,
                                         reference_total_s=2.0)
    assert activity.pacs_s == pytest.approx(0.002)
    assert activity.harness_s == pytest.approx(0.001)
    faster = bench.activity_from_times("transfer", 1000, harness_total_s=1.0,
                                       reference_total_s=2.0)
    assert faster.harness_s == 0.0  # faster than the tool (workers): no cost of its own


def test_parallel_gain_is_the_measured_one_and_flat_beyond_it() -> None:
    measured = {1: 100.0, 2: 180.0, 4: 150.0}  # the PACS got slower at 4
    assert bench.speedup(measured, 1) == pytest.approx(1.0)
    assert bench.speedup(measured, 2) == pytest.approx(1.8)
    assert bench.speedup(measured, 4) == pytest.approx(1.8)  # 2 associations are used
    assert bench.speedup(measured, 64) == pytest.approx(1.8)  # no extrapolation
    activity = bench.Activity("crawl full", pacs_s=0.01, harness_s=0.01, pacs_kind="retrieval")
    row = bench.project(activity, 1_000_000, pacs_speedup=bench.speedup(measured, 8),
                        partitions=8)
    assert row["pacs_s"] == pytest.approx(10_000 / 1.8)
    assert row["harness_s"] == pytest.approx(10_000 / 8)


def test_partitions_for_a_week_and_when_the_pacs_alone_is_too_slow() -> None:
    measured = {1: 100.0, 2: 200.0, 4: 400.0}
    week = 7 * 24 * 3600
    # 100M x 10 ms = 11.6 days over one association; 4 partitions: 2.9 days
    fits = bench.Activity("crawl full", pacs_s=0.008, harness_s=0.002, pacs_kind="retrieval")
    parts = bench.partitions_within(fits, 100_000_000, week, measured)
    assert parts == 2
    assert bench.project(fits, 100_000_000, pacs_speedup=2.0, partitions=2)["total_s"] <= week
    assert bench.project(fits, 100_000_000)["total_s"] > week
    # the PACS needs 100M x 40 ms / 4 = 11.6 days even at its best: no number of machines helps
    too_slow = bench.Activity("crawl full", pacs_s=0.04, harness_s=0.0, pacs_kind="retrieval")
    assert bench.partitions_within(too_slow, 100_000_000, week, measured) is None


def test_verification_row_names_reconcile_when_it_dominates() -> None:
    activities = [bench.Activity("crawl attributes", 1e-6, 1e-6, "listing"),
                  bench.Activity("crawl full", 1e-6, 1e-6, "retrieval"),
                  bench.Activity("reconcile", 0.0, 1e-3)]
    gains = {"listing": {1: 1.0}, "retrieval": {1: 1.0}}
    row = bench.verification(activities, "full", 1_000_000, gains)
    assert row["bottleneck"] == "reconcile"
    assert row["total_s"] == pytest.approx(2 + 2 + 1000)


def test_real_world_rates_and_sampling_bound() -> None:
    """5.8 TB a week of 0.5 MB instances is 19 instances/s sustained."""
    assert bench.required_rate(5.8e12, 7 * 86400, 0.5e6) == pytest.approx(19.18, abs=0.01)
    # the bound docs/scale.md quotes: 0 defects in 500 of 450,000 studies, 95% confidence
    assert sample_bound(500, 450_000) == pytest.approx(0.0060, abs=5e-5)


# -------------------------------------------------------------------------------------
# merging partition ledgers, on real crawls

cluster = pacs_cluster_factory("name: scale-merge\nnodes:\n  pacs: {kind: orthanc}\n",
                               scope="module", requires=("Orthanc",))


@pytest.fixture(scope="module")
def crawled(cluster, tmp_path_factory):
    """A one-shot crawl of the node, and one crawl per share of it as machines would crawl
    them (`study_dates`): early dates, late dates, the study without a StudyDate."""
    node = cluster.node("pacs")
    folder = tmp_path_factory.mktemp("merge")
    data = list(generate(GeneratorOptions(patients=4, studies_per_patient=2, seed=7,
                                          scale="tiny")))
    undated = data[0].StudyInstanceUID
    for ds in data:
        if ds.StudyInstanceUID == undated:
            del ds.StudyDate
    dates = sorted({ds.StudyDate for ds in data if "StudyDate" in ds})
    cut = dt.datetime.strptime(dates[len(dates) // 2], "%Y%m%d").date()
    shares = {"early": f"-{cut - dt.timedelta(days=1):%Y%m%d}", "late": f"{cut:%Y%m%d}-",
              "undated": "undated"}
    node.wipe()
    assert node.dimse().store(data).ok
    crawl(node, folder / "one-shot.sqlite", depth="full")
    for name, share in shares.items():
        summary = crawl(node, folder / f"{name}.sqlite", depth="full", study_dates=share)
        assert summary.studies_total > 0, name
    node.wipe()
    return folder, {str(ds.SOPInstanceUID) for ds in data}


PARTS = ("early.sqlite", "late.sqlite", "undated.sqlite")


TABLES = ("patients", "studies", "series", "instances", "instance_attrs", "issues")


def _rows(path: Path) -> dict[str, list[tuple]]:
    conn = sqlite3.connect(path)
    try:
        return {t: sorted(conn.execute(f"SELECT * FROM {t}"), key=repr) for t in TABLES}
    finally:
        conn.close()


def test_merged_partitions_equal_a_one_shot_crawl(crawled) -> None:
    folder, generated = crawled
    counts = merge_ledgers([folder / part for part in PARTS], folder / "merged.sqlite")
    assert counts["instances"] == len(generated)
    merged, one_shot = _rows(folder / "merged.sqlite"), _rows(folder / "one-shot.sqlite")
    assert {row[0] for row in merged["instances"]} == generated
    assert merged == one_shot
    findings = reconcile(folder / "one-shot.sqlite", folder / "merged.sqlite")
    assert findings.findings == []
    assert findings.counts["source"] == findings.counts["target"]


def test_overlapping_partitions_are_reported(crawled) -> None:
    folder, generated = crawled
    shutil.copyfile(folder / "early.sqlite", folder / "early-again.sqlite")
    merge_ledgers([*(folder / part for part in PARTS), folder / "early-again.sqlite"],
                  folder / "overlap.sqlite")
    rows = _rows(folder / "overlap.sqlite")
    early = _rows(folder / "early.sqlite")
    assert len(rows["instances"]) == len(generated)
    problems = [problem for _, _, problem in rows["issues"]]
    assert sum("more than one partition" in p for p in problems) == len(early["studies"])
    assert sum("seen twice" in p for p in problems) == len(early["instances"])


def test_partitions_of_different_crawls_are_refused(crawled, tmp_path) -> None:
    folder, _ = crawled
    shutil.copyfile(folder / "late.sqlite", tmp_path / "other.sqlite")
    conn = sqlite3.connect(tmp_path / "other.sqlite")
    conn.execute("UPDATE meta SET value = 'attributes' WHERE key = 'depth'")
    conn.commit()
    conn.close()
    with pytest.raises(ConfigError, match="depth 'attributes'"):
        merge_ledgers([folder / "early.sqlite", tmp_path / "other.sqlite"],
                      tmp_path / "merged.sqlite")
    with pytest.raises(ConfigError, match="cannot be one of the partitions"):
        merge_ledgers([folder / "early.sqlite"], folder / "early.sqlite")
    command = run_cli("merge-ledgers", str(tmp_path / "m.sqlite"),
                      str(tmp_path / "missing.sqlite"), timeout=60)
    assert command.returncode == 2
    assert command.stderr.count("\n") == 1 and "missing.sqlite" in command.stderr


def test_merge_ledgers_command_merges_the_shares(crawled, tmp_path) -> None:
    folder, generated = crawled
    merged = tmp_path / "merged.sqlite"
    proc = run_cli("merge-ledgers", str(merged), *(str(folder / part) for part in PARTS),
                   "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["counts"]["instances"] == len(generated)
    assert _rows(merged) == _rows(folder / "one-shot.sqlite")
    bad = run_cli("merge-ledgers", str(tmp_path / "m.sqlite"), str(tmp_path / "none.sqlite"))
    assert bad.returncode == 2 and "none.sqlite" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("share, partition, message", [
    ("2015-2016", "date", "expected a StudyDate range"),
    ("20161301-", "date", "expected a StudyDate range"),
    ("20170101-20160101", "date", "expected a StudyDate range"),
    ("20160101-", "uid", "use partition 'date'"),
])
def test_a_bad_share_is_refused_before_the_node_is_asked(share, partition, message) -> None:
    from harness.migration.partitions import check_study_dates

    with pytest.raises(ConfigError, match=message):
        check_study_dates(share, partition)


def test_reconcile_command_compares_merged_shares_without_crawling(crawled, tmp_path) -> None:
    """`reconcile` on ledgers alone: the merged shares equal the one-shot crawl (exit 0);
    one share against the whole node misses every study of the other shares (exit 1)."""
    folder, _ = crawled
    merged = tmp_path / "merged.sqlite"
    merge_ledgers([folder / part for part in PARTS], merged)
    same = run_cli("reconcile", str(folder / "one-shot.sqlite"), str(merged),
                   "--out", str(tmp_path / "same"), "--json")
    assert same.returncode == 0, same.stdout + same.stderr
    assert json.loads(same.stdout)["verdict"] == "pass"
    short = run_cli("reconcile", str(folder / "one-shot.sqlite"), str(folder / "early.sqlite"),
                    "--out", str(tmp_path / "short"))
    assert short.returncode == 1, short.stdout + short.stderr
    findings = json.loads((tmp_path / "short" / "findings.json").read_text())
    lost = sum(f["instances"] for f in findings["findings"] if f["type"].startswith("missing_"))
    early = {row[0] for row in _rows(folder / "early.sqlite")["instances"]}
    whole = {row[0] for row in _rows(folder / "one-shot.sqlite")["instances"]}
    assert lost == len(whole - early) > 0
    assert not [f for f in findings["findings"] if not f["type"].startswith("missing_")]
