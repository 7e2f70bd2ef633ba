"""The conformance runner on real nodes: every probe against every node, permissions kept.

One cluster holds one node of each launchable kind (embedded, dcmqrscp, Orthanc). The probes
here are the test's own, built as Probe objects and never registered (other modules' lists
of probes stay as their areas define them): C-ECHO, a Modality Worklist negotiation that
some kinds refuse, a C-FIND of what the corpus stored, a C-MOVE of it to the node's move
destination, and one that stores an object of its own. Each outcome is held against an
independent means: DCMTK's echoscu and findscu by absolute path, the nodes' own counts
(Orthanc REST, the embedded index, dcmqrscp's files).
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from harness.config import NodeSpec
from harness.conformance.model import Probe, conforms, differs, not_supported
from harness.conformance.runner import move_destination, run_conformance, select_probes
from harness.dicom.peer import HARNESS_AE_TITLE, DimseConnectionError
from harness.errors import ConfigError, EnvironmentProblem
from harness.fixtures import pacs_cluster_factory
from harness.launch.ports import free_port
from harness.nodes import make_node
from synthetic_data.samples import sample_study
from tests.helpers import one_node_per_kind

ECHOSCU, FINDSCU = "/usr/bin/echoscu", "/usr/bin/findscu"
MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
#: the one study the test corpus stores (the same on every node, so a C-MOVE between two
#: nodes leaves each holding one study)
CORPUS = sample_study(seed=1601)
OWN_OBJECT = sample_study(seed=1602)

cluster = pacs_cluster_factory(one_node_per_kind("conformance-runner"), scope="module")


def _echo(ctx):
    answer = ctx.node.dimse(timeout_s=10).echo()
    ctx.record("C-ECHO", f"status {answer.status}")
    return conforms("answered") if answer.status.ok else differs(f"status {answer.status}")


def _worklist(ctx):
    pair = (MODALITY_WORKLIST_FIND, IMPLICIT_VR_LITTLE_ENDIAN)
    try:  # an association whose only context is refused is not established (pynetdicom)
        accepted = ctx.node.dimse(timeout_s=10).negotiate([pair])[pair]
    except DimseConnectionError as exc:
        accepted, answer = False, str(exc)
    else:
        answer = "accepted" if accepted else "context refused"
    ctx.record("A-ASSOCIATE-RQ Modality Worklist FIND", answer)
    if accepted:
        return conforms("accepted")
    return not_supported("Modality Worklist FIND refused")


def _corpus_study_found(ctx):
    (study,) = ctx.corpus.study_uids
    found = ctx.node.dimse(timeout_s=10).find("STUDY", {"StudyInstanceUID": study})
    ctx.record(f"C-FIND STUDY StudyInstanceUID={study}", f"{len(found.matches)} matches")
    return conforms("found") if len(found.matches) == 1 else differs(f"{len(found.matches)}")


def _move_to_destination(ctx):
    if ctx.move_destination is None:
        return not_supported("no move destination")
    (study,) = ctx.corpus.study_uids
    moved = ctx.node.dimse(timeout_s=20).move(
        ctx.move_destination.ae_title, "STUDY", {"StudyInstanceUID": study})
    ctx.record(f"C-MOVE to {ctx.move_destination.ae_title}", f"status {moved.status}")
    if not moved.ok:
        return differs(f"status {moved.status}")
    return conforms("moved", destination=ctx.move_destination.name)


def _store_own(ctx):
    stored = ctx.node.dimse(timeout_s=10).store(OWN_OBJECT)
    return conforms("stored") if stored.ok else differs("refused")


def _probe(id_: str, function, **flags) -> Probe:
    return Probe(id_, id_.split(".")[0], id_, "as the test says", "PS3.4 (test)", function,
                 **flags)


ECHO = _probe("services.test-echo", _echo)
WORKLIST = _probe("services.test-worklist", _worklist)
CORPUS_FIND = _probe("query.test-corpus", _corpus_study_found, needs_corpus=True)
MOVE = _probe("retrieve.test-move", _move_to_destination, needs_corpus=True)
WRITE = _probe("storage.test-write", _store_own, writes=True)


class CorpusStore:
    """Stores the test corpus with C-STORE and remembers on which nodes it did."""

    def __init__(self) -> None:
        self.nodes: list[str] = []

    def __call__(self, node):
        self.nodes.append(node.name)
        assert node.dimse(timeout_s=20).store(CORPUS).ok
        return SimpleNamespace(study_uids=frozenset({CORPUS[0].StudyInstanceUID}),
                               patient_ids=frozenset({CORPUS[0].PatientID}))


class OwnStudyStore:
    """Stores a study of its own into each node (so moved studies can be told apart)."""

    def __call__(self, node):
        study = sample_study(seed=1700 + sum(map(ord, node.name)))
        assert node.dimse(timeout_s=20).store(study).ok
        return SimpleNamespace(study_uids=frozenset({study[0].StudyInstanceUID}))


def _count_studies(ctx):
    found = ctx.node.dimse(timeout_s=10).find("STUDY", {"StudyInstanceUID": None})
    return conforms(f"{len(found.matches)} studies", studies=len(found.matches))


COUNT = _probe("query.test-count", _count_studies, needs_corpus=True)


def _dcmtk(program: str, node, *args: str, files: tuple[str, ...] = ()) -> int:
    """DCMTK's exit code; `files` go after peer and port (its positional order)."""
    return subprocess.run([program, "-aet", HARNESS_AE_TITLE, "-aec", node.ae_title, *args,
                           node.host, str(node.dicom_port), *files],
                          capture_output=True, timeout=60).returncode


