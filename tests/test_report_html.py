"""The go-live readiness report: content, escaping, redaction, and a real headless browser.

The browser tests drive Debian's chromium (apt-get install chromium): the page must load
with no console error, its script must run, and the charts must be in the rendered DOM and
visibly in the screenshot (pixels of the chart and verdict colours).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from markupsafe import escape

from harness.cli.report import report_command
from harness.errors import ConfigError, EnvironmentProblem
from harness.report.html import redact, redact_text, write_html_report

SECRETS = ("hunter2", "s3cr3t-pw", "tok-abcdef123456", "AKIAFAKEKEY", "bearer-xyz-0123456789")


# ---------------------------------------------------------------------------------------
# Report directories


# the first test to use the shared full run waits for it (about five minutes)
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def real_run(default_run) -> Path:
    """A full `pacs-harness run` on the default topology (every scenario, shared)."""
    target, proc = default_run
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    assert (target / "report.json").is_file()
    return target


def _rich_report() -> dict:
    """A failing run with the metrics future scenarios will produce."""
    timeline = []
    for i in range(40):
        t = i * 0.5
        outage = 8 <= t < 11
        timeline.append([t, "source", True, 0.05 + 0.01 * (i % 5)])
        timeline.append([t, "target", not outage, 0.0 if outage else 0.08 + 0.02 * (i % 3)])
    findings = [
        {"type": "missing_series" if i % 3 else "altered_study", "level": "series",
         "modality": ["CT", "MR", "US"][i % 3], "facility": ["North", "South"][i % 2],
         "study_uid": f"1.2.3.{i}", "instances": i + 1,
         "attributes": {"PatientName": {"source": "DOE^J", "target": "DOE^JOHN"}}}
        for i in range(12)
    ]
    return {
        "verdict": "fail",
        "started": "2026-01-01T10:00:00+0000",
        "finished": "2026-01-01T10:20:00+0000",
        "harness_version": "0.1.0",
        "phase": "pilot",
        "seed": 1234,
        "topology": {
            "name": "merger-<pilot>",
            "source": "/sites/merger.yaml",
            "nodes": [
                {"name": "legacy", "kind": "dcmqrscp", "ae_title": "LEGACY", "host": "127.0.0.1",
                 "dicom_port": 11112, "http_port": None, "disposable": True,
                 "version": "DCMTK dcmqrscp 3.6.7"},
                {"name": "central", "kind": "external", "ae_title": "CENTRAL",
                 "host": "10.0.0.5", "dicom_port": 104, "http_port": 8042, "disposable": False,
                 "version": "Orthanc 1.12.0",
                 "credentials": {"username_env": "CENTRAL_USER", "password": "hunter2"},
                 "url": "http://admin:s3cr3t-pw@10.0.0.5:8042/"},
            ],
        },
        "scenarios": [
            {
                "name": "connectivity", "phase": "infrastructure", "outcome": "passed",
                "duration_s": 3.0,
                "metrics": {
                    "echo_ms.legacy": 3.2, "echo_ms.central": 4.1,
                    "accepted.legacy": {"CT Image Storage": ["Explicit VR Little Endian"],
                                        "Key Object Selection Document Storage": [
                                            "Explicit VR Little Endian"]},
                    "accepted.central": {"CT Image Storage": ["Explicit VR Little Endian",
                                                              "JPEG Baseline (Process 1)"],
                                         "Key Object Selection Document Storage": []},
                    "charsets.legacy": ["ISO_IR 100", "ISO_IR 192"],
                    "charsets.central": ["ISO_IR 100"],
                },
                "tests": [{"nodeid": "scenarios/test_connectivity.py::test_echo[legacy]",
                           "scenario": "connectivity", "phase": "infrastructure",
                           "outcome": "passed", "duration_s": 0.1, "metrics": {}}],
            },
            {
                "name": "migration", "phase": "pilot", "outcome": "failed", "duration_s": 600.0,
                "metrics": {
                    "thresholds": {"rto_s": 30, "acknowledged_lost": 0},
                    "rto_s": 42.5, "rpo_instances": 3, "acknowledged_lost": 2,
                    "api_token": "tok-abcdef123456",
                    "aws_secret_key": "AKIAFAKEKEY",
                    "faults": [{"t": 8.0, "what": "kill target", "duration_s": 3.0}],
                    "availability": {
                        "inaccessible_share": {"source": 0.0, "target": 0.075},
                        "latency_s": {"source": {"p50": 0.06, "p95": 0.09, "max": 0.1},
                                      "target": {"p50": 0.1, "p95": 0.12, "max": 0.2}},
                        "timeline": timeline,
                    },
                    "latency_percentiles": {
                        "C-STORE": {"p50": 0.02, "p90": 0.05, "p99": 0.2},
                        "C-FIND": {"p50": 0.01, "p90": 0.02, "p99": 0.04},
                    },
                    "throughput": [[i, 50 + (i % 7) * 5 - (30 if 8 <= i < 11 else 0)]
                                   for i in range(20)],
                    "progress": [{"t": i * 10, "migrated": i * 100} for i in range(10)],
                    "findings_by_type": {"missing_series": 8, "altered_study": 4},
                    "findings": findings,
                    "sla": [{"clause": "RTO <= 30 s", "measured": 42.5, "threshold": 30,
                             "ok": False},
                            {"clause": "no acknowledged loss", "measured": 2, "threshold": 0,
                             "ok": False}],
                    "note": "<script>alert('metric')</script>",
                },
                "tests": [{"nodeid": "scenarios/test_migration.py::test_failover[central]",
                           "scenario": "migration", "phase": "pilot", "outcome": "failed",
                           "duration_s": 600.0, "metrics": {},
                           "message": "E   AssertionError: RTO 42.5 s > 30 s "
                                      "<img src=x onerror=alert(1)> see "
                                      "https://ops:s3cr3t-pw@vault.example/"}],
            },
        ],
        "counts": {"passed": 1, "failed": 1, "error": 0, "skipped": 0},
    }


@pytest.fixture
def rich_dir(tmp_path) -> Path:
    (tmp_path / "report.json").write_text(json.dumps(_rich_report()))
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "central.log").write_text(
        "".join(f"line {i}\n" for i in range(100))
        + "connecting with password=hunter2\nAuthorization: Bearer bearer-xyz-0123456789\n"
        + "LAST LINE <b>not bold</b>\n"
    )
    (logs / "legacy.log").write_text("I: Association Received\n")
    (tmp_path / "junit.xml").write_text("<testsuites/>")
    return tmp_path


# ---------------------------------------------------------------------------------------
# Content


def test_real_run_renders_verdict_topology_and_compatibility_matrix(real_run):
    page = write_html_report(real_run).read_text()
    report = json.loads((real_run / "report.json").read_text())
    assert page.startswith("<!DOCTYPE html>")
    assert ("READY for" in page) and ("NOT READY" in page) == (report["verdict"] != "pass")
    for node in report["topology"]["nodes"]:
        assert node["name"] in page and node["version"] in page
    assert report["harness_version"] in page
    assert "pacs-harness run" in page  # the command to reproduce
    assert "Node compatibility matrix" in page and "CT Image Storage" in page
    assert "Explicit VR Little Endian" in page
    assert 'href="junit.xml"' in page
    # self-contained: nothing fetched from anywhere (URLs may appear as text: the
    # conformance evidence names the loopback URLs the probes asked)
    assert not re.search(r"""(href|src|action)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "url(" not in page and "@import" not in page
    assert "<link" not in page and " src=" not in page


