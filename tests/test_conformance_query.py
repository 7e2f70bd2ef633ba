"""The C-FIND matching probes against real nodes: the embedded PACS, Orthanc and dcmqrscp.

The corpus is stored into each node once, checked there by means independent of the harness
(DCMTK's /usr/bin/findscu, Orthanc's REST API), then every query probe runs on every node.
The outcomes asserted are the ones measured on this machine, each with its explanation:
a probe that changes its verdict on a node makes the test fail.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
)

from harness.conformance.corpus import CORPUS_PREFIX, STUDIES, Corpus, store_corpus
from harness.conformance.model import ProbeContext, ProbeResult, all_probes, probe_by_id
from harness.dicom.client import DimseClient
from harness.errors import EnvironmentProblem
from harness.fixtures import pacs_cluster_factory
from harness.launch.ports import free_port
from harness.launch.tools import find_binary
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
        # matching.py also tries a name's alphabetic group alone
        "query.pn-components": ("conforms", {"trailing_caret_matches": False,
                                             "alphabetic_group_matches": True}),
        "query.levels-study-root": ("conforms", {"patient_level": "refused"}),
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
        "query.pn-components": ("conforms", {"trailing_caret_matches": False,
                                             "alphabetic_group_matches": False}),
        # Orthanc answers a PATIENT-level query in Study Root instead of refusing it
        "query.levels-study-root": ("conforms", {"patient_level": "answered"}),
    },
    "dcmqrscp": {
        "query.pn-case": ("conforms", {"pn_matching": "case-sensitive"}),
        # dcmqrscp answers in the character set each instance was stored with
        "query.charset-jis": ("conforms", {"answered_in": "\\ISO 2022 IR 87"}),
        "query.charset-latin1": ("conforms", {"answered_in": "ISO_IR 100"}),
        # its index holds no sequences: the key is ignored
        "query.sequence": ("not supported", {"sequence_matching": False, "returned": False}),
        "query.relational": ("conforms", {"relational": False, "lenient": True}),
        "query.pn-components": ("conforms", {"trailing_caret_matches": False,
                                             "alphabetic_group_matches": False}),
        "query.levels-study-root": ("conforms", {"patient_level": "refused"}),
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
    for kind in KINDS:  # none of them accepts combined date-time matching (C.5.1.1)
        assert results[(kind, "query.datetime-range")].facts == {
            "datetime_matching": "separate", "combined_negotiated": False}
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


# -- pynetdicom peers that answer in one particular way ---------------------------------------


class _Peer:
    """A DICOM peer on 127.0.0.1 seen as a writable node (what a probe needs of a node)."""

    kind = "pynetdicom"
    writable = True

    def __init__(self, port: int, ae_title: str) -> None:
        self.name, self.port, self.ae_title = ae_title.lower(), port, ae_title

    def dimse(self) -> DimseClient:
        return DimseClient("127.0.0.1", self.port, self.ae_title, timeout_s=10.0)


@contextmanager
def _scp(handlers: list, contexts: list[str]) -> Iterator[_Peer]:
    ae = AE(ae_title="PROBESCP")
    for sop_class in contexts:
        ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        yield _Peer(port, "PROBESCP")
    finally:
        server.shutdown()


@pytest.mark.parametrize("grant", [True, False])
def test_the_relational_probe_proposes_the_negotiation_and_reads_the_reply(grant):
    """The probe proposes relational-queries (PS3.4 C.5.1.1: byte 1 = 1) and tells an SCP
    that accepted it but failed the query (differs) from one that refused both (not
    supported)."""
    proposed, identifiers = [], []

    def on_extended(event):
        proposed.append(dict(event.app_info))
        return {uid: b"\x01" for uid in event.app_info} if grant else {}

    def on_find(event):
        identifiers.append(event.identifier)
        yield 0xA900, None

    with _scp([(evt.EVT_SOP_EXTENDED, on_extended), (evt.EVT_C_FIND, on_find)],
              [StudyRootQueryRetrieveInformationModelFind]) as peer:
        result = probe_by_id("query.relational").run(
            ProbeContext(peer, Corpus(STUDIES, peer.name)))
    assert proposed == [{StudyRootQueryRetrieveInformationModelFind: b"\x01"}]
    assert identifiers[0].QueryRetrieveLevel == "SERIES"
    assert not identifiers[0].StudyInstanceUID and identifiers[0].Modality == "MR"
    assert result.facts["relational"] is grant
    assert result.outcome == ("differs" if grant else "not supported"), result.line()


def test_a_node_refusing_the_corpus_is_an_environment_problem_naming_it():
    stored = []

    def on_store(event):
        stored.append(event.request.AffectedSOPInstanceUID)
        return 0xA700  # Refused: out of resources

    with _scp([(evt.EVT_C_STORE, on_store)], [SecondaryCaptureImageStorage]) as peer, \
            pytest.raises(EnvironmentProblem, match=r"node probescp did not store the "
                                                    r"conformance corpus: 9 of 9"):
        store_corpus(peer)
    assert len(stored) == len(STUDIES)


def test_a_node_refusing_some_of_the_corpus_keeps_the_rest_and_names_the_gap():
    """CTN refuses some character sets (0xA700): the probes that need a refused study are
    "not tested" naming it; the corpus holds exactly what the node accepted."""
    refused_uid = next(s.sop_uid for s in STUDIES if s.key == "jis")

    def on_store(event):
        return 0xA700 if event.request.AffectedSOPInstanceUID == refused_uid else 0x0000

    with _scp([(evt.EVT_C_STORE, on_store)], [SecondaryCaptureImageStorage]) as peer:
        corpus = store_corpus(peer)
        result = probe_by_id("query.charset-jis").run(ProbeContext(peer, corpus))
    assert set(corpus.refused) == {"jis"} and "0xA700" in corpus.refused["jis"]
    assert len(corpus.study_uids) == len(STUDIES) - 1
    assert result.outcome == "not tested", result.line()
    assert "refused to store corpus study 'jis'" in result.observed


@pytest.fixture
def orthanc_configured(tmp_path) -> Iterator[_Peer]:
    """An Orthanc of our own, with CaseSensitivePN true and DefaultEncoding Utf8: the two
    options the measured differences come from (stopped by its pid at teardown)."""
    if "orthanc" not in KINDS:
        pytest.skip("Orthanc not installed")
    port = free_port()
    config = {
        "Name": "cfq-configured", "DicomAet": "ORTHANCCS", "DicomPort": port,
        "HttpPort": free_port(), "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "StorageDirectory": str(tmp_path / "storage"), "IndexDirectory": str(tmp_path / "index"),
        "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True, "Plugins": [],
        "CaseSensitivePN": True, "DefaultEncoding": "Utf8",
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    log = (tmp_path / "orthanc.log").open("w")
    process = subprocess.Popen([find_binary("Orthanc"), str(tmp_path / "orthanc.json")],
                               stdout=log, stderr=subprocess.STDOUT)
    peer = _Peer(port, "ORTHANCCS")
    try:
        deadline = time.monotonic() + 180
        while not _answers_echo(peer):
            assert process.poll() is None, (tmp_path / "orthanc.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "Orthanc did not start"
            time.sleep(0.2)
        yield peer
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _answers_echo(peer: _Peer) -> bool:
    try:
        return peer.dimse().echo().status.ok
    except EnvironmentProblem:
        return False


def test_orthanc_configured_for_the_standard_conforms_where_it_differed(orthanc_configured):
    """The same probes on an Orthanc with CaseSensitivePN and DefaultEncoding Utf8: the PN
    case and the UTF-8 and Japanese names now conform, which pins the differences measured
    on the default Orthanc to those two options."""
    corpus = store_corpus(orthanc_configured)
    for probe_id, facts in (("query.pn-case", {"pn_matching": "case-sensitive"}),
                            ("query.charset-utf8", {"answered_in": "ISO_IR 192"}),
                            ("query.charset-jis", {"answered_in": "ISO_IR 192"}),
                            ("query.charset-latin1", {"answered_in": "ISO_IR 192"})):
        result = probe_by_id(probe_id).run(ProbeContext(orthanc_configured, corpus))
        assert result.outcome == "conforms", result.line()
        assert {k: result.facts.get(k) for k in facts} == facts, result.line()


def test_a_model_the_node_refuses_is_not_supported():
    """An SCP offering Study Root only: the Patient Root levels probe says 'not supported',
    the Study Root one asks its levels."""
    levels = []

    def on_find(event):
        levels.append(str(event.identifier.QueryRetrieveLevel))
        yield 0x0000, None

    with _scp([(evt.EVT_C_FIND, on_find)], [StudyRootQueryRetrieveInformationModelFind]) as peer:
        corpus = Corpus(STUDIES, peer.name)
        patient_root = probe_by_id("query.levels-patient-root").run(ProbeContext(peer, corpus))
        study_root = probe_by_id("query.levels-study-root").run(ProbeContext(peer, corpus))
    assert patient_root.outcome == "not supported", patient_root.line()
    assert "patient root" in patient_root.observed
    assert study_root.outcome == "differs", study_root.line()  # it found nothing
    assert levels == ["STUDY", "SERIES", "IMAGE", "PATIENT"]
