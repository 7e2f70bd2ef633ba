"""The C-FIND matching probes against real nodes: the embedded PACS, Orthanc and dcmqrscp.

The corpus is stored into each node once, checked there by means independent of the harness
(DCMTK's /usr/bin/findscu, Orthanc's REST API), then every query probe runs on every node.
The outcomes asserted are the ones measured on this machine, each with its explanation:
a probe that changes its verdict on a node makes the test fail.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from harness.conformance.corpus import CORPUS_PREFIX, STUDIES, store_corpus
from harness.conformance.model import ProbeContext, ProbeResult, all_probes
from harness.fixtures import pacs_cluster_factory
from tests.helpers import LAUNCHABLE_KINDS, external_topology, one_node_per_kind

QUERY_PROBES = all_probes(("query",))
KINDS = LAUNCHABLE_KINDS

launched = pacs_cluster_factory(one_node_per_kind("cfq"), scope="module")


@pytest.fixture(scope="module")
def corpora(launched):
    """The corpus stored into every node, twice (the second time must overwrite)."""
    for node in launched.nodes.values():
        store_corpus(node)
    return {name: store_corpus(node) for name, node in launched.nodes.items()}


@pytest.fixture(scope="module")
def results(launched, corpora) -> dict[tuple[str, str], ProbeResult]:
    """Every query probe's result on every node: (kind, probe id) -> result."""
    return {(name, p.id): p.run(ProbeContext(node, corpora[name]))
            for name, node in launched.nodes.items() for p in QUERY_PROBES}


