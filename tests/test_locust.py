"""The Locust path: a local master and two worker processes load a real node, bounded."""

from __future__ import annotations

import pytest

from harness.cli.load import run_locust
from harness.fixtures import pacs_cluster_factory
from harness.performance.workload import parse_workload

WORKLOAD = """
name: locust-small
duration_s: 6
warmup_s: 0
dataset: {studies: 2, instances_per_study: 3, scale: tiny}
groups:
  - {name: find, operation: c-find, level: STUDY, users: 2}
  - {name: get, operation: c-get, users: 2}
"""


launched = pacs_cluster_factory("name: loc\nnodes:\n  t: {kind: orthanc, ae_title: LOC}\n",
                                requires=("Orthanc",))


@pytest.fixture
def node(launched):
    return launched.node("t")


def test_locust_master_and_two_workers(node, tmp_path):
    results = run_locust(parse_workload(WORKLOAD), node, processes=2, duration_s=6,
                         workdir=tmp_path)
    stats = results["stats"]
    assert results["master_exit_code"] == 0, results["master_log_tail"]
    assert stats["find: c-find STUDY"]["count"] > 0
    assert stats["get: c-get"]["count"] > 0
    assert stats["Aggregated"]["failures"] == 0, results["master_log_tail"]
    # the master starts only once --expect-workers (2) have joined, else exits non-zero
    assert results["processes"] == 2
