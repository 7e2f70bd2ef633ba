"""`pacs-harness report` and `pacs-harness gate`: re-render a finished run, gate a phase on it.

Why separate commands: CI keeps a run's directory as an artifact, and a later pipeline stage
(or a person) decides on a phase from it without running the scenarios again.

Exit codes: gate 0 ready, 1 not ready, 2 bad input; report 0, 2 bad input, 3 no Allure CLI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import click

from harness.errors import EXIT_FINDINGS, EXIT_PASS, ConfigError, EnvironmentProblem
from harness.phases import PHASES

ALLURE_INSTALL = (
    "install it with `npm install -g allure-commandline` (needs Java: apt-get install "
    "default-jre-headless nodejs npm)"
)


def _report_dir(path: str) -> Path:
    """Accept the run directory or its report.json."""
    target = Path(path)
    if target.name == "report.json" or target.is_file():
        target = target.parent
    return target




@click.command("gate")
@click.option("--report", "report_path", required=True, type=click.Path(),
              help="a finished run's directory (or its report.json)")
@click.option("--phase", required=True, type=click.Choice(PHASES),
              help="the rollout phase to gate")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def gate_command(report_path: str, phase: str, as_json: bool) -> None:
    """Say whether a finished run makes PHASE ready: exit 0 ready, 1 not ready, 2 bad input.

    Ready when every scenario of PHASE and of the phases before it passed and at least one
    of them ran.
    """
    from harness.report.gate import evaluate_gate
    from harness.report.html import load_report

    report = load_report(_report_dir(report_path))
    result = evaluate_gate(report, phase)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        click.echo(f"phase {phase}: {'READY' if result.ready else 'NOT READY'}")
        for reason in result.reasons:
            click.echo(f"  - {reason}")
    sys.exit(EXIT_PASS if result.ready else EXIT_FINDINGS)


@click.command("report")
@click.option("--report", "report_path", required=True, type=click.Path(),
              help="a finished run's directory (or its report.json)")
@click.option("--allure", is_flag=True,
              help="also build the Allure HTML report (needs the `allure` command and Java)")
def report_command(report_path: str, allure: bool) -> None:
    """Re-render a run's index.html from its report.json and logs; optionally the Allure report."""
    from harness.report.html import load_report, write_html_report

    report_dir = _report_dir(report_path)
    load_report(report_dir)  # one clear line if it is not a run directory
    if allure:
        results = report_dir / "allure-results"
        if not results.is_dir():
            raise ConfigError(f"{results}: no allure-results directory in this run")
        allure_bin = shutil.which("allure")
        if allure_bin is None:
            raise EnvironmentProblem(f"the `allure` command line is not installed: "
                                     f"{ALLURE_INSTALL}")
        output = report_dir / "allure-report"
        proc = subprocess.run(
            [allure_bin, "generate", str(results), "-o", str(output), "--clean"],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise EnvironmentProblem(f"allure generate failed ({proc.returncode}): {last[0]}")
        click.echo(f"allure report: {output}/index.html")
    page = write_html_report(report_dir)  # after Allure, so the page links its report
    click.echo(f"report: {page}")
