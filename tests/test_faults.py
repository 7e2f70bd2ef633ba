"""Every fault type has the effect it claims, measured: links through FaultProxy, nodes by
signals or the Docker API, and the schedule that runs them."""

from __future__ import annotations

import contextlib
import socket
import statistics
import threading
import time
from typing import Any

import pytest

from harness.cluster import Cluster
from harness.config import WAN_PRESETS, parse_topology
from harness.dicom.peer import DimseConnectionError
from harness.errors import ConfigError, EnvironmentProblem, NotDisposableError
from harness.launch.tools import find_binary
from harness.nodes import make_node
from harness.resilience import node_faults
from harness.resilience.proxy import FaultProxy
from harness.resilience.schedule import FaultSchedule
from tests.helpers import processes_mentioning


class _Server:
    """A loopback TCP server: echoes (mode echo) or swallows and counts (mode sink)."""

    def __init__(self, mode: str = "echo") -> None:
        self.mode = mode
        self.received = 0
        self.done_at: float | None = None
        self.expect = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                self.received += len(data)
                if self.expect and self.received >= self.expect and self.done_at is None:
                    self.done_at = time.monotonic()
                if self.mode == "echo":
                    conn.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.close()


@pytest.fixture
def echo():
    server = _Server("echo")
    yield server
    server.close()


@pytest.fixture
def proxy(echo):
    with FaultProxy(0, "127.0.0.1", echo.port, name="test") as link:
        yield link


