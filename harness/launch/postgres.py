"""A throw-away PostgreSQL server for an Orthanc node with `index: postgresql`.

Hospitals run Orthanc on PostgreSQL, so the harness can too: Debian's PostgreSQL binaries,
a cluster initdb'd in the node's own directory, listening on a free loopback port, run as the
`postgres` user (initdb refuses root) and stopped with the node.
"""

from __future__ import annotations

import glob
import os
import pwd
import subprocess
import time
from pathlib import Path

from harness.errors import EnvironmentProblem
from harness.launch.process import ProcessHandle, log_tail, spawn

DATABASE = "orthanc"


def postgres_bin_dir() -> Path:
    """Debian's newest installed PostgreSQL bin directory."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name))
    if not dirs:
        raise EnvironmentProblem(
            "PostgreSQL not installed (install: apt-get install postgresql orthanc-postgresql)"
        )
    return Path(dirs[-1])


def _server_user() -> str | None:
    """Run as `postgres` when we are root (initdb refuses root), else as ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise EnvironmentProblem(
            "no 'postgres' user (install: apt-get install postgresql)"
        ) from None
    return "postgres"


class PostgresServer:
    """initdb + postgres in the foreground, so the harness owns the process."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.data_dir = directory / "data"
        self.log_path = directory / "postgres.log"
        self.handle: ProcessHandle | None = None
        self._popen = None

    def dsn(self) -> dict:
        return {
            "Host": "127.0.0.1",
            "Port": self.port,
            "Database": DATABASE,
            "Username": "postgres",
            "Password": "",
        }

    def start(self, *, detached: bool = False, timeout_s: float = 30.0) -> None:
        bindir = postgres_bin_dir()
        user = _server_user()
        self.directory.mkdir(parents=True, exist_ok=True)
        if user:
            info = pwd.getpwnam(user)
            os.chown(self.directory, info.pw_uid, info.pw_gid)
        if not (self.data_dir / "PG_VERSION").exists():
            proc = subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ],
                user=user,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise EnvironmentProblem(f"initdb failed: {proc.stderr.strip()[-500:]}")
        self._popen, self.handle = spawn(
            [
                str(bindir / "postgres"),
                "-D",
                str(self.data_dir),
                "-p",
                str(self.port),
                "-k",
                str(self.directory),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
            ],
            log_path=self.log_path,
            cwd=self.directory,
            detached=detached,
            user=user,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
            )
            if ready.returncode == 0:
                break
            if not self.handle.alive():
                raise EnvironmentProblem(
                    f"PostgreSQL exited during start-up; log:\n{log_tail(self.log_path)}"
                )
            time.sleep(0.2)
        else:
            raise EnvironmentProblem(f"PostgreSQL not ready after {timeout_s:.0f} s")
        psql = bindir / "psql" if (bindir / "psql").exists() else Path("/usr/bin/psql")
        exists = subprocess.run(
            [
                str(psql),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-tAc",
                f"SELECT 1 FROM pg_database WHERE datname='{DATABASE}'",
            ],
            capture_output=True,
            text=True,
        )
        if exists.stdout.strip() != "1":
            subprocess.run(
                [
                    str(bindir / "createdb"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                    DATABASE,
                ],
                check=True,
                capture_output=True,
            )

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.stop()
