"""Port reservations hold across processes: two processes picking ports at the same time never
get the same one, and a reservation dies with the process holding it.

The lock files are checked from outside through flock(2) by another process, and the ports by
binding them, not through the reservation code asking itself."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap

from harness.launch.ports import PortReservation, free_port, ports_dir, release_port

PORTS_EACH = 300  # with plain bind(0)-and-close, two processes share about 3 ports of 2 x 300


def _reserve_many(count: int, start, done, found) -> None:
    """Child process: wait for the start, reserve `count` ports, report them, hold them."""
    start.wait(60)
    found.put([free_port() for _ in range(count)])
    done.wait(300)


def test_two_processes_reserving_at_once_never_get_the_same_port():
    spawn = multiprocessing.get_context("spawn")
    start, done, found = spawn.Event(), spawn.Event(), spawn.Queue()
    children = [spawn.Process(target=_reserve_many, args=(PORTS_EACH, start, done, found))
                for _ in range(2)]
    for child in children:
        child.start()
    try:
        start.set()
        first, second = found.get(timeout=300), found.get(timeout=300)
    finally:
        done.set()
        for child in children:
            child.join(60)
    assert len(set(first)) == len(set(second)) == PORTS_EACH
    assert set(first).isdisjoint(second)


def _locked_by_someone(port: int) -> bool:
    """Whether another process holds the port's lock file (a flock of our own)."""
    fd = os.open(ports_dir() / f"{port}.lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_reservation_is_released_when_its_process_dies():
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys, time
            from harness.launch.ports import free_port
            print(free_port(), flush=True)
            time.sleep(300)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        port = int(holder.stdout.readline())
        assert _locked_by_someone(port)
        assert PortReservation.try_claim(port) is None
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    assert not _locked_by_someone(port)
    claimed = PortReservation.try_claim(port)
    assert claimed is not None
    claimed.release()


def test_a_reserved_port_is_free_to_bind_and_released_on_request():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # the reservation does not keep the port bound
    assert PortReservation.try_claim(port) is None  # held by this process's free_port
    release_port(port)
    claimed = PortReservation.try_claim(port)
    assert claimed is not None
    claimed.release()
