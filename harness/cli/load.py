"""`pacs-harness load` and `pacs-harness sla`: run a workload, judge a contract.

Exit codes: load exits 0 when the run finished (errors are in the figures) and 3 when not one
operation succeeded (the node does not answer as a PACS: the figures are still printed, the
reason is one line on stderr); sla exits 0 when every clause passed and 1 when one failed;
2 for bad input; 3 when a node does not answer; `sla verify` 0 valid, 1 a signature or figure
mismatch, 2 unsigned or unreadable evidence or a bad key.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.live import Live

from harness.cli.signing import (
    finish_check,
    public_key_option,
    read_json_document,
    say_signed,
    signing_key_option,
)
from harness.errors import EXIT_FINDINGS, ConfigError, EnvironmentProblem

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)
LOCUSTFILE = Path(__file__).parents[1] / "performance" / "locust_users.py"


def _node_and_move_port(topology_path: str | None, name: str) -> tuple[Any, int | None]:
    from harness.cluster import Cluster, reachable_node
    from harness.config import resolve_topology
    from harness.launch.state import state_dir_for

    topology, _ = resolve_topology(topology_path)
    cluster = Cluster.from_state(topology, state_dir_for(topology))
    node = reachable_node(topology, cluster, name)
    return node, (cluster.harness_port if cluster is not None else None)


@contextlib.contextmanager
def _live(enabled: bool) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A one-line live display on a terminal (throughput, p95, errors); a no-op otherwise."""
    if not enabled or not console.is_terminal:
        yield lambda _snapshot: None
        return
    with Live(console=console, transient=True) as live:
        yield lambda snapshot: live.update(_progress_line(snapshot))


def _progress_line(snapshot: dict[str, Any]) -> str:
    p95 = "  ".join(f"{k} {v:.0f} ms" for k, v in snapshot["p95_ms"].items())
    return (f"{snapshot['elapsed_s']:.0f}/{snapshot['duration_s']:.0f} s  "
            f"{snapshot['instances_per_s']:.1f} inst/s  {snapshot['mb_per_s']:.2f} MB/s  "
            f"errors {snapshot['errors']}  p95: {p95}")


