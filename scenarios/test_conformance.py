"""Conformance (phase planning): the same probes against every node, side by side (issue 16).

The matrix (harness/conformance/runner.py) is made once per session over the topology's
nodes and recorded whole in report.json as `conformance` (nodes, probes, results, risks:
what the interoperability page draws). `settings.conformance.probes: [ID or AREA, ...]` in
the topology limits the probes (default: all). Disposable nodes are wiped before and after,
so the probe corpus neither skews the probes nor leaks into other scenarios; a writable
node that is not disposable keeps it (synthetic data, docs/safety.md); a read-only node gets
no probe that writes ("not tested").

What the planning gate says:
* a node that did not answer fails: its column would be empty, nothing to plan on;
* a node that differs from the standard does not fail: that is a property of the PACS, for
  the matrix to show;
* a migration risk with a remedy (e.g. split the queries by date range) passes and is
  shown: recorded, and a warning in the pytest summary; the reference migrator applies the
  remedy, a site's own tool must be checked to;
* a migration risk without a remedy fails: between that pair no known way migrates
  without missing studies, a decision to take before the pilot.
"""

from __future__ import annotations

import warnings

import pytest

pytestmark = [pytest.mark.phase("planning"), pytest.mark.scenario("conformance")]


class MigrationRiskWarning(UserWarning):
    """A migration risk the matrix found, with its remedy (planning must see it)."""


@pytest.fixture(scope="module")
def conformance_run(pacs_cluster, pacs_topology):
    from harness.conformance.runner import run_conformance, select_probes
    from harness.errors import ConfigError

    settings = (pacs_topology.settings or {}).get("conformance") or {}
    selectors = settings.get("probes") or []
    where = f"{pacs_topology.source}: settings.conformance.probes:"
    if not isinstance(selectors, list) or not all(isinstance(s, str) for s in selectors):
        pytest.fail(f"{where} must be a list of probe ids or areas", pytrace=False)
    try:
        probes = select_probes(selectors, where=where)
    except ConfigError as exc:
        pytest.fail(str(exc), pytrace=False)
    disposable = [n for n in pacs_cluster.nodes.values() if n.disposable]
    for node in disposable:
        node.wipe()
    yield run_conformance(list(pacs_cluster.nodes.values()), probes)
    for node in disposable:
        if node.alive():
            node.wipe()


def _line(risk: dict, limit: int = 400) -> str:
    """One risk in a line (cut at `limit`: report.json keeps it whole)."""
    said = risk["risk"] if len(risk["risk"]) <= limit else risk["risk"][: limit - 1] + "…"
    remedy = risk.get("remedy") or "no known remedy"
    return f"{risk['source']} -> {risk['target']}: {risk['probe']}: {said} (remedy: {remedy})"


def test_every_node_answers_the_probes(conformance_run, pacs_metrics):
    pacs_metrics["conformance"] = conformance_run.as_dict()
    assert not conformance_run.unanswered, "; ".join(conformance_run.unanswered.values())


def test_every_migration_risk_has_a_remedy(conformance_run):
    risks = [r.as_dict() for r in conformance_run.risks]
    for risk in risks:
        if risk.get("remedy_id") or risk.get("remedy"):
            warnings.warn(_line(risk), MigrationRiskWarning, stacklevel=1)
    unremedied = [r for r in risks if not (r.get("remedy_id") or r.get("remedy"))]
    assert not unremedied, (f"{len(unremedied)} migration risks without a remedy:\n"
                            + "\n".join(_line(r) for r in unremedied))
