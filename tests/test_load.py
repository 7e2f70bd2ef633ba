"""Load engine: workload validation (file:line errors) and a bounded run on a real Orthanc."""

from __future__ import annotations

import pytest

from harness.errors import ConfigError
from harness.fixtures import pacs_cluster_factory
from harness.performance.runner import run_workload
from harness.performance.workload import parse_workload


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("groups:\n  - {operation: c-fnd, users: 1}\n",
         "w.yaml:2: groups.0.operation: unknown operation 'c-fnd'"),
        ("groups:\n  - {operation: c-find, users: 1, rate: 2}\n",
         "w.yaml:2: groups.0: give exactly one of users"),
        ("duration_s: 10\ngroups:\n  - operation: c-find\n    users: 0\n",
         "w.yaml:4: groups.0.users: must be a whole number >= 1"),
        ("groups:\n  - {operation: c-find, users: 1, level: STUDYY}\n",
         "w.yaml:2: groups.0.level: unknown level 'STUDYY'"),
        ("dataset: {scale: huge}\ngroups:\n  - {operation: c-echo, users: 1}\n",
         "w.yaml:1: dataset.scale: unknown scale 'huge'"),
        ("groups: []\n", "w.yaml:1: groups: must be a non-empty list"),
        ("duraton_s: 3\ngroups:\n  - {operation: c-echo, users: 1}\n",
         "w.yaml:1: duraton_s: unknown field"),
    ],
)
def test_workload_errors_name_file_line_field(text, message):
    with pytest.raises(ConfigError) as caught:
        parse_workload(text, "w.yaml")
    assert str(caught.value).startswith(message), str(caught.value)


orthanc = pacs_cluster_factory("name: ld\nnodes:\n  t: {kind: orthanc, ae_title: LD}\n",
                               scope="module", requires=("Orthanc",))


def test_mixed_workload_closed_and_open(orthanc):
    workload = parse_workload("""
name: mix
duration_s: 4
warmup_s: 1
max_operations: 400
dataset: {studies: 2, instances_per_study: 4, scale: small}
groups:
  - {name: store, operation: c-store, users: 1, instances: 3}
  - {name: get, operation: c-get, users: 1}
  - {name: move, operation: c-move, users: 1}
  - {name: find-study, operation: c-find, level: STUDY, rate: 5}
  - {name: find-image, operation: c-find, level: IMAGE, users: 1}
  - {name: wado, operation: wado-rs, users: 1}
  - {name: qido, operation: qido-rs, rate: 3}
  - {name: stow, operation: stow-rs, users: 1, instances: 2}
""")
    snapshots = []
    # bounded by its duration or count: it returns by itself (a hang is pytest-timeout's)
    results = run_workload(workload, orthanc.node("t"), move_port=orthanc.harness_port,
                           on_progress=snapshots.append)
    ops = results["operations"]
    for name, op in ops.items():
        assert op["count"] > 0, name
        assert op["errors"] == 0, (name, op["errors_by_status"])
        assert op["latency_ms"]["p95"] > 0
    assert ops["store"]["instances"] % 3 == 0 and ops["store"]["instances_per_s"] > 0
    assert ops["wado"]["mb_per_s"] > 0 and ops["get"]["instances"] % 4 == 0
    assert 4 <= ops["find-study"]["count"] + ops["find-study"]["dropped"] <= 21  # 5/s for ~4 s
    assert results["move_received"] >= ops["move"]["instances"] > 0
    assert results["timeline"] and results["harness"]["cpu_cores"] > 0
    seconds = [row for row in results["timeline"] if "latency_ms" in row]
    assert seconds, "no second of the run has latencies"
    for row in seconds:
        latency = row["latency_ms"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["max"], row
    slowest = max(op["latency_ms"]["max"] for op in ops.values())
    assert max(row["latency_ms"]["max"] for row in seconds) <= slowest + 1  # same operations
    assert results["node"]["name"] == "t" and results["harness_version"]
    assert snapshots and "p95_ms" in snapshots[-1]


def test_count_bound_stops_the_run(orthanc):
    workload = parse_workload(
        "duration_s: 600\nwarmup_s: 0\nmax_operations: 10\ndataset: {studies: 1, "
        "instances_per_study: 1, scale: tiny}\ngroups:\n  - {operation: c-echo, users: 2}\n")
    results = run_workload(workload, orthanc.node("t"))
    # ended by the count, not by the 600 s duration: the run says which bound stopped it
    assert results["totals"]["operations"] == 10
    assert results["totals"]["bounded_by"] == "max_operations"


def test_errors_are_counted_by_status(orthanc):
    workload = parse_workload(
        "duration_s: 2\nwarmup_s: 0\ndataset: {studies: 1, instances_per_study: 1, "
        "scale: tiny}\ngroups:\n  - {operation: c-move, users: 1, destination: NOSUCHAE}\n")
    results = run_workload(workload, orthanc.node("t"))
    op = results["operations"]["c-move"]
    assert op["count"] > 0 and op["errors"] == op["count"]
    assert op["availability_pct"] == 0.0
    assert any("0xA801" in status or "failure" in status for status in op["errors_by_status"])
