"""TCP ports on loopback for the nodes the harness launches, reserved across processes.

Binding port 0 and closing the socket only says the port was free a moment ago: two
processes (two pytest sessions, `pacs-harness up` beside a test run) can be handed the same
port before either node binds it. So a picked port is also reserved: an exclusive flock(2)
on `<ports dir>/<port>.lock`, which other processes see and skip. The kernel drops the lock
when the holder releases it or dies, so a killed run leaves no reservation behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import tempfile
import threading
from pathlib import Path

from harness.errors import EnvironmentProblem

PORTS_DIR_ENV = "PACS_HARNESS_PORTS_DIR"

_held: dict[int, PortReservation] = {}  # reservations free_port keeps for this process
_held_lock = threading.Lock()


def ports_dir() -> Path:
    """Where the lock files live: shared by every user's runs on this machine."""
    configured = os.environ.get(PORTS_DIR_ENV)
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "pacs-harness-ports"


def _open_lock_file(path: Path) -> int:
    """A read-only descriptor on the lock file, created if missing (never unlinked: removing
    a lock file while another process holds it would let a third one lock a new file)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags)  # another user's file in a sticky directory: no O_CREAT
    except FileNotFoundError:
        pass
    try:
        return os.open(path, flags | os.O_CREAT, 0o644)
    except FileExistsError:
        return os.open(path, flags)


class PortReservation:
    """An exclusive claim on one TCP port, held until `release()` or the process ends."""

    def __init__(self, port: int, fd: int) -> None:
        self.port = port
        self._fd: int | None = fd

    @classmethod
    def try_claim(cls, port: int) -> PortReservation | None:
        """Claim `port` now, or None when another holder (any process) has it."""
        directory = ports_dir()
        if not directory.is_dir():
            try:
                directory.mkdir(parents=True, exist_ok=True)
                directory.chmod(0o1777)  # every user's runs share it, like /tmp
            except OSError as exc:
                if not directory.is_dir():
                    raise EnvironmentProblem(
                        f"cannot create the port reservation directory {directory}: "
                        f"{exc.strerror} (set {PORTS_DIR_ENV} to a writable directory)"
                    ) from None
        try:
            fd = _open_lock_file(directory / f"{port}.lock")
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot open the port reservation {directory / f'{port}.lock'}: "
                f"{exc.strerror} (set {PORTS_DIR_ENV} to a writable directory)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise EnvironmentProblem(f"cannot lock port reservation {port}: {exc}") from None
        return cls(port, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> PortReservation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"PortReservation({self.port}, held={self.held})"


def reserve_port(host: str = "127.0.0.1", taken: set[int] | None = None) -> PortReservation:
    """A port nobody listens on right now, not in `taken`, and reserved for the caller."""
    taken = taken if taken is not None else set()
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
            if port in taken:
                continue
            reservation = PortReservation.try_claim(port)  # claimed while still bound here
        if reservation is not None:
            taken.add(port)
            return reservation
    raise EnvironmentProblem(f"no free TCP port found on {host}")


def free_port(host: str = "127.0.0.1", taken: set[int] | None = None) -> int:
    """A free port, reserved until `release_port(port)` or the end of this process."""
    reservation = reserve_port(host, taken)
    with _held_lock:
        _held[reservation.port] = reservation
    return reservation.port


def release_port(port: int) -> None:
    """Drop the reservation `free_port` made for `port` (once its node has stopped)."""
    with _held_lock:
        reservation = _held.pop(port, None)
    if reservation is not None:
        reservation.release()


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0
