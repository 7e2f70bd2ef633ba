"""A throw-away MariaDB server for a node kind that keeps its index there (CTN).

Like harness/launch/postgres.py: Debian's binaries, a data directory made by
mariadb-install-db in the node's own directory, the server in the foreground so the harness
owns (and stops) it. It opens no TCP port at all (`--skip-networking`): clients reach it
through a Unix socket under /tmp, named after the node's directory (a socket path is at
most 107 bytes, a pytest directory can be longer), so another command (`down`) finds it.
The server ignores every my.cnf (`--no-defaults`) and never touches the Debian service.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from harness.errors import EnvironmentProblem
from harness.launch.process import ProcessHandle, log_tail, spawn
from harness.launch.tools import find_binary, require_binary

INSTALL_HINT = "apt-get install mariadb-server-core mariadb-client-core"
SQL_TIMEOUT_S = 120.0
SOCKET_PREFIX = "pacs-harness-mariadb-"


def mariadbd_binary() -> str:
    """The server program, or an EnvironmentProblem (exit 3) saying what to install."""
    return require_binary("mariadbd", INSTALL_HINT)


def client_binary() -> str:
    return require_binary("mariadb", INSTALL_HINT)


def _install_db_script() -> str:
    """mariadb-install-db is a shell script (find_binary looks for compiled programs)."""
    found = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"
    if not os.access(found, os.X_OK):
        raise EnvironmentProblem(f"mariadb-install-db not found (install: {INSTALL_HINT})")
    return found


def socket_directory(directory: Path) -> Path:
    """A short directory for the server's socket, the same for the same node directory."""
    digest = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
    return Path("/tmp") / f"{SOCKET_PREFIX}{digest}"


def sweep_stale_socket_dirs() -> list[Path]:
    """Remove socket directories whose server is gone (a killed run's MariaDB died with
    it and no one removed the directory): a socket that refuses a connection."""
    removed = []
    for directory in Path("/tmp").glob(f"{SOCKET_PREFIX}*"):
        path = directory / "mariadb.sock"
        if not path.exists():
            continue  # a server starting up, or nothing to judge by
        with socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(str(path))
                continue
            except OSError:
                pass
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(directory)
    return removed


def installed() -> bool:
    return bool(find_binary("mariadbd") and find_binary("mariadb"))


class MariadbServer:
    """mariadb-install-db + mariadbd on a private socket; `sql` runs statements as root."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data_dir = directory / "data"
        self.log_path = directory / "mariadb.log"
        self.socket = socket_directory(directory) / "mariadb.sock"
        self.handle: ProcessHandle | None = None
        self.popen: subprocess.Popen | None = None

    def _user_options(self) -> list[str]:
        # mariadbd refuses to run as root unless told so; otherwise it runs as the caller
        return ["--user=root"] if os.geteuid() == 0 else []

    def start(self, *, detached: bool = False, timeout_s: float = 60.0) -> None:
        """Initialise the data directory once, start the server, wait until it answers."""
        server = mariadbd_binary()
        client_binary()  # missing: say so before anything starts
        self.directory.mkdir(parents=True, exist_ok=True)
        if not (self.data_dir / "mysql").is_dir():
            self._install_db()
        sweep_stale_socket_dirs()
        self.socket.parent.mkdir(mode=0o700, exist_ok=True)
        self.popen, self.handle = spawn(
            [
                server,
                "--no-defaults",
                *self._user_options(),
                f"--datadir={self.data_dir}",
                f"--socket={self.socket}",
                "--skip-networking",
                f"--pid-file={self.directory / 'mariadbd.pid'}",
                "--innodb-buffer-pool-size=16M",
                "--skip-log-bin",
                "--skip-name-resolve",
            ],
            log_path=self.log_path,
            cwd=self.directory,
            detached=detached,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.handle.alive():
                raise EnvironmentProblem(
                    f"MariaDB exited during start-up; log {self.log_path}:\n"
                    f"{log_tail(self.log_path)}"
                )
            if self.socket.exists() and self._ping():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise EnvironmentProblem(
                    f"MariaDB not ready on {self.socket} after {timeout_s:.0f} s; log:\n"
                    f"{log_tail(self.log_path)}"
                )
            time.sleep(0.1)

    def _install_db(self) -> None:
        proc = subprocess.run(
            [
                _install_db_script(),
                "--no-defaults",
                *self._user_options(),
                f"--datadir={self.data_dir}",
                "--auth-root-authentication-method=normal",  # root without password, socket only
                "--skip-test-db",
            ],
            capture_output=True,
            text=True,
            timeout=SQL_TIMEOUT_S,
        )
        if proc.returncode != 0:
            output = (proc.stderr or proc.stdout).strip()[-500:]
            raise EnvironmentProblem(f"mariadb-install-db failed in {self.data_dir}: {output}")

    def _ping(self) -> bool:
        try:
            self.sql("SELECT 1")
        except EnvironmentProblem:
            return False
        return True

    def sql(self, statements: str, database: str | None = None) -> str:
        """Run SQL as root over the socket; the tab-separated rows, without header."""
        argv = [client_binary(), "--no-defaults", f"--socket={self.socket}", "-uroot",
                "--batch", "--skip-column-names"]
        if database:
            argv.append(database)
        try:
            proc = subprocess.run(argv, input=statements, capture_output=True, text=True,
                                  timeout=SQL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise EnvironmentProblem(
                f"MariaDB on {self.socket}: no answer within {SQL_TIMEOUT_S:.0f} s"
            ) from None
        if proc.returncode != 0:
            raise EnvironmentProblem(f"MariaDB on {self.socket}: {proc.stderr.strip()[-500:]}")
        return proc.stdout

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), SIGKILL after the handle's grace period."""
        if self.handle is not None:
            self.handle.stop(timeout_s=30)
        if self.popen is not None:
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.socket.parent, ignore_errors=True)

    def remove(self) -> None:
        """Stop and delete everything: data directory, log and socket directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
