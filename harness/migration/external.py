"""Driver for the site's own migration tool: run it, bounded in time, with its output kept.

Why: the site usually migrates with its own tool; the harness then judges that tool's work
the same way it judges its reference migrator (``Migrator.verify`` checks the result study
by study without sending anything). The tool must never outlive the harness: on timeout or
Ctrl-C its whole process group is killed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.errors import ConfigError, EnvironmentProblem
from harness.nodes.base import Node

PLACEHOLDERS = (
    "source_ae",
    "source_host",
    "source_port",
    "target_ae",
    "target_host",
    "target_port",
)


@dataclass
class ExternalResult:
    """How the site's migration tool ended."""

    argv: list[str]
    exit_code: int | None  # None: killed (timeout or interrupt)
    timed_out: bool
    elapsed_s: float
    log_path: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["elapsed_s"] = round(self.elapsed_s, 3)
        data["ok"] = self.ok
        return data


class ExternalMigration:
    """Runs the site's own migration tool; the harness verifies its work afterwards.

    The command is split with shlex (no shell unless `shell=True`) and the placeholders
    {source_ae} {source_host} {source_port} {target_ae} {target_host} {target_port} are
    replaced in each word; the same values are in the environment as PACS_SOURCE_AE etc.
    Output goes to `log_path`. On timeout or Ctrl-C the whole process group is killed.
    """

    def __init__(
        self,
        command: str,
        source: Node,
        target: Node,
        *,
        env: dict[str, str] | None = None,
        timeout_s: float = 3600.0,
        log_path: str | os.PathLike[str] = "external-migration.log",
        shell: bool = False,
    ) -> None:
        if not command.strip():
            raise ConfigError("--external-command: empty command")
        self.command = command
        self.values = {
            "source_ae": source.ae_title,
            "source_host": source.host,
            "source_port": str(source.dicom_port),
            "target_ae": target.ae_title,
            "target_host": target.host,
            "target_port": str(target.dicom_port),
        }
        self.env = dict(env or {})
        self.timeout_s = timeout_s
        self.log_path = Path(log_path)
        self.shell = shell

    def _substitute(self, text: str, quote: bool) -> str:
        def value(match: re.Match[str]) -> str:
            raw = self.values[match.group(1)]
            return shlex.quote(raw) if quote else raw

        return re.sub(r"\{(" + "|".join(PLACEHOLDERS) + r")\}", value, text)

    def argv(self) -> list[str]:
        """The command as it will run, placeholders replaced."""
        if self.shell:
            return ["/bin/sh", "-c", self._substitute(self.command, quote=True)]
        try:
            words = shlex.split(self.command)
        except ValueError as exc:
            raise ConfigError(f"--external-command: {exc}") from None
        return [self._substitute(word, quote=False) for word in words]

    def run(self) -> ExternalResult:
        argv = self.argv()
        env = dict(os.environ)
        env.update({f"PACS_{k.upper()}": v for k, v in self.values.items()})
        env.update(self.env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"$ {shlex.join(argv)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            except FileNotFoundError:
                raise EnvironmentProblem(
                    f"--external-command: program not found: {argv[0]}"
                ) from None
            except PermissionError:
                raise EnvironmentProblem(f"--external-command: not executable: {argv[0]}") from None
            timed_out = False
            try:
                exit_code: int | None = proc.wait(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                exit_code = None
            except BaseException:  # Ctrl-C: the tool must not outlive the harness
                _kill_group(proc)
                raise
        return ExternalResult(
            argv, exit_code, timed_out, time.monotonic() - start, str(self.log_path)
        )


def _kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the tool's process group, then SIGKILL whatever of the group is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children that ignored SIGTERM, or the leader
    proc.wait()
