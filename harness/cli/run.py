"""`run`: the scenario suites against a topology, in a pytest child; the report and its verdict."""

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

from harness.cli.options import (
    chosen_topology,
    topology_option,
)
from harness.cli.signing import say_signed, signing_key_option, write_signed
from harness.console import console
from harness.errors import (
    EXIT_ENVIRONMENT,
    EXIT_USAGE,
    ConfigError,
    HarnessError,
)
from harness.launch.process import die_with_parent
from harness.phases import PHASES


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


@click.command()
@topology_option
@click.option(
    "--phase",
    default=None,
    type=click.Choice(PHASES),
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
@click.option(
    "--require-ready",
    type=click.Choice([*PHASES, "none"]),
    default=None,
    help="fail (exit 1) unless this phase is ready; `none`: exit on the verdict only. "
    "Default: the --phase asked for, else the last phase the run's scenarios gate (the "
    "report's headline), so a job calling plain `run` fails when its own report says "
    "NOT READY",
)
@signing_key_option
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
    require_ready: str | None,
    signing_key_path: str | None,
) -> None:
    """Run the scenario suites against the topology and write the report.

    With no arguments this is the main job: the default topology, every scenario. It prints
    each phase's readiness and exits 1 when the phase it gates is not ready (see
    --require-ready); report.json records the readiness and the exit decision, and is
    signed when a key is given (--signing-key or PACS_HARNESS_SIGNING_KEY).
    """
    import scenarios as scenarios_package
    from harness.report.signing import signing_key

    key = signing_key(signing_key_path)  # a bad key is refused before anything runs

    topology = chosen_topology(topology_path)  # validate (exit 2) and say what the default chose
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
    if report is None:
        console.print(f"no report.json: pytest exited {code}")
        sys.exit(EXIT_USAGE if code in (4, 5) else EXIT_ENVIRONMENT)
    decision = _record_outcome(report, code, scenarios, phase, require_ready)
    if key is not None:
        from harness.report.signing import sign_document

        report = sign_document(report, key)
        _sign_sla_evidence(target / "sla-evidence.json", key)
    report_json.write_text(json.dumps(report, indent=2, default=str))
    say_signed(report_json, report)
    from harness.report.html import write_html_report

    try:
        write_html_report(target)
    except HarnessError as exc:
        console.print(f"[yellow]no index.html:[/] {exc}")
    console.print(f"report: {target}/index.html (and report.json, junit.xml, allure-results/)")
    _print_outcome(report, decision)
    sys.exit(decision["code"])


def _sign_sla_evidence(path: Path, key) -> None:
    """The performance scenario's evidence beside report.json, signed with the same key
    when its figures recompute (left unsigned, and said, when they do not)."""
    if not path.is_file():
        return
    from harness.performance.sla import check_figures

    document = json.loads(path.read_text())
    problems = check_figures(document)
    if problems:
        console.print(f"{path}: not signed: {problems[0]}", markup=False, highlight=False)
        return
    write_signed(path, document, key)


def _record_outcome(report: dict, code: int, scenarios: tuple[str, ...], phase: str | None,
                    require_ready: str | None) -> dict:
    """Put in report.json what its verdict, readiness and exit decision are computed from,
    and the results: `report verify` recomputes them from the same file."""
    from harness.report.gate import exit_decision, headline_phase, readiness

    report["command"] = shlex.join(["pacs-harness", *sys.argv[1:]])
    report["scenario_filter"] = list(scenarios)
    report["pytest_exit_code"] = code
    report["readiness"] = [
        {"phase": gate.phase, "ready": gate.ready, "reasons": gate.reasons}
        for gate in readiness(report)
    ]
    required = require_ready or phase or headline_phase(report)
    report["exit"] = decision = exit_decision(report, required)
    return decision


def _print_outcome(report: dict, decision: dict) -> None:
    """The verdict, each phase's readiness with what kept it from being ready, the exit."""
    if report.get("environment_error"):
        console.print(f"[red]environment error:[/] {report['environment_error']}")
    if decision["code"] == EXIT_USAGE:
        console.print("[red]no scenario ran[/] (check --phase and --scenario)")
    if decision["code"] in (EXIT_USAGE, EXIT_ENVIRONMENT):
        return
    verdict = report["verdict"]
    console.print(f"verdict: [bold {'green' if verdict == 'pass' else 'red'}]{verdict}[/]")
    for row in report["readiness"]:
        console.print(f"phase {row['phase']}: {'ready' if row['ready'] else 'NOT READY'}",
                      markup=False, highlight=False)
        if not row["ready"]:
            for reason in row["reasons"]:
                console.print(f"  - {reason}", markup=False, highlight=False)
    required = decision["require_ready"]
    tail = ("" if required == "none" else
            "; `--require-ready none` exits on the verdict only")
    console.print(f"exit {decision['code']}: {decision['reason']} "
                  f"(--require-ready {required}{tail})", markup=False, highlight=False)
