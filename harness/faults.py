"""Fault injection: a TCP fault proxy for links, signals and restarts for nodes, a schedule.

Why: failover, disaster recovery and migration claims only mean something when the faults
they survive are real. A link is made faulty by routing it through `FaultProxy` on
127.0.0.1 (latency, jitter, bandwidth, dropped or reset connections, a cut, a blackhole, a
half-open close), changed at run time and, with `apply`, reverted by itself. A node is made
faulty by signals on its process group or the Docker API (`kill`, `stop`, `pause`, `resume`,
`restart`), refused unless the node is disposable. `FaultSchedule` runs a list of faults
from the scenario settings in a background thread and records each on a timeline.
"""

from __future__ import annotations

import math
import queue
import random
import signal
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harness.dicom.tcp import QUICKACK
from harness.errors import ConfigError, EnvironmentProblem
from harness.launch.docker import ContainerHandle
from harness.launch.process import ProcessHandle
from harness.nodes.base import Node

if TYPE_CHECKING:
    from harness.config import Checker

MAX_FAULT_DURATION_S = 600.0  # every fault is bounded in time
MAX_SCHEDULE_AT_S = 3600.0
_CHUNK = 64 * 1024

#: settings of a link between facilities: one-way latency, jitter, bandwidth (bits/s)
WAN_PRESETS: dict[str, dict[str, float]] = {
    "lan": {"latency_s": 0.0005, "jitter_s": 0.0, "bandwidth_bps": 1e9},
    "wan-10ms-1gbit": {"latency_s": 0.010, "jitter_s": 0.001, "bandwidth_bps": 1e9},
    "wan-30ms-100mbit": {"latency_s": 0.030, "jitter_s": 0.003, "bandwidth_bps": 100e6},
    "wan-80ms-20mbit": {"latency_s": 0.080, "jitter_s": 0.010, "bandwidth_bps": 20e6},
    "satellite-600ms-5mbit": {"latency_s": 0.600, "jitter_s": 0.050, "bandwidth_bps": 5e6},
}
LINK_FAULTS = ("cut", "blackhole", "half_open", "reset", "drop", "latency", "bandwidth")
NODE_FAULTS = ("kill", "stop", "pause", "restart")


# ---------------------------------------------------------------------------------------
# link faults


class _Pacer:
    """A bandwidth limit shared by every connection in one direction of a link."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.next_free = 0.0

    def wait(self, nbytes: int, bps: float | None) -> None:
        if not bps:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + nbytes * 8 / bps
            done_at = self.next_free
        delay = done_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def _hard_close(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0) instead of FIN, as a crashed middlebox would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _Connection:
    """One client connection and its upstream; two directions, each a reader and a writer."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.closed = threading.Event()
        self.half_closed = False
        self.threads: list[threading.Thread] = []
        self._finished = 0
        self._finished_lock = threading.Lock()

    def start(self) -> None:
        for name, src, dst, pacer in (
            ("up", self.client, self.upstream, self.proxy._pacer_up),
            ("down", self.upstream, self.client, self.proxy._pacer_down),
        ):
            pending: deque[tuple[float, bytes]] = deque()
            ready = threading.Condition()
            reader = threading.Thread(
                target=self._read, args=(src, pending, ready, name), daemon=True
            )
            writer = threading.Thread(
                target=self._write, args=(dst, pending, ready, pacer, name), daemon=True
            )
            self.threads += [reader, writer]
        for thread in self.threads:
            thread.start()

    def _read(self, src: socket.socket, pending: deque, ready: threading.Condition, name: str):
        last_due = 0.0
        try:
            while not self.closed.is_set():
                data = src.recv(_CHUNK)
                if not data:
                    break
                if QUICKACK is not None:  # acknowledge at once: a proxy must not add stalls
                    src.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
                if self.proxy.blackholed or (name == "down" and self.half_closed):
                    continue  # swallowed: nothing goes through
                latency = self.proxy.latency_s
                jitter = self.proxy.jitter_s
                delay = latency + (random.uniform(-jitter, jitter) if jitter else 0.0)
                due = max(time.monotonic() + max(0.0, delay), last_due)  # keep order
                last_due = due
                with ready:
                    while len(pending) >= 64 and not self.closed.is_set():
                        ready.wait(0.2)  # back-pressure: at most 4 MiB queued per direction
                    pending.append((due, data))
                    ready.notify()
        except OSError:
            pass
        with ready:
            pending.append((0.0, b""))  # end of stream
            ready.notify()

    def _write(
        self,
        dst: socket.socket,
        pending: deque,
        ready: threading.Condition,
        pacer: _Pacer,
        name: str,
    ) -> None:
        try:
            while not self.closed.is_set():
                with ready:
                    while not pending and not self.closed.is_set():
                        ready.wait(0.2)
                    if not pending:
                        continue
                    due, data = pending.popleft()
                    ready.notify()
                if not data:
                    dst.shutdown(socket.SHUT_WR)  # pass the FIN on
                    self._direction_done()
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if self.proxy.blackholed or (name == "down" and self.half_closed):
                    continue
                pacer.wait(len(data), self.proxy.bandwidth_bps)
                dst.sendall(data)
        except OSError:
            self.close(hard=True)

    def _direction_done(self) -> None:
        with self._finished_lock:
            self._finished += 1
            both = self._finished == 2
        if both:
            self.close()

    def half_close(self) -> None:
        """Close the server-to-client direction: the client reads EOF, may still send."""
        self.half_closed = True
        try:
            self.client.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self, hard: bool = False) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.upstream):
            if hard:
                _hard_close(sock)
            else:
                try:
                    sock.close()
                except OSError:
                    pass
        self.proxy._forget(self)


