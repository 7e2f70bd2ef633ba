"""`pacs-harness conformance`: the same probes against every node, side by side (issue 16).

Nodes are those `up` runs for the topology; when none runs, the topology is launched for
this command and stopped at its end, also on Ctrl-C or SIGTERM. The matrix goes to stdout
(a table, or `--json`); `--output DIR` keeps conformance.json and the interoperability page.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from harness.cli.options import chosen_topology, json_option, topology_option
from harness.console import console, out, progress_bar
from harness.errors import EXIT_ENVIRONMENT, EXIT_FINDINGS

#: how a cell of the matrix reads in a terminal
CELLS = {
    "conforms": "[green]conforms[/]",
    "differs": "[red]differs[/]",
    "not supported": "[yellow]n-s[/]",
    "not tested": "[dim]n-t[/]",
}


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a CI job cancelled) unwinds like Ctrl-C, so launched nodes are stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _running_cluster(topology, quiet: bool) -> Iterator[Any]:
    """The cluster `up` runs for the topology, else one launched here and stopped after."""
    from harness.cluster import Cluster
    from harness.launch.state import state_dir_for, state_lock

    state_dir = state_dir_for(topology)
    say = (lambda _msg: None) if quiet else (lambda msg: console.print(f"  {msg}",
                                                                        markup=False))
    with state_lock(state_dir):
        cluster = Cluster.from_state(topology, state_dir)
        if cluster is None:
            cluster = Cluster.launch(topology, on_event=say)
    if not cluster.owned:
        yield cluster
        return
    try:
        yield cluster
    finally:
        cluster.stop()


def _matrix(run_dict: dict[str, Any]):
    """Rows: probes grouped by area; columns: nodes; cells: the outcome. The probe id is
    never cut (it is what --probe takes); title and reference only where the width leaves
    them room (they are in --json and on the page)."""
    from rich.table import Table

    ids = max((len(p["id"]) for p in run_dict["probes"]), default=5)
    nodes = sum(max(len(n["name"]), len(n["kind"]), 8) + 3 for n in run_dict["nodes"])
    titled = out.width - ids - nodes >= 40
    table = Table(title="conformance (n-s: not supported, n-t: not tested)")
    table.add_column("probe", no_wrap=True)
    for node in run_dict["nodes"]:
        header = node["name"] if node["name"] == node["kind"] else (
            f"{node['name']}\n{node['kind']}")
        table.add_column(header, no_wrap=True)
    if titled:
        table.add_column("title (reference)", style="dim", ratio=1)
    outcome = {(r["probe"], r["node"]): r["outcome"] for r in run_dict["results"]}
    area = None
    for probe in run_dict["probes"]:
        if probe["area"] != area:
            if area is not None:
                table.add_section()
            area = probe["area"]
        cells = [CELLS[outcome[(probe["id"], n["name"])]] for n in run_dict["nodes"]]
        title = [f"{probe['title']} ({probe['reference']})"] if titled else []
        table.add_row(probe["id"], *cells, *title)
    return table


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _print_human(run_dict: dict[str, Any], unanswered: dict[str, str]) -> None:
    """The matrix, what differed, then the migration risks per source/target pair (long
    texts cut here; --json and conformance.json keep them whole)."""
    out.print(_matrix(run_dict))
    differing = [r for r in run_dict["results"] if r["outcome"] == "differs"]
    if differing:
        out.print("differences:")
    for result in differing:
        out.print(f"  {result['node']}: {result['probe']}: {_short(result['observed'])}",
                  markup=False, highlight=False)
    for name, why in unanswered.items():
        out.print(f"not probed {name}: {why}", markup=False, highlight=False)
    risks = run_dict["risks"]
    if not risks:
        out.print("migration risks: none between these nodes")
        return
    out.print(f"migration risks: {len(risks)}")
    pairs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for risk in risks:
        pairs.setdefault((risk["source"], risk["target"]), []).append(risk)
    for (source, target), found in pairs.items():
        out.print(f"  {source} -> {target}:", markup=False, highlight=False)
        for risk in found:
            said = risk["risk"] if risk["risk"].startswith(risk["probe"]) else (
                f"{risk['probe']}: {risk['risk']}")
            remedy = risk.get("remedy") or "no known remedy"
            out.print(f"    {_short(said)}\n      remedy: {remedy}", markup=False,
                      highlight=False)


def _write_output(directory: Path, run_dict: dict[str, Any]) -> None:
    """conformance.json and the interoperability page (harness/report/interop.py)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "conformance.json").write_text(json.dumps(run_dict, indent=2, default=str))
    try:
        interop = importlib.import_module("harness.report.interop")
    except ModuleNotFoundError as exc:
        if exc.name != "harness.report.interop":
            raise
        console.print(f"conformance.json in {directory}/ (no interop page: "
                      "harness/report/interop.py is not installed)", markup=False)
        return
    page = directory / "interop.html"
    interop.render_interop_page(run_dict, page)
    console.print(f"written: {directory / 'conformance.json'}, {page}", markup=False)


@click.command("conformance")
@topology_option
@click.option("--node", "node_names", multiple=True,
              help="probe only this node (repeatable; default: every node of the topology)")
@click.option("--probe", "selectors", multiple=True,
              help="run only this probe id or area (repeatable), e.g. query.wildcard-star, "
                   "association")
@json_option
@click.option("--output", "output_dir", type=click.Path(file_okay=False), default=None,
              help="write conformance.json and interop.html (the matrix page) into DIR")
def conformance_command(topology_path: str | None, node_names: tuple[str, ...],
                        selectors: tuple[str, ...], as_json: bool,
                        output_dir: str | None) -> None:
    """Run the conformance probes against every node: the nodes x probes matrix and the
    migration risks between each source/target pair, with their remedies.

    Nodes come from `pacs-harness up`; when the topology is not up it is launched for
    this command and stopped at its end. Probes that store objects run only on writable
    nodes (elsewhere: not tested).

    Exit codes: 0 the matrix was made and shows no migration risk (a node that differs
    from the standard is a finding about that PACS, shown in the matrix, not a failure);
    1 migration risks were found between two nodes (each printed with its remedy: the
    reference migrator applies them, a site's own tool may not); 2 unknown node, probe or
    area; 3 a node did not start or did not answer.
    """
    from harness.conformance.runner import run_conformance, select_probes

    probes = select_probes(selectors)  # a bad id or area: exit 2 before anything starts
    topology = chosen_topology(topology_path, quiet=as_json)
    for name in node_names:
        topology.node(name)  # an unknown node: exit 2 naming it
    with _sigterm_as_interrupt(), _running_cluster(topology, as_json) as cluster:
        every_node = list(cluster.nodes.values())
        nodes = [cluster.node(name) for name in dict.fromkeys(node_names)] or every_node
        with progress_bar(as_json) as progress:
            task = progress.add_task("probing", total=len(nodes) * len(probes))
            run = run_conformance(
                nodes, probes, destinations=every_node,
                progress=lambda done, total, what: progress.update(
                    task, completed=done, total=total, description=what),
            )
    run_dict = run.as_dict()
    if as_json:
        out.print_json(json.dumps(run_dict, default=str))
    else:
        _print_human(run_dict, run.unanswered)
    if output_dir:
        _write_output(Path(output_dir), run_dict)
    if run.unanswered:
        console.print(f"not probed (did not answer): {', '.join(run.unanswered)}",
                      markup=False)
        sys.exit(EXIT_ENVIRONMENT)
    if run.risks:
        sys.exit(EXIT_FINDINGS)
