"""`up`, `down`, `status`: start the topology's nodes, stop them, show whether they answer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.table import Table

from harness.cli.options import (
    chosen_topology,
    json_option,
    running_cluster,
    topology_option,
)
from harness.console import console, out
from harness.errors import (
    EXIT_FINDINGS,
    EnvironmentProblem,
)


@click.command()
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

    topology = chosen_topology(topology_path, quiet=as_json)
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


@click.command()
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
    topology = chosen_topology(topology_path, quiet=True)
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


@click.command()
@topology_option
@json_option
def status(topology_path: str | None, as_json: bool) -> None:
    """Show each node: kind, AE title, address, ports, and whether it answers C-ECHO.

    Exit 0 when every node answers, 1 when one does not.
    """
    from harness.nodes import make_node

    topology = chosen_topology(topology_path, quiet=True)
    cluster = running_cluster(topology)
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
