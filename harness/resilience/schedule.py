"""A fault schedule: node and link faults at given times of a scenario, on a timeline.

`FaultSchedule` runs the faults listed in a topology's `settings.faults` from a background
thread, undoes each after its duration, and records what happened when.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from harness.config.errors import Checker
from harness.config.faults import NODE_FAULTS, FaultSpec, parse_faults
from harness.errors import ConfigError
from harness.nodes.base import Node
from harness.resilience.node_faults import kill, pause, restart, resume, start_again, stop
from harness.resilience.proxy import FaultProxy

#: one fault of a schedule, as checked by the schema (harness/config/faults.py)
ScheduledFault = FaultSpec


# ---------------------------------------------------------------------------------------
# schedule


class FaultSchedule:
    """Faults at given times after `start()`, each bounded, recorded on a timeline.

    The faults come from a topology's `settings.faults` (schema and examples:
    harness/config/faults.py). Node faults with a duration are undone at its end
    (kill/stop: started again; pause: resumed).
    """

    def __init__(self, faults: list[FaultSpec]) -> None:
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
        """The schedule of a list of {at_s, fault, target, duration_s, params}, checked by
        the fault schema: ConfigError names the field (and, given the topology's `check`,
        the file and line). Every number is finite and in range, before any fault runs."""
        check = check or Checker(None, {})
        return cls(list(parse_faults(raw, check, tuple(where.split(".")))))

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