class FaultProxy:
    """A TCP proxy on 127.0.0.1 whose faults are set at run time.

    Settings (attributes, changed any time): `latency_s` and `jitter_s` (one way, per
    direction), `bandwidth_bps` (bits per second per direction, shared by all connections),
    `drop_rate` (share of new connections closed with RST at once). Actions: `cut()` refuses
    new connections (the listening socket is closed), `blackhole()` accepts and forwards
    nothing, `half_open()` closes the server-to-client direction, `reset()` RSTs every open
    connection, `heal()` undoes all of them. `apply(fault, duration_s)` reverts by itself.
    """

    def __init__(
        self,
        listen_port: int = 0,
        target_host: str = "127.0.0.1",
        target_port: int = 0,
        *,
        name: str = "link",
        connect_timeout_s: float = 5.0,
    ) -> None:
        if not target_port:
            raise ConfigError(f"fault proxy {name}: target_port is required")
        self.name = name
        self.listen_host = "127.0.0.1"
        self.port = listen_port
        self.target = (target_host, target_port)
        self.connect_timeout_s = connect_timeout_s
        self.latency_s = 0.0
        self.jitter_s = 0.0
        self.bandwidth_bps: float | None = None
        self.drop_rate = 0.0
        self.blackholed = False
        self.half_opened = False
        self.is_cut = False
        self.connections_total = 0
        self.connections_dropped = 0
        self._lock = threading.Lock()
        self._conns: set[_Connection] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._timers: list[threading.Timer] = []
        self._stopped = threading.Event()
        self._pacer_up = _Pacer()
        self._pacer_down = _Pacer()

    def __repr__(self) -> str:
        host, port = self.target
        return f"<FaultProxy {self.name} 127.0.0.1:{self.port} -> {host}:{port}>"

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._stopped.clear()
        self._listen()
        return self

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop listening, cancel pending reverts, close every connection."""
        self._stopped.set()
        for timer in list(self._timers):
            timer.cancel()
        self._unlisten()
        for conn in list(self._conns):
            conn.close()

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.listen_host, self.port))
        except OSError as exc:
            sock.close()
            raise EnvironmentProblem(
                f"fault proxy {self.name}: cannot listen on 127.0.0.1:{self.port}: {exc}"
            ) from None
        sock.listen(64)
        sock.settimeout(0.2)
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(sock,), name=f"proxy-{self.name}", daemon=True
        )
        self._accept_thread.start()

    def _unlisten(self) -> None:
        sock, self._listener = self._listener, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # stops listening at once, wakes accept()
            except OSError:
                pass
            sock.close()
        if self._accept_thread is not None:
            self._accept_thread.join(2)
            self._accept_thread = None

    def _accept_loop(self, listener: socket.socket) -> None:
        while self._listener is listener and not self._stopped.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            self.connections_total += 1
            if self.drop_rate and random.random() < self.drop_rate:
                self.connections_dropped += 1
                _hard_close(client)
                continue
            threading.Thread(target=self._open, args=(client,), daemon=True).start()

    def _open(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=self.connect_timeout_s)
            upstream.settimeout(None)
        except OSError:
            _hard_close(client)  # the target is down: the client sees a reset
            return
        for sock in (client, upstream):  # relay pieces as they come (harness/dicom/tcp.py)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Connection(self, client, upstream)
        with self._lock:
            cut_meanwhile = self.is_cut  # cut() between accept and here: reset this one too
            if not cut_meanwhile:
                self._conns.add(conn)
        if cut_meanwhile:
            _hard_close(client)
            _hard_close(upstream)
            return
        if self.half_opened:
            conn.half_close()
        conn.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    # -- faults ----------------------------------------------------------------------
    def set_preset(self, preset: str) -> None:
        """Apply one of WAN_PRESETS (latency, jitter, bandwidth)."""
        try:
            values = WAN_PRESETS[preset]
        except KeyError:
            raise ConfigError(
                f"unknown link preset {preset!r} (allowed: {', '.join(WAN_PRESETS)})"
            ) from None
        self.latency_s = values["latency_s"]
        self.jitter_s = values["jitter_s"]
        self.bandwidth_bps = values["bandwidth_bps"]

    def cut(self) -> None:
        """Refuse new connections (ECONNREFUSED) and reset the open ones."""
        self.is_cut = True
        self._unlisten()
        self.reset()

    def blackhole(self) -> None:
        """Accept connections but forward nothing either way: peers wait until they time out."""
        self.blackholed = True

    def half_open(self) -> None:
        """Close the server-to-client direction of open and new connections."""
        self.half_opened = True
        for conn in list(self._conns):
            conn.half_close()

    def reset(self) -> None:
        """RST every open connection (both sides)."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.close(hard=True)

    def heal(self) -> None:
        """Undo every fault: no latency, no limit, no drop, listening and forwarding again."""
        self.latency_s = 0.0
        self.jitter_s = 0.0
        self.bandwidth_bps = None
        self.drop_rate = 0.0
        self.blackholed = False
        self.half_opened = False
        if self.is_cut and not self._stopped.is_set():
            self.is_cut = False
            self._listen()

    def snapshot(self) -> dict[str, Any]:
        return {
            "latency_s": self.latency_s,
            "jitter_s": self.jitter_s,
            "bandwidth_bps": self.bandwidth_bps,
            "drop_rate": self.drop_rate,
            "blackholed": self.blackholed,
            "half_opened": self.half_opened,
            "is_cut": self.is_cut,
        }

    def _restore(self, saved: dict[str, Any]) -> None:
        if self.is_cut and not saved["is_cut"] and not self._stopped.is_set():
            self.is_cut = False
            self._listen()
        for key in ("latency_s", "jitter_s", "bandwidth_bps", "drop_rate", "blackholed"):
            setattr(self, key, saved[key])
        self.half_opened = saved["half_opened"]

    def apply(self, fault: str, duration_s: float, **params: Any) -> threading.Timer:
        """Put a fault on the link for `duration_s`, then put the settings back as they were.

        fault: cut, blackhole, half_open, reset (instant), drop (params: rate=1.0),
        latency (params: latency_s, jitter_s), bandwidth (params: bps), or a WAN_PRESETS name.
        """
        _check_duration(duration_s, f"link {self.name}: {fault}")
        for key, value in params.items():
            low, high, low_open = FAULT_PARAMS.get(fault, {}).get(key, (0.0, 0.0, False))
            if not _is_number(value, low, high, low_open=low_open):
                raise ConfigError(
                    f"link {self.name}: {fault}: {key} must be a number in range "
                    f"(allowed: {', '.join(FAULT_PARAMS.get(fault, {})) or 'none'}), "
                    f"got {value!r}"
                )
        saved = self.snapshot()
        if fault == "cut":
            self.cut()
        elif fault == "blackhole":
            self.blackhole()
        elif fault == "half_open":
            self.half_open()
        elif fault == "reset":
            self.reset()
        elif fault == "drop":
            self.drop_rate = float(params.get("rate", 1.0))
        elif fault == "latency":
            self.latency_s = float(params.get("latency_s", 0.1))
            self.jitter_s = float(params.get("jitter_s", 0.0))
        elif fault == "bandwidth":
            self.bandwidth_bps = float(params.get("bps", 1e6))
        elif fault in WAN_PRESETS:
            self.set_preset(fault)
        else:
            raise ConfigError(
                f"link {self.name}: unknown fault {fault!r} "
                f"(allowed: {', '.join(LINK_FAULTS)} or a preset: {', '.join(WAN_PRESETS)})"
            )
        timer = threading.Timer(duration_s, self._restore, args=(saved,))
        timer.daemon = True
        self._timers.append(timer)
        timer.start()
        return timer


