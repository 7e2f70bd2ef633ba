"""Security (phase infrastructure): encryption in transit, access control, audit trails and
patient data, measured on every node (docs/security.md).

Each test runs one area's probe against one node and records its checks (harness/security/
checks.py) in `security.<area>.<node>`; the report's compliance section lays them out as a
nodes x checks matrix. A failed check fails the test, so the infrastructure phase is not
ready while any check fails; a node where nothing applies (e.g. no TLS declared) is skipped
with the reason. The probe modules are imported inside each test: one area's module
missing or broken fails that area's tests only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness.security.checks import Check, failures

pytestmark = [pytest.mark.phase("infrastructure"), pytest.mark.scenario("security")]


@pytest.fixture(scope="session")
def security_artifacts(pytestconfig: pytest.Config, pacs_cluster, tmp_path_factory) -> Path:
    """Where this run writes what a canary must not leak into: the report directory
    (--pacs-report-json's), else the cluster's working directory (node logs, state)."""
    from harness.plugin import _setting

    report_json = _setting(pytestconfig, "pacs_report_json")
    if report_json:
        directory = Path(report_json).parent
        directory.mkdir(parents=True, exist_ok=True)
        return directory
    if getattr(pacs_cluster, "root", None):
        return Path(pacs_cluster.root)
    return tmp_path_factory.mktemp("security-artifacts")


def judge(area: str, node_name: str, checks: list[Check], metrics: dict[str, Any]) -> None:
    """Record the checks; fail on any failed one (each on its own line with its remedy);
    skip when nothing applied."""
    metrics[f"security.{area}.{node_name}"] = [c.as_dict() for c in checks]
    failed = failures(checks)
    assert not failed, (f"{len(failed)} of {len(checks)} {area} checks failed on "
                        f"{node_name}:\n" + "\n".join(c.line() for c in failed))
    if all(c.outcome == "skip" for c in checks):
        reasons = sorted({c.observed for c in checks}) or ["no check applies"]
        pytest.skip(f"{node_name}: {'; '.join(reasons)}")


def test_tls(pacs_node, pacs_node_name, pacs_metrics):
    from harness.security.tls_probe import tls_checks

    judge("tls", pacs_node_name, tls_checks(pacs_node(pacs_node_name)), pacs_metrics)


def test_access_control(pacs_node, pacs_node_name, pacs_metrics):
    from harness.security.access_control import access_checks

    judge("access", pacs_node_name, access_checks(pacs_node(pacs_node_name)), pacs_metrics)


def test_rest_auth(pacs_node, pacs_node_name, pacs_metrics):
    from harness.security.rest_auth import rest_checks

    judge("rest", pacs_node_name, rest_checks(pacs_node(pacs_node_name)), pacs_metrics)


def test_audit_trail(pacs_node, pacs_node_name, pacs_metrics):
    from harness.security.audit_trail import audit_trail

    result = audit_trail(pacs_node(pacs_node_name))
    if result.coverage is not None:  # operations audited / performed, for the report
        pacs_metrics[f"security.audit_coverage.{pacs_node_name}"] = result.coverage.as_dict()
    judge("audit", pacs_node_name, result.checks, pacs_metrics)


def test_phi_canaries(pacs_node, pacs_node_name, pacs_metrics, security_artifacts):
    from harness.security.canaries import canary_checks

    checks = canary_checks(pacs_node(pacs_node_name), security_artifacts)
    judge("phi", pacs_node_name, checks, pacs_metrics)