def _findscu_study_uids(node) -> set[str]:
    """Study Instance UIDs of the corpus, asked by DCMTK's own C-FIND SCU."""
    proc = subprocess.run(
        ["/usr/bin/findscu", "-v", "-S", "-aet", "PACSHARNESS", "-aec", node.ae_title,
         node.host, str(node.dicom_port), "-k", "QueryRetrieveLevel=STUDY",
         "-k", f"PatientID={CORPUS_PREFIX}*", "-k", "StudyInstanceUID"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(re.findall(r"\(0020,000d\) UI \[([0-9.]+)[^\]]*\]", proc.stdout + proc.stderr))


@pytest.mark.parametrize("kind", KINDS)
def test_the_corpus_is_on_every_node_once(launched, corpora, kind):
    node = launched.node(kind)
    expected = {s.study_uid for s in STUDIES}
    assert corpora[kind].study_uids == expected
    # stored twice: the same 9 studies, not 18 (the UIDs are fixed)
    assert _findscu_study_uids(node) == expected
    if kind == "orthanc":
        held = node.rest().post_json("/tools/find", {
            "Level": "Study", "Query": {"PatientID": f"{CORPUS_PREFIX}*"}, "Expand": True})
        assert {s["MainDicomTags"]["StudyInstanceUID"] for s in held} == expected


# What each kind does, measured here (Orthanc 1.10.1, DCMTK 3.6.7 dcmqrscp, the embedded
# PACS); every probe not listed conforms on that kind.
MEASURED: dict[str, dict[str, tuple[str, dict]]] = {
    "embedded": {
        # our SCP folds case for PN (matching.py), like Orthanc; allowed by C.2.2.2.1.1
        "query.pn-case": ("differs", {"pn_matching": "case-insensitive"}),
        # it returns an empty sequence and does not match inside it: an optional key
        "query.sequence": ("not supported", {"sequence_matching": False}),
        "query.relational": ("conforms", {"relational": False, "lenient": True}),
    },
    "orthanc": {
        # CaseSensitivePN defaults to false in Orthanc's configuration
        "query.pn-case": ("differs", {"pn_matching": "case-insensitive"}),
        # Orthanc answers C-FIND in its DefaultEncoding (Latin1 unless configured): letters
        # outside Latin-1 are dropped from the names it returns
        "query.charset-utf8": ("differs", {"answered_in": "ISO_IR 100"}),
        "query.charset-jis": ("differs", {"answered_in": "ISO_IR 100"}),
        # the stored sequence comes back, but the key does not narrow the match
        "query.sequence": ("not supported", {"sequence_matching": False, "returned": True}),
        "query.relational": ("conforms", {"relational": False, "lenient": True}),
    },
    "dcmqrscp": {
        "query.pn-case": ("conforms", {"pn_matching": "case-sensitive"}),
        # dcmqrscp answers in the character set each instance was stored with
        "query.charset-jis": ("conforms", {"answered_in": "\\ISO 2022 IR 87"}),
        "query.charset-latin1": ("conforms", {"answered_in": "ISO_IR 100"}),
        # its index holds no sequences: the key is ignored
        "query.sequence": ("not supported", {"sequence_matching": False, "returned": False}),
        "query.relational": ("conforms", {"relational": False, "lenient": True}),
    },
}


@pytest.mark.parametrize("probe", [p.id for p in QUERY_PROBES])
@pytest.mark.parametrize("kind", KINDS)
def test_each_probe_gives_the_measured_outcome(results, kind, probe):
    result = results[(kind, probe)]
    outcome, facts = MEASURED[kind].get(probe, ("conforms", {}))
    assert result.outcome == outcome, result.line()
    assert {k: result.facts.get(k) for k in facts} == facts, result.line()
    assert result.evidence, f"{result.line()}: no exchange recorded"


def test_matching_rules_every_kind_shares(results):
    """Wild cards, ranges, UID lists and the levels of both models conform everywhere;
    PN matching is literal on the whole value (family name alone matches nothing)."""
    shared = ["query.universal", "query.single-value", "query.wildcard-star",
              "query.wildcard-question", "query.date-range", "query.date-range-open-start",
              "query.date-range-open-end", "query.time-range", "query.datetime-range",
              "query.uid-list", "query.pn-components", "query.empty-value",
              "query.extra-attributes", "query.levels-patient-root", "query.levels-study-root",
              "query.charset-latin1"]
    for kind in KINDS:
        assert [p for p in shared if results[(kind, p)].outcome != "conforms"] == [], kind
    assert results[("orthanc", "query.datetime-range")].facts["datetime_matching"] == \
        "separate"
    assert results[("dcmqrscp", "query.levels-patient-root")].facts["levels"] == \
        ["PATIENT", "STUDY", "SERIES", "IMAGE"]


@pytest.mark.skipif("orthanc" not in KINDS, reason="Orthanc not installed")
def test_orthanc_holds_the_names_its_c_find_mangles(launched, corpora, results):
    """The utf8 and jis differences are in Orthanc's C-FIND answer, not in what it stored:
    its REST API gives the names intact."""
    node = launched.node("orthanc")
    for key in ("utf8", "jis"):
        study = corpora["orthanc"].study(key)
        held = node.rest().post_json("/tools/find", {
            "Level": "Study", "Query": {"StudyInstanceUID": study.study_uid}, "Expand": True})
        assert held[0]["PatientMainDicomTags"]["PatientName"] == study.patient_name
        returned = results[("orthanc", f"query.charset-{key}")].facts["returned"]
        assert returned != study.patient_name
        assert returned.startswith(study.patient_name.split("=")[0][:10])


def test_every_query_probe_names_its_reference_and_expectation():
    assert len(QUERY_PROBES) >= 20
    for p in QUERY_PROBES:
        assert p.area == "query" and p.id.startswith("query.")
        assert re.match(r"PS3\.4 C\.[0-9.]+", p.reference), p.id
        assert len(p.expected) > 30 and p.title, p.id
        assert p.needs_corpus, p.id


def test_a_node_that_is_not_writable_is_not_tested(launched, pacs_launch, tmp_path):
    """Declared as an external node without `writable: true`, the same PACS gets no corpus,
    and every query probe says 'not tested' without sending anything."""
    kind = KINDS[0]
    topology = external_topology(tmp_path / "ro.yaml", "cfq-ro", [launched.node(kind)], "CFQ")
    node = pacs_launch(topology).node(kind)
    assert not node.writable
    for p in QUERY_PROBES:
        result = p.run(ProbeContext(node, None))
        assert result.outcome == "not tested", result.line()
        assert "not writable" in result.observed
        assert result.evidence == ()
