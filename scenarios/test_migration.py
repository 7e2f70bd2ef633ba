"""Migration (phase pilot, then staged-rollout with more volume): zero loss, proven.

An archive with identity traps (colliding MRNs across facilities, one person under two MRNs,
name and birth-date variants) is loaded into the source node, its identities are reported
before anything moves, it is migrated with each applicable method while an availability
monitor probes both sides, and the target is reconciled against the source at full depth:
every instance, attribute and pixel. The gate: no finding, no merged patients, the share
of failed availability probes under the topology's threshold, and the target's storage
commitment of every migrated instance (PS3.4 J; a target without the service fails with
"storage commitment not supported": the source cannot be retired on its word).

Topology settings (all optional)::

    settings:
      migration:
        source: legacy            # default: the node named legacy, else the first disposable
        target: target            # default: the node named target, else the next one
        rules: rules.yaml         # allowed changes (harness/migration/rules.py); default: none
        max_inaccessible_share: 0.05
        pilot_patients: 4
        staged_patients: 48
        commit_timeout_s: 60      # wait for each storage commitment report (harness's address)
"""

from __future__ import annotations

from pathlib import Path

import allure
import pytest

from harness.dicom.commitment import commit_on_node
from harness.migration.identity import identity_report, merged_patients
from harness.migration.inventory import crawl
from harness.migration.methods import METHODS
from harness.migration.migrator import Migrator
from harness.migration.monitor import AvailabilityMonitor
from harness.migration.rules import load_rules
from harness.migration.verify import migrated_instances, verify
from harness.report.identities import for_report, redactor_for
from synthetic_data import GeneratorOptions, generate
from synthetic_data.manifest import colliding_patient_ids

pytestmark = pytest.mark.scenario("migration")

MODALITIES = ["CT", "MR", "CR", "US", "SR", "DOC"]


def _settings(topology) -> dict:
    return topology.settings.get("migration", {}) or {}


def _pair(topology, pacs_node):
    settings = _settings(topology)
    disposable = [name for name, spec in topology.nodes.items() if spec.disposable]
    source = settings.get("source") or ("legacy" if "legacy" in disposable else None)
    target = settings.get("target") or ("target" if "target" in disposable else None)
    if source is None or target is None:
        others = [n for n in disposable if n not in (source, target)]
        source = source or (others.pop(0) if others else None)
        target = target or (others.pop(0) if others else None)
    if not source or not target:
        pytest.skip("migration needs two disposable nodes in the topology")
    for role, name in (("source", source), ("target", target)):
        if not topology.node(name).may_write:
            # `run` refuses this before starting (exit 2); a direct pytest run skips
            pytest.skip(f"settings.migration.{role}: node {name} has no write permission "
                        "(the scenario stores synthetic patients; declare writable: true)")
    return pacs_node(source), pacs_node(target)


def _applicable(method: str, source, target) -> str | None:
    """Why a method cannot run between these nodes, or None."""
    service = {"move": "C-MOVE", "get": "C-GET"}.get(method)
    if service and service not in source.capabilities.retrieve_methods:
        return f"{method} needs {service} on the source"
    if method == "dicomweb" and (source.dicomweb() is None or target.dicomweb() is None):
        return "dicomweb needs DICOMweb on both nodes"
    if method == "orthanc" and source.rest() is None:
        return "orthanc needs an Orthanc source"
    return None


