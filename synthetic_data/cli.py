"""`pacs-harness generate`: write a synthetic archive with a progress bar and a summary."""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from harness.errors import ConfigError
from synthetic_data.names import CHARSET_NAMES, MODALITIES, SCALES, SYNTAX_NAMES


@click.command("generate")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="New or empty folder to write the archive into.")
@click.option("--patients", default=2, show_default=True, type=int,
              help="Distinct (true) persons; identity traps add extra patient records.")
@click.option("--studies-per-patient", default=1, show_default=True, type=int,
              help="Studies per patient record.")
@click.option("--modalities", default="CT,MR", show_default=True,
              help=f"Comma-separated: {','.join(MODALITIES)} (SR = text report, "
                   "DOC = encapsulated PDF, SC/OT = secondary capture).")
@click.option("--facilities", default=2, show_default=True, type=int,
              help="Sites, each with its own name, issuer of patient ID, AE titles, MRNs.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Same seed and options give byte-identical files.")
@click.option("--scale", default="tiny", show_default=True,
              help=f"Image sizes: {'|'.join(SCALES)} (realistic = e.g. 512x512x300 CT).")
@click.option("--quirks", is_flag=True, help="Add legacy quirks to about half the series.")
@click.option("--charsets", default=None,
              help=f"Comma-separated: {', '.join(CHARSET_NAMES)} (aliases: latin1, utf8, "
                   "japanese, korean); default: plain ASCII.")
@click.option("--transfer-syntaxes", default=None,
              help=f"Comma-separated short names ({', '.join(SYNTAX_NAMES)}) or UIDs; "
                   "default: explicit.")
@click.option("--uid-root", default=None,
              help="UID root for every UID (default 2.25., UUID-derived).")
@click.option("--trap-rate", default=0.2, show_default=True, type=float,
              help="Share of persons given an identity trap (0..1).")
def generate_command(out: str, patients: int, studies_per_patient: int, modalities: str,
                     facilities: int, seed: int, scale: str, quirks: bool,
                     charsets: str | None, transfer_syntaxes: str | None,
                     uid_root: str | None, trap_rate: float) -> None:
    """Write synthetic DICOM studies (never real patient data) plus a ground-truth manifest.

    Output: OUT/<facility>/<record>/studyNNNNN/seriesNNN/NNNNN.dcm, OUT/manifest.jsonl (one
    record per instance) and OUT/manifest.json (options, seed, counts). Exit code 2 on bad
    input; nothing is left behind on failure.
    """
    from synthetic_data.options import GeneratorOptions
    from synthetic_data.writer import write_archive

    console = Console(stderr=True)
    try:
        opts = GeneratorOptions(
            patients=patients, studies_per_patient=studies_per_patient, modalities=modalities,
            facilities=facilities, seed=seed, scale=scale, quirks=quirks, charsets=charsets,
            transfer_syntaxes=transfer_syntaxes, uid_root=uid_root, trap_rate=trap_rate)
        with Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=console, transient=True) as bar:
            task = bar.add_task("generate", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            counts = write_archive(opts, out, progress=progress)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("error: interrupted; nothing was written", err=True)
        sys.exit(130)
    _print_summary(counts, out)


def _print_summary(counts: dict, out: str) -> None:
    table = Table(title=f"Synthetic archive: {out}")
    table.add_column("what")
    table.add_column("count", justify="right")
    for key in ("instances", "studies", "series", "patient_records", "persons",
                "quirky_instances"):
        table.add_row(key.replace("_", " "), str(counts[key]))
    table.add_row("megabytes", f"{counts['bytes'] / 1e6:.1f}")
    for group in ("by_modality", "by_transfer_syntax", "by_charset", "traps", "by_quirk"):
        for name, n in counts[group].items():
            table.add_row(f"{group.replace('by_', '').replace('_', ' ')}: {name}", str(n))
    Console().print(table)
