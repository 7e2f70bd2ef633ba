"""Rollout-phase gates: is a finished run enough to enter phase P?

Why: CI pipelines gate each rollout phase on the same rule that the HTML report shows, so the
rule lives here once. A phase is ready iff every scenario whose phase is at or before it
passed and at least one of them ran. Scenarios without a phase marker run in every phase, so
they gate every phase. A run limited by `--phase` or `--scenario` shows nothing about the
phases after the last one its scenarios gate.

`run` records each phase's readiness and its exit decision in report.json; `check_report`
recomputes both (and the verdict) from the recorded test outcomes, for `report verify`.
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
    limited = _limited_by_scenario_filter(report, phase)
    if limited:
        reasons.append(limited)
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


def _limited_by_scenario_filter(report: dict[str, Any], phase: str) -> str | None:
    """A `--scenario` run says nothing about phases after the last one its scenarios gate."""
    chosen = report.get("scenario_filter") or []
    if not chosen:
        return None
    marked = [s.get("phase") for s in report["scenarios"] if s.get("phase") in PHASES]
    last = max(marked, key=PHASES.index) if marked else None
    if last is not None and PHASES.index(last) >= PHASES.index(phase):
        return None
    return (f"the run was limited to --scenario {', '.join(map(str, chosen))}"
            f"{f' (up to phase {last})' if last else ''}: the scenarios of later phases up "
            f"to {phase} did not run")


def headline_phase(report: dict[str, Any]) -> str:
    """The phase asked for, else the latest phase any scenario of the run gates: the phase
    index.html's headline and `run`'s exit decision are about."""
    if report.get("phase") in PHASES:
        return str(report["phase"])
    marked = [s.get("phase") for s in report.get("scenarios", []) if s.get("phase") in PHASES]
    return max(marked, key=PHASES.index) if marked else PHASES[-1]


def readiness(report: dict[str, Any]) -> list[GateResult]:
    """Every phase's gate on this run, planning to full."""
    return [evaluate_gate(report, phase) for phase in PHASES]


def recomputed_verdict(report: dict[str, Any]) -> str:
    """pass iff a test ran, none failed and pytest exited 0 (harness/report/model.py)."""
    tests = [t for s in report.get("scenarios", []) for t in s.get("tests") or []]
    ran = [t for t in tests if t.get("outcome") != "skipped"]
    failed = [t for t in tests if t.get("outcome") in ("failed", "error")]
    exit_ok = report.get("pytest_exit_code", 0) == 0
    return "pass" if ran and not failed and exit_ok else "fail"


def exit_decision(report: dict[str, Any], require_ready: str) -> dict[str, Any]:
    """`run`'s exit code from the verdict and, unless `require_ready` is "none", the
    readiness of that phase: 0 pass (and ready), 1 otherwise. A failed test always fails;
    3 for an environment error, 2 when nothing ran (exit codes: harness/errors.py)."""
    pytest_code = report.get("pytest_exit_code", 0)
    if report.get("environment_error") or pytest_code == 3:
        return {"code": 3, "require_ready": require_ready,
                "reason": f"environment error: {report.get('environment_error') or 'pytest'}"}
    if pytest_code in (4, 5) or report.get("reason") == "no scenario ran":
        return {"code": 2, "require_ready": require_ready,
                "reason": "no scenario ran (check --phase and --scenario)"}
    verdict = recomputed_verdict(report)
    if verdict != "pass":
        return {"code": 1, "require_ready": require_ready, "reason": "verdict fail"}
    if require_ready == "none":
        return {"code": 0, "require_ready": require_ready,
                "reason": "verdict pass; readiness not required (--require-ready none)"}
    gate = evaluate_gate(report, require_ready)
    state = "ready" if gate.ready else "NOT READY"
    return {"code": 0 if gate.ready else 1, "require_ready": require_ready,
            "reason": f"verdict pass; phase {require_ready} {state}"}


def check_report(report: dict[str, Any]) -> list[str]:
    """The verdict, each phase's readiness and the exit decision recorded by `run`,
    recomputed from the test outcomes: one line per disagreement (empty when consistent)."""
    if not isinstance(report.get("scenarios"), list):
        return ["not a pacs-harness report (no 'scenarios' list)"]
    problems = []
    verdict = recomputed_verdict(report)
    if report.get("verdict") != verdict:
        problems.append(f"verdict: {report.get('verdict')!r} but the test outcomes give "
                        f"{verdict!r}")
    recorded = {row.get("phase"): row for row in report.get("readiness") or []
                if isinstance(row, dict)}
    for gate in readiness(report) if recorded else []:
        row = recorded.get(gate.phase)
        if row is None or row.get("ready") != gate.ready:
            problems.append(f"readiness.{gate.phase}: recorded "
                            f"{'missing' if row is None else row.get('ready')!r}, "
                            f"recomputed {gate.ready!r} ({'; '.join(gate.reasons)})")
    decision = report.get("exit")
    if isinstance(decision, dict) and decision.get("require_ready") is not None:
        expected = exit_decision(report, str(decision["require_ready"]))
        if decision.get("code") != expected["code"]:
            problems.append(f"exit.code: recorded {decision.get('code')!r}, recomputed "
                            f"{expected['code']} ({expected['reason']})")
    return problems
