"""Where the commands write: results to stdout, progress and messages to stderr.

Soft wrap keeps long lines whole when the output is a file or a CI log.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def progress_bar(disable: bool = False) -> Progress:
    """The progress bar every long command shows (off with --json)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
    )
