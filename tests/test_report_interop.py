"""The interoperability page, rendered from real probe results on launched nodes (a capped
Orthanc and the embedded PACS), parsed back with the standard library's HTML parser: the
matrix cells, their colours and links, the evidence each link points to, the risks on top,
and a value with HTML in it shown as text. Also as a section of the readiness report."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness.conformance.model import ProbeContext, probe_by_id
from harness.conformance.risks import SPLIT_BY_DATE, migration_risks
from harness.fixtures import pacs_cluster_factory
from harness.report.html import write_html_report
from harness.report.interop import render_interop_page
from tests.test_conformance_limits import DATES, LIMIT, dated_studies

HOSTILE = "<script>alert('x')</script> & <b>bold</b>"

launched = pacs_cluster_factory(
    "name: interop\nnodes:\n"
    "  capped: {kind: orthanc, ae_title: CAPPED, "
    f"orthanc_config: {{LimitFindResults: {LIMIT}}}}}\n"
    "  honest: {kind: embedded, ae_title: HONEST}\n",
    scope="module", requires=("Orthanc",))


class Page(HTMLParser):
    """Matrix cells (class, link, text) by row, element ids, and every text with its tag."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[str, list[str]] = {}  # id -> texts inside that element
        self.open_ids: list[tuple[str, int]] = []
        self.depth = 0
        self.in_matrix = False
        self.rows: list[list[dict[str, str]]] = []
        self.cell: dict[str, str] | None = None
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        if tag not in ("br", "meta", "link", "img", "input"):
            self.depth += 1
        if attributes.get("id"):
            self.open_ids.append((attributes["id"], self.depth))
            self.ids[attributes["id"]] = []
        if tag == "table":
            self.in_matrix = "interop" in attributes.get("class", "").split()
        elif tag == "tr" and self.in_matrix:
            self.rows.append([])
        elif tag in ("td", "th") and self.in_matrix and self.rows:
            self.cell = {"tag": tag, "class": attributes.get("class", ""), "href": "",
                         "text": "", "title": attributes.get("title", "")}
            self.rows[-1].append(self.cell)
        elif tag == "a" and self.cell is not None:
            self.cell["href"] = attributes.get("href", "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self.cell = None
        elif tag == "table":
            self.in_matrix = False
        while self.open_ids and self.open_ids[-1][1] >= self.depth:
            self.open_ids.pop()
        self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell["text"] += data
        for element_id, _ in self.open_ids:
            self.ids[element_id].append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    return page


@pytest.fixture(scope="module")
def conformance(launched) -> dict:
    """ConformanceRun.as_dict() of the limit probe on both nodes (as the runner builds it),
    plus one result whose observation and evidence carry HTML."""
    archive = dated_studies(12, DATES, seed=3600)
    for node in launched.nodes.values():
        assert node.dimse().store(archive).ok
    limit_probe = probe_by_id("limits.find-results")
    nodes = list(launched.nodes.values())
    results = [limit_probe.run(ProbeContext(node)) for node in nodes]
    rows = [r.as_dict() for r in results]
    rows.append({"probe": "query.hostile", "node": "honest", "outcome": "differs",
                 "observed": HOSTILE, "facts": {"note": HOSTILE},
                 "evidence": [{"request": f"C-FIND {HOSTILE}", "response": "0x0000"}]})
    return {
        "nodes": [{"name": n.name, "kind": n.kind, "version": "", "writable": n.writable}
                  for n in nodes],
        "probes": [limit_probe.info()],
        "results": rows,
        "risks": [r.as_dict() for r in migration_risks(results, nodes)],
    }


def _matrix(page: Page) -> dict[str, dict[str, dict[str, str]]]:
    """probe title -> node -> cell, from the parsed matrix."""
    header = [c["text"].strip() for c in page.rows[0]]
    return {row[0]["text"].strip(): dict(zip(header[2:], row[2:], strict=True))
            for row in page.rows[1:]}


def test_page_has_matrix_cells_linking_to_their_evidence(conformance, tmp_path):
    page = parse(render_interop_page(conformance, tmp_path / "interop.html"))
    matrix = _matrix(page)
    limit_row = matrix["C-FIND result limit"]
    assert limit_row["capped"]["text"].strip() == "differs"
    assert "o-differs" in limit_row["capped"]["class"]
    assert limit_row["honest"]["text"].strip() == "conforms"
    assert "o-conforms" in limit_row["honest"]["class"]
    for node, cell in limit_row.items():
        anchor = cell["href"].removeprefix("#")
        assert cell["href"].startswith("#") and anchor in page.ids, (node, cell)
        evidence = " ".join(page.ids[anchor])
        assert node in evidence and "limits.find-results" in evidence
        assert "C-FIND STUDY" in evidence  # the request the probe recorded
    capped_evidence = " ".join(page.ids[limit_row["capped"]["href"][1:]])
    assert "0xFE00" in capped_evidence and f"{LIMIT} matches" in capped_evidence
    # a probe only the results name still gets its row
    assert matrix["query.hostile"]["honest"]["text"].strip() == "differs"


def test_risks_come_before_the_matrix(conformance, tmp_path):
    path = render_interop_page(conformance, tmp_path / "interop.html")
    html = path.read_text()
    assert SPLIT_BY_DATE in html and "capped → honest" in html
    assert html.index(SPLIT_BY_DATE) < html.index('class="matrix interop"')
    assert "honest → capped" not in html  # the honest node truncates nothing


def test_html_in_a_value_is_shown_as_text(conformance, tmp_path):
    path = render_interop_page(conformance, tmp_path / "interop.html")
    page = parse(path)
    assert "script" not in page.tags and "b" not in page.tags
    html = path.read_text()
    assert "&lt;script&gt;alert(" in html and "<b>bold" not in html
    texts = " ".join(t for texts in page.ids.values() for t in texts)
    assert "<script>alert('x')</script>" in texts  # shown to the reader, as text


def test_readiness_report_shows_a_recorded_conformance_run(conformance, tmp_path):
    report = {
        "verdict": "pass", "started": "2026-12-02T07:00:00+0000",
        "finished": "2026-12-02T07:01:00+0000", "harness_version": "test", "phase": None,
        "topology": {"name": "interop", "source": "interop.yaml", "nodes": []},
        "scenarios": [{"name": "conformance", "phase": None, "outcome": "passed",
                       "duration_s": 1.0, "metrics": {"conformance": conformance},
                       "tests": [{"nodeid": "scenarios/test_conformance.py::test_matrix",
                                  "scenario": "conformance", "phase": None, "outcome": "passed",
                                  "duration_s": 1.0, "metrics": {}, "message": ""}]}],
        "counts": {"passed": 1, "failed": 0, "error": 0, "skipped": 0},
    }
    (tmp_path / "report.json").write_text(json.dumps(report))
    page = parse(write_html_report(tmp_path))
    matrix = _matrix(page)
    assert matrix["C-FIND result limit"]["capped"]["text"].strip() == "differs"
    anchor = matrix["C-FIND result limit"]["capped"]["href"][1:]
    assert "0xFE00" in " ".join(page.ids[anchor])
    html = (tmp_path / "index.html").read_text()
    assert "Interoperability" in html and SPLIT_BY_DATE in html
    assert "<script>alert('x')" not in html and "&lt;script&gt;alert(" in html
