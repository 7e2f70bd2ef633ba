"""The compliance section of the readiness report, rendered from a report.json.

The report.json is hand-made with check rows shaped as harness/security/checks.py makes
them (this tests the page, not a PACS): the failing check must show with its node and remedy,
in the matrix's tooltip and in the findings table, HTML-escaped; the phase gate says not
ready.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

from harness.report.html import write_html_report
from harness.security.checks import Check

HOSTILE = "<script>alert('x')</script> & \"quoted\""
NAME_REMEDY = "issue the server a certificate whose subjectAltName holds pacs.example.org"


def _checks(node: str, area: str, outcomes: dict[str, str], **failing: str) -> list[dict]:
    return [Check(node, area, name, outcome, failing.get("observed", f"{name}: as expected")
                  if outcome == "fail" else f"{name}: as expected",  # type: ignore[arg-type]
                  failing.get("remedy", "") if outcome == "fail" else "", "PS3.15 B.1"
                  ).as_dict() for name, outcome in outcomes.items()]


TLS_OK = {"plaintext refused": "pass", "client without certificate refused": "pass",
          "certificate name": "pass", "TLS 1.0 refused": "skip"}


def security_report(failing: bool) -> dict:
    tls_central = dict(TLS_OK, **({"certificate name": "fail"} if failing else {}))
    metrics = {
        "security.tls.legacy": _checks("legacy", "tls", TLS_OK),
        "security.tls.central": _checks(
            "central", "tls", tls_central,
            observed=f"certificate names {HOSTILE}, not pacs.example.org", remedy=NAME_REMEDY),
        "security.access.central": _checks("central", "access", {
            "unknown calling AE: C-ECHO": "pass", "unknown calling AE: C-FIND": "pass"}),
        "security.audit.central": _checks("central", "audit", {"audit trail": "pass"}),
        "security.audit_coverage.central": {"performed": 6, "audited": 4, "messages": 5,
                                            "invalid": 1},
        "security.phi.central": _checks("central", "phi", {"canaries in run outputs": "pass"}),
    }
    tests = [{"nodeid": f"scenarios/test_security.py::test_tls[{node}]", "scenario": "security",
              "phase": "infrastructure", "duration_s": 0.5, "metrics": {},
              "outcome": "failed" if failing and node == "central" else "passed",
              "message": "E AssertionError: 1 of 4 tls checks failed on central"
              if failing and node == "central" else ""} for node in ("legacy", "central")]
    return {
        "verdict": "fail" if failing else "pass", "started": "2026-12-02T04:00:00+0000",
        "finished": "2026-12-02T04:01:00+0000", "harness_version": "test",
        "phase": "infrastructure", "topology": {"name": "tls", "source": "tls.yaml",
                                                "nodes": []},
        "scenarios": [{"name": "security", "phase": "infrastructure",
                       "outcome": "failed" if failing else "passed", "duration_s": 1.0,
                       "metrics": metrics, "tests": tests}],
        "counts": {"passed": 1, "failed": 1, "error": 0, "skipped": 0},
    }


class Tables(HTMLParser):
    """Every table cell: (tag, title attribute, text), grouped by row, per table."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[tuple[str, str, str]]]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th") and self.tables:
            self.cell = [tag, dict(attrs).get("title") or "", ""]

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell[2] += data

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][-1].append((self.cell[0], self.cell[1], self.cell[2].strip()))
            self.cell = None


def render(tmp_path: Path, report: dict) -> tuple[str, Tables]:
    (tmp_path / "report.json").write_text(json.dumps(report))
    page = write_html_report(tmp_path).read_text()
    parsed = Tables()
    parsed.feed(page)
    return page, parsed


def test_failing_check_shows_its_node_and_remedy_escaped(tmp_path):
    page, parsed = render(tmp_path, security_report(failing=True))
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(" in page

    matrix = next(t for t in parsed.tables if t and [c[2] for c in t[0]][:2] ==
                  ["Node", "plaintext refused"])
    central = next(row for row in matrix if row and row[0][2] == "central")
    header = [c[2] for c in matrix[0]]
    name_cell = central[header.index("certificate name")]
    assert name_cell[2] == "failed"
    assert f"certificate names {HOSTILE}, not pacs.example.org" in name_cell[1]
    assert f"Remedy: {NAME_REMEDY}" in name_cell[1]
    legacy = next(row for row in matrix if row and row[0][2] == "legacy")
    assert [c[2] for c in legacy[1:]] == ["passed", "passed", "passed", "skipped"]

    findings = next(t for t in parsed.tables if t and [c[2] for c in t[0]][:2] ==
                    ["Node", "Failed check"])
    assert [c[2] for c in findings[1]] == [
        "central", "certificate name", f"certificate names {HOSTILE}, not pacs.example.org",
        NAME_REMEDY, "PS3.15 B.1"]

    coverage = next(t for t in parsed.tables if t and t[0][1][2].startswith("Audited"))
    assert [c[2] for c in coverage[1]][:2] == ["central", "4 / 6"]
    assert "PACS go-live readiness: infrastructure — not ready" in page
    assert "Other figures" not in page  # every security metric has its place in the section


def test_all_checks_passing_reads_as_such(tmp_path):
    page, parsed = render(tmp_path, security_report(failing=False))
    assert "Failed check" not in page
    assert page.count("No check failed.") == 4  # tls, access, audit, phi
    assert "PACS go-live readiness: infrastructure — ready" in page