def test_failing_run_shows_why(rich_dir):
    page = write_html_report(rich_dir).read_text()
    head = page[: page.index('id="overview"')]
    assert "NOT READY for <span>pilot</span>" in head
    assert "scenario migration (pilot) failed" in head and "RTO 42.5 s &gt; 30 s" in head
    assert "Why it failed" in page
    assert "RTO &lt;= 30 s" in page  # the failing SLA clause with its measured value
    assert "LAST LINE &lt;b&gt;not bold&lt;/b&gt;" in page  # the node's log tail
    assert "line 50" not in page  # only the tail
    assert "threshold 30" in page  # threshold next to the key figure
    assert "download CSV" in page and "data:text/csv" in page
    assert "Findings by modality" in page and "Findings by facility" in page
    assert "kill target" in page  # fault events marked
    assert 'class="fault"' in page
    assert "latency percentiles per operation" in page
    assert "accessible over time" in page
    assert "7.50 %" in page  # inaccessible share of the target
    assert "Character sets" in page and "ISO_IR 192" in page
    assert "Key Object Selection Document Storage" in page  # a label, not a secret key
    assert "1234" in page  # the seed
    assert "pacs-harness run --topology /sites/merger.yaml --phase pilot" in page


def test_everything_is_escaped(rich_dir):
    page = write_html_report(rich_dir).read_text()
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#39;metric&#39;)&lt;/script&gt;" in page
    assert "merger-&lt;pilot&gt;" in page
    assert page.count("<script>") == 1  # only the page's own


