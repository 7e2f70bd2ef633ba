"""Run a PACS server as a child process that cannot outlive the harness by accident.

Attached processes (pytest sessions, `run`) get PR_SET_PDEATHSIG=SIGKILL so that even a
SIGKILL of the harness takes them down; detached processes (`up`) are meant to outlive the
command and are found again by pid *and* start time, so a recycled pid is never killed.
Every process runs in its own session (process group): stopping it also stops any children
it forked (dcmqrscp forks one per association).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from harness.errors import EnvironmentProblem

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: ask the kernel to SIGKILL this child when the harness dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def process_start_time(pid: int) -> int | None:
    """Start time of a pid in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces: split after the closing parenthesis
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


@dataclass(frozen=True)
class ProcessHandle:
    """What is needed to find and stop a process again, also from another command."""

    pid: int
    start_time: int

    def alive(self) -> bool:
        if process_start_time(self.pid) != self.start_time:
            return False
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state != "Z"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after the timeout."""
        if not self.alive():
            self._reap()
            return
        self.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._reap()
            if not self.alive():
                break
            time.sleep(0.05)
        self.signal_group(signal.SIGKILL)
        self._reap()

    def signal_group(self, sig: int) -> None:
        """Signal the process group, unless the pid now belongs to another process."""
        # The process leads its own session, so its pgid is its pid; check that we
        # still talk to the same process before signalling its group.
        if process_start_time(self.pid) != self.start_time:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(self.pid, sig)

    def _reap(self) -> None:
        try:
            os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pass


def spawn(
    argv: list[str],
    *,
    log_path: Path,
    cwd: Path,
    env: dict[str, str] | None = None,
    detached: bool = False,
    user: str | None = None,
) -> tuple[subprocess.Popen, ProcessHandle]:
    """Start `argv` with stdout and stderr appended to `log_path`.

    Attached children die with the *thread* that spawned them (that is how the kernel's
    parent-death signal works): spawn long-lived nodes from a thread that lives as long as
    the harness (the main thread), never from a short-lived worker thread.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        try:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=user,
                preexec_fn=None if detached else die_with_parent,
            )
        except FileNotFoundError:
            raise EnvironmentProblem(f"cannot start {argv[0]}: program not found") from None
    start_time = process_start_time(proc.pid)
    if start_time is None:
        proc.wait()
        raise EnvironmentProblem(
            f"{argv[0]} exited at once (exit {proc.returncode}); log: {log_path}"
        )
    return proc, ProcessHandle(proc.pid, start_time)


def log_tail(log_path: Path, lines: int = 20) -> str:
    """Last lines of a log file, for error messages and reports."""
    try:
        data = log_path.read_bytes()[-64 * 1024 :]
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])
