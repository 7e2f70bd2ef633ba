"""The `pacs-harness` command line: one module per command group (see app.COMMANDS)."""

from harness.cli.app import main

__all__ = ["main"]
