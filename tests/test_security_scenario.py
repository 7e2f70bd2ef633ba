"""`pacs-harness run --phase infrastructure` on TLS topologies, as a site's CI runs it.

Properly configured nodes of every launched kind (TLS on each, the embedded PACS sending its
audit trail) make the phase ready; a topology where each node carries one misconfiguration
a site could make makes it not ready, and each node fails exactly the check that names its
misconfiguration (caught alone), in report.json and in the command's output.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.helpers import processes_mentioning, run_cli

PROPER = """name: @NAME@
nodes:
  legacy: {kind: dcmqrscp, ae_title: LEGACY, tls: {generate: true}}
  central: {kind: orthanc, ae_title: CENTRAL, tls: {generate: true}}
  pocket: {kind: embedded, ae_title: POCKET, tls: {generate: true}, audit: true}
"""

MISCONFIGURED = """name: @NAME@
nodes:
  good: {kind: embedded, ae_title: GOOD, tls: {generate: true}, audit: true}
  expiring: {kind: embedded, ae_title: EXPIRING, tls: {generate: true, valid_days: 10}}
  oldtls: {kind: embedded, ae_title: OLDTLS, tls: {generate: true, min_version: "1.0"}}
  wrongname:
    kind: embedded
    ae_title: WRONGNAME
    tls: {generate: true, certificate_names: [pacs.example.invalid]}
  plain:
    kind: orthanc
    ae_title: PLAIN
    tls: {generate: true}
    orthanc_config: {DicomTlsEnabled: false}
  open:
    kind: orthanc
    ae_title: OPEN
    orthanc_config:
      DicomAlwaysAllowEcho: true
      DicomAlwaysAllowFind: true
      DicomCheckCalledAet: false
      AuthenticationEnabled: false
"""

#: node -> area -> the checks that must fail there, and no other check of the run fails
EXPECTED_FAILURES = {
    "expiring": {"tls": {"certificate expiry"}},
    "oldtls": {"tls": {"TLS 1.0 refused", "TLS 1.1 refused"}},
    "wrongname": {"tls": {"certificate name"}},
    "plain": {"tls": {"plaintext refused", "protocol and cipher (BCP 195)"}},
    "open": {
        "access": {"unknown calling AE: C-ECHO", "unknown calling AE: C-FIND", "wrong called AE"},
        "rest": {
            f"{api}: {attempt}"
            for api in ("Orthanc REST GET /system", "DICOMweb GET /studies")
            for attempt in ("anonymous request", "default login orthanc/orthanc",
                            "wrong password")
        },
    },
}


def _run(tmp_path: Path, topology: str, *extra: str):
    path = tmp_path / "topology.yaml"
    path.write_text(topology)  # its name is this run's own: the process check below is too
    report_dir = tmp_path / "report"
    proc = run_cli("run", "--topology", str(path), "--phase", "infrastructure", "-q",
                   "--report-dir", str(report_dir), *extra, timeout=900)
    report = json.loads((report_dir / "report.json").read_text())
    return proc, report


def _security(report: dict) -> dict:
    [scenario] = [s for s in report["scenarios"] if s["name"] == "security"]
    return scenario


def _failed_checks(scenario: dict) -> dict[str, dict[str, set[str]]]:
    failed: dict[str, dict[str, set[str]]] = {}
    for rows in scenario["metrics"].values():
        if not isinstance(rows, list):
            continue
        for row in rows:
            if row["outcome"] == "fail":
                failed.setdefault(row["node"], {}).setdefault(row["area"], set()).add(row["name"])
    return failed


@pytest.mark.timeout(1200)
def test_properly_configured_tls_nodes_make_the_infrastructure_phase_ready(tmp_path):
    name = f"secure-merger-{uuid.uuid4().hex[:8]}"
    proc, report = _run(tmp_path, PROPER.replace("@NAME@", name))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "phase infrastructure: ready" in proc.stderr
    scenario = _security(report)
    assert scenario["outcome"] == "passed"
    assert _failed_checks(scenario) == {}
    for node in ("legacy", "central", "pocket"):
        tls = {row["name"]: row["outcome"] for row in scenario["metrics"][f"security.tls.{node}"]}
        assert set(tls.values()) == {"pass"} and len(tls) == 10, (node, tls)
    coverage = scenario["metrics"]["security.audit_coverage.pocket"]
    assert coverage["performed"] > 0 and coverage["audited"] == coverage["performed"]
    page = (tmp_path / "report" / "index.html").read_text()
    assert "security" in page and "plaintext refused" in page
    assert processes_mentioning(f"pacs-harness-{name}-") == []  # every node stopped


@pytest.mark.timeout(1200)
def test_each_misconfiguration_fails_its_own_check_and_the_phase(tmp_path):
    name = f"misconfigured-{uuid.uuid4().hex[:8]}"
    proc, report = _run(tmp_path, MISCONFIGURED.replace("@NAME@", name), "--scenario", "security")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "phase infrastructure: NOT READY" in proc.stderr
    assert "scenario security (infrastructure) failed" in proc.stderr
    scenario = _security(report)
    assert _failed_checks(scenario) == EXPECTED_FAILURES
    # the well-configured node of the same run passes everything it was asked
    tests = {t["nodeid"].split("::")[-1]: t["outcome"] for t in scenario["tests"]}
    assert {name: outcome for name, outcome in tests.items() if name.endswith("[good]")} == {
        "test_tls[good]": "passed", "test_access_control[good]": "passed",
        "test_rest_auth[good]": "skipped", "test_audit_trail[good]": "passed",
        "test_phi_canaries[good]": "passed",
    }
    # a node the harness cannot trust is reported by name, not as a start-up failure
    messages = " ".join(t.get("message") or "" for t in scenario["tests"])
    assert "certificate names pacs.example.invalid, not 127.0.0.1" in messages
    assert processes_mentioning(f"pacs-harness-{name}-") == []  # every node stopped