#: parameters of the link faults: (low, high, low excluded)
FAULT_PARAMS: dict[str, dict[str, tuple[float, float, bool]]] = {
    "drop": {"rate": (0.0, 1.0, False)},
    "latency": {"latency_s": (0.0, 60.0, False), "jitter_s": (0.0, 60.0, False)},
    "bandwidth": {"bps": (0.0, 1e11, True)},
}


def _is_number(value: Any, low: float, high: float, *, low_open: bool = False) -> bool:
    """A finite int or float (not a bool) in [low, high] (or (low, high])."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if not math.isfinite(value):
        return False
    return (value > low if low_open else value >= low) and value <= high


def _check_duration(duration_s: Any, what: str) -> None:
    if not _is_number(duration_s, 0, MAX_FAULT_DURATION_S, low_open=True):
        raise ConfigError(
            f"{what}: duration_s must be a number > 0 and <= {MAX_FAULT_DURATION_S:.0f} "
            f"(every fault is bounded in time), got {duration_s!r}"
        )


# ---------------------------------------------------------------------------------------
# node faults


def _process_signal(node: Node, sig: int) -> None:
    handle = node.handle
    if not isinstance(handle, ProcessHandle) or not handle.alive():
        raise EnvironmentProblem(f"node {node.name}: no running process to signal")
    handle.signal_group(sig)


def _container(node: Node):
    handle = node.handle
    assert isinstance(handle, ContainerHandle)
    container = handle._container()
    if container is None:
        raise EnvironmentProblem(f"node {node.name}: its container is gone")
    return container


def _require_launched(node: Node, action: str) -> None:
    node.require_disposable(action)
    if node.handle is None:
        raise ConfigError(f"node {node.name}: refusing to {action}: the harness did not launch it")


def kill(node: Node) -> None:
    """SIGKILL the node's process group (or `docker kill`): a crash, no clean shutdown."""
    _require_launched(node, "kill it")
    if isinstance(node.handle, ContainerHandle):
        _container(node).kill()
    else:
        _process_signal(node, signal.SIGKILL)
        if node._popen is not None:
            node._popen.wait(timeout=10)


