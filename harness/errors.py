"""Errors a user can act on, each mapped to one documented exit code.

Exit codes of every `pacs-harness` command:
    0  pass
    1  findings or a failed scenario
    2  usage or configuration error (bad topology, bad option, bad input file)
    3  environment error (missing binary, a node that does not start or answer)

Raise these with a one-line message that names the file, field or peer; the CLI prints
the message and exits with the code, never a traceback.
"""

from __future__ import annotations

EXIT_PASS = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3


class HarnessError(Exception):
    """Base class: a problem explained in one line, with an exit code."""

    exit_code = EXIT_FINDINGS


class ConfigError(HarnessError):
    """The user's input is wrong: a topology, an option, an input file (exit 2)."""

    exit_code = EXIT_USAGE


class EnvironmentProblem(HarnessError):
    """The machine or a node is not as needed: missing binary, dead node (exit 3)."""

    exit_code = EXIT_ENVIRONMENT


class NotDisposableError(ConfigError):
    """A destructive action was asked of a node not declared `disposable: true`."""


class NotWritableError(ConfigError):
    """Synthetic data would be stored into a node declared neither `writable: true` nor
    `disposable: true` (a site's own PACS is read-only to the harness)."""
