"""TCP ports on loopback for the nodes the harness launches."""

from __future__ import annotations

import socket

from harness.errors import EnvironmentProblem


def free_port(host: str = "127.0.0.1", taken: set[int] | None = None) -> int:
    """A TCP port nobody listens on right now (and not in `taken`)."""
    taken = taken if taken is not None else set()
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port
    raise EnvironmentProblem(f"no free TCP port found on {host}")


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0
