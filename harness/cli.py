"""The `pacs-harness` command: up, down, status, store, run, generate.

Exit codes (every command): 0 pass, 1 findings or failure, 2 usage or configuration error,
3 environment error (missing binary, a node that does not start or answer).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from harness import __version__
from harness.console import console, out, progress_bar
from harness.errors import (
    EXIT_ENVIRONMENT,
    EXIT_FINDINGS,
    EXIT_PASS,
    EXIT_USAGE,
    ConfigError,
    EnvironmentProblem,
    HarnessError,
)
from harness.launch.process import die_with_parent

TOPOLOGY_HELP = (
    "topology YAML file (default: a legacy and a target node, real servers if installed)"
)


def topology_option(func):
    return click.option(
        "--topology",
        "-t",
        "topology_path",
        type=click.Path(dir_okay=False),
        default=None,
        help=TOPOLOGY_HELP,
    )(func)


def json_option(func):
    return click.option("--json", "as_json", is_flag=True, help="machine-readable output")(func)


def _resolve(topology_path: str | None, quiet: bool = False):
    from harness.config import resolve_topology

    topology, choices = resolve_topology(topology_path)
    if not quiet:
        for choice in choices:
            console.print(
                f"default topology: [bold]{choice.node}[/] = {choice.kind} ({choice.reason})"
            )
    return topology


def _running_cluster(topology):
    """The cluster `up` started for this topology, or None."""
    from harness.cluster import Cluster
    from harness.launch.state import state_dir_for

    return Cluster.from_state(topology, state_dir_for(topology))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pacs-harness")
def cli() -> None:
    """Validation harness for PACS integration and migration.

    Start PACS nodes from a topology file (or a default one), fill them with synthetic
    studies, and run the scenario suites that gate each rollout phase.

    Exit codes: 0 pass, 1 findings/fail, 2 usage or configuration error, 3 environment error.
    """


# ---------------------------------------------------------------------------------------
@cli.command()
@topology_option
@json_option
@click.option(
    "--timeout",
    "timeout_s",
    default=60.0,
    show_default=True,
    help="seconds to wait for each node to answer",
)
def up(topology_path: str | None, as_json: bool, timeout_s: float) -> None:
    """Start the topology's nodes and return, leaving them running until `down`."""
    from harness.cluster import Cluster
    from harness.launch.state import state_dir_for, state_lock

    topology = _resolve(topology_path, quiet=as_json)
    state_dir = state_dir_for(topology)
    with state_lock(state_dir):
        cluster = Cluster.from_state(topology, state_dir)
        if cluster is not None and cluster.all_processes_alive():
            console.print(f"topology {topology.name} is already up")
        else:
            if cluster is not None:
                console.print("found a stale run of this topology: cleaning it up")
                cluster.stop()
            with console.status("starting nodes..."):
                cluster = Cluster.launch(
                    topology,
                    detached=True,
                    state_dir=state_dir,
                    ready_timeout_s=timeout_s,
                    on_event=lambda msg: console.print(f"  {msg}"),
                )
    _print_status(cluster.status(), as_json)


@cli.command()
@topology_option
@click.option(
    "--all",
    "all_runs",
    is_flag=True,
    help="stop every node any pacs-harness run left running on this machine",
)
def down(topology_path: str | None, all_runs: bool) -> None:
    """Stop the nodes `up` started and remove their temporary directories."""
    from harness.cluster import Cluster
    from harness.launch.state import STATE_FILE, state_lock, state_root

    if all_runs:
        stopped = 0
        for state_file in sorted(state_root().glob(f"*/{STATE_FILE}")):
            cluster = Cluster.from_state(_resolve_saved(state_file), state_file.parent)
            if cluster is not None:
                with state_lock(state_file.parent):
                    cluster.stop()
                console.print(f"stopped {state_file.parent.name} ({len(cluster.nodes)} nodes)")
                stopped += 1
        stopped += _remove_leftover_containers()
        if not stopped:
            console.print("nothing was running")
        return
    topology = _resolve(topology_path, quiet=True)
    from harness.launch.state import state_dir_for

    state_dir = state_dir_for(topology)
    with state_lock(state_dir):
        cluster = Cluster.from_state(topology, state_dir)
        if cluster is None:
            console.print(f"topology {topology.name} is not up: nothing to stop")
            return
        cluster.stop()
    console.print(f"stopped topology {topology.name} ({len(cluster.nodes)} nodes)")


