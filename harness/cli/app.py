"""The `pacs-harness` command group: each command's module is imported only when it runs.

Why lazy: `pacs-harness --help` and light commands (`status`, `down`) should start at once;
the migration, load and generation commands pull in pydicom, numpy, faker and requests.
`--help` loads only the command modules (each imports its heavy dependencies inside the
command function), never what the commands use.

Exit codes (every command): 0 pass, 1 findings or failure, 2 usage or configuration error,
3 environment error (missing binary, a node that does not start or answer).
"""

from __future__ import annotations

import importlib
import sys

import click

from harness import __version__
from harness.console import console
from harness.errors import EXIT_PASS, EXIT_USAGE, HarnessError

#: command name -> "module:attribute", in the order `--help` lists them
COMMANDS: dict[str, str] = {
    "up": "harness.cli.nodes:up",
    "status": "harness.cli.nodes:status",
    "down": "harness.cli.nodes:down",
    "store": "harness.cli.store:store",
    "generate": "synthetic_data.cli:generate_command",
    "run": "harness.cli.run:run",
    "migrate": "harness.cli.migrate:migrate_command",
    "inventory": "harness.cli.verify:inventory_command",
    "verify": "harness.cli.verify:verify_command",
    "merge-ledgers": "harness.cli.verify:merge_ledgers_command",
    "reconcile": "harness.cli.verify:reconcile_command",
    "conformance": "harness.cli.conformance:conformance_command",
    "report": "harness.cli.report:report_command",
    "gate": "harness.cli.report:gate_command",
    "load": "harness.cli.load:load_command",
    "sla": "harness.cli.load:sla_command",
    "images": "harness.cli.images:images",
    "keygen": "harness.cli.signing:keygen",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported by name when first needed."""

    def __init__(self, *args, lazy_commands: dict[str, str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*self.lazy_commands, *super().list_commands(ctx)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy_commands:
            return super().get_command(ctx, name)
        module_name, attribute = self.lazy_commands[name].split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if command.name != name:  # e.g. a command function named `up`, `images`
            command.name = name
        return command


@click.group(
    cls=LazyGroup,
    lazy_commands=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="pacs-harness")
def cli() -> None:
    """Validation harness for PACS integration and migration.

    Start PACS nodes from a topology file (or a default one), fill them with synthetic
    studies, and run the scenario suites that gate each rollout phase.

    Exit codes: 0 pass, 1 findings/fail, 2 usage or configuration error, 3 environment error.
    """


def run_command(
    command: click.Command,
    argv: list[str] | None,
    prog_name: str,
    interrupted: str = "interrupted",
) -> None:
    """Run a click command with the harness's exit codes; HarnessErrors become one line."""
    try:
        command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except (click.exceptions.Abort, KeyboardInterrupt):
        console.print(interrupted)
        sys.exit(130)
    except HarnessError as exc:
        # plain text: one line a script can grep, never wrapped or coloured
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    sys.exit(EXIT_PASS)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `pacs-harness`."""
    run_command(cli, argv, "pacs-harness")