def test_every_probe_against_every_kind(cluster, tmp_path):
    nodes = list(cluster.nodes.values())
    probes = [ECHO, WORKLIST, CORPUS_FIND, MOVE]
    store = CorpusStore()
    seen: list[tuple[int, int, str]] = []
    run = run_conformance(nodes, probes, corpus_store=store,
                          progress=lambda done, total, what: seen.append((done, total, what)))

    assert len(run.results) == len(nodes) * len(probes)
    assert seen[-1][:2] == (len(run.results), len(run.results))
    assert sorted(store.nodes) == sorted(cluster.nodes)  # once per writable node
    worklist_request = tmp_path / "worklist.dcm"
    subprocess.run(["/usr/bin/dump2dcm", "/dev/stdin", str(worklist_request)], check=True,
                   input=b"(0008,0005) CS [ISO_IR 100]\n(0010,0010) PN []\n", timeout=30)
    for node in nodes:
        assert run.result(ECHO.id, node.name).outcome == "conforms"
        assert _dcmtk(ECHOSCU, node) == 0
        # findscu -W proposes only Modality Worklist FIND: it fails where the probe says
        # the node does not support it
        worklist = run.result(WORKLIST.id, node.name).outcome
        assert worklist in ("conforms", "not supported")
        findscu = _dcmtk(FINDSCU, node, "-W", files=(str(worklist_request),))
        assert (findscu == 0) == (worklist == "conforms"), (node.name, worklist, findscu)
        assert run.result(CORPUS_FIND.id, node.name).outcome == "conforms"
        held = node.held_statistics()
        assert held is not None and held.statistics.studies == 1, node.name
        moved = run.result(MOVE.id, node.name)
        assert moved.outcome == "conforms", moved.line()
        destination = cluster.node(moved.facts["destination"])
        assert destination.name != node.name and destination.writable
        assert moved.evidence and moved.evidence[0].request.startswith("C-MOVE")
    assert run.result(WORKLIST.id, "dcmqrscp").outcome == "not supported"

    as_dict = json.loads(json.dumps(run.as_dict()))
    assert set(as_dict) == {"nodes", "probes", "results", "risks"}
    assert [n["name"] for n in as_dict["nodes"]] == list(cluster.nodes)
    assert {tuple(sorted(n)) for n in as_dict["nodes"]} == {
        ("kind", "name", "version", "writable")}
    assert [p["id"] for p in as_dict["probes"]] == [p.id for p in probes]
    assert isinstance(as_dict["risks"], list)


def test_probes_that_send_into_other_nodes_run_last(cluster):
    """Each node's query probes see its own corpus only, whatever the order of the nodes;
    the moves happened all the same (each destination holds one more study)."""
    nodes = list(cluster.nodes.values())
    for node in nodes:
        node.wipe()
    run = run_conformance(nodes, [MOVE, COUNT], corpus_store=OwnStudyStore())

    for node in nodes:
        assert run.result(COUNT.id, node.name).facts["studies"] == 1, node.name
        assert run.result(MOVE.id, node.name).outcome == "conforms"
    received = {name: 0 for name in cluster.nodes}
    for node in nodes:
        received[run.result(MOVE.id, node.name).facts["destination"]] += 1
    for node in nodes:  # counted by each node's own index, not C-FIND
        assert node.held_statistics().statistics.studies == 1 + received[node.name]
    assert [r.probe for r in run.results[:2]] == [MOVE.id, COUNT.id]  # matrix order kept


