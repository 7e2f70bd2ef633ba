"""`pacs-harness migrate`: run the reference migrator (or the site's tool) between two nodes.

Nodes are resolved like `store`: from the cluster `up` started for the topology, else as
external nodes of the topology. While the migration runs, the availability monitor probes
both nodes; its figures are part of the summary (and of `--json`).

Also runnable on its own: ``python -m harness.cli.migrate --from A --to B ...``.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from harness.console import out, progress_bar
from harness.errors import EXIT_FINDINGS
from harness.migration.methods import METHODS
from harness.migration.state import DEFAULT_SLOW_STUDY_S, PHASES

if TYPE_CHECKING:
    from harness.migration.state import StudyOutcome
    from harness.nodes.base import Node


def _present_on(target: Node) -> Callable[[str], bool]:
    """For an external tool: 'is the study on the target yet?' by study-level C-FIND.

    Positive answers are cached, so once a study is there it costs nothing more.
    """
    seen: set[str] = set()
    lock = threading.Lock()

    def check(study: str) -> bool:
        with lock:
            if study in seen:
                return True
        found = target.dimse(timeout_s=10).find("STUDY", {"StudyInstanceUID": study})
        if found.ok and found.matches:
            with lock:
                seen.add(study)
            return True
        return False

    return check


def _remedies(path: str | None, source: str, target: str) -> dict[str, Any]:
    """What the conformance results say the migrator must do for this pair: split the
    source's study discovery by date ranges when it truncates C-FIND (probe
    limits.find-results, remedy split-queries-by-date). ConfigError (exit 2) naming the
    file when it is not a conformance run."""
    from harness.conformance.risks import (
        SPLIT_BY_DATE,
        conformance_of,
        find_limit_of,
        remedies_for,
    )
    from harness.errors import ConfigError

    remedies: dict[str, Any] = {"split_queries": False, "source_find_limit": None,
                                "remedy_ids": []}
    if path is None:
        return remedies
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--conformance {path}: not readable JSON ({exc})") from None
    run = conformance_of(document) if isinstance(document, dict) else None
    if run is None:
        raise ConfigError(f"--conformance {path}: no conformance results in it (expected the "
                          "output of pacs-harness conformance --json or a report.json)")
    limit, says_so = find_limit_of(run, source)
    ids = remedies_for(run, source, target)
    remedies["remedy_ids"] = sorted(ids)
    remedies["split_queries"] = limit is not None or SPLIT_BY_DATE in ids
    remedies["source_find_limit"] = limit if limit and not says_so else None
    return remedies


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.1f}%"


def _print_summary(summary: dict[str, Any]) -> None:
    result = summary["result"]
    external = summary.get("external")
    if external:
        state = "timed out" if external["timed_out"] else f"exit code {external['exit_code']}"
        out.print(
            f"external command: {state} after {external['elapsed_s']} s "
            f"(log: {external['log_path']})"
        )
    out.print(
        f"{result['method']} {result['source']} -> {result['target']}: "
        f"{result['migrated']} migrated, {result['skipped_already_confirmed']} already "
        f"confirmed, {result['already_on_target']} found on target, "
        f"{result['failed']} failed of {result['studies_total']} studies; "
        f"{result['instances_sent']} instances sent, {result['retries_used']} retries, "
        f"{result['elapsed_s']} s (state: {summary['state']})"
    )
    durations = result.get("study_durations_s")
    if durations and durations["studies"]:
        out.print(
            f"per study ({durations['studies']} worked on): p50 {durations['p50']} s, "
            f"p99 {durations['p99']} s, max {durations['max']} s"
        )
    slow = result.get("slow_studies") or []
    if slow:
        out.print(f"[yellow]{len(slow)} studies slower than {result['slow_study_s']:g} s[/] "
                  "(time by phase; see table study_durations)")
    for entry in slow[:20]:
        phases = ", ".join(f"{PHASES[name]} {seconds} s"
                           for name, seconds in entry["phases_s"].items())
        out.print(f"[yellow]slow study[/] {entry['study']}: {entry['elapsed_s']} s, "
                  f"waiting for {entry['waiting_for']} ({phases})")
    discovery = summary.get("discovery")
    if discovery and discovery["split_by_date"]:
        cut = (f"the source cut its C-FIND answer at {discovery['limit']} matches"
               if discovery["capped"] else "asked to split")
        out.print(f"discovery: {cut}; {discovery['studies']} studies listed by date ranges "
                  f"in {discovery['queries']} queries")
    availability = summary.get("availability")
    if availability:
        parts = []
        for role in ("source", "target"):
            probes = availability["probes"][role]
            latency = availability["latency_s"][role]
            parts.append(
                f"{role} unreachable {_percent(availability['inaccessible_share'][role])} "
                f"of {probes['total']} probes" + (f", p95 {latency['p95']} s" if latency else "")
            )
        out.print("availability: " + "; ".join(parts))
    for study, error in list(result["errors"].items())[:20]:
        out.print(f"[red]failed[/] study {study}: {error}")
    unstable = result.get("unstable_listings") or {}
    if unstable:
        out.print(
            f"[yellow]{len(unstable)} studies with unstable listings[/] (a read disagreed "
            "with the study count or with the next read; see table unstable_listings)"
        )
    for study, notes in list(unstable.items())[:20]:
        out.print(f"[yellow]unstable listing[/] study {study}: {'; '.join(notes)}")


@click.command("migrate")
@click.option(
    "--topology",
    "-t",
    "topology_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="topology YAML file (default: the default topology)",
)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--from", "source_name", required=True, help="name of the source node")
@click.option("--to", "target_name", required=True, help="name of the target node")
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default="move",
    show_default=True,
    help="move: source C-MOVEs to target; get: C-GET then C-STORE; dicomweb: WADO-RS then "
    "STOW-RS; orthanc: the source Orthanc pushes over its REST API",
)
@click.option("--workers", default=4, show_default=True, type=click.IntRange(1, 64))
@click.option(
    "--rate", type=click.FloatRange(min=0, min_open=True), default=None, help="studies per second"
)
@click.option("--retries", default=3, show_default=True, type=click.IntRange(0, 100))
@click.option(
    "--slow-study-s",
    default=DEFAULT_SLOW_STUDY_S,
    show_default=True,
    type=click.FloatRange(min=0),
    help="report each study slower than this (seconds) with the time it spent listing the "
    "source, sending, confirming on the target and in retry backoff",
)
@click.option(
    "--state",
    "state_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="SQLite state file; run again with the same file to resume "
    "(default: ./migration-FROM-to-TO.sqlite)",
)
@click.option(
    "--external-command",
    default=None,
    help="run the site's own migration tool instead; placeholders {source_ae} {source_host} "
    "{source_port} {target_ae} {target_host} {target_port}",
)
@click.option(
    "--external-timeout",
    default=3600.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="seconds before the external command is killed",
)
@click.option("--shell", is_flag=True, help="run --external-command through /bin/sh")
@click.option("--no-monitor", is_flag=True, help="do not probe availability meanwhile")
@click.option(
    "--conformance",
    "conformance_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="conformance results (pacs-harness conformance --json, or a run's report.json): "
    "apply their remedies, e.g. list a source that truncates C-FIND by date ranges",
)
def migrate_command(
    topology_path: str | None,
    as_json: bool,
    source_name: str,
    target_name: str,
    method: str,
    workers: int,
    rate: float | None,
    retries: int,
    slow_study_s: float,
    state_path: str | None,
    external_command: str | None,
    external_timeout: float,
    shell: bool,
    no_monitor: bool,
    conformance_path: str | None,
) -> None:
    """Migrate every study from one node to another, resumably, with zero-loss proof.

    A study counts as migrated once the target's C-FIND lists every SOP instance the
    source has, each listing agreeing with the node's study count or with a second read
    (listings that changed between reads are reported). Prints each study's duration
    (p50, p99, max) and the studies slower than --slow-study-s with what they waited for.
    Killed or interrupted? Run the
    same command again: confirmed studies are not sent again. Exit 1 if any study is not
    on the target at the end.
    """
    from harness.cluster import Cluster, reachable_node
    from harness.config import resolve_topology
    from harness.launch.state import state_dir_for
    from harness.migration.external import ExternalMigration
    from harness.migration.migrator import Migrator
    from harness.migration.monitor import AvailabilityMonitor

    topology, _choices = resolve_topology(topology_path)
    cluster = Cluster.from_state(topology, state_dir_for(topology))
    source = reachable_node(topology, cluster, source_name)
    target = reachable_node(topology, cluster, target_name)
    state = Path(state_path or f"migration-{source_name}-to-{target_name}.sqlite")
    remedies = _remedies(conformance_path, source_name, target_name)
    migrator = Migrator(
        source,
        target,
        "move" if external_command else method,
        state_path=state,
        workers=workers,
        rate_limit=rate,
        retries=retries,
        slow_study_s=slow_study_s,
        split_queries=remedies["split_queries"],
        source_find_limit=remedies["source_find_limit"],
    )
    summary: dict[str, Any] = {"state": str(state)}
    if conformance_path:
        summary["remedies"] = remedies
    try:
        studies = migrator.plan()
        monitor = None
        if not no_monitor:
            monitor = AvailabilityMonitor(
                source,
                target,
                studies,
                is_migrated=_present_on(target) if external_command else migrator.is_confirmed,
            )
            monitor.start()
        try:
            with progress_bar(as_json) as progress:
                task = progress.add_task(f"{source_name} -> {target_name}", total=len(studies))

                def advance(done: int, total: int, _outcome: StudyOutcome | None) -> None:
                    progress.update(task, completed=done, total=total)

                if external_command:
                    tool = ExternalMigration(
                        external_command,
                        source,
                        target,
                        timeout_s=external_timeout,
                        log_path=state.with_suffix(".external.log"),
                        shell=shell,
                    )
                    progress.update(task, description="external command running")
                    external = tool.run()
                    summary["external"] = external.as_dict()
                    progress.update(task, description="verifying on target")
                    result = migrator.verify(progress=advance)
                else:
                    result = migrator.run(progress=advance)
        finally:
            if monitor is not None:
                monitor.stop()
        summary["result"] = result.as_dict()
        summary["discovery"] = migrator.discovery.as_dict() if migrator.discovery else None
        summary["availability"] = monitor.summary() if monitor is not None else None
    finally:
        migrator.close()
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        _print_summary(summary)
    external_failed = bool(summary.get("external")) and not summary["external"]["ok"]
    if not result.ok or external_failed:
        sys.exit(EXIT_FINDINGS)


def main(argv: list[str] | None = None) -> None:
    """`python -m harness.cli.migrate`: the command with pacs-harness's exit codes."""
    from harness.cli.app import run_command

    run_command(
        migrate_command, argv, "migrate", "interrupted (run the same command again to resume)"
    )


if __name__ == "__main__":
    main()
