"""Links declared in the topology really go through fault proxies: delay, cut, schedule."""

from __future__ import annotations

import time

from harness.fixtures import pacs_cluster_factory
from synthetic_data.samples import sample_study

pytest_plugins = ["pytester"]

LINKED = """\
name: linked
nodes:
  a: {kind: embedded, ae_title: NODEA}
  b: {kind: embedded, ae_title: NODEB}
links:
  - {to: a, latency_ms: 100}
  - {from: b, to: a}
"""


linked = pacs_cluster_factory(LINKED)


def test_harness_link_adds_its_latency(linked):
    a, b = linked.node("a"), linked.node("b")
    assert a.access_port == linked.links["harness->a"].port != a.dicom_port
    start = time.perf_counter()
    assert a.dimse().echo().status.ok
    through_link = time.perf_counter() - start
    assert b.access_port is None and b.dimse().echo().status.ok  # no link: direct
    # an association is at least two round trips: 4 x 100 ms one way (no upper bound on
    # the direct echo: the machine may be loaded)
    assert through_link >= 0.4


def test_node_to_node_link_carries_c_move_and_cut_stops_it(linked):
    a, b = linked.node("a"), linked.node("b")
    study = sample_study(seed=61, instances=2)
    assert b.dimse().store(study).ok
    keys = {"StudyInstanceUID": study[0].StudyInstanceUID}
    moved = b.dimse().move(a.ae_title, "STUDY", keys)
    assert moved.ok and moved.completed == 2
    assert linked.links["b->a"].connections_total >= 1
    a.wipe()
    linked.links["b->a"].cut()
    refused = b.dimse().move(a.ae_title, "STUDY", keys)
    assert not refused.ok
    assert a.statistics().instances == 0
    linked.links["b->a"].heal()
    assert b.dimse().move(a.ae_title, "STUDY", keys).ok


def test_fault_schedule_from_settings_runs_and_is_recorded(pytester, tmp_path):
    topo = tmp_path / "t.yaml"
    topo.write_text(LINKED + "settings:\n  faults:\n"
                    "    - {at_s: 0.2, fault: cut, target: 'harness->a', duration_s: 5.0}\n")
    report = tmp_path / "report.json"
    # each state awaited (bounded generously), never assumed after a fixed sleep
    pytester.makepyfile(test_sched="""
import time
def wait_for(condition):
    deadline = time.monotonic() + 120
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)
def test_cut_then_healed(pacs_node, pacs_fault_schedule):
    wait_for(lambda: not pacs_node("a").alive())   # the cut came
    wait_for(lambda: pacs_node("a").alive())       # and healed by itself
""")
    result = pytester.runpytest_subprocess("--pacs-topology", str(topo), "-p",
                                           "no:cacheprovider", "--pacs-report-json", str(report))
    result.assert_outcomes(passed=1)
    import json

    (scenario,) = json.loads(report.read_text())["scenarios"]
    events = scenario["metrics"]["fault_events"]
    assert [e["what"] for e in events][:1] == ["cut"]