def test_a_read_only_node_gets_not_tested_and_nothing_is_stored(cluster):
    orthanc = cluster.node("orthanc") if "orthanc" in cluster.nodes else None
    if orthanc is None:
        pytest.skip("Orthanc is not installed: no independent count of a site's PACS")
    site = make_node(NodeSpec(name="site", kind="external", ae_title=orthanc.ae_title,
                              host=orthanc.host, dicom_port=orthanc.dicom_port,
                              disposable=False), None)
    assert not site.writable
    before = orthanc.rest().statistics()
    store = CorpusStore()
    run = run_conformance([site], [WRITE, CORPUS_FIND, ECHO], corpus_store=store)

    after = orthanc.rest().statistics()  # Orthanc's own counts, not C-FIND
    assert (after["CountInstances"], after["CountStudies"]) == (
        before["CountInstances"], before["CountStudies"])
    assert store.nodes == []
    for probe in (WRITE, CORPUS_FIND):
        result = run.result(probe.id, "site")
        assert result.outcome == "not tested" and "not writable" in result.observed
    assert run.result(ECHO.id, "site").outcome == "conforms"
    assert run.as_dict()["nodes"] == [
        {"name": "site", "kind": "external", "version": "external PACS", "writable": False}]


def test_a_node_that_does_not_answer_makes_its_probes_not_tested(cluster):
    port = free_port()  # reserved, nobody listens
    silent = make_node(NodeSpec(name="silent", kind="external", ae_title="SILENT",
                                dicom_port=port, writable=True), None)
    store = CorpusStore()
    run = run_conformance([silent, cluster.node("embedded")], [ECHO, CORPUS_FIND],
                          corpus_store=store)

    assert store.nodes == ["embedded"]
    for probe in (ECHO, CORPUS_FIND):
        result = run.result(probe.id, "silent")
        assert result.outcome == "not tested" and "did not answer" in result.observed
    assert "silent" in run.unanswered
    assert run.result(ECHO.id, "embedded").outcome == "conforms"


def test_without_a_corpus_its_probes_are_not_tested_with_the_reason(cluster, monkeypatch):
    embedded = cluster.node("embedded")

    def refuse(node):
        raise EnvironmentProblem(f"{node.name} refused the corpus: out of space")

    refused = run_conformance([embedded], [ECHO, CORPUS_FIND], corpus_store=refuse)
    result = refused.result(CORPUS_FIND.id, "embedded")
    assert result.outcome == "not tested" and "out of space" in result.observed
    assert refused.result(ECHO.id, "embedded").outcome == "conforms"

    # the corpus and risk modules of other areas missing: the matrix is still made
    monkeypatch.setitem(sys.modules, "harness.conformance.corpus", None)
    monkeypatch.setitem(sys.modules, "harness.conformance.risks", None)
    missing = run_conformance([embedded], [ECHO, CORPUS_FIND])
    result = missing.result(CORPUS_FIND.id, "embedded")
    assert result.outcome == "not tested" and "corpus.py" in result.observed
    assert missing.risks == [] and missing.as_dict()["risks"] == []


def test_move_destination_is_a_writable_peer_the_node_knows(cluster):
    nodes = list(cluster.nodes.values())
    for node in nodes:
        destination = move_destination(node, nodes)
        assert destination is not None and destination.name != node.name
        assert destination.ae_title in {p.ae_title for p in node.peers}
    site = make_node(NodeSpec(name="site", kind="external", ae_title="SITE", dicom_port=104,
                              disposable=False), None)
    assert move_destination(site, [site, *nodes]) is None  # its peer table is the site's
    read_only = [make_node(NodeSpec(name=n.name, kind="external", ae_title=n.ae_title,
                                    dicom_port=n.dicom_port, disposable=False), None)
                 for n in nodes]
    assert move_destination(nodes[0], read_only) is None  # never into a read-only node


def test_select_probes_by_id_or_area_and_names_an_unknown_one():
    assert select_probes([]) == select_probes(["association", "query", "limits", "retrieve",
                                               "storage", "services"])
    with pytest.raises(ConfigError, match="'query.no-such-probe'"):
        select_probes(["query.no-such-probe"])
    with pytest.raises(ConfigError, match="'nonsense'"):
        select_probes(["nonsense"])