def test_no_secret_anywhere(rich_dir):
    page = write_html_report(rich_dir).read_text()
    for secret in SECRETS:
        assert secret not in page, secret
    assert "[redacted]" in page
    assert "CENTRAL_USER" not in page  # the whole credentials block is hidden


def test_redaction_rules():
    assert redact({"password": "x", "DB_PASSWORD": "y", "apiKey": "z", "authToken": "t",
                   "credentials": {"user": "u"}, "client_secret": "s", "keep": "ok",
                   "Key Object Selection Document Storage": ["a"], "monkey": 1}) == {
        "password": "[redacted]", "DB_PASSWORD": "[redacted]", "apiKey": "[redacted]",
        "authToken": "[redacted]", "credentials": "[redacted]", "client_secret": "[redacted]",
        "keep": "ok", "Key Object Selection Document Storage": ["a"], "monkey": 1,
    }
    assert redact_text("see postgresql://pacs:hunter2@db:5432/x") == (
        "see postgresql://pacs:[redacted]@db:5432/x"
    )
    assert "hunter2" not in redact_text('{"Password": "hunter2"}')
    assert "hunter2" not in redact_text("token=hunter2&x=1")
    assert redact_text("Authorization: Bearer abcdefgh12345") == (
        "Authorization: Bearer [redacted]"
    )
    assert redact_text("plain text with no secret") == "plain text with no secret"
    assert redact([{"url": "http://a:b@h/"}]) == [{"url": "http://a:[redacted]@h/"}]


def test_missing_or_bad_report_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no report.json"):
        write_html_report(tmp_path)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        write_html_report(tmp_path)


def test_phase_with_no_scenario_is_explained(rich_dir):
    report = _rich_report()
    report["phase"] = "planning"
    (rich_dir / "report.json").write_text(json.dumps(report))
    page = write_html_report(rich_dir).read_text()
    assert "NOT READY for <span>planning</span>" in page
    assert "no scenario gates phase planning" in page


# ---------------------------------------------------------------------------------------
# The `report` command


def test_report_command_rerenders(rich_dir):
    result = CliRunner().invoke(report_command, ["--report", str(rich_dir)])
    assert result.exit_code == 0, result.output
    assert (rich_dir / "index.html").is_file()


def test_report_allure_without_allure_says_how_to_install(rich_dir, monkeypatch):
    (rich_dir / "allure-results").mkdir()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    result = CliRunner().invoke(report_command, ["--report", str(rich_dir), "--allure"])
    assert isinstance(result.exception, EnvironmentProblem)
    assert result.exception.exit_code == 3
    assert "npm install -g allure-commandline" in str(result.exception)


@pytest.mark.skipif(shutil.which("allure") is None or shutil.which("java") is None,
                    reason="the Allure command line (npm allure-commandline) or Java is absent")
