"""A link made faulty on purpose: a TCP proxy on 127.0.0.1 between two nodes.

Why: failover, disaster recovery and migration claims only mean something when the faults
they survive are real. A link is routed through `FaultProxy` (latency, jitter, bandwidth,
dropped or reset connections, a cut, a blackhole, a half-open close), changed at run time
and, with `apply`, reverted by itself. Every fault is bounded in time.
"""

from __future__ import annotations

import math
import random
import socket
import struct
import threading
import time
from collections import deque
from typing import Any

from harness.config.faults import FAULT_PARAMS, LINK_FAULTS, MAX_FAULT_DURATION_S
from harness.config.wan import WAN_PRESETS
from harness.dicom.tcp import QUICKACK
from harness.errors import ConfigError, EnvironmentProblem

_CHUNK = 64 * 1024


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