def _remove_leftover_containers() -> int:
    """Harness containers no saved state accounts for: a dead owner's or this state root's."""
    import shutil

    from harness.launch.docker import leftover_containers, remove_containers

    if not shutil.which("docker") and not Path("/var/run/docker.sock").exists():
        return 0
    try:
        containers = leftover_containers()
    except EnvironmentProblem:
        return 0  # no engine: no containers to remove
    if containers:
        names = ", ".join(c.name for c in containers)
        remove_containers(containers)
        console.print(f"removed {len(containers)} leftover containers: {names}")
    return len(containers)


def _resolve_saved(state_file: Path):
    """A topology good enough to stop what a state file describes, even if its YAML is gone."""
    from harness.config import Topology

    state = json.loads(state_file.read_text())
    return Topology(name=state["name"], nodes={}, source=state["topology"])


# ---------------------------------------------------------------------------------------
@cli.command()
@topology_option
@json_option
def status(topology_path: str | None, as_json: bool) -> None:
    """Show each node: kind, AE title, address, ports, and whether it answers C-ECHO.

    Exit 0 when every node answers, 1 when one does not.
    """
    from harness.nodes import make_node

    topology = _resolve(topology_path, quiet=True)
    cluster = _running_cluster(topology)
    if cluster is not None:
        rows = cluster.status()
    else:
        rows = []
        for spec in topology.nodes.values():
            node = make_node(spec, None)
            row = node.describe()
            row["alive"] = node.alive() if not spec.launched else False
            rows.append(row)
        if not as_json:
            console.print(f"topology {topology.name} is not up (start it: pacs-harness up)")
    _print_status(rows, as_json)
    if not all(row["alive"] for row in rows):
        sys.exit(EXIT_FINDINGS)


def _print_status(rows: list[dict], as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title="PACS nodes")
    for column in ("name", "kind", "ae_title", "host", "dicom_port", "http_port", "alive"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            *[
                ("[green]yes[/]" if row["alive"] else "[red]no[/]")
                if key == "alive"
                else str(row[key] if row[key] is not None else "-")
                for key in ("name", "kind", "ae_title", "host", "dicom_port", "http_port", "alive")
            ]
        )
    out.print(table)


# ---------------------------------------------------------------------------------------
@cli.command()
@topology_option
@json_option
@click.option("--to", "node_name", required=True, help="name of the node to store into")
@click.option(
    "--associations",
    "-n",
    default=4,
    show_default=True,
    type=click.IntRange(1, 64),
    help="parallel DICOM associations",
)
@click.option(
    "--decompress",
    is_flag=True,
    help="send compressed files decompressed when the node refuses their transfer syntax",
)
@click.argument("paths", nargs=-1, required=True, type=click.Path())
def store(
    topology_path: str | None,
    as_json: bool,
    node_name: str,
    associations: int,
    decompress: bool,
    paths: tuple[str, ...],
) -> None:
    """Send DICOM files or folders to a node with C-STORE (exit 1 if any is refused).

    Each file is checked before it is sent; a bad one is refused with its reason. A file
    whose transfer syntax the node refuses is converted to one it accepts (uncompressed
    syntaxes only, or decompressed with --decompress); each conversion is listed.
    """
    from harness.cluster import reachable_node
    from harness.dicom.dimse import iter_dicom_files

    for path in paths:
        if not Path(path).exists():
            raise ConfigError(f"{path}: no such file or folder")
    topology = _resolve(topology_path, quiet=True)
    node = reachable_node(topology, _running_cluster(topology), node_name)
    node.require_writable("store files into it")
    files = list(iter_dicom_files(paths))
    if not files:
        raise ConfigError(f"no files found under {', '.join(paths)}")
    with progress_bar(as_json) as progress:
        task = progress.add_task(f"C-STORE to {node_name}", total=len(files))
        report = node.dimse().store(
            files,
            associations=associations,
            decompress=decompress,
            on_result=lambda _r: progress.advance(task),
        )
        progress.update(task, completed=len(files))
    skipped = len(report.skipped)
    sent = [r for r in report.results if not r.refused]
    summary = {
        "node": node_name,
        "files": len(files),
        "sent": len(sent),
        "stored": len(report.succeeded),
        "failed": len(report.failed),
        "refused": len(report.refused),
        "skipped_not_dicom": skipped,
        "associations": associations,
        "elapsed_s": round(report.elapsed_s, 3),
        "instances_per_s": round(len(sent) / report.elapsed_s, 1) if report.elapsed_s else None,
        "failures": [
            {
                "source": r.source,
                "sop_instance_uid": r.sop_instance_uid,
                "refused": r.refused,
                "error": r.error,
            }
            for r in report.failed
        ],
        "conversions": [
            {
                "source": r.source,
                "from": r.conversion[0],
                "to": r.conversion[1],
                "text": r.conversion_text(),
            }
            for r in report.results
            if r.conversion
        ],
        "quirks": [
            {"source": r.source, "quirk": quirk} for r in report.results for quirk in r.quirks
        ],
        "skipped": [
            {"source": path, "reason": report.skip_reasons.get(path, "")}
            for path in report.skipped
        ],
    }
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        out.print(
            f"stored {summary['stored']} of {len(files)} files into {node_name} in "
            f"{summary['elapsed_s']} s ({summary['instances_per_s']}/s, "
            f"{associations} associations)"
            + (f"; {summary['refused']} refused" if summary["refused"] else "")
            + (f"; {skipped} non-DICOM files skipped" if skipped else "")
        )
        for failure in summary["failures"]:
            label = "refused" if failure["refused"] else "failed"
            out.print(f"[red]{label}[/] {escape(failure['error'])}", highlight=False)
        for conversion in summary["conversions"]:
            out.print(f"converted {conversion['source']}: {conversion['text']}",
                      markup=False, highlight=False)
        for quirk in summary["quirks"]:
            out.print(f"quirk {quirk['source']}: {quirk['quirk']}", markup=False,
                      highlight=False)
        for skip in summary["skipped"]:
            out.print(f"skipped {skip['source']}: {skip['reason']}", markup=False,
                      highlight=False)
    if report.failed:
        sys.exit(EXIT_FINDINGS)