def test_report_allure_builds_the_allure_report(real_run):
    result = CliRunner().invoke(report_command, ["--report", str(real_run), "--allure"])
    assert result.exit_code == 0, result.output
    assert (real_run / "allure-report" / "index.html").is_file()
    assert 'href="allure-report/index.html"' in (real_run / "index.html").read_text()


def test_real_run_has_junit_and_allure_results(real_run):
    assert "<testsuite" in (real_run / "junit.xml").read_text()
    results = list((real_run / "allure-results").glob("*-result.json"))
    assert results
    assert any(json.loads(p.read_text()).get("status") for p in results)


def test_run_writes_index_html(real_run):
    """`pacs-harness run` renders the page after the pytest run."""
    assert (real_run / "index.html").is_file()


def test_failing_scenario_fails_gate_and_report_shows_why(real_run, tmp_path):
    """A real run with one scenario made to fail: the gate says 1, the page names it."""
    report = json.loads((real_run / "report.json").read_text())
    broken = copy.deepcopy(report)
    scenario = next(s for s in broken["scenarios"] if s["name"] == "connectivity")
    scenario["outcome"] = "failed"
    scenario["tests"][0]["outcome"] = "failed"
    scenario["tests"][0]["message"] = "E   AssertionError: legacy answered C-ECHO with 0xA700"
    (tmp_path / "report.json").write_text(json.dumps(broken))
    shutil.copytree(real_run / "logs", tmp_path / "logs")
    from harness.cli.report import gate_command

    result = CliRunner().invoke(gate_command,
                                ["--report", str(tmp_path), "--phase", "infrastructure"])
    assert result.exit_code == 1 and "0xA700" in result.output
    page = write_html_report(tmp_path).read_text()
    assert "NOT READY" in page and "0xA700" in page and "log tail of node legacy" in page


# ---------------------------------------------------------------------------------------
# One section per scenario, from a report shaped like a real run's


HOSTILE = ("<script>alert(1)</script>", '"><img src=x onerror=alert(2)>')


