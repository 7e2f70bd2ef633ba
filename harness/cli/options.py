"""Options and helpers every command that takes a topology shares."""

from __future__ import annotations

import click

from harness.console import console

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


def chosen_topology(topology_path: str | None, quiet: bool = False):
    from harness.config import resolve_topology

    topology, choices = resolve_topology(topology_path)
    if not quiet:
        for choice in choices:
            console.print(
                f"default topology: [bold]{choice.node}[/] = {choice.kind} ({choice.reason})"
            )
    return topology


def running_cluster(topology):
    """The cluster `up` started for this topology, or None."""
    from harness.cluster import Cluster
    from harness.launch.state import state_dir_for

    return Cluster.from_state(topology, state_dir_for(topology))
