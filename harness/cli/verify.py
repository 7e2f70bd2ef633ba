"""`pacs-harness inventory` and `pacs-harness verify`: crawl nodes, prove what was lost.

Exit codes: verify exits 0 when nothing was lost or altered outside the rules, 1 when
something was (the findings say what); with `--commit`, also 1 when the target does not
commit every migrated instance (PS3.4 J storage commitment: the instances and reasons are
listed) or does not offer storage commitment at all; inventory exits 0 when it read
everything the node listed, 1 when it could not (instances listed but not retrievable, or
other issues: the ledger's issues table says which; counts still cover everything listed).
Both: 2 for bad input, 3 when a node does not answer.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from harness.console import console, out, progress_bar
from harness.errors import EXIT_FINDINGS
from harness.report.identities import SHOW_IDENTITIES_ENV, redactor_for


def _nodes(topology_path: str | None, *names: str):
    from harness.cluster import Cluster, reachable_node
    from harness.config import resolve_topology
    from harness.launch.state import state_dir_for

    topology, _ = resolve_topology(topology_path)
    cluster = Cluster.from_state(topology, state_dir_for(topology))
    return [reachable_node(topology, cluster, name) for name in names]


def _report_port(topology_path: str | None) -> int | None:
    """The harness's own address in the running cluster (Cluster.harness_peer), where its
    launched nodes send storage commitment reports on a new association; None without one."""
    from harness.cluster import Cluster
    from harness.config import resolve_topology
    from harness.launch.state import state_dir_for

    topology, _ = resolve_topology(topology_path)
    cluster = Cluster.from_state(topology, state_dir_for(topology))
    return cluster.harness_port if cluster is not None else None


def crawl_options(command):
    """--workers, --partition, --partition-size, --study-dates: how a crawl reads a node
    (inventory.py, partitions.py)."""
    for option in reversed([
        click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
                     help="studies read at once, each worker on its own associations "
                          "(or HTTP session); one writer commits them"),
        click.option("--partition", type=click.Choice(["date", "uid", "none"]),
                     default="date", show_default=True,
                     help="how the study listing is cut and recorded for resuming: date "
                          "ranges halved until no C-FIND answer is cut (gets past an "
                          "archive's result cap), UID hash buckets, or one listing"),
        click.option("--partition-size", type=click.IntRange(1), default=None,
                     help="most studies one date partition may hold (default 5000); set it "
                          "below a cap the archive applies without saying so"),
        click.option("--study-dates", default=None, metavar="RANGE|undated",
                     help="crawl one share of the node: studies with a StudyDate in RANGE "
                          "(YYYYMMDD-YYYYMMDD, either side open, or one day), or `undated`; "
                          "for a crawl spread over machines, merged with merge-ledgers "
                          "(docs/scale.md)"),
    ]):
        command = option(command)
    return command


def _show_identities(show: bool) -> None:
    """--show-identities for this process: ledgers and findings then keep clear values."""
    if show:
        os.environ[SHOW_IDENTITIES_ENV] = "1"


@click.command("inventory")
@click.option("--node", "node_name", required=True, help="the node to crawl")
@click.option("--depth", type=click.Choice(["attributes", "full"]), default="attributes",
              show_default=True, help="full also retrieves every instance and digests it")
@click.option("--sample", type=click.IntRange(1), default=None,
              help="retrieve only N studies fully (counts for all), with the confidence given")
@click.option("--ledger", type=click.Path(dir_okay=False), default=None,
              help="SQLite ledger to write (default: inventory-NODE.sqlite); resumes if present")
@click.option("--topology", "-t", "topology_path", type=click.Path(dir_okay=False), default=None)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--show-identities", is_flag=True,
              help="write patient IDs, names, birth dates, sex into the ledger in clear even "
                   "when the node is not declared synthetic (default: keyed tokens)")
@crawl_options
def inventory_command(node_name: str, depth: str, sample: int | None, ledger: str | None,
                      topology_path: str | None, as_json: bool, show_identities: bool,
                      workers: int, partition: str, partition_size: int | None,
                      study_dates: str | None) -> None:
    """Crawl every patient, study, series and instance of a node into a ledger.

    Exit 1 when something listed could not be read (see `issues` and `unretrievable`).
    """
    from harness.migration.inventory import crawl

    (node,) = _nodes(topology_path, node_name)
    _show_identities(show_identities)
    path = Path(ledger or f"inventory-{node_name}.sqlite")
    with progress_bar(as_json) as progress:
        task = progress.add_task(f"crawling {node_name}", total=None)
        summary = crawl(
            node, path, depth=depth, sample=sample, workers=workers, partition=partition,
            partition_size=partition_size, study_dates=study_dates,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    result = {"node": node_name, "ledger": str(path), **summary.as_dict()}
    if sample:
        result["sample"] = _inventory_sample(path)
    if as_json:
        out.print_json(json.dumps(result, default=str))
    else:
        out.print(" ".join(f"{k}={v}" for k, v in result.items() if not isinstance(v, dict)),
                  markup=False, highlight=False)
        if sample:
            out.print(f"sample: {result['sample']['statement']}", markup=False,
                      highlight=False)
    if summary.issues:
        console.print(f"inventory incomplete: {summary.issues} issues, {summary.unretrievable} "
                      f"instances listed but not retrievable (see the issues table of {path})",
                      markup=False, highlight=False)
        sys.exit(EXIT_FINDINGS)


def _inventory_sample(path: Path) -> dict:
    """What a sampled inventory says of every study (reconcile.sample_statement): a sampled
    study is a defect when one of its instances could not be retrieved."""
    from harness.migration.ledger import Ledger
    from harness.migration.reconcile import sample_statement

    with Ledger.open(path) as ledger:
        defects, sampled, total = ledger.sample_counts()
    return sample_statement(defects, sampled, total, "a defect: a sampled study with an "
                            "instance that could not be retrieved")


@click.command("verify")
@click.option("--source", "source_name", required=True, help="node the data came from")
@click.option("--target", "target_name", required=True, help="node the data went to")
@click.option("--depth", type=click.Choice(["attributes", "full"]), default="attributes",
              show_default=True, help="full compares every instance's attributes and pixels")
@click.option("--rules", type=click.Path(dir_okay=False), default=None,
              help="YAML rules: the changes the migration may make")
@click.option("--sample", type=click.IntRange(1), default=None,
              help="retrieve only N studies fully (counts for all); states what the sample "
                   "proves at 95% confidence")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="where ledgers and findings go (default: verify-SOURCE-TARGET/)")
@click.option("--topology", "-t", "topology_path", type=click.Path(dir_okay=False), default=None)
@click.option("--json", "as_json", is_flag=True,
              help="print {verdict, counts, missing, extra, altered, unretrievable}")
@click.option("--show-identities", is_flag=True,
              help="write patient IDs, names, birth dates in clear even when a node is not "
                   "declared synthetic (default: tokenised, see docs/safety.md)")
@click.option("--commit", is_flag=True,
              help="then ask the target for storage commitment of every migrated instance "
                   "(PS3.4 J) and fail unless it commits them all")
@click.option("--commit-timeout", type=click.FloatRange(min=1), default=60.0,
              show_default=True, help="seconds to wait for each storage commitment report")
@crawl_options
def verify_command(source_name: str, target_name: str, depth: str, rules: str | None,
                   sample: int | None, out_dir: str | None, topology_path: str | None,
                   as_json: bool, show_identities: bool, commit: bool,
                   commit_timeout: float, workers: int, partition: str,
                   partition_size: int | None, study_dates: str | None) -> None:
    """Prove, instance by instance, what a migration lost, altered or added.

    Writes findings.json, findings.csv and summary.txt; exit 1 when anything is lost or
    altered outside the rules.
    """
    from harness.migration.rules import load_rules
    from harness.migration.verify import verify

    checked_rules = load_rules(rules)  # a bad rules file is the first thing reported
    source, target = _nodes(topology_path, source_name, target_name)
    _show_identities(show_identities)
    redactor = redactor_for(source, target, show=show_identities)
    workdir = Path(out_dir or f"verify-{source_name}-{target_name}")
    with progress_bar(as_json) as progress:
        tasks = {side: progress.add_task(f"crawling {side}", total=None)
                 for side in ("source", "target")}
        result = verify(
            source, target, workdir, depth=depth, rules=checked_rules, sample=sample,
            redactor=redactor, workers=workers, partition=partition,
            partition_size=partition_size, study_dates=study_dates,
            progress=lambda side, done, total: progress.update(
                tasks[side], completed=done, total=total),
        )
    commitment = _commit(target, result, workdir, commit_timeout, topology_path) if commit \
        else None
    if as_json:
        printed = result.as_json()
        if result.findings.sample:
            printed["sample"] = result.findings.sample
        if commitment is not None:
            printed["commitment"] = commitment.as_dict()
        out.print_json(json.dumps(printed))
    else:
        findings = result.findings if redactor is None else result.findings.redacted(redactor)
        out.print(findings.summary_text(), markup=False, highlight=False)
        if commitment is not None:
            for line in [commitment.summary(), *commitment.problems()]:
                out.print(line, markup=False, highlight=False)
        console.print(f"findings: {workdir}/ (findings.json, findings.csv)", markup=False,
                      highlight=False)
    if result.verdict != "pass" or (commitment is not None and not commitment.ok):
        sys.exit(EXIT_FINDINGS)


def _commit(target, result, workdir: Path, timeout_s: float, topology_path: str | None):
    """Storage commitment of every migrated instance by the target (PS3.4 J), written to
    WORKDIR/commitment.json; the reports on a new association come to the harness's address
    in the running cluster (an external target must send them on the N-ACTION's one)."""
    from harness.dicom.commitment import commit_on_node
    from harness.migration.verify import migrated_instances

    commitment = commit_on_node(target, migrated_instances(result), timeout_s=timeout_s,
                                report_port=_report_port(topology_path))
    (workdir / "commitment.json").write_text(json.dumps(commitment.as_dict(), indent=2))
    return commitment


@click.command("merge-ledgers")
@click.argument("merged", type=click.Path(dir_okay=False))
@click.argument("parts", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def merge_ledgers_command(merged: str, parts: tuple[str, ...], as_json: bool) -> None:
    """Merge the ledgers of one crawl's shares (inventory --study-dates, one per machine)
    into MERGED, which reconcile then compares as a one-shot crawl (docs/scale.md).

    Exit 2 when a part did not finish or belongs to another crawl (named).
    """
    from harness.migration.merge import merge_ledgers

    counts = merge_ledgers(parts, merged)
    if as_json:
        out.print_json(json.dumps({"ledger": merged, "parts": list(parts), "counts": counts}))
    else:
        out.print(f"{merged}: " + " ".join(f"{k}={v}" for k, v in counts.items())
                  + f" (from {len(parts)} ledgers)", markup=False, highlight=False)


@click.command("reconcile")
@click.argument("source_ledger", type=click.Path(dir_okay=False))
@click.argument("target_ledger", type=click.Path(dir_okay=False))
@click.option("--rules", type=click.Path(dir_okay=False), default=None,
              help="migration rules YAML (what the migration may change)")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="where findings.json, findings.csv and summary.txt go "
                   "(default: reconcile-<source>-<target>)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def reconcile_command(source_ledger: str, target_ledger: str, rules: str | None,
                      out_dir: str | None, as_json: bool) -> None:
    """Compare two finished ledgers (inventory, or merge-ledgers of a crawl spread over
    machines) without crawling again: the findings `verify` would report.

    Exit 1 when anything is lost or altered outside the rules; 2 for a file that is no
    finished ledger.
    """
    from harness.migration.reconcile import reconcile
    from harness.migration.rules import load_rules
    from harness.migration.writers import write_findings

    checked_rules = load_rules(rules)
    findings = reconcile(source_ledger, target_ledger, checked_rules)
    workdir = Path(out_dir or f"reconcile-{Path(source_ledger).stem}-{Path(target_ledger).stem}")
    paths = write_findings(findings, workdir)  # ledgers hold tokens where they must
    if as_json:
        out.print_json(json.dumps({**findings.as_dict(),
                                   "files": {k: str(v) for k, v in paths.items()}}))
    else:
        out.print(findings.summary_text(), markup=False, highlight=False)
        console.print(f"findings: {workdir}/ (findings.json, findings.csv)", markup=False,
                      highlight=False)
    if findings.verdict != "pass":
        sys.exit(EXIT_FINDINGS)