def _every_scenario_report(hostile: str) -> dict:
    """Every scenario's metrics as scenarios/*.py record them (shapes of a real run), with
    `hostile` in a patient name, a study description, node names and a metric key."""
    name, description = f"Doe^Jane{hostile}", f"CT head {hostile}"
    people = [{"patient_id": "MRN1", "issuer": "NGH01.MRN", "name": name,
               "birth_date": "19420516", "sex": "F"},
              {"patient_id": "MRN1", "issuer": "SAMC02.MRN", "name": "Roe^Ann",
               "birth_date": "19700101", "sex": "F"}]
    identity = {"collisions": [{"patient_id": "MRN1", "records": people,
                                "ids_after_rules": ["MRN1"], "resolved_by_rules": False}],
                "likely_duplicates": [{"family_name": "Doe", "birth_year": "1942",
                                       "records": people, "note": "review"}],
                "unresolved_collisions": 1}
    availability = {
        "samples": 40, "nodes": {"source": f"legacy{hostile}", "target": "target"},
        "probe": "study-level C-FIND + C-GET of one instance", "interval_s": 0.2,
        "duration_s": 4.0, "studies_probed": 6,
        "inaccessible_share": {"source": 0.0, "target": 0.15},
        "probes": {"source": {"total": 20, "failed": 0}, "target": {"total": 20, "failed": 3}},
        "latency_s": {"source": {"p50": 0.03, "p95": 0.05, "max": 0.06},
                      "target": {"p50": 0.02, "p95": 0.04, "max": 0.05}},
        "errors": {"source": {}, "target": {f"no answer for {description}": 3}},
        "timeline": [[round(i * 0.2, 3), role, not (role == "target" and 4 <= i < 7),
                      0.02 + 0.001 * i] for i in range(20) for role in ("source", "target")],
    }

    def migration_run(method: str, target_instances: int, by_type: dict) -> dict:
        counts = {"patients": 6, "studies": 6, "series": 9, "instances": 17}
        return {
            "method": method, "source": f"legacy{hostile} (dcmqrscp)",
            "target": "target (orthanc)", "studies": 6, "instances": 17,
            "migration": {"method": method, "studies_total": 6, "migrated": 5 if by_type else 6,
                          "already_on_target": 0, "failed": 1 if by_type else 0,
                          "instances_sent": target_instances, "retries_used": 2,
                          "elapsed_s": 0.8, "ok": not by_type,
                          "errors": {"1.2.3.4": f"C-MOVE failed: {description}"}
                          if by_type else {}},
            "verdict": "fail" if by_type else "pass",
            "counts": {"source": counts, "target": {**counts, "instances": target_instances}},
            "findings_by_type": by_type, "availability": availability,
            "identity": identity, "merged_patients": [],
        }

    attempts = [{"t": round(i * 0.1, 3), "op": op, "ok": not 2.0 <= i * 0.1 < 4.3,
                 "latency_s": 0.008 if op == "store" else 0.02}
                for i in range(90) for op in (("store",) if i % 3 else ("store", "probe-get"))]
    load = {"count": 40, "errors": 1, "instances_per_s": 0.0, "mb_per_s": 0.0,
            "latency_ms": {"p50": 900.0, "p90": 1500.0, "p95": 1900.0, "p99": 2500.0,
                           "p99.9": 2600.0, "mean": 950.0, "max": 2600.0},
            "errors_by_status": {"0xA700": 1}}
    perf_tests = [
        {"nodeid": "scenarios/test_performance.py::test_sla_clause[find-study-p99]",
         "outcome": "failed", "duration_s": 9.0, "message": "E   find-study-p99: 2.5 s > 2 s",
         "metrics": {"sla.find-study-p99": {}, "load.mix.find-study": {},
                     "load.mix.totals": {}, "load.mix.harness": {}}},
    ]
    scenarios = {
        "assessment": ("planning", {"inventory.legacy": {
            "held": {"patients": 8, "studies": 9, "series": 12, "instances": 33,
                     "means": "files of dcmqrscp's storage area", "unreadable": []},
            "answered": {"patients": 9, "studies": 9, "series": 12, "instances": 33},
            "findings": [], "first_reading_disagreed": None, "identity": identity}}),
        "connectivity": ("infrastructure", {
            "echo_ms.legacy": 21.6, "echo_ms.target": 8.6,
            "accepted.legacy": {"CT Image Storage": ["Explicit VR Little Endian"],
                                "Encapsulated PDF Storage": []},
            "accepted.target": {"CT Image Storage": ["Explicit VR Little Endian",
                                                     "JPEG Baseline (Process 1)"],
                                "Encapsulated PDF Storage": ["Explicit VR Little Endian"]},
            "store_find_get_ms.legacy": 17.5, "move_ms.legacy->target": 33.2}),
        "ingest": ("pilot", {f"ingest.legacy{hostile}": {
            "objects": 4, "outcomes": {"kept": 1, "coerced": 1, "rejected": 1, "altered": 1},
            "by_transfer_syntax": {"Explicit VR Little Endian": {"kept": 1, "altered": 1},
                                   "Implicit VR Little Endian": {"coerced": 1},
                                   "RLE Lossless": {"rejected": 1}},
            "objects_not_kept": [
                {"sop_instance_uid": "2.25.1", "modality": "CT", "charset": "ISO_IR 192",
                 "transfer_syntax": "Explicit VR Little Endian", "outcome": "altered",
                 "reason": f"changed: StudyDescription {description}"},
                {"sop_instance_uid": "2.25.2", "modality": "MR", "charset": "default",
                 "transfer_syntax": "RLE Lossless", "outcome": "rejected",
                 "reason": "not accepted"}]}}),
        "migration": ("staged-rollout", {
            "pilot-move": migration_run("move", 17, {}),
            "staged-move": migration_run("move", 15, {"missing_series": 1,
                                                      "altered_attributes": 2})}),
        "migration-under-faults": ("staged-rollout", {
            "runs": 2, "retries": 15, "studies": 12, "instances": 96, "lost": 0,
            "duplicates": 0, "target_instances": 96,
            "fault_events": [{"t": 1.0, "what": "kill", "target": "target", "duration_s": 1.5},
                             {"t": 4.0, "what": "cut", "target": "harness->target",
                              "duration_s": 1.5}],
            "fault_errors": [],
            "results": [{"migrated": 11, "already_on_target": 1, "failed": 1, "ok": False,
                         "instances_sent": 88, "retries_used": 15, "elapsed_s": 44.4}]}),
        "failover": ("staged-rollout", {
            "setup": "reference (2 x Orthanc + Lua forwarding + HAProxy)", "rto_s": 42.5,
            "rpo_instances": 0, "acknowledged_lost": 0, "error_rate": 0.026,
            "error_rate_during_outage": 0.45, "acked": 151, "acked_before_fault": 50,
            "failback_s": 0.22, "thresholds": {"rto_s": 30.0, "rpo_instances": 50},
            "timeline": attempts,
            "fault_events": [{"t": 1.969, "what": "kill", "target": "primary",
                              "duration_s": None},
                             {"t": 44.469, "what": "recovered", "target": "virtual",
                              "duration_s": 42.5},
                             {"t": 50.0, "what": "failback", "target": "primary",
                              "duration_s": 0.22}]}),
        "disaster-recovery": ("staged-rollout", {
            **{f"{k}{suffix}": v for suffix in ("", ".postgresql") for k, v in (
                ("restore_time_s", 3.9), ("backup_s", 2.7), ("lost", 0), ("altered", 0),
                ("expected", 45), ("restored", 45))}}),
        "performance": ("full", {
            "sla.find-study-p99": {"verdict": "fail", "measured": 2.5, "unit": "s",
                                   "threshold": "<= 2 s", "workload": "mix", "node": "target",
                                   "evidence": "/r/sla-evidence.json"},
            "load.mix.find-study": load,
            "load.mix.totals": {"operations": 40, "errors": 1, "instances": 0,
                                "instances_per_s": 0.0, "mb_per_s": 0.0,
                                "bounded_by": "duration"},
            "load.mix.harness": {"cpu_cores": 0.7, "cpu_s_total": 9.2, "saturated": False,
                                 "cpu_count": 2},
            "load.mix.timeline": [
                {"t_s": s, "operations": 4, "errors": 0, "instances": 0, "mb": 0.0,
                 "latency_ms": {"p50": 900.0 + 10 * s, "p95": 1800.0 + 70 * s,
                                "max": 2100.0 + 90 * s}}
                for s in range(10)]}),
        "custom": (None, {"missing_on_target": 3, f"remark{hostile}": description}),
    }
    failing = {"migration", "failover", "performance"}
    report = _rich_report()
    report["phase"] = None
    report["scenarios"] = [{
        "name": scenario, "phase": phase, "duration_s": 1.0, "metrics": metrics,
        "outcome": "failed" if scenario in failing else "passed",
        "tests": perf_tests if scenario == "performance" else [{
            "nodeid": f"scenarios/test_{scenario}.py::test_it", "outcome":
            "failed" if scenario in failing else "passed", "duration_s": 1.0,
            "metrics": {}, **({"message": f"E   AssertionError: {description}"}
                              if scenario in failing else {})}],
    } for scenario, (phase, metrics) in scenarios.items()]
    return report