# ---------------------------------------------------------------------------------------
def scenario_names(suite_dir: Path) -> list[str]:
    """Names a suite answers to: its `scenario(...)` markers, else its module name."""
    names = set()
    for module in suite_dir.glob("test_*.py"):
        marked = re.findall(r"mark\.scenario\(\s*[\"']([^\"']+)[\"']", module.read_text())
        names.update(marked or [module.stem.removeprefix("test_")])
    return sorted(names)


def _check_scenario_permissions(topology, scenarios: tuple[str, ...]) -> None:
    """Nodes the settings name for a scenario that writes must have write permission;
    checked before any scenario starts, so a refused run has stored nothing (exit 2)."""
    from harness.nodes import make_node

    if scenarios and "migration" not in scenarios:
        return
    migration = (topology.settings or {}).get("migration") or {}
    actions = {"source": "load synthetic patients into it", "target": "migrate studies into it"}
    for role, action in actions.items():
        name = migration.get(role)
        if isinstance(name, str) and name in topology.nodes:
            node = make_node(topology.nodes[name], None)
            node.require_writable(f"{action} (settings.migration.{role})")


@cli.command()
@topology_option
@click.option(
    "--phase",
    default=None,
    type=click.Choice(["planning", "infrastructure", "pilot", "staged-rollout", "full"]),
    help="run what gates this phase and the phases before it",
)
@click.option(
    "--scenario",
    "scenarios",
    multiple=True,
    help="run only this scenario (repeatable), e.g. connectivity",
)
@click.option(
    "--report-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="where to write junit.xml, allure-results/ and report.json "
    "(default: reports/run-<timestamp>)",
)
@click.option("--keep", is_flag=True, help="leave launched nodes running afterwards")
@click.option("--quiet", "-q", is_flag=True, help="less pytest output")
@click.option("--show-identities", is_flag=True,
              help="report patient IDs, names, birth dates of external nodes not declared "
                   "synthetic in clear (default: tokenised, see docs/safety.md)")
