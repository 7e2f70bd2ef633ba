"""The command line starts at once: `--help` and each command module load no heavy library.

Why: `pacs-harness --help`, `status` and `down` are what a person types first and what CI
scripts call in loops; they should not pay for pydicom, numpy, faker or the Docker SDK that
only migration, load and generation need (harness/cli/app.py imports each command lazily).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.cli.app import COMMANDS
from synthetic_data import names

HEAVY = ("pydicom", "pynetdicom", "numpy", "faker", "requests", "docker", "yaml", "hdrh",
         "locust", "jinja2")


def _heavy_modules_after(code: str) -> list[str]:
    probe = (f"import sys\n{code}\n"
             f"print('loaded:', *(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True)
    return result.stdout.splitlines()[-1].split()[1:]


@pytest.mark.parametrize("module", sorted({target.split(":")[0] for target in COMMANDS.values()}))
def test_command_module_imports_no_heavy_library(module: str) -> None:
    assert _heavy_modules_after(f"import {module}") == []


def test_help_lists_every_command_without_heavy_imports() -> None:
    code = (
        "from harness.cli.app import cli\n"
        "try:\n    cli.main(['--help'], prog_name='pacs-harness')\n"
        "except SystemExit:\n    pass\n"
    )
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    for name in COMMANDS:
        assert f"  {name} " in probe.stdout, f"`{name}` missing from --help"
    assert _heavy_modules_after(code) == []


def test_every_command_resolves_and_has_help() -> None:
    import click

    from harness.cli.app import cli

    ctx = click.Context(cli)
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        assert command is not None and command.name == name
        assert command.get_short_help_str().strip(), f"`{name}` has no help text"


def test_choice_names_match_their_implementations() -> None:
    from synthetic_data.charsets import CHARSET_NAMES
    from synthetic_data.encodings import SYNTAXES

    assert tuple(SYNTAXES) == names.SYNTAX_NAMES
    assert CHARSET_NAMES == names.CHARSET_NAMES