class _Page(HTMLParser):
    """Tags, ids and the text a reader sees (outside <details> folds), and nesting errors."""

    VOID = {"meta", "br", "img", "input", "link", "hr", "col", "area", "base", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.ids: list[str] = []
        self.visible: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if "id" in attributes:
            self.ids.append(attributes["id"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        if not {"details", "script", "style", "title"} & set(self.stack):
            self.visible.append(data)


def _parsed(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


@pytest.fixture
def every_scenario_page(tmp_path):
    def render(hostile: str = "") -> str:
        (tmp_path / "report.json").write_text(json.dumps(_every_scenario_report(hostile)))
        return write_html_report(tmp_path).read_text()
    return render


def test_every_scenario_has_its_purpose_built_section(every_scenario_page):
    page = every_scenario_page()
    parsed = _parsed(page)
    visible = " ".join(" ".join(parsed.visible).split())
    for scenario in ("assessment", "connectivity", "ingest", "migration", "failover",
                     "migration-under-faults", "disaster-recovery", "performance"):
        assert f"scenario-{scenario}" in parsed.ids, scenario
        assert f"scenario-{scenario}-figures" in parsed.ids, scenario  # not only the fallback
    assert "scenario-custom" in parsed.ids and "scenario-custom-figures" not in parsed.ids
    assert {"migration-pilot-move", "migration-staged-move"} <= set(parsed.ids)
    # migration: counts, findings by type, availability timeline
    for text in ("Instances on source", "5 of 6 Studies migrated", "Series missing on target",
                 "Attributes altered", "Missing on target (findings)",
                 "Availability while migrating: accessible over time",
                 "15.00 % Probes failed on target (target)", "Patient IDs shared by different"):
        assert text in visible, text
    # failover: RTO over its threshold, marked; the outage drawn on the timeline
    assert "42.5 s Recovery time, RTO threshold ≤ 30 s" in visible
    assert '<div class="card bad"><div class="cval">42.5 s</div>' in page
    assert "primary killed: outage" in page and 'class="fault"' in page
    # performance: the clause, and its threshold as a line on the percentile chart
    assert "find-study-p99 failed 2.5 s <= 2 s find-study mix" in visible
    assert 'class="limit"' in page and "find-study-p99: &lt;= 2 s" in page
    # ... and each second of the run (p50, p95, slowest) against the same threshold
    assert "Workload mix: latency per second of the run against the contract" in visible
    assert "load.mix.timeline" not in visible.split("raw metrics")[0]
    # ingest: the matrix cell of an altered object
    assert ('<td class="o-altered" title="legacy: Explicit VR Little Endian">1 kept, 1 altered'
            in page)
    # connectivity, disaster recovery, assessment, migration under faults
    assert "Node compatibility matrix" in visible and "C-MOVE of a study between" in visible
    assert "Orthanc, PostgreSQL index 45 45 0 0 2.7 3.9" in visible
    assert "Instances 33 33" in visible and "Held (independent count)" in visible
    assert "Faults injected" in visible and "harness->target" in visible
    # the raw metrics stay available, folded away
    assert page.count("raw metrics (JSON, as in report.json)") == 9


@pytest.mark.parametrize("hostile", HOSTILE)
def test_patient_name_and_study_description_are_escaped_everywhere(every_scenario_page,
                                                                   hostile):
    page = every_scenario_page(hostile)
    assert hostile not in page
    assert "<img" not in page and "<script>alert" not in page
    parsed = _parsed(page)
    assert [t for t, _ in parsed.tags if t in ("script", "img")] == ["script"]  # the page's own
    assert not [a for _, attrs in parsed.tags for a in attrs if a.startswith("on")]
    shown = "".join(parsed.visible)
    # shown as text where a person reads it: the name, the description, a node, a key
    assert f"Doe^Jane{hostile}" in shown and f"CT head {hostile}" in shown
    assert f"legacy{hostile}" in shown and f"Remark{hostile}" in shown
    svg_text = re.findall(r"<svg.*?</svg>", page, flags=re.S)
    assert any(escape(f"legacy{hostile}") in svg for svg in svg_text)  # escaped in charts too


def test_labels_are_human_not_metric_keys(every_scenario_page):
    visible = " ".join(_parsed(every_scenario_page()).visible)
    for label in ("Instances missing on target", "Recovery time, RTO", "Recovery point, RPO",
                  "Acknowledged instances lost", "Restore time (s)", "C-ECHO round trip (ms)",
                  "Instances on the target"):
        assert label in visible, label
    for key in ("missing_on_target", "rto_s", "rpo_instances", "acknowledged_lost",
                "restore_time_s", "echo_ms", "store_find_get_ms", "target_instances",
                "findings_by_type", "missing_series", "inaccessible_share"):
        assert not re.search(rf"\b{key}\b", visible), key


def test_page_is_well_formed(every_scenario_page, rich_dir):
    for page in (every_scenario_page(HOSTILE[1]), write_html_report(rich_dir).read_text()):
        parsed = _parsed(page)
        assert parsed.errors == [] and parsed.stack == []
        assert len(parsed.ids) == len(set(parsed.ids))  # ids unique: links land once
        for anchor in re.findall(r'href="#([^"]+)"', page):
            assert anchor in parsed.ids, anchor


# ---------------------------------------------------------------------------------------
# A real headless browser

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
)


def _chromium(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         "--window-size=1280,2000", *extra, url],
        capture_output=True, text=True, timeout=120,
    )


def _console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if "CONSOLE" in line or "Uncaught" in line or "ERR_FILE_NOT_FOUND" in line]


def _png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG (what chromium writes) into rows."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            assert depth == 8 and colour in (2, 6) and interlace == 0
            channels = 4 if colour == 6 else 3
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        ftype = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - channels] if x >= channels else 0
            b = prev[x]
            c = prev[x - channels] if x >= channels else 0
            if ftype == 1:
                line[x] = (line[x] + a) & 255
            elif ftype == 2:
                line[x] = (line[x] + b) & 255
            elif ftype == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[x] = (line[x] + pred) & 255
        rows.append(bytes(line[i] for i in range(stride) if i % channels < 3))
        prev = line
    return width, height, rows


