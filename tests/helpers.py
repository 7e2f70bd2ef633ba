"""Helpers for the harness's own tests: running the CLI, finding leftover processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from harness.launch.process import ProcessHandle

#: a pytest session started by a test, as a harness user runs one: without Hypothesis's
#: plugin, which imports and assertion-rewrites all of Hypothesis for its closing summary
#: (no bytecode cache under PYTHONDONTWRITEBYTECODE): tens of seconds on a loaded machine
CHILD_PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                "-p", "no:hypothesispytest"]


def run_cli(*args: str, timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
    """Run `pacs-harness ARGS` as a user would, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        capture_output=True, text=True, timeout=timeout, **kwargs,
    )


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live (non-zombie) processes whose command line contains `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            found.append(f"{proc.name}: {cmdline.strip()}")
    return found


def status_json(*args: str) -> list[dict]:
    proc = run_cli("status", "--json", *args)
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout)


def handle_alive(pid: int, start_time: int) -> bool:
    return ProcessHandle(pid, start_time).alive()