def stop(node: Node) -> None:
    """Graceful stop (SIGTERM, then SIGKILL after the timeout); sidecars stop too."""
    _require_launched(node, "stop it")
    node.stop()


def pause(node: Node) -> None:
    """Freeze the node: SIGSTOP on its process group, `docker pause` for a container.

    The kernel still accepts TCP connections for a frozen process, so a health check that
    only connects sees it as up: a realistic and nasty fault.
    """
    _require_launched(node, "pause it")
    if isinstance(node.handle, ContainerHandle):
        _container(node).pause()
    else:
        _process_signal(node, signal.SIGSTOP)


def resume(node: Node) -> None:
    """Undo `pause`."""
    _require_launched(node, "resume it")
    if isinstance(node.handle, ContainerHandle):
        container = _container(node)
        if container.status == "paused":
            container.unpause()
    else:
        _process_signal(node, signal.SIGCONT)


_launcher_lock = threading.Lock()
_launcher_queue: queue.Queue = queue.Queue()
_launcher_thread: threading.Thread | None = None


def _launcher_loop() -> None:
    while True:
        future, fn, args = _launcher_queue.get()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            future.set_exception(exc)


def _from_long_lived_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn` in the main thread or in one thread that lives as long as the process.

    Why: launched processes get PR_SET_PDEATHSIG, which the kernel fires when the *thread*
    that forked them ends. A node started again from a short-lived fault thread would be
    killed the moment that thread finishes.
    """
    global _launcher_thread
    if threading.current_thread() is threading.main_thread():
        return fn(*args)
    with _launcher_lock:
        if _launcher_thread is None:
            _launcher_thread = threading.Thread(
                target=_launcher_loop, name="fault-launcher", daemon=True
            )
            _launcher_thread.start()
    future: Future = Future()
    _launcher_queue.put((future, fn, args))
    return future.result()


def _run_id_of(node: Node) -> str:
    if isinstance(node.handle, ContainerHandle):
        container = node.handle._container()
        if container is not None:
            from harness.launch.docker import LABEL_RUN

            return container.labels.get(LABEL_RUN, "harness")
    return "harness"


def start_again(node: Node, ready_timeout_s: float = 60.0) -> None:
    """Start a stopped or killed node on the same ports and data, and wait until it answers."""
    _require_launched(node, "start it again")
    run_id = _run_id_of(node)
    if isinstance(node.handle, ContainerHandle):
        node.handle.stop(timeout_s=5)  # a killed container still exists under its name
    elif node.handle is not None and node.handle.alive():
        raise EnvironmentProblem(f"node {node.name}: still running, stop or kill it first")
    for sidecar in node.sidecars.values():
        if sidecar is not None and sidecar.alive():
            sidecar.stop()  # start() starts the sidecars again
    _from_long_lived_thread(lambda: node.start(run_id=run_id))
    node.wait_ready(ready_timeout_s)


def restart(node: Node, ready_timeout_s: float = 60.0) -> None:
    """Graceful stop, then start on the same ports, then wait until it answers."""
    _require_launched(node, "restart it")
    run_id = _run_id_of(node)
    node.stop()
    _from_long_lived_thread(lambda: node.start(run_id=run_id))
    node.wait_ready(ready_timeout_s)


# ---------------------------------------------------------------------------------------
# schedule


@dataclass(frozen=True)
class ScheduledFault:
    at_s: float
    fault: str
    target: str
    duration_s: float | None = None
    params: tuple[tuple[str, Any], ...] = ()


class FaultSchedule:
    """Faults at given times after `start()`, each bounded, recorded on a timeline.

    Settings shape (a list)::

        faults:
          - {at_s: 2, fault: kill, target: target, duration_s: 3}   # killed, started 3 s later
          - {at_s: 4, fault: cut, target: harness->target, duration_s: 2}
          - {at_s: 7, fault: latency, target: harness->target, duration_s: 5, latency_s: 0.05}

    Node faults with a duration are undone at its end (kill/stop: started again; pause:
    resumed); `restart` takes no duration. Link faults need a duration.
    """

    FIELDS = ("at_s", "fault", "target", "duration_s")

    def __init__(self, faults: list[ScheduledFault]) -> None:
        self.faults = sorted(faults, key=lambda f: f.at_s)
        self.events: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._lock = threading.Lock()
        self._undo: list[threading.Thread] = []

    @classmethod
    def from_settings(
        cls, raw: Any, where: str = "settings.faults", check: Checker | None = None
    ) -> FaultSchedule:
        """Parse and check a list of {at_s, fault, target, duration_s, params}; ConfigError
        names the field (and, given the topology's `check`, the file and line). Every number
        is finite and in range here, before any fault runs."""

        def fail(index: int | None, key: str | None, message: str) -> ConfigError:
            if check is not None:
                path = tuple(where.split(".")) + tuple(p for p in (index, key) if p is not None)
                return check.fail(path, message)
            field = where if index is None else f"{where}[{index}]"
            return ConfigError(f"{field}.{key}: {message}" if key else f"{field}: {message}")

        if raw is None:
            return cls([])
        if not isinstance(raw, list):
            raise fail(None, None, "must be a list of {at_s, fault, target, duration_s}")
        faults = []
        allowed = (*NODE_FAULTS, *LINK_FAULTS, *WAN_PRESETS)
        for index, item in enumerate(raw):
            if not isinstance(item, dict):
                raise fail(index, None, "must be a mapping with at_s, fault, target")
            for key in ("at_s", "fault", "target"):
                if key not in item:
                    raise fail(index, key, "missing")
            at_s = item["at_s"]
            if not _is_number(at_s, 0, MAX_SCHEDULE_AT_S):
                raise fail(
                    index, "at_s",
                    f"must be a number of seconds 0-{MAX_SCHEDULE_AT_S:.0f}, got {at_s!r}",
                )
            fault = item["fault"]
            if not isinstance(fault, str) or fault not in allowed:
                raise fail(
                    index, "fault", f"unknown fault {fault!r} (allowed: {', '.join(allowed)})"
                )
            target = item["target"]
            if not isinstance(target, str) or not target:
                raise fail(index, "target", "must name a node or a link")
            duration = item.get("duration_s")
            if fault == "restart" and duration is not None:
                raise fail(index, "duration_s", "restart takes no duration")
            # node kill/stop/pause without a duration last until the scenario ends
            if (fault not in NODE_FAULTS or duration is not None) and not _is_number(
                duration, 0, MAX_FAULT_DURATION_S, low_open=True
            ):
                raise fail(
                    index, "duration_s",
                    f"must be a number > 0 and <= {MAX_FAULT_DURATION_S:.0f} "
                    f"(every fault is bounded in time), got {duration!r}",
                )
            allowed_params = FAULT_PARAMS.get(fault, {})
            for key, value in item.items():
                if key in cls.FIELDS:
                    continue
                if key not in allowed_params:
                    names = ", ".join((*cls.FIELDS, *allowed_params))
                    raise fail(index, key, f"unknown field for {fault} (allowed: {names})")
                low, high, low_open = allowed_params[key]
                if not _is_number(value, low, high, low_open=low_open):
                    relation = ">" if low_open else ">="
                    raise fail(
                        index, key, f"must be a number {relation} {low:g} and <= {high:g}, "
                        f"got {value!r}",
                    )
            params = tuple(sorted((k, v) for k, v in item.items() if k not in cls.FIELDS))
            faults.append(ScheduledFault(float(at_s), fault, target, duration, params))
        return cls(faults)

    def check_targets(self, nodes: dict[str, Node], links: dict[str, FaultProxy]) -> None:
        for index, item in enumerate(self.faults):
            if item.fault in NODE_FAULTS:
                if item.target not in nodes:
                    raise ConfigError(
                        f"faults[{index}].target: {item.fault} needs a node "
                        f"(known: {', '.join(nodes) or 'none'}), got {item.target!r}"
                    )
                nodes[item.target].require_disposable(f"{item.fault} it")
            elif item.target not in links:
                raise ConfigError(
                    f"faults[{index}].target: {item.fault} needs a link "
                    f"(known: {', '.join(links) or 'none'}), got {item.target!r}"
                )

    def start(
        self,
        nodes: dict[str, Node],
        links: dict[str, FaultProxy],
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> FaultSchedule:
        """Check the targets, then run the faults in a background thread."""
        self.check_targets(nodes, links)
        self._t0 = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(nodes, links, on_event), name="fault-schedule", daemon=True
        )
        self._thread.start()
        return self

    @property
    def t0(self) -> float:
        return self._t0

    def _record(self, what: str, target: str, duration_s: float | None, **extra: Any) -> None:
        event = {
            "t": round(time.monotonic() - self._t0, 3),
            "what": what,
            "target": target,
            "duration_s": duration_s,
            **extra,
        }
        with self._lock:
            self.events.append(event)

    def _run(self, nodes, links, on_event) -> None:
        for item in self.faults:
            if self._stop.wait(max(0.0, self._t0 + item.at_s - time.monotonic())):
                return
            try:
                self._fire(item, nodes, links)
            except Exception as exc:  # noqa: BLE001 - record and go on with the schedule
                self.errors.append(f"{item.fault} {item.target}: {exc}")
                self._record(item.fault, item.target, item.duration_s, error=str(exc))
            if on_event and self.events:
                on_event(self.events[-1])

    def _fire(self, item: ScheduledFault, nodes, links) -> None:
        params = dict(item.params)
        if item.fault in NODE_FAULTS:
            node = nodes[item.target]
            action = {"kill": kill, "stop": stop, "pause": pause, "restart": restart}[item.fault]
            self._record(item.fault, item.target, item.duration_s)
            action(node)
            if item.duration_s is not None and item.fault != "restart":
                undo = resume if item.fault == "pause" else start_again
                thread = threading.Thread(
                    target=self._undo_later, args=(item, node, undo), daemon=True
                )
                self._undo.append(thread)
                thread.start()
        else:
            self._record(item.fault, item.target, item.duration_s, **params)
            links[item.target].apply(item.fault, item.duration_s, **params)

    def _undo_later(self, item: ScheduledFault, node: Node, undo) -> None:
        # the undo always runs, even when the schedule is stopped: nothing stays broken
        self._stop.wait(item.duration_s)
        try:
            undo(node)
            self._record(f"{item.fault}-end", item.target, None)
        except Exception as exc:  # noqa: BLE001
            self.errors.append(f"undo {item.fault} {item.target}: {exc}")

    def stop(self, timeout_s: float = 90.0) -> None:
        """Fire no more faults; wait for pending undos (node restarts) to finish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        for thread in self._undo:
            thread.join(timeout_s)

    def join(self, timeout_s: float = 600.0) -> None:
        """Wait until every fault has fired and every undo has run."""
        if self._thread is not None:
            self._thread.join(timeout_s)
        for thread in list(self._undo):
            thread.join(timeout_s)
