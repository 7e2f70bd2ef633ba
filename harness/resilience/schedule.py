"""A fault schedule: node and link faults at given times of a scenario, on a timeline.

`FaultSchedule` runs the faults listed in a topology's `settings.faults` from a background
thread, undoes each after its duration, and records what happened when.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harness.config import WAN_PRESETS
from harness.errors import ConfigError
from harness.nodes.base import Node
from harness.resilience.node_faults import (
    NODE_FAULTS,
    kill,
    pause,
    restart,
    resume,
    start_again,
    stop,
)
from harness.resilience.proxy import (
    FAULT_PARAMS,
    LINK_FAULTS,
    MAX_FAULT_DURATION_S,
    FaultProxy,
    _is_number,
)

if TYPE_CHECKING:
    from harness.config import Checker

MAX_SCHEDULE_AT_S = 3600.0


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