def _count_colour(rows: list[bytes], rgb: tuple[int, int, int], tolerance: int = 6) -> int:
    count = 0
    for row in rows:
        for i in range(0, len(row), 3):
            if all(abs(row[i + k] - rgb[k]) <= tolerance for k in range(3)):
                count += 1
    return count


@needs_chromium
def test_browser_loads_without_console_error_and_runs_the_script(rich_dir, tmp_path):
    page = write_html_report(rich_dir)
    proc = _chromium(tmp_path, page.as_uri(), "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not _console_errors(proc.stderr), _console_errors(proc.stderr)
    dom = proc.stdout
    charts = dom.count('<svg class="chart"')
    assert charts >= 8, charts
    assert f'data-charts="{charts}"' in dom  # set by the page's script: it ran
    assert f"{charts} charts rendered" in dom
    assert "<polyline" in dom and 'class="fault"' in dom


@needs_chromium
def test_browser_console_error_detection_works(tmp_path):
    """The check above would see an error: a page with a broken script is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    proc = _chromium(tmp_path, bad.as_uri(), "--dump-dom")
    assert _console_errors(proc.stderr), proc.stderr[-2000:]


@needs_chromium
def test_browser_screenshot_shows_verdict_and_charts(rich_dir, tmp_path):
    page = write_html_report(rich_dir)
    shot = tmp_path / "shot.png"
    proc = _chromium(tmp_path, page.as_uri(), f"--screenshot={shot}")
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    width, height, rows = _png_pixels(shot)
    assert (width, height) == (1280, 2000)
    assert _count_colour(rows, (0xC6, 0x28, 0x28)) > 2000  # the red NOT READY verdict
    # chart colours in the first screen: the fault band, and series lines/bars
    chart_pixels = sum(_count_colour(rows, rgb) for rgb in
                       ((0x1F, 0x77, 0xB4), (0xD6, 0x27, 0x28), (0x43, 0xA0, 0x47)))
    assert chart_pixels > 500, chart_pixels


@needs_chromium
def test_browser_real_run_page(real_run, tmp_path):
    page = write_html_report(real_run)
    proc = _chromium(tmp_path, page.as_uri(), "--dump-dom")
    assert proc.returncode == 0
    assert not _console_errors(proc.stderr), _console_errors(proc.stderr)
    assert "data-charts=" in proc.stdout and "Node compatibility matrix" in proc.stdout
