"""Every conformance probe against every node: the nodes x probes matrix and its risks.

Why one node at a time: a node's probes C-MOVE into another node of the topology (its move
destination) and read what the corpus stored; probing nodes side by side would let one
node's probes change what another's see, for a few seconds saved on a planning run.

Per node: one C-ECHO first (PS3.7 9.1.5), so a node that does not answer costs one
deadline, not one per probe; the probe corpus is stored once when the node is writable and
a chosen probe reads it (harness/conformance/corpus.py); then each probe runs with a fresh
ProbeContext. Probes that send objects into another node (C-MOVE) run after every node's
other probes, so no node's answers depend on the order of the nodes. Permissions are the
probe's (Probe.run): nothing is written into a node that is not writable. The migration
risks between the nodes come from harness/conformance/risks.py.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.conformance.model import (
    AREAS,
    Probe,
    ProbeContext,
    ProbeResult,
    all_probes,
)
from harness.errors import ConfigError, EnvironmentProblem, HarnessError

#: progress(done, total, what): what is "node: probe id"
Progress = Callable[[int, int, str], None]
#: stores the probe corpus into a writable node and returns what it stored
CorpusStore = Callable[[Any], Any]

ECHO_DEADLINE_S = 10.0
#: areas whose probes send objects into another node (the move destination)
SENDING_AREAS = ("retrieve",)


@dataclass(frozen=True)
class NodeInfo:
    """A column of the matrix: which implementation answered."""

    name: str
    kind: str
    version: str
    writable: bool

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "version": self.version,
                "writable": self.writable}


@dataclass
class ConformanceRun:
    """The matrix (one ProbeResult per node and probe) and the migration risks it shows."""

    nodes: list[NodeInfo]
    probes: list[Probe]
    results: list[ProbeResult]
    risks: list[Any] = field(default_factory=list)  # risks.MigrationRisk
    #: node name -> why none of its probes ran (it did not answer C-ECHO)
    unanswered: dict[str, str] = field(default_factory=dict)

    def result(self, probe_id: str, node_name: str) -> ProbeResult:
        for result in self.results:
            if result.probe == probe_id and result.node == node_name:
                return result
        raise KeyError(f"no result for probe {probe_id!r} on node {node_name!r}")

    def as_dict(self) -> dict[str, Any]:
        """What the scenario records in pacs_metrics["conformance"] and `--json` prints."""
        return {
            "nodes": [n.as_dict() for n in self.nodes],
            "probes": [p.info() for p in self.probes],
            "results": [r.as_dict() for r in self.results],
            "risks": [r.as_dict() for r in self.risks],
        }


def select_probes(selectors: Iterable[str], where: str = "--probe") -> list[Probe]:
    """The probes named by ids ("query.wildcard-star") or areas ("query"), in matrix
    order; none named: every probe. An unknown one is a ConfigError naming it."""
    selectors = list(selectors)
    probes = all_probes()
    if not selectors:
        return probes
    known = {p.id for p in probes}
    for selector in selectors:
        if selector not in known and selector not in AREAS:
            close = difflib.get_close_matches(selector, [*known, *AREAS], n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(
                f"{where} {selector!r}: no such conformance probe or area ({hint}areas: "
                f"{', '.join(AREAS)}; {len(known)} probes, ids 'area.name')"
            )
    wanted = set(selectors)
    return [p for p in probes if p.id in wanted or p.area in wanted]


def move_destination(node: Any, candidates: Sequence[Any]) -> Any | None:
    """Another writable node `node` knows as a C-MOVE destination (PS3.4 C.4.2.1: the SCP
    resolves the Move Destination AE title from its own configuration), disposable ones
    first; None when there is none.

    Known: the peers the harness configured into a launched node (`node.peers`, given
    back to a cluster attached from `up`'s state). An external node's table is the
    site's, unknown to the harness: None.
    """
    others = sorted((c for c in candidates if c.name != node.name and c.writable),
                    key=lambda c: not c.disposable)
    known = {peer.ae_title for peer in node.peers}
    return next((c for c in others if c.ae_title in known), None)


def _unanswered(node: Any) -> str | None:
    """Why the node cannot be probed (its association failed), or None when it answers."""
    try:
        node.dimse(timeout_s=ECHO_DEADLINE_S).echo()
    except (EnvironmentProblem, OSError) as exc:
        return f"{node.name} did not answer C-ECHO: {exc}"
    return None


def _version(node: Any) -> str:
    try:
        return str(node.version())
    except (HarnessError, OSError):
        return "unknown"


def _store_corpus(node: Any, store: CorpusStore | None) -> tuple[Any, str | None]:
    """(corpus, None), or (None, why not) when the corpus module is missing or the node
    refused it."""
    if store is None:
        try:
            store = importlib.import_module("harness.conformance.corpus").store_corpus
        except ModuleNotFoundError as exc:
            if exc.name != "harness.conformance.corpus":
                raise
            return None, "the probe corpus is not available (harness/conformance/corpus.py)"
    try:
        return store(node), None
    except EnvironmentProblem as exc:
        return None, f"the probe corpus could not be stored on {node.name}: {exc}"


def _migration_risks(results: list[ProbeResult], nodes: list[NodeInfo]) -> list[Any]:
    """risks.migration_risks over every ordered pair; the nodes go as their dicts, whose
    `writable` tells which can be a target. [] while risks.py is not installed."""
    try:
        risks = importlib.import_module("harness.conformance.risks")
    except ModuleNotFoundError as exc:
        if exc.name != "harness.conformance.risks":
            raise
        return []
    return list(risks.migration_risks(results, [n.as_dict() for n in nodes]))


def _not_tested(probe: Probe, node: Any, why: str) -> ProbeResult:
    return ProbeResult(probe=probe.id, node=node.name, outcome="not tested", observed=why)


def run_conformance(
    nodes: Sequence[Any],
    probes: Sequence[Probe] | None = None,
    *,
    progress: Progress | None = None,
    destinations: Sequence[Any] | None = None,
    corpus_store: CorpusStore | None = None,
) -> ConformanceRun:
    """Run `probes` (default: every registered probe) against each of `nodes`.

    `destinations`: the nodes a move destination may be picked from (default: `nodes`;
    the CLI passes the whole topology when only some nodes are probed). `corpus_store`:
    how the corpus is stored (default: harness.conformance.corpus.store_corpus).
    """
    chosen = list(all_probes() if probes is None else probes)
    candidates = list(nodes if destinations is None else destinations)
    total = len(nodes) * len(chosen)
    done: dict[tuple[str, str], ProbeResult] = {}
    unanswered: dict[str, str] = {}
    infos: list[NodeInfo] = []
    contexts: list[tuple[Any, Any, str | None, Any]] = []  # node, corpus, why none, destination
    for node in nodes:
        silent = _unanswered(node)
        infos.append(NodeInfo(node.name, node.kind,
                              "unknown" if silent else _version(node), node.writable))
        corpus, corpus_problem = None, None
        if silent:
            unanswered[node.name] = silent
        elif node.writable and any(p.needs_corpus for p in chosen):
            corpus, corpus_problem = _store_corpus(node, corpus_store)
        contexts.append((node, corpus, corpus_problem, move_destination(node, candidates)))
    # probes that send into another node last: no node's answers depend on node order
    for moving in (False, True):
        for node, corpus, corpus_problem, destination in contexts:
            silent = unanswered.get(node.name)
            for probe in chosen:
                if (probe.area in SENDING_AREAS) != moving:
                    continue
                if silent:
                    result = _not_tested(probe, node, silent)
                elif probe.needs_corpus and corpus_problem:
                    result = _not_tested(probe, node, corpus_problem)
                else:
                    result = probe.run(ProbeContext(node, corpus, destination))
                done[(node.name, probe.id)] = result
                if progress is not None:
                    progress(len(done), total, f"{node.name}: {probe.id}")
    results = [done[(node.name, probe.id)] for node in nodes for probe in chosen]
    risks = _migration_risks(results, infos)
    return ConformanceRun(infos, chosen, results, risks, unanswered)