def migrate_and_prove(source, target, workdir: Path, *, method: str, patients: int, seed: int,
                      settings: dict, metrics: dict, label: str, report_port: int) -> None:
    archive = list(generate(GeneratorOptions(
        patients=patients, studies_per_patient=1, modalities=MODALITIES, facilities=2,
        seed=seed, scale="tiny", trap_rate=0.5, transfer_syntaxes=["explicit", "implicit"],
    )))
    with allure.step(f"load {len(archive)} synthetic instances into {source.name}"):
        stored = source.dimse().store(archive, associations=4)
    assert stored.ok, f"loading the source failed: {stored.failed[0].error}"
    studies = sorted({ds.StudyInstanceUID for ds in archive})

    rules = load_rules(settings.get("rules"))
    with allure.step("identity report before migrating"):
        crawl(source, workdir / "before.ledger.sqlite")
        identities = identity_report(workdir / "before.ledger.sqlite", rules)

    with allure.step(f"migrate {source.name} -> {target.name} by {method}"), Migrator(
        source, target, method, state_path=workdir / "migration.sqlite", workers=2
    ) as migrator:
        with AvailabilityMonitor(source, target, studies, interval_s=0.2, seed=seed,
                                 is_migrated=migrator.is_confirmed) as monitor:
            result = migrator.run()
    availability = monitor.summary()

    with allure.step("reconcile target against source at full depth"):
        redactor = redactor_for(source, target)  # a site's patients: tokens in the report
        verified = verify(source, target, workdir / "verify", depth="full", rules=rules,
                          redactor=redactor)
        merged = merged_patients(
            verified.paths["source_ledger"], verified.paths["target_ledger"]
        )
    allure.attach.file(
        verified.paths["csv"], name="findings.csv",
        attachment_type=allure.attachment_type.CSV,
    )
    with allure.step(f"storage commitment of the migrated instances by {target.name}"):
        commitment = commit_on_node(
            target, migrated_instances(verified), report_port=report_port,
            timeout_s=float(settings.get("commit_timeout_s", 60)))

    metrics[label] = {
        "method": method,
        "source": f"{source.name} ({source.kind})",
        "target": f"{target.name} ({target.kind})",
        "studies": len(studies),
        "instances": len(archive),
        "migration": result.as_dict(),
        "verdict": verified.verdict,
        "counts": verified.counts,
        "findings_by_type": verified.findings.by_type(),
        "availability": availability,
        "identity": for_report(identities.as_dict(), source, target),
        "merged_patients": for_report(merged, source, target),
        "commitment": {"summary": commitment.summary(), "supported": commitment.supported,
                       "committed": len(commitment.committed),
                       "problems": commitment.problems()[:20]},
    }
    assert result.ok, f"migration failed for {len(result.errors)} studies: {result.errors}"
    assert verified.verdict == "pass", (
        verified.findings if redactor is None else verified.findings.redacted(redactor)
    ).summary_text()
    assert merged == [], ("patients of different facilities merged: "
                          f"{for_report(merged, source, target)}")
    assert commitment.ok, "; ".join(commitment.problems()[:20])
    threshold = float(settings.get("max_inaccessible_share", 0.05))
    share = availability["inaccessible_share"]["source"] or 0.0
    assert share <= threshold, f"{share:.1%} of source probes failed (threshold {threshold:.1%})"
    reported = {c["patient_id"] for c in identities.collisions}
    assert colliding_patient_ids(archive) <= reported, "MRN collisions went unreported"


@pytest.mark.phase("pilot")
@pytest.mark.parametrize("method", METHODS)
def test_migration_pilot(pacs_topology, pacs_cluster, pacs_node, pacs_janitor, pacs_metrics,
                         tmp_path, method):
    source, target = _pair(pacs_topology, pacs_node)
    reason = _applicable(method, source, target)
    if reason:
        pytest.skip(f"{method}: {reason} ({source.kind} -> {target.kind})")
    settings = _settings(pacs_topology)
    migrate_and_prove(
        source, target, tmp_path, method=method, seed=101,
        patients=int(settings.get("pilot_patients", 4)), settings=settings,
        metrics=pacs_metrics, label=f"pilot-{method}", report_port=pacs_cluster.harness_port,
    )


@pytest.mark.phase("staged-rollout")
def test_migration_staged_volume(pacs_topology, pacs_cluster, pacs_node, pacs_janitor,
                                 pacs_metrics, tmp_path):
    source, target = _pair(pacs_topology, pacs_node)
    settings = _settings(pacs_topology)
    migrate_and_prove(
        source, target, tmp_path, method="move", seed=202,
        patients=int(settings.get("staged_patients", 48)), settings=settings,
        metrics=pacs_metrics, label="staged-move", report_port=pacs_cluster.harness_port,
    )
