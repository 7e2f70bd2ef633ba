"""The C-FIND result-limit probe (limits.find-results) and discovery by date ranges, against
a real Orthanc 1.10 capped by `LimitFindResults: 5` and the embedded PACS (no limit).

What each node holds is read independently: Orthanc's REST API, and DCMTK's findscu (called
by absolute path) for what a plain C-FIND answers.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from harness.conformance.model import ProbeContext, probe_by_id
from harness.fixtures import pacs_cluster_factory
from harness.migration.discovery import IncompleteListing, discover_studies
from harness.migration.migrator import Migrator
from synthetic_data.samples import sample_study

FINDSCU = "/usr/bin/findscu"
LIMIT = 5
DATES = ("20190301", "20200615", "20211224", "20230102", "20240229")
STUDIES = 15  # three per date, at different times

TOPOLOGY = f"""name: limits
nodes:
  capped: {{kind: orthanc, ae_title: CAPPED, orthanc_config: {{LimitFindResults: {LIMIT}}}}}
  honest: {{kind: embedded, ae_title: HONEST}}
  empty:  {{kind: embedded, ae_title: EMPTY}}
"""

launched = pacs_cluster_factory(TOPOLOGY, scope="module", requires=("Orthanc",))


def dated_studies(count: int, dates: tuple[str, ...], seed: int = 1600) -> list:
    """`count` one-instance studies spread over `dates`, each at its own hour."""
    datasets = []
    for number in range(count):
        for ds in sample_study(seed=seed + number):
            ds.StudyDate = dates[number % len(dates)]
            ds.StudyTime = f"{8 + number % 12:02d}{number:02d}00"
            datasets.append(ds)
    return datasets


def findscu_studies(node) -> tuple[list[str], str]:
    """A plain universal study-level C-FIND by DCMTK: (Study Instance UIDs, final status)."""
    proc = subprocess.run(
        [FINDSCU, "-v", "-S", "-aet", "PACSHARNESS", "-aec", node.ae_title, "-to", "30",
         "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
         node.host, str(node.dicom_port)],
        capture_output=True, text=True, timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-2000:]
    uids = [uid.rstrip("\0 ") for uid in re.findall(r"\(0020,000d\) UI \[([^\]]*)\]", output)]
    final = re.search(r"Received Final Find Response \(([^)]*)\)", output)
    return uids, final.group(1) if final else ""


def orthanc_studies(node) -> set[str]:
    """Every study Orthanc holds, by its REST API (no C-FIND)."""
    return {s["MainDicomTags"]["StudyInstanceUID"]
            for s in node.rest().get_json("/studies", expand="")}


@pytest.fixture(scope="module")
def cluster(launched):
    archive = dated_studies(STUDIES, DATES)
    for name in ("capped", "honest"):
        stored = launched.node(name).dimse().store(archive)
        assert stored.ok, [r.error for r in stored.failed]
    return launched


def _probe(node):
    return probe_by_id("limits.find-results").run(ProbeContext(node))


def test_capped_orthanc_stops_at_its_limit_and_says_so(cluster):
    capped = cluster.node("capped")
    held = orthanc_studies(capped)
    assert len(held) == STUDIES
    plain, final = findscu_studies(capped)  # the seed works: a plain query sees 5
    assert len(plain) == LIMIT and "Cancel" in final

    result = _probe(capped)
    assert result.outcome == "differs", result.line()
    assert result.facts["limit"] == LIMIT and result.facts["says_so"] is True
    assert result.facts["status"] == "0xFE00"
    assert LIMIT < result.facts["checked_up_to"] <= STUDIES
    assert any("0xFE00" in e.response and f"{LIMIT} matches" in e.response
               for e in result.evidence)


def test_node_without_limit_conforms(cluster):
    honest = cluster.node("honest")
    plain, final = findscu_studies(honest)
    assert len(plain) == STUDIES and final == "Success"
    result = _probe(honest)
    assert result.outcome == "conforms", result.line()
    assert result.facts["limit"] is None and result.facts["checked_up_to"] == STUDIES


def test_node_without_studies_is_not_tested(cluster):
    result = _probe(cluster.node("empty"))
    assert result.outcome == "not tested" and "no study" in result.observed


def test_discovery_lists_every_study_of_a_capped_node(cluster):
    capped = cluster.node("capped")
    listing = discover_studies(capped.dimse())
    assert listing.capped and listing.split and listing.largest_cut == LIMIT
    assert listing.unresolved == []
    assert set(listing.uids) == orthanc_studies(capped)


def test_discovery_with_a_silent_limit_splits_until_parts_are_under_it(cluster):
    """A node believed to truncate silently at 5: every part holding 5 or more is split."""
    honest = cluster.node("honest")
    listing = discover_studies(honest.dimse(), silent_limit=LIMIT)
    assert listing.split and listing.queries > 1 and listing.unresolved == []
    assert set(listing.uids) == set(findscu_studies(honest)[0])


def test_discovery_reports_a_day_it_cannot_split(pacs_launch, tmp_path):
    """More than the limit on one day in one minute: named, not silently dropped, and the
    migrator refuses to plan from it (a saved short plan would be resumed as complete)."""
    crowded = pacs_launch(
        "name: crowded\nnodes:\n  crowded: {kind: orthanc, ae_title: CROWDED, "
        f"orthanc_config: {{LimitFindResults: {LIMIT}}}}}\n"
        "  sink: {kind: embedded, ae_title: SINK}\n")
    node = crowded.node("crowded")
    same_minute = dated_studies(LIMIT + 2, ("20220505",), seed=1700)
    for ds in same_minute:
        ds.StudyTime = "101500"
    assert node.dimse().store(same_minute).ok
    listing = discover_studies(node.dimse())
    assert listing.unresolved and "20220505" in listing.unresolved[0]
    assert len(listing.uids) < len(orthanc_studies(node)) == LIMIT + 2

    state = tmp_path / "state.sqlite"
    with Migrator(node, crowded.node("sink"), state_path=state) as migrator:
        with pytest.raises(IncompleteListing) as refused:
            migrator.plan()
        assert migrator.open().plan() == []
    message = str(refused.value)
    assert "CROWDED" in message and "20220505" in message and "\n" not in message
    assert refused.value.exit_code == 3
