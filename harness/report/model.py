"""report.json: the verdict of a run, its topology, and one entry per scenario.

Built from what the pytest plugin recorded per test (outcome, phase, scenario, duration,
metrics); no pytest here, so `report`, `gate` and the HTML page read the same model
whether the run just ended or a CI stage kept its directory.
"""

from __future__ import annotations

import time
from typing import Any

from harness.phases import PHASES


def scenario_outcome(tests: list[dict[str, Any]]) -> str:
    """error or failed if any test was; passed if any passed (skips are reasons, not
    failures: e.g. a method that does not apply); skipped only when nothing ran."""
    outcomes = {t["outcome"] for t in tests}
    for outcome in ("error", "failed", "passed"):
        if outcome in outcomes:
            return outcome
    return "skipped"



def build_report(
    results: dict[str, dict[str, Any]],
    metrics: dict[str, dict[str, Any]],
    *,
    started: str,
    phase: str | None,
    topology: dict[str, Any],
    exitstatus: int,
    environment_error: str | None = None,
) -> dict[str, Any]:
    """report.json: verdict, topology, and one entry per scenario with its tests and metrics.

    `results`: test id -> {scenario, phase, outcome, duration_s, ...}; `metrics`: test id ->
    what the test put in `pacs_metrics`."""
    from harness import __version__

    scenarios: dict[str, dict[str, Any]] = {}
    for nodeid, entry in results.items():
        scenario = scenarios.setdefault(
            entry["scenario"],
            {
                "name": entry["scenario"],
                "phase": entry["phase"],
                "outcome": "passed",
                "duration_s": 0.0,
                "metrics": {},
                "tests": [],
            },
        )
        scenario["tests"].append({**entry, "metrics": metrics.get(nodeid, {})})
        scenario["duration_s"] = round(scenario["duration_s"] + entry["duration_s"], 3)
        scenario["metrics"].update(metrics.get(nodeid, {}))
        scenario["outcome"] = scenario_outcome(scenario["tests"])
        if entry["phase"] and (
            scenario["phase"] is None
            or PHASES.index(entry["phase"]) > PHASES.index(scenario["phase"])
        ):
            scenario["phase"] = entry["phase"]
    ran = [e for e in results.values() if e["outcome"] != "skipped"]
    failed = [e for e in results.values() if e["outcome"] in ("failed", "error")]
    verdict = "pass" if ran and not failed and exitstatus == 0 else "fail"
    report: dict[str, Any] = {
        "verdict": verdict,
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "harness_version": __version__,
        "phase": phase,
        "topology": topology,
        "scenarios": list(scenarios.values()),
        "counts": {
            outcome: sum(1 for e in results.values() if e["outcome"] == outcome)
            for outcome in ("passed", "failed", "error", "skipped")
        },
    }
    if not ran:
        report["reason"] = "no scenario ran"
    if environment_error:
        report["environment_error"] = environment_error
    return report