def run(
    topology_path: str | None,
    phase: str | None,
    scenarios: tuple[str, ...],
    report_dir: str | None,
    keep: bool,
    quiet: bool,
    show_identities: bool,
) -> None:
    """Run the scenario suites against the topology and write the report.

    With no arguments this is the main job: the default topology, every scenario.
    """
    import scenarios as scenarios_package

    topology = _resolve(topology_path)  # validate (exit 2) and say what the default chose
    suite_dir = Path(scenarios_package.__file__).parent
    known = scenario_names(suite_dir)
    for name in scenarios:
        if name not in known:
            raise ConfigError(
                f"--scenario {name!r}: unknown scenario (allowed: {', '.join(known)})"
            )
    _check_scenario_permissions(topology, scenarios)
    target = Path(report_dir or f"reports/run-{time.strftime('%Y%m%d-%H%M%S')}")
    target.mkdir(parents=True, exist_ok=True)
    report_json = target / "report.json"
    argv = [
        sys.executable,
        "-m",
        "pytest",
        str(suite_dir),
        "-c",
        str(suite_dir / "pytest.ini"),
        "--rootdir",
        str(suite_dir.parent),
        "--junitxml",
        str(target / "junit.xml"),
        "--alluredir",
        str(target / "allure-results"),
        "--pacs-report-json",
        str(report_json),
        "-q" if quiet else "-v",
    ]
    if topology_path:
        argv += ["--pacs-topology", str(Path(topology_path).resolve())]
    if phase:
        argv += ["--pacs-phase", phase]
    for name in scenarios:
        argv += ["--pacs-scenario", name]
    if keep:
        argv.append("--pacs-keep")
    # the pytest child dies with this command, even when this command is killed
    from harness.report.identities import SHOW_IDENTITIES_ENV

    env = {**os.environ, SHOW_IDENTITIES_ENV: "1" if show_identities else ""}
    code = subprocess.call(argv, preexec_fn=die_with_parent, env=env)
    report = json.loads(report_json.read_text()) if report_json.exists() else None
    if report is not None:
        from harness.report.html import write_html_report

        report["command"] = shlex.join(["pacs-harness", *sys.argv[1:]])
        report_json.write_text(json.dumps(report, indent=2, default=str))
        try:
            write_html_report(target)
        except HarnessError as exc:
            console.print(f"[yellow]no index.html:[/] {exc}")
    console.print(f"report: {target}/index.html (and report.json, junit.xml, allure-results/)")
    if report and report.get("environment_error"):
        console.print(f"[red]environment error:[/] {report['environment_error']}")
        sys.exit(EXIT_ENVIRONMENT)
    if code == 5 or (report and report.get("reason") == "no scenario ran"):
        console.print("[red]no scenario ran[/] (check --phase and --scenario)")
        sys.exit(EXIT_USAGE)
    if code == 4:
        sys.exit(EXIT_USAGE)
    if code == 3 or report is None:
        sys.exit(EXIT_ENVIRONMENT)
    verdict = report["verdict"]
    console.print(f"verdict: [bold {'green' if verdict == 'pass' else 'red'}]{verdict}[/]")
    if phase:
        from harness.report.gate import evaluate_gate

        gate = evaluate_gate(report, phase)
        console.print(f"phase {phase}: {'ready' if gate.ready else 'NOT READY'}")
        for reason in gate.reasons:
            console.print(f"  - {reason}")
        sys.exit(EXIT_PASS if code == 0 and gate.ready else EXIT_FINDINGS)
    sys.exit(EXIT_PASS if code == 0 and verdict == "pass" else EXIT_FINDINGS)


@cli.group()
def images() -> None:
    """Container images for `launch: docker` nodes, built without a registry."""


@images.command("build")
@click.argument("names", nargs=-1, required=True)
@click.option("--tag", default=None, help="image tag (default: pacs-harness/NAME:<recipe digest>)")
@click.option("--force", is_flag=True, help="rebuild even when a cached image matches")
def images_build(names: tuple[str, ...], tag: str | None, force: bool) -> None:
    """Build orthanc, dcmqrscp or embedded images from Debian packages (debootstrap + apt).

    The mirror is the one this machine's apt uses; a build whose recipe did not change is
    reused. Prints the image name it made.
    """
    from harness.launch.images import RECIPES, build_image

    for name in names:
        if name not in RECIPES:
            raise ConfigError(
                f"images build {name!r}: unknown image (allowed: {', '.join(RECIPES)})"
            )
    if tag and len(names) > 1:
        raise ConfigError("--tag names one image: build one image at a time with --tag")
    for name in names:
        with console.status(f"building {name}..."):
            image, built = build_image(
                name, tag, force=force, say=lambda msg: console.print(f"  {msg}")
            )
        out.print(image)


def _register_commands_of_other_modules() -> None:
    from harness.load_cli import load_command, sla_command
    from harness.migrate_cli import migrate_command
    from harness.report.cli import gate_command, report_command
    from harness.verify_cli import inventory_command, verify_command
    from synthetic_data.cli import generate_command

    for command in (
        generate_command,
        migrate_command,
        inventory_command,
        verify_command,
        report_command,
        gate_command,
        load_command,
        sla_command,
    ):
        cli.add_command(command)


_register_commands_of_other_modules()


def run_command(
    command: click.Command,
    argv: list[str] | None,
    prog_name: str,
    interrupted: str = "interrupted",
) -> None:
    """Run a click command with the harness's exit codes; HarnessErrors become one line."""
    try:
        command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except (click.exceptions.Abort, KeyboardInterrupt):
        console.print(interrupted)
        sys.exit(130)
    except HarnessError as exc:
        # plain text: one line a script can grep, never wrapped or coloured
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    sys.exit(EXIT_PASS)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `pacs-harness`."""
    run_command(cli, argv, "pacs-harness")
