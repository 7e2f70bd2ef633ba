"""The fault schedule schema: a topology's `settings.faults`, checked before anything runs.

::

    settings:
      faults:
        - {at_s: 2, fault: kill, target: target, duration_s: 3}   # killed, started 3 s later
        - {at_s: 4, fault: cut, target: harness->target, duration_s: 2}
        - {at_s: 7, fault: latency, target: harness->target, duration_s: 5, latency_s: 0.05}

Node faults with a duration are undone at its end (kill/stop: started again; pause:
resumed); `restart` takes no duration. Link faults (and WAN presets, applied as a fault)
need a duration: every fault is bounded in time. Which node or link a target names is
checked when the schedule starts (`FaultSchedule.check_targets`).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator, Field, model_validator

from harness.config.errors import Checker, ConfigModel, fail, validate
from harness.config.numbers import Number
from harness.config.wan import WAN_PRESETS

NODE_FAULTS = ("kill", "stop", "pause", "restart")
LINK_FAULTS = ("cut", "blackhole", "half_open", "reset", "drop", "latency", "bandwidth")
MAX_FAULT_DURATION_S = 600.0  # every fault is bounded in time
MAX_SCHEDULE_AT_S = 3600.0
#: parameters of link faults: (low, high, low_open) of each
FAULT_PARAMS: dict[str, dict[str, tuple[float, float, bool]]] = {
    "drop": {"rate": (0.0, 1.0, False)},
    "latency": {"latency_s": (0.0, 60.0, False), "jitter_s": (0.0, 60.0, False)},
    "bandwidth": {"bps": (0.0, 1e11, True)},
}
FAULTS = (*NODE_FAULTS, *LINK_FAULTS, *WAN_PRESETS)


def _param(fault: str, name: str) -> Any:
    low, high, low_open = FAULT_PARAMS[fault][name]
    return Number(low, high, low_open=low_open) | None


AtSeconds = Number(0, MAX_SCHEDULE_AT_S)
Duration = Number(0, MAX_FAULT_DURATION_S, low_open=True) | None
DropRate = _param("drop", "rate")
LatencySeconds = _param("latency", "latency_s")
JitterSeconds = _param("latency", "jitter_s")
Bandwidth = _param("bandwidth", "bps")


def _fault_name(value: Any) -> str:
    if not isinstance(value, str) or value not in FAULTS:
        raise fail(f"unknown fault {value!r} (allowed: {', '.join(FAULTS)})")
    return value


def _target(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise fail("must name a node or a link")
    return value


class FaultSpec(ConfigModel):
    """One fault of the schedule: what, on which node or link, when, for how long."""

    shape: ClassVar[str] = "a mapping with at_s, fault, target"
    FIELDS: ClassVar[tuple[str, ...]] = ("at_s", "fault", "target", "duration_s")

    at_s: AtSeconds = Field(description="seconds after the start")
    fault: Annotated[str, BeforeValidator(_fault_name)] = Field(description=", ".join(FAULTS))
    target: Annotated[str, BeforeValidator(_target)] = Field(description="a node or a link")
    duration_s: Duration = None
    rate: DropRate = None
    latency_s: LatencySeconds = None
    jitter_s: JitterSeconds = None
    bps: Bandwidth = None

    @property
    def params(self) -> tuple[tuple[str, float], ...]:
        """The link fault's parameters that were given, by name."""
        given = ((name, getattr(self, name)) for name in FAULT_PARAMS.get(self.fault, {}))
        return tuple(sorted((name, value) for name, value in given if value is not None))

    @model_validator(mode="after")
    def _bounded(self) -> FaultSpec:
        if self.fault == "restart" and self.duration_s is not None:
            raise fail("restart takes no duration", "duration_s")
        # node kill/stop/pause without a duration last until the scenario ends
        if self.fault not in NODE_FAULTS and self.duration_s is None:
            raise fail(
                f"must be a number > 0 and <= {MAX_FAULT_DURATION_S:.0f} (every fault is "
                "bounded in time), got None",
                "duration_s",
            )
        allowed = FAULT_PARAMS.get(self.fault, {})
        for name in ("rate", "latency_s", "jitter_s", "bps"):
            if getattr(self, name) is not None and name not in allowed:
                names = ", ".join((*self.FIELDS, *allowed))
                raise fail(f"unknown field for {self.fault} (allowed: {names})", name)
        return self


def parse_faults(
    raw: Any, check: Checker, where: tuple = ("settings", "faults")
) -> tuple[FaultSpec, ...]:
    """The faults listed at `where` (None: no fault), sorted by time; the first mistake is
    one ConfigError naming the field (and the file and line when `check` has them)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise check.fail(where, "must be a list of {at_s, fault, target, duration_s}")
    faults = [validate(FaultSpec, item, check, (*where, index)) for index, item in enumerate(raw)]
    return tuple(sorted(faults, key=lambda fault: fault.at_s))