def _summary(results: dict[str, Any]) -> str:
    lines = [f"workload {results['workload']['name']} on {results['node']['name']}: "
             f"{results['measured_s']:.1f} s measured"]
    for name, op in results["operations"].items():
        lat = op["latency_ms"]
        p = "n/a" if lat["p50"] is None else (
            f"p50 {lat['p50']:.0f} ms p95 {lat['p95']:.0f} ms p99 {lat['p99']:.0f} ms")
        lines.append(f"  {name} ({op['operation']}, {op['model']}): {op['count']} ops, "
                     f"{op['errors']} errors, {op['instances_per_s']} inst/s, "
                     f"{op['mb_per_s']} MB/s, {p}")
        if op["errors_by_status"]:
            lines.append(f"    errors by status: {op['errors_by_status']}")
    t, h = results["totals"], results["harness"]
    lines.append(f"  total: {t['instances_per_s']} inst/s, {t['mb_per_s']} MB/s, "
                 f"{t['errors']} errors; harness CPU {h['cpu_cores']} cores, "
                 f"PACS CPU {results['pacs']['cpu_cores']} cores")
    lines += [f"  warning: {w}" for w in results["warnings"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Locust


def locust_target(runner: Any) -> dict[str, Any]:
    """What Locust processes need to know, as JSON for PACS_HARNESS_LOCUST_TARGET."""
    node = runner.node
    web = node.dicomweb()
    described = runner.workload.describe()
    described.pop("source")
    return {
        "node": {"name": node.name, "host": node.host, "dicom_port": node.dicom_port,
                 "ae_title": node.ae_title, "dicomweb_url": web.root_url if web else None,
                 # file paths only (TLSConfig): a TLS node's workers speak TLS too
                 "tls": dataclasses.asdict(tls) if (tls := node.tls_client()) else None,
                 "http_verify": web.session.verify if web else True,
                 "http_server_name": node.http_server_name() if web else None},
        "workload": described,
        "studies": [s.__dict__ for s in runner.studies],
        "dataset_stored": runner.dataset_stored,
    }


def _read_locust_stats(csv_path: Path) -> dict[str, Any]:
    rows = {}
    with open(csv_path, newline="") as handle:
        for row in csv.DictReader(handle):
            rows[row["Name"]] = {
                "type": row["Type"],
                "count": int(row["Request Count"]),
                "failures": int(row["Failure Count"]),
                "p50_ms": float(row["50%"]) if row["50%"] != "N/A" else None,
                "p95_ms": float(row["95%"]) if row["95%"] != "N/A" else None,
                "p99_ms": float(row["99%"]) if row["99%"] != "N/A" else None,
                "ops_per_s": float(row["Requests/s"]),
                "mb_per_s": float(row["Requests/s"]) * float(row["Average Content Size"]) / 1e6,
            }
    return rows


def run_locust(workload: Any, node: Any, *, processes: int = 2, duration_s: float | None = None,
               workdir: Path | None = None, master_port: int | None = None,
               expect_workers: int | None = None,
               on_event: Any = None) -> dict[str, Any]:
    """Seed the node, start a local Locust master and `processes` workers, bounded in time.

    `expect_workers` > `processes` waits for workers joining from elsewhere (the printed
    command). Every process started here is stopped before returning, also on failure.
    """
    from harness.launch.ports import free_port
    from harness.performance.runner import LoadRun

    say = on_event or (lambda _msg: None)
    runner = LoadRun(workload, node)
    runner.prepare()
    runner.check_http_login()
    duration = int(max(1, round(duration_s or workload.duration_s)))
    users = sum(
        g.users if g.model == "closed" else min(g.max_in_flight, max(1, int(g.rate * 2)))
        for g in workload.groups
    )
    workdir = workdir or Path(tempfile.mkdtemp(prefix="pacs-locust-"))
    workdir.mkdir(parents=True, exist_ok=True)
    port = master_port or free_port()
    env = {**os.environ, "PACS_HARNESS_LOCUST_TARGET": json.dumps(locust_target(runner))}
    web = runner.node.dicomweb()
    if web is not None and web.session.auth:  # the node's HTTP login: in the environment only
        env["PACS_HARNESS_LOCUST_HTTP_USER"], env["PACS_HARNESS_LOCUST_HTTP_PASSWORD"] = (
            web.session.auth
        )
    expected = expect_workers or processes
    base = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE)]
    master_cmd = [
        *base, "--master", "--headless", "--master-bind-host", "127.0.0.1",
        "--master-bind-port", str(port), "--expect-workers", str(expected),
        "--expect-workers-max-wait", "60", "-u", str(users), "-r", str(users),
        "-t", f"{duration}s", "--stop-timeout", "10", "--csv", str(workdir / "locust"),
        "--only-summary", "--loglevel", "WARNING",
    ]
    worker_cmd = [*base, "--worker", "--master-host", "127.0.0.1", "--master-port", str(port),
                  "--loglevel", "WARNING"]
    say("join more workers: PACS_HARNESS_LOCUST_TARGET='" + env["PACS_HARNESS_LOCUST_TARGET"]
        + "' " + " ".join(worker_cmd[:1] + worker_cmd[1:]).replace("127.0.0.1", "<this host>"))
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        master_log = open(workdir / "master.log", "w")
        logs.append(master_log)
        master = subprocess.Popen(master_cmd, env=env, stdout=master_log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(master)
        for n in range(processes):
            log = open(workdir / f"worker-{n}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen(worker_cmd, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        try:
            code = master.wait(timeout=duration + 120)
        except subprocess.TimeoutExpired:
            raise EnvironmentProblem(
                f"Locust master did not finish within {duration + 120} s (log: {workdir})"
            ) from None
        for proc in procs[1:]:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
        for log in logs:
            log.close()
    stats_path = workdir / "locust_stats.csv"
    if not stats_path.exists():
        raise EnvironmentProblem(
            f"Locust wrote no statistics (exit {code}); master log:\n"
            + (workdir / "master.log").read_text()[-2000:]
        )
    master_text = (workdir / "master.log").read_text()
    return {
        "workload": workload.describe(),
        "node": node.describe(),
        "engine": "locust",
        "processes": processes,
        "users": users,
        "duration_s": duration,
        "master_exit_code": code,
        "stats": _read_locust_stats(stats_path),
        "workdir": str(workdir),
        "master_log_tail": master_text[-2000:],
    }


# ---------------------------------------------------------------------------------------
# Commands


@click.command("load")
@click.option("--node", "node_name", required=True, help="the node to load")
@click.option("--workload", "workload_path", required=True, type=click.Path(dir_okay=False),
              help="workload YAML (groups of operations, users or rates, duration)")
@click.option("--duration", type=click.FloatRange(0, 3600, min_open=True), default=None,
              help="measured seconds (overrides the workload's duration_s)")
@click.option("--locust", is_flag=True, help="generate the load with a Locust master + workers")
@click.option("--processes", type=click.IntRange(1, 64), default=2, show_default=True,
              help="--locust: local worker processes")
@click.option("--expect-workers", type=click.IntRange(1, 1024), default=None,
              help="--locust: wait for this many workers (more than --processes: remote ones)")
@click.option("--topology", "-t", "topology_path", type=click.Path(dir_okay=False), default=None)
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON")
@click.option("--timeout", "timeout_s", type=click.FloatRange(0.1, 600), default=30.0,
              show_default=True,
              help="seconds each network step of an operation may take (association, each "
                   "read, a whole C-FIND); slower is an error")
def load_command(node_name: str, workload_path: str, duration: float | None, locust: bool,
                 processes: int, expect_workers: int | None, topology_path: str | None,
                 as_json: bool, timeout_s: float) -> None:
    """Run a workload against a node: latency per operation, throughput, errors by status."""
    from harness.performance.runner import run_workload
    from harness.performance.workload import load_workload

    workload = load_workload(workload_path)
    node, move_port = _node_and_move_port(topology_path, node_name)
    if locust:
        results = run_locust(workload, node, processes=processes, duration_s=duration,
                             expect_workers=expect_workers, on_event=console.print)
        if as_json:
            out.print_json(json.dumps(results, default=str))
        else:
            for name, row in results["stats"].items():
                out.print(f"{name}: {row['count']} requests, {row['failures']} failures, "
                          f"p50 {row['p50_ms']} ms, p95 {row['p95_ms']} ms, "
                          f"{row['ops_per_s']:.1f}/s")
        return
    with _live(not as_json) as show:
        results = run_workload(
            workload, node, duration_s=duration, move_port=move_port, on_progress=show,
            operation_timeout_s=timeout_s,
        )
    if as_json:
        out.print_json(json.dumps(results, default=str))
    else:
        out.print(_summary(results))
    _require_one_success(results, node)


def _require_one_success(results: dict[str, Any], node: Any) -> None:
    """Not one operation succeeded: the node did not answer as a PACS (exit 3, one line)."""
    totals = results["totals"]
    if not totals["operations"] or totals["errors"] < totals["operations"]:
        return
    reasons: dict[str, int] = {}
    for op in results["operations"].values():
        for reason, count in op["errors_by_status"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    commonest = max(reasons, key=lambda r: reasons[r]) if reasons else "unknown"
    raise EnvironmentProblem(
        f"load: node {node.name} ({node.host}:{node.dicom_port}): none of "
        f"{totals['operations']} operations succeeded; commonest reason: {commonest}"
    )


@click.group("sla", invoke_without_command=True)
@click.option("--contract", "contract_path", type=click.Path(dir_okay=False), default=None,
              help="contract YAML: clauses with metric, operation, threshold, workload")
@click.option("--node", "node_name", default=None,
              help="the node to measure (default: the topology's settings.performance.node)")
@click.option("--evidence", "evidence_path", type=click.Path(dir_okay=False), default=None,
              help="evidence JSON to write (default: sla-evidence-CONTRACT.json)")
@click.option("--topology", "-t", "topology_path", type=click.Path(dir_okay=False), default=None)
@click.option("--json", "as_json", is_flag=True, help="print the evidence as JSON")
@signing_key_option
@click.pass_context
def sla_command(ctx: click.Context, contract_path: str | None, node_name: str | None,
                evidence_path: str | None, topology_path: str | None, as_json: bool,
                signing_key_path: str | None) -> None:
    """Judge every clause of a contract by running its workloads; exit 1 if one fails.

    `sla --contract FILE ...` measures and writes the evidence (signed when a key is given);
    `sla verify FILE` checks a signed evidence file.
    """
    if ctx.invoked_subcommand is not None:
        return
    if contract_path is None:
        raise click.UsageError("Missing option '--contract'.", ctx)
    from harness.config import resolve_topology
    from harness.performance.sla import evaluate, load_contract, write_evidence
    from harness.report.signing import signing_key

    key = signing_key(signing_key_path)  # a bad key is refused before any load is sent
    contract = load_contract(contract_path)
    if node_name is None:
        topology, _ = resolve_topology(topology_path)
        node_name = ((topology.settings or {}).get("performance") or {}).get("node")
        if not node_name:
            raise ConfigError("sla: give --node (or settings.performance.node in the topology)")
    node, move_port = _node_and_move_port(topology_path, node_name)
    started = time.monotonic()
    with _live(not as_json) as show:
        verdicts = evaluate(
            contract, node, move_port=move_port, on_progress=show,
            on_clause=lambda v: console.print(f"{v.verdict.upper():4} {v.message}"),
        )
    path = Path(evidence_path or f"sla-evidence-{contract.name}.json")
    document = write_evidence(path, contract, verdicts, key)
    if as_json:
        out.print_json(json.dumps(document, default=str))
    else:
        failed = [v for v in verdicts if v.verdict != "pass"]
        out.print(f"{len(verdicts) - len(failed)}/{len(verdicts)} clauses passed in "
                  f"{time.monotonic() - started:.0f} s; evidence: {path}")
    say_signed(path, document)
    if document["verdict"] != "pass":
        sys.exit(EXIT_FINDINGS)


@sla_command.command("verify")
@click.argument("evidence_file", type=click.Path(dir_okay=False))
@public_key_option
def sla_verify(evidence_file: str, public_key: str | None) -> None:
    """Check signed SLA evidence: its signature, then every clause's verdict recomputed from
    its measured value and threshold. Exit 0 valid, 1 a mismatch (named), 2 unsigned or
    unreadable file or bad key."""
    from harness.performance.sla import check_figures

    path = Path(evidence_file)
    document = read_json_document(path, "SLA evidence")
    finish_check(path, document, public_key, check_figures(document))
