"""`pacs-harness load` and the availability monitor against hostile peers on 127.0.0.1.

A raw socket in the test plays the peer (it is the peer, not a PACS under test), one thread
per connection, in four ways: it accepts the association then never answers (stall), it
drips a PDU one byte at a time (drip), it answers the A-ASSOCIATE-RQ with junk (junk), it
accepts TCP and never reads nor answers (silent). Whatever the peer does, the load ends
(duration plus a bounded grace), counts every operation as an error with its reason and
exits 3 (none succeeded) with one line on stderr; the monitor records failed samples with a
reason, keeps sampling, and stop() returns.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.config import parse_topology
from harness.migration.monitor import AvailabilityMonitor
from harness.nodes import make_node
from tests.helpers import run_cli
from tests.test_wire import pynetdicom_ac, recv_pdu

Script = Callable[[socket.socket, threading.Event], None]


def _read_until_closed(conn: socket.socket, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            if not conn.recv(65536):
                return
        except TimeoutError:
            continue


def stall(conn: socket.socket, stop: threading.Event) -> None:
    """Accept the association (PS3.8 9.3.3), then read everything and answer nothing."""
    conn.sendall(pynetdicom_ac(recv_pdu(conn) or b""))
    _read_until_closed(conn, stop)


def drip(conn: socket.socket, stop: threading.Event) -> None:
    """Accept the association, then announce a P-DATA-TF (PS3.8 9.3.5) and drip its body."""
    conn.sendall(pynetdicom_ac(recv_pdu(conn) or b""))
    conn.sendall(struct.pack(">BBI", 0x04, 0, 100_000))
    while not stop.wait(0.2):
        conn.sendall(b"\x00")


def junk(conn: socket.socket, stop: threading.Event) -> None:
    """Answer the A-ASSOCIATE-RQ with bytes that are no PDU, then keep the connection open."""
    recv_pdu(conn)
    conn.sendall(b"\x99\x42junk" + bytes(range(256)))
    _read_until_closed(conn, stop)


def silent(conn: socket.socket, stop: threading.Event) -> None:
    """Accept TCP and never read nor answer the A-ASSOCIATE-RQ."""
    stop.wait(300)


class HostilePeer:
    """A listener on 127.0.0.1 running `script` on every connection, each in its own thread."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.5)
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.connections = 0
        self.threads: list[threading.Thread] = []
        self.accepting = threading.Thread(target=self._accept, daemon=True)
        self.accepting.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(1)
            try:
                self.script(conn, self.stop)
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        self.accepting.join(60)
        for thread in self.threads:
            thread.join(60)


BEHAVIOURS = {"stall": stall, "drip": drip, "junk": junk, "silent": silent}


@pytest.fixture(params=sorted(BEHAVIOURS))
def peer(request) -> Iterator[HostilePeer]:
    hostile = HostilePeer(BEHAVIOURS[request.param])
    try:
        yield hostile
    finally:
        hostile.close()


def _topology(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "hostile.yaml"
    path.write_text(
        "name: hostile\nnodes:\n"
        f"  peer: {{kind: external, ae_title: PEER, host: 127.0.0.1, dicom_port: {port}}}\n"
    )
    return path


WORKLOAD = """\
name: hostile
duration_s: 2
warmup_s: 0
groups:
  - {name: echo, operation: c-echo, users: 2}
  - {name: find, operation: c-find, level: STUDY, users: 1}
  - {name: arrivals, operation: c-find, level: STUDY, rate: 2, max_in_flight: 4}
"""


def test_load_ends_counts_errors_and_exits_3(peer: HostilePeer, tmp_path: Path) -> None:
    workload = tmp_path / "w.yaml"
    workload.write_text(WORKLOAD)
    env = {**os.environ, "PACS_HARNESS_STATE_DIR": str(tmp_path / "state")}
    ran = run_cli("load", "--topology", str(_topology(tmp_path, peer.port)), "--node", "peer",
                  "--workload", str(workload), "--timeout", "2", "--json",
                  env=env, timeout=240)  # a hang fails here (TimeoutExpired)

    assert ran.returncode == 3, ran.stdout + ran.stderr  # docs: not one operation succeeded
    assert "Traceback" not in ran.stderr, ran.stderr
    problem = ran.stderr.strip().splitlines()
    assert len(problem) == 1 and "peer" in problem[0], ran.stderr
    results = json.loads(ran.stdout)
    assert peer.connections > 0  # the operations did reach the hostile peer
    for name, op in results["operations"].items():
        assert op["count"] > 0 and op["errors"] == op["count"], (name, op)
        assert sum(op["errors_by_status"].values()) == op["errors"], (name, op)
        assert all(reason.strip() for reason in op["errors_by_status"]), (name, op)
    assert results["totals"]["errors"] == results["totals"]["operations"] > 0


def _wait(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_monitor_records_failures_keeps_sampling_and_stops(peer: HostilePeer,
                                                           tmp_path: Path) -> None:
    topology = parse_topology(_topology(tmp_path, peer.port).read_text(), "hostile.yaml")
    node = make_node(topology.node("peer"), None)
    monitor = AvailabilityMonitor(node, None, ["1.2.826.0.1.3680043.9.7.1"], interval_s=0.1,
                                  timeout_s=1.0)
    monitor.start()
    try:
        _wait(lambda: len(monitor.samples) >= 3)  # the loop goes on past every failed probe
    finally:
        stopping = threading.Thread(target=monitor.stop, daemon=True)
        stopping.start()
        stopping.join(60)
    assert not stopping.is_alive(), "stop() did not return"
    samples = monitor.samples
    assert samples and all(not s.ok and s.error for s in samples), samples
    summary = monitor.summary()
    assert summary["probes"]["source"]["failed"] == len(samples)
    assert summary["inaccessible_share"]["source"] == 1.0
    assert "monitor_error" not in summary