def _connect(port: int, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def _round_trips(port: int, count: int = 8) -> list[float]:
    times = []
    with _connect(port) as sock:
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(b"ping")
            got = b""
            while len(got) < 4:
                got += sock.recv(4)
            times.append(time.perf_counter() - start)
    return times


# -- links ------------------------------------------------------------------------------


def test_proxy_forwards_unchanged(proxy):
    with _connect(proxy.port) as sock:
        sock.sendall(b"hello")
        assert sock.recv(5) == b"hello"
    assert len(_round_trips(proxy.port)) == 8  # many messages on one connection, each relayed


def test_latency_adds_the_delay_each_way(proxy):
    base = statistics.median(_round_trips(proxy.port))
    proxy.latency_s = 0.05
    slow = _round_trips(proxy.port)
    # one way 50 ms per direction: a round trip takes 100 ms more
    assert statistics.median(slow) - base >= 0.095, slow
    assert min(slow) >= 0.095


def test_jitter_varies_the_delay(proxy):
    proxy.latency_s, proxy.jitter_s = 0.04, 0.03
    rtts = _round_trips(proxy.port, count=15)
    assert statistics.pstdev(rtts) > 0.005, rtts
    assert min(rtts) >= 0.02, rtts  # at least (40 - 30) ms each way


def test_wan_preset_30ms(proxy):
    proxy.set_preset("wan-30ms-100mbit")
    assert WAN_PRESETS["wan-30ms-100mbit"]["bandwidth_bps"] == 100e6
    median = statistics.median(_round_trips(proxy.port))
    assert median >= 0.05, median  # 2 x 30 ms less the preset's jitter


def test_bandwidth_limits_throughput():
    sink = _Server("sink")
    with FaultProxy(0, "127.0.0.1", sink.port, name="bw") as link:
        link.bandwidth_bps = 8e6  # 1 MB/s
        payload = b"x" * 1_000_000
        sink.expect = len(payload)
        start = time.monotonic()
        with _connect(link.port) as sock:
            sock.sendall(payload)
            deadline = time.monotonic() + 60  # bounded wait for the last byte
            while sink.done_at is None and time.monotonic() < deadline:
                time.sleep(0.01)
        assert sink.done_at is not None, f"only {sink.received} bytes arrived"
        took = sink.done_at - start
        assert took >= 0.9, f"1 MB at 8 Mbit/s took {took:.2f} s"
    sink.close()


def _assert_reset(sock: socket.socket) -> None:
    """The connection is dead: a byte sent, then the read fails (reset or end of stream).
    The read waits for the reset to arrive (bounded generously), never a fixed sleep."""
    sock.settimeout(60)
    with pytest.raises((ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        sock.sendall(b"x")
        if sock.recv(1) == b"":
            raise ConnectionResetError("EOF")


def test_cut_refuses_then_heal_accepts(proxy):
    with _connect(proxy.port) as before:
        proxy.cut()
        _assert_reset(before)  # the open connection is reset too
    with pytest.raises(ConnectionRefusedError):
        _connect(proxy.port)
    proxy.heal()
    assert _round_trips(proxy.port, 1)


def test_cut_also_resets_a_connection_accepted_just_before_it(monkeypatch, echo):
    """A connection the proxy had accepted but not yet wired up when cut() came must not
    survive the cut (found as a CI flake: the echo came back through a cut link)."""
    plain_open = FaultProxy._open

    def slow_open(self, client):
        time.sleep(0.1)  # widen the window between accept and registration
        plain_open(self, client)

    monkeypatch.setattr(FaultProxy, "_open", slow_open)
    with FaultProxy(0, "127.0.0.1", echo.port, name="race") as link:
        with _connect(link.port) as before:
            deadline = time.monotonic() + 60  # the accept, awaited (bounded)
            while link.connections_total < 1 and time.monotonic() < deadline:
                time.sleep(0.001)
            assert link.connections_total == 1
            link.cut()
            _assert_reset(before)
    assert echo.received == 0


def test_blackhole_accepts_but_nothing_comes_back(proxy, echo):
    proxy.blackhole()
    with _connect(proxy.port, timeout=0.5) as sock:  # accepted
        sock.sendall(b"anyone?")
        with pytest.raises(TimeoutError):
            sock.recv(10)
    assert echo.received == 0
    proxy.heal()
    assert _round_trips(proxy.port, 1)


def test_reset_drops_an_open_connection(proxy):
    with _connect(proxy.port) as sock:
        sock.sendall(b"a")
        assert sock.recv(1) == b"a"
        proxy.reset()
        _assert_reset(sock)
    assert proxy.open_connections == 0


def test_drop_resets_new_connections(proxy):
    """The proxy accepts, then resets. The reset may already be there when connect() checks
    the socket (Python's connect with a timeout reads SO_ERROR after the handshake; on a busy
    machine the proxy's RST can arrive first): that is the same reset, seen earlier."""
    proxy.drop_rate = 1.0
    try:
        sock = _connect(proxy.port)
    except ConnectionResetError:
        pass
    else:
        with sock:
            _assert_reset(sock)
    deadline = time.monotonic() + 60  # the proxy counts the drop after its reset: await it
    while proxy.connections_dropped < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.connections_dropped == 1


def test_half_open_closes_one_direction(proxy, echo):
    with _connect(proxy.port) as sock:
        sock.sendall(b"1")
        assert sock.recv(1) == b"1"
        proxy.half_open()
        assert sock.recv(1) == b""  # server-to-client closed: EOF
        sock.sendall(b"still going")  # client-to-server still forwarded
        deadline = time.monotonic() + 60  # its arrival, awaited (bounded)
        while echo.received < 1 + len(b"still going") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert echo.received == 1 + len(b"still going")


def _wait_restored(proxy, before: dict) -> None:
    deadline = time.monotonic() + 120  # the fault's own undo timer: wait for it, bounded
    while proxy.snapshot() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.snapshot() == before


def test_apply_reverts_by_itself(proxy):
    before = proxy.snapshot()
    proxy.apply("cut", 3)
    with pytest.raises(ConnectionRefusedError):
        _connect(proxy.port)
    _wait_restored(proxy, before)
    assert _round_trips(proxy.port, 1)
    proxy.apply("latency", 3, latency_s=0.05)
    assert min(_round_trips(proxy.port, 2)) >= 0.09
    _wait_restored(proxy, before)
    assert len(_round_trips(proxy.port, 2)) == 2


def test_apply_refuses_unbounded_or_unknown(proxy):
    with pytest.raises(ConfigError, match="duration_s"):
        proxy.apply("cut", 0)
    with pytest.raises(ConfigError, match="duration_s"):
        proxy.apply("cut", 10_000)
    with pytest.raises(ConfigError, match="unknown fault"):
        proxy.apply("flood", 1)


# -- schedule -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"at_s": 1}, r"settings.faults: must be a list"),
        ([{"fault": "kill", "target": "a"}], r"settings\.faults\.0\.at_s: missing"),
        ([{"at_s": -1, "fault": "kill", "target": "a"}], r"settings\.faults\.0\.at_s: must be"),
        ([{"at_s": 1, "fault": "nuke", "target": "a"}],
         r"settings\.faults\.0\.fault: unknown fault"),
        ([{"at_s": 1, "fault": "cut", "target": "a"}], r"settings\.faults\.0\.duration_s"),
        ([{"at_s": 1, "fault": "restart", "target": "a", "duration_s": 2}], "no duration"),
        ([{"at_s": 1, "fault": "kill", "target": ""}], r"settings\.faults\.0\.target"),
    ],
)
def test_schedule_errors_name_the_field(raw, message):
    with pytest.raises(ConfigError, match=message):
        FaultSchedule.from_settings(raw)


def test_schedule_runs_and_records(proxy):
    """Each scheduled fault is on the link when its event is recorded, and the link is as it
    was once the schedule is done. Checked from the schedule's own event callback (right
    after the fault is applied, well inside its duration), never by sleeping."""
    # each check takes milliseconds; the windows are wide so a loaded machine's delays
    # (timer threads late by seconds) cannot push a check out of its fault
    schedule = FaultSchedule.from_settings(
        [
            {"at_s": 0.1, "fault": "cut", "target": "l", "duration_s": 5},
            {"at_s": 6, "fault": "latency", "target": "l", "duration_s": 5, "latency_s": 0.05},
        ]
    )
    with pytest.raises(ConfigError, match="needs a link"):
        schedule.check_targets({}, {})
    before = proxy.snapshot()
    seen: dict[str, Any] = {}

    def on_event(event: dict[str, Any]) -> None:
        seen[event["what"]] = proxy.snapshot()
        if event["what"] == "cut":
            try:
                _connect(proxy.port).close()
                seen["cut-connect"] = "connected"
            except ConnectionRefusedError:
                seen["cut-connect"] = "refused"
        elif event["what"] == "latency":
            # the cut's undo timer may run late: its end is awaited, not assumed
            deadline = time.monotonic() + 60
            while proxy.is_cut and time.monotonic() < deadline:
                time.sleep(0.01)
            seen["latency-round-trips"] = _round_trips(proxy.port, 2)
            seen["latency-after"] = proxy.snapshot()

    schedule.start({}, {"l": proxy}, on_event=on_event)
    schedule.join(240)
    assert not schedule.errors and "latency-after" in seen, (schedule.errors, seen)
    assert seen["cut"]["is_cut"] and seen["cut-connect"] == "refused"
    assert seen["latency"]["latency_s"] == seen["latency-after"]["latency_s"] == 0.05
    assert min(seen["latency-round-trips"]) >= 0.09  # 50 ms each way
    assert [(e["what"], e["target"], e["duration_s"]) for e in schedule.events] == [
        ("cut", "l", 5),
        ("latency", "l", 5),
    ]
    assert schedule.events[0]["t"] >= 0.1
    _wait_restored(proxy, before)  # every fault undone
    assert len(_round_trips(proxy.port, 2)) == 2  # and the link relays again


# -- nodes --------------------------------------------------------------------------------


def _echo_ok(node, timeout_s: float = 2.0) -> bool:
    try:
        return node.dimse(timeout_s=timeout_s).echo().status.ok
    except (DimseConnectionError, OSError):
        return False


def _exercise_node_faults(node) -> None:
    port = node.dicom_port
    assert _echo_ok(node)

    node_faults.pause(node)
    start = time.monotonic()
    assert not _echo_ok(node, timeout_s=2), "a paused node still answered"
    assert time.monotonic() - start >= 1.5  # it hung (connection accepted, no answer)
    node_faults.resume(node)
    node.wait_ready(120)

    node_faults.kill(node)
    assert not node.handle.alive()
    assert not _echo_ok(node)
    node_faults.start_again(node)
    assert node.dicom_port == port and _echo_ok(node)

    node_faults.stop(node)
    assert not node.handle.alive() and not _echo_ok(node)
    node_faults.start_again(node)
    assert _echo_ok(node)

    before = node.handle
    node_faults.restart(node)
    assert node.handle != before and node.dicom_port == port and _echo_ok(node)


@pytest.mark.parametrize("kind", ["embedded", "orthanc"])
def test_node_faults_on_process_nodes(kind, tmp_path):
    if kind == "orthanc" and not find_binary("Orthanc"):
        pytest.skip("Orthanc is not installed")
    topology = parse_topology(f"name: faults\nnodes:\n  victim: {{kind: {kind}}}\n")
    cluster = Cluster.launch(topology, root=tmp_path / "nodes")
    try:
        _exercise_node_faults(cluster["victim"])
    finally:
        cluster.stop()
    assert not processes_mentioning(str(tmp_path))


def test_node_faults_on_a_container_node(tmp_path):
    from harness.launch.docker import docker_client

    try:
        docker_client()
    except EnvironmentProblem as exc:
        pytest.skip(f"no Docker engine: {exc}")
    from harness.launch.images import build_image

    build_image("embedded")
    topology = parse_topology("name: faults\nnodes:\n  box: {kind: embedded, launch: docker}\n")
    cluster = Cluster.launch(topology, root=tmp_path / "nodes")
    try:
        node = cluster["box"]
        _exercise_node_faults(node)
        assert node.handle.alive()
    finally:
        cluster.stop()
    from harness.launch.docker import harness_containers

    assert not harness_containers(cluster.run_id)


def test_node_faults_refuse_a_non_disposable_node():
    topology = parse_topology(
        "name: ext\nnodes:\n  site: {kind: external, host: 127.0.0.1, dicom_port: 9}\n"
    )
    node = make_node(topology.nodes["site"], None)
    actions = (node_faults.kill, node_faults.stop, node_faults.pause, node_faults.resume,
               node_faults.restart)
    for action in actions:
        with pytest.raises(NotDisposableError, match="not declared 'disposable: true'"):
            action(node)
    schedule = FaultSchedule.from_settings([{"at_s": 0, "fault": "kill", "target": "site"}])
    with pytest.raises(NotDisposableError):
        schedule.start({"site": node}, {})


def test_schedule_kills_and_restarts_a_node(tmp_path):
    topology = parse_topology("name: sched\nnodes:\n  n1: {kind: embedded}\n")
    cluster = Cluster.launch(topology, root=tmp_path / "nodes")
    try:
        node = cluster["n1"]
        answered_while_killed: list[bool] = []
        schedule = FaultSchedule.from_settings(
            [{"at_s": 0.1, "fault": "kill", "target": "n1", "duration_s": 5.0}]
        ).start(
            {"n1": node}, {},
            # checked from the schedule's callback, right after the kill, not after a sleep
            on_event=lambda event: answered_while_killed.append(_echo_ok(node)),
        )
        schedule.join(240)
        assert answered_while_killed == [False]
        assert _echo_ok(node), (schedule.events, schedule.errors, node.log_tail())
        assert [e["what"] for e in schedule.events] == ["kill", "kill-end"]
        assert not schedule.errors
    finally:
        cluster.stop()
