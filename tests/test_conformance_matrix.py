"""The whole matrix on a topology of every launched kind this machine has: every probe on
every node, and the behaviours measured for each kind (docs/conformance.md) still hold.

What each kind does was first measured with DCMTK's tools and the servers' own APIs (the
probe modules' tests, tests/test_pixelmed.py, tests/test_ctn.py); here the assertions are on
the matrix a user reads: one cell per probe and node, the known differences in the right
cells, and the migration risks they imply per pair.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.conformance.model import OUTCOMES, all_probes
from harness.conformance.risks import ONE_ASSOCIATION, TRANSCODE
from harness.conformance.runner import run_conformance
from harness.fixtures import pacs_cluster_factory
from harness.launch.tools import find_binary
from tests.helpers import LAUNCHABLE_KINDS, one_node_per_kind

#: the kinds beyond the everyday three, when installed (CI installs them: setup.sh)
EXTRA_KINDS = [kind for kind, installed in (
    ("pixelmed", Path("/usr/share/java/pixelmed.jar").exists() and find_binary("java")),
    ("ctn", find_binary("archive_server") and find_binary("mariadbd")),
) if installed]
KINDS = [*LAUNCHABLE_KINDS, *EXTRA_KINDS]

cluster = pacs_cluster_factory(one_node_per_kind("matrix", KINDS), scope="module")


@pytest.fixture(scope="module")
def matrix(cluster):
    return run_conformance([cluster.node(kind) for kind in KINDS])


def _outcome(matrix, probe: str, kind: str) -> str:
    return matrix.result(probe, kind).outcome


def test_every_probe_has_a_cell_on_every_node(matrix):
    probes = all_probes()
    assert {p.id for p in matrix.probes} == {p.id for p in probes}
    cells = {(r.probe, r.node) for r in matrix.results}
    assert cells == {(p.id, kind) for p in probes for kind in KINDS}
    assert {r.outcome for r in matrix.results} <= set(OUTCOMES)
    assert not matrix.unanswered
    assert all(p.reference and p.expected for p in probes)
    assert all(p.reference.startswith("PS3.") for p in probes
               if p.id != "services.orthanc-rest")  # not DICOM: Orthanc's own API
    # a 'differs' or 'not tested' cell always says what was seen
    assert all(r.observed for r in matrix.results if r.outcome != "conforms")


def test_matching_every_kind_agrees_on(matrix):
    """PS3.4 C.2.2.2.4 wildcards and C.2.2.2.5 date ranges: every kind that stored the
    corpus conforms (CTN refuses some of it; its cells name what)."""
    for kind in KINDS:
        for probe in ("query.wildcard-star", "query.wildcard-question", "query.date-range"):
            assert _outcome(matrix, probe, kind) == "conforms", matrix.result(probe, kind).line()


def test_pn_case_differs_where_measured(matrix):
    expected = {"embedded": "differs", "orthanc": "differs", "dcmqrscp": "conforms",
                "pixelmed": "differs", "ctn": "differs"}
    for kind in KINDS:
        assert _outcome(matrix, "query.pn-case", kind) == expected[kind]


def test_unknown_move_destination_answers(matrix):
    """PS3.4 C.4.2.1.5: 0xA801. Orthanc 1.10 answers 0xC000, CTN 3.2 0xB000."""
    expected = {"embedded": "conforms", "orthanc": "differs", "dcmqrscp": "conforms",
                "pixelmed": "conforms", "ctn": "differs"}
    for kind in KINDS:
        result = matrix.result("retrieve.move-unknown", kind)
        assert result.outcome == expected[kind], result.line()


def test_storage_commitment_is_asked_not_read(matrix):
    """Negotiation alone would say CTN offers it; the made-up instance shows it never
    answers. Orthanc and the embedded PACS report the instance failed (0x0112)."""
    expected = {"embedded": "conforms", "orthanc": "conforms", "dcmqrscp": "not supported",
                "pixelmed": "not supported", "ctn": "differs"}
    for kind in KINDS:
        result = matrix.result("services.storage-commitment", kind)
        assert result.outcome == expected[kind], result.line()
        if result.outcome == "conforms":
            assert "0x0112" in result.observed


@pytest.mark.skipif("pixelmed" not in KINDS, reason="PixelMed not installed")
def test_pixelmed_differences_are_in_the_matrix_and_the_risks(matrix):
    # list-of-UID matching (PS3.4 C.2.2.2.2) finds nothing on PixelMed
    assert _outcome(matrix, "query.uid-list", "pixelmed") == "differs"
    accepted = matrix.result("association.storage-syntaxes", "pixelmed").facts["accepted"]
    syntaxes = {ts for per_class in accepted.values() for ts in per_class}
    assert "Implicit VR Little Endian" in syntaxes  # asked alone when refused among others
    assert not any("JPEG" in ts for ts in syntaxes)  # uncompressed only
    towards = {r.remedy_id for r in matrix.risks
               if (r.source, r.target) == ("embedded", "pixelmed")}
    assert TRANSCODE in towards


@pytest.mark.skipif("ctn" not in KINDS, reason="CTN not installed")
def test_ctn_changes_names_and_refuses_part_of_the_corpus(matrix):
    universal = matrix.result("query.universal", "ctn")
    assert universal.outcome == "differs" and "CONFPROBE^ALPHA" in universal.observed
    untested = matrix.result("query.charset-utf8", "ctn")
    assert untested.outcome == "not tested" and "refused to store" in untested.observed


def test_parallel_stores_are_consistent_and_risky_targets_named(matrix):
    for kind in KINDS:
        result = matrix.result("limits.parallel-stores", kind)
        facts = result.facts
        assert facts["acknowledged"] + facts["refused"] == facts["sent"], result.line()
        flagged = {r.target for r in matrix.risks if r.remedy_id == ONE_ASSOCIATION}
        if result.outcome == "differs" or facts["refused"]:
            assert kind in flagged
    for kind in ("embedded", "orthanc"):
        assert matrix.result("limits.parallel-stores", kind).facts["lost"] == 0
