"""Migration risks from probe outcomes, and the reference migrator applying the remedy.

The seeded difference: an Orthanc 1.10 source capped by `LimitFindResults: 5`, holding 15
studies over five dates, and an embedded target. The limit probe measures the cap, the risk
"split-queries-by-date" is flagged for source -> target, and `pacs-harness migrate
--conformance` moves every study; the target is checked with DCMTK's findscu and the source
with Orthanc's REST API, never with the migrator's own listing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.conformance.model import ProbeContext, probe_by_id
from harness.conformance.risks import (
    BY_UID_LIST,
    CLASS_NOT_STORED,
    DELETE_BEFORE_RESEND,
    DUPLICATES,
    KEEP_ATTRIBUTES,
    ONE_ASSOCIATION,
    RECONCILE_FULL,
    RETRIEVE_BY_GET,
    SPLIT_BY_DATE,
    TRANSCODE,
    migration_risks,
)
from harness.fixtures import pacs_cluster_factory
from harness.migration.migrator import Migrator
from tests.helpers import external_topology, login_env
from tests.test_conformance_limits import (
    DATES,
    LIMIT,
    STUDIES,
    dated_studies,
    findscu_studies,
    orthanc_studies,
)

TOPOLOGY = f"""name: risks
nodes:
  legacy: {{kind: orthanc, ae_title: LEGACY, orthanc_config: {{LimitFindResults: {LIMIT}}}}}
  target: {{kind: embedded, ae_title: TARGET}}
