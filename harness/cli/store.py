"""`store`: send DICOM files or folders to a node with C-STORE."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.markup import escape

from harness.cli.options import (
    chosen_topology,
    json_option,
    running_cluster,
    topology_option,
)
from harness.console import out, progress_bar
from harness.errors import (
    EXIT_FINDINGS,
    ConfigError,
)


@click.command()
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
    from harness.dicom.files import iter_dicom_files

    for path in paths:
        if not Path(path).exists():
            raise ConfigError(f"{path}: no such file or folder")
    topology = chosen_topology(topology_path, quiet=True)
    node = reachable_node(topology, running_cluster(topology), node_name)
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
