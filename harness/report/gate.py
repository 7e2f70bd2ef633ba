"""Rollout-phase gates: is a finished run enough to enter phase P?

Why: CI pipelines gate each rollout phase on the same rule that the HTML report shows, so the
rule lives here once. A phase is ready iff every scenario whose phase is at or before it
passed and at least one of them ran. Scenarios without a phase marker run in every phase, so
they gate every phase.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.errors import ConfigError
from harness.phases import PHASES


@dataclass
class GateResult:
    """The decision and the reasons for it, in words a release manager can act on."""

    phase: str
    ready: bool
    reasons: list[str] = field(default_factory=list)
    scenarios: list[str] = field(default_factory=list)  # the scenarios that gate the phase

    def as_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "ready": self.ready,
            "reasons": self.reasons,
            "scenarios": self.scenarios,
        }


def _gates(scenario_phase: str | None, phase: str) -> bool:
    if scenario_phase is None or scenario_phase not in PHASES:
        return True
    return PHASES.index(scenario_phase) <= PHASES.index(phase)


def _first_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    for line in lines:  # pytest puts the assertion message on a line starting with 'E '
        if line.startswith("E "):
            return line[2:].strip()[:160]
    return (lines[-1] if lines else "")[:160]


def evaluate_gate(report: dict[str, Any], phase: str) -> GateResult:
    """Decide whether `report` (a parsed report.json) makes `phase` ready, and say why."""
    if phase not in PHASES:
        raise ConfigError(f"phase {phase!r}: unknown phase (allowed: {', '.join(PHASES)})")
    if not isinstance(report, dict) or not isinstance(report.get("scenarios"), list):
        raise ConfigError("report.json: not a pacs-harness report (no 'scenarios' list)")
    reasons: list[str] = []
    run_phase = report.get("phase")
    if run_phase in PHASES and PHASES.index(run_phase) < PHASES.index(phase):
        reasons.append(
            f"the run only covered phase {run_phase}: scenarios of later phases up to "
            f"{phase} did not run (run `pacs-harness run --phase {phase}`)"
        )
    if report.get("environment_error"):
        reasons.append(f"environment error: {report['environment_error']}")
    gating = [s for s in report["scenarios"] if _gates(s.get("phase"), phase)]
    names = [str(s.get("name")) for s in gating]
    ran = 0
    for scenario in gating:
        name = scenario.get("name")
        tests = scenario.get("tests") or []
        bad = [t for t in tests if t.get("outcome") in ("failed", "error")]
        if not tests and scenario.get("outcome") in ("failed", "error"):
            bad = [scenario]
        executed = [t for t in tests if t.get("outcome") != "skipped"]
        if executed or (not tests and scenario.get("outcome") == "passed"):
            ran += 1
        if bad:
            first = bad[0]
            detail = _first_line(first.get("message"))
            test_name = str(first.get("nodeid", "")).split("::")[-1]
            where = f" ({test_name}{': ' + detail if detail else ''})" if test_name else ""
            reasons.append(
                f"scenario {name} ({scenario.get('phase') or 'any phase'}) "
                f"{scenario.get('outcome', 'failed')}: {len(bad)} of {len(tests) or 1} "
                f"tests failed{where}"
            )
        elif tests and not executed:
            reasons.append(f"scenario {name} did not run: every test was skipped")
    if not gating:
        reasons.append(
            f"no scenario gates phase {phase} or an earlier phase in this run: "
            "nothing shows the phase is ready"
        )
    elif ran == 0 and not reasons:
        reasons.append(f"no scenario gating phase {phase} ran")
    if reasons:
        return GateResult(phase=phase, ready=False, reasons=reasons, scenarios=names)
    return GateResult(
        phase=phase,
        ready=True,
        reasons=[
            f"all {len(gating)} scenarios gating phase {phase} passed: {', '.join(names)}"
        ],
        scenarios=names,
    )