"""

launched = pacs_cluster_factory(TOPOLOGY, scope="module", requires=("Orthanc",))


def _row(node: str, probe: str, outcome: str, observed: str = "", **facts) -> dict:
    return {"node": node, "probe": probe, "outcome": outcome, "observed": observed,
            "evidence": [], "facts": facts}


NODES = [{"name": "a", "writable": True}, {"name": "b", "writable": True}]


def _ids(risks, source: str, target: str) -> set[str]:
    return {r.remedy_id for r in risks if (r.source, r.target) == (source, target)}


# -- the rules, on recorded results ---------------------------------------------------------


def test_truncating_source_is_a_risk_towards_every_target_only():
    results = [_row("a", "limits.find-results", "differs", limit=5, says_so=False),
               _row("b", "limits.find-results", "conforms", limit=None, says_so=False)]
    risks = migration_risks(results, NODES)
    assert _ids(risks, "a", "b") == {SPLIT_BY_DATE}
    assert _ids(risks, "b", "a") == set()
    (risk,) = risks
    assert "after 5 matches" in risk.risk and "silently" in risk.risk
    assert risk.as_dict()["remedy_id"] == SPLIT_BY_DATE


def test_truncating_source_without_reliable_date_ranges_is_listed_by_uid():
    results = [_row("a", "limits.find-results", "differs", limit=5, says_so=True),
               _row("a", "query.date-range", "differs", "matched nothing")]
    assert _ids(migration_risks(results, NODES), "a", "b") == {BY_UID_LIST}


def test_matching_that_differs_between_the_nodes_asks_for_uid_queries():
    results = [_row("a", "query.wildcard-star", "conforms"),
               _row("b", "query.wildcard-star", "differs", "case-folded"),
               _row("a", "query.pn-case", "differs", "case-insensitive"),
               _row("b", "query.pn-case", "conforms"),
               _row("a", "query.single-value", "conforms"),
               _row("b", "query.single-value", "conforms"),
               _row("a", "query.charset-utf8", "differs", "answered in ISO_IR 100"),
               _row("b", "query.charset-utf8", "differs", "answered in ISO_IR 100")]
    risks = migration_risks(results, NODES)
    assert {(r.source, r.target, r.probe, r.remedy_id) for r in risks} == {
        ("a", "b", "query.wildcard-star, query.pn-case", BY_UID_LIST),
        ("b", "a", "query.wildcard-star, query.pn-case", BY_UID_LIST)}
    assert "query.pn-case: differs / conforms" in next(r.risk for r in risks if r.source == "a")
    assert "one UID per query" in risks[0].remedy


def test_refused_syntaxes_and_classes_of_the_target():
    accepted_a = {"CT Image Storage": ["Explicit VR Little Endian", "JPEG Baseline (Process 1)"],
                  "MR Image Storage": ["Explicit VR Little Endian"]}
    accepted_b = {"CT Image Storage": ["Explicit VR Little Endian"]}
    results = [_row("a", "association.storage-syntaxes", "conforms", accepted=accepted_a),
               _row("b", "association.storage-syntaxes", "conforms", accepted=accepted_b)]
    risks = migration_risks(results, NODES)
    assert _ids(risks, "a", "b") == {TRANSCODE, CLASS_NOT_STORED}
    assert _ids(risks, "b", "a") == set()
    assert any("JPEG Baseline" in r.risk for r in risks if r.remedy_id == TRANSCODE)


@pytest.mark.parametrize(("outcome", "facts", "flagged"), [
    ("differs", {"lost": 1, "refused": 0}, True),  # acknowledged, then not held
    ("conforms", {"lost": 0, "refused": 20}, True),  # refusals: allowed, but a risk
    ("conforms", {"lost": 0, "refused": 0}, False),
])
def test_a_target_that_cannot_take_parallel_stores(outcome, facts, flagged):
    results = [_row("b", "limits.parallel-stores", outcome, "observed", **facts)]
    risks = migration_risks(results, NODES)
    assert _ids(risks, "a", "b") == ({ONE_ASSOCIATION} if flagged else set())
    assert _ids(risks, "b", "a") == set()


def test_source_without_move_is_migrated_by_get():
    results = [_row("a", "retrieve.move-known", "not supported", "no C-MOVE"),
               _row("a", "retrieve.get-study", "conforms")]
    assert _ids(migration_risks(results, NODES), "a", "b") == {RETRIEVE_BY_GET}


def test_storage_changes_of_the_target_and_conversions_of_the_source():
    results = [_row("b", "storage.private-tags", "differs", "creators dropped"),
               _row("a", "storage.private-tags", "conforms"),
               _row("a", "storage.long-text", "differs", "cut at 64 kB"),
               _row("b", "storage.long-text", "differs", "cut at 64 kB"),
               _row("a", "storage.transcoding", "differs", "sent JPEG")]
    risks = migration_risks(results, NODES)
    assert {(r.source, r.target, r.probe, r.remedy_id) for r in risks} == {
        ("a", "b", "storage.private-tags", KEEP_ATTRIBUTES),  # b drops what a keeps
        ("a", "b", "storage.transcoding", RECONCILE_FULL)}  # long text: both cut alike


@pytest.mark.parametrize(("target_policy", "source_policy", "expected"), [
    ("keep-first", "overwrite", {DELETE_BEFORE_RESEND}),
    ("reject", None, {DELETE_BEFORE_RESEND}),
    ("overwrite", "overwrite", set()),
    ("overwrite", "keep-both", {DUPLICATES}),
    ("keep-both", None, {DUPLICATES}),
])
def test_duplicate_policies(target_policy, source_policy, expected):
    results = [_row("b", "storage.duplicate-uid", "conforms", duplicate_policy=target_policy)]
    if source_policy:
        results.append(_row("a", "storage.duplicate-uid", "conforms",
                            duplicate_policy=source_policy))
    assert _ids(migration_risks(results, NODES), "a", "b") == expected


def test_unknown_missing_and_untested_probes_are_ignored():
    results = [_row("a", "limits.find-results", "not tested", "no study", limit=None),
               _row("a", "storage.no-such-probe-yet", "not tested", "x"),
               _row("b", "query.wildcard-star", "differs", "x"),  # nothing measured on a
               _row("a", "some.future-probe", "differs", "y", whatever=1)]
    assert migration_risks(results, NODES) == []


def test_a_node_that_is_not_writable_is_only_a_source():
    results = [_row("a", "limits.find-results", "differs", limit=5, says_so=True),
               _row("b", "limits.find-results", "differs", limit=7, says_so=True)]
    nodes = [{"name": "a", "writable": False}, {"name": "b", "writable": True}]
    risks = migration_risks(results, nodes)
    assert {(r.source, r.target) for r in risks} == {("a", "b")}


# -- the seeded difference, end to end ----------------------------------------------------


@pytest.fixture(scope="module")
def cluster(launched):
    archive = dated_studies(STUDIES, DATES, seed=2600)
    stored = launched.node("legacy").dimse().store(archive)
    assert stored.ok, [r.error for r in stored.failed]
    return launched


def _conformance(cluster) -> dict:
    """What `pacs-harness conformance --json` holds, for the limit probe only."""
    limit_probe = probe_by_id("limits.find-results")
    nodes = list(cluster.nodes.values())
    results = [limit_probe.run(ProbeContext(node)) for node in nodes]
    return {
        "nodes": [{"name": n.name, "kind": n.kind, "version": "", "writable": n.writable}
                  for n in nodes],
        "probes": [limit_probe.info()],
        "results": [r.as_dict() for r in results],
        "risks": [r.as_dict() for r in migration_risks(results, nodes)],
    }


def test_capped_source_is_flagged_and_migrate_moves_every_study(cluster, tmp_path):
    legacy, target = cluster.node("legacy"), cluster.node("target")
    target.wipe()
    on_source = orthanc_studies(legacy)
    assert len(on_source) == STUDIES
    assert len(findscu_studies(legacy)[0]) == LIMIT  # a plain universal query sees 5

    conformance = _conformance(cluster)
    facts = {r["node"]: r["facts"] for r in conformance["results"]}
    assert facts["legacy"]["limit"] == LIMIT and facts["target"]["limit"] is None
    flagged = {(r["source"], r["target"], r["remedy_id"]) for r in conformance["risks"]}
    assert flagged == {("legacy", "target", SPLIT_BY_DATE)}
    path = tmp_path / "conformance.json"
    path.write_text(json.dumps(conformance))

    topology = external_topology(tmp_path / "ext.yaml", "ext", [legacy, target], "RISKS_TEST",
                                 {"legacy": ", writable: true", "target": ", writable: true"})
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli.migrate", "--topology", str(topology),
         "--from", "legacy", "--to", "target", "--state", str(tmp_path / "state.sqlite"),
         "--conformance", str(path), "--no-monitor", "--json"],
        capture_output=True, text=True, timeout=600,
        env=login_env(cluster, "RISKS_TEST", tmp_path / "harness-state"),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["remedies"]["split_queries"] is True
    assert summary["discovery"]["split_by_date"] and summary["discovery"]["studies"] == STUDIES
    assert summary["result"]["migrated"] == STUDIES
    on_target, final = findscu_studies(target)
    assert final == "Success" and set(on_target) == on_source


def test_migrator_notices_the_cut_answer_by_itself(cluster, tmp_path):
    legacy, target = cluster.node("legacy"), cluster.node("target")
    target.wipe()
    with Migrator(legacy, target, "move", state_path=tmp_path / "state.sqlite") as migrator:
        result = migrator.run()
    assert result.ok, result.errors
    assert migrator.discovery is not None and migrator.discovery.capped
    assert migrator.discovery.largest_cut == LIMIT
    assert set(findscu_studies(target)[0]) == orthanc_studies(legacy)


def test_conformance_file_that_is_not_one_is_refused_in_one_line(cluster, tmp_path):
    legacy, target = cluster.node("legacy"), cluster.node("target")
    topology = external_topology(tmp_path / "ext.yaml", "ext", [legacy, target], "RISKS_TEST",
                                 {"target": ", writable: true"})
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli.migrate", "--topology", str(topology),
         "--from", "legacy", "--to", "target", "--state", str(tmp_path / "s.sqlite"),
         "--conformance", str(bad)],
        capture_output=True, text=True, timeout=300,
        env=login_env(cluster, "RISKS_TEST", tmp_path / "harness-state"),
    )
    assert proc.returncode == 2
    assert "bad.json" in proc.stderr and "Traceback" not in proc.stderr
