"""`pacs-harness report` and `pacs-harness gate`: re-render a finished run, gate a phase on it.

Why separate commands: CI keeps a run's directory as an artifact, and a later pipeline stage
(or a person) decides on a phase from it without running the scenarios again.

Exit codes: gate 0 ready, 1 not ready, 2 bad input; report 0, 1 figures that do not
recompute (nothing signed), 2 bad input or key, 3 no Allure CLI; report verify 0 valid,
1 a signature or figure mismatch, 2 unsigned or unreadable report or bad key.

Why the signature is inside report.json (a `signature` member) rather than a detached
report.json.sig: the report is the one file CI keeps, mails and attaches to a contract; a
detached file gets separated from it, and SLA evidence carries its signature the same way.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import click

from harness.cli.signing import (
    finish_check,
    public_key_option,
    read_json_document,
    signing_key_option,
    write_signed,
)
from harness.errors import EXIT_FINDINGS, EXIT_PASS, ConfigError, EnvironmentProblem, HarnessError
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


@click.group("report", invoke_without_command=True)
@click.option("--report", "report_path", type=click.Path(), default=None,
              help="a finished run's directory (or its report.json)")
@click.option("--allure", is_flag=True,
              help="also build the Allure HTML report (needs the `allure` command and Java)")
@signing_key_option
@click.pass_context
def report_command(ctx: click.Context, report_path: str | None, allure: bool,
                   signing_key_path: str | None) -> None:
    """Re-render a run's index.html from its report.json and logs; optionally the Allure report.

    With a signing key, report.json is signed (after its figures are recomputed and found
    consistent). `report verify DIR` checks a signed report.
    """
    if ctx.invoked_subcommand is not None:
        return
    if report_path is None:
        raise click.UsageError("Missing option '--report'.", ctx)
    from harness.report.html import load_report, write_html_report
    from harness.report.signing import signing_key

    key = signing_key(signing_key_path)
    report_dir = _report_dir(report_path)
    report = load_report(report_dir)  # one clear line if it is not a run directory
    if key is not None:
        _sign_report(report_dir / "report.json", report, key)
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


def _sign_report(path: Path, report: dict, key) -> None:
    """Sign report.json in place; refused (exit 1) when its figures do not recompute: a
    signature vouches for the figures, so inconsistent ones are not signed."""
    from harness.report.gate import check_report

    problems = check_report(report)
    if problems:
        for problem in problems:
            click.echo(f"{path}: figures do not match: {problem}", err=True)
        raise HarnessError(f"{path}: not signed: its figures do not match (above)")
    write_signed(path, report, key)


@report_command.command("verify")
@click.argument("report_path", type=click.Path())
@public_key_option
def report_verify(report_path: str, public_key: str | None) -> None:
    """Check a signed readiness report (a run's directory or its report.json): the
    signature, then the verdict, each phase's readiness and the exit decision recomputed
    from the test outcomes. Exit 0 valid, 1 a mismatch (named), 2 unsigned or unreadable
    file or bad key."""
    from harness.report.gate import check_report

    given = Path(report_path)
    path = given if given.is_file() else given / "report.json"  # a copy may have any name
    report = read_json_document(path, "report")
    finish_check(path, report, public_key, check_report(report))
