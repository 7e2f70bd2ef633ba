"""The go-live readiness report: one self-contained index.html per run.

Why: the people who decide on a go-live read a page, not a pytest log. The page is built from
report.json and logs/ only, so it can be re-rendered after the run (`pacs-harness report`) and
opened offline: no JS library, no network, charts are inline SVG (harness/report/charts.py).
Anything that looks like a secret is redacted here; patient identities of a site's archive
were already replaced by tokens when the scenario recorded them (harness/report/identities.py).

The markup is in templates/*.html.j2, rendered by jinja2 with autoescaping, from blocks
(harness/report/blocks.py): each scenario gets a purpose-built section
(harness/report/sections.py) with human labels, its other metrics rendered by shape, and
its raw metrics as JSON behind a fold.
"""

from __future__ import annotations

import json
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from harness.errors import ConfigError
from harness.phases import PHASES
from harness.report.blocks import Cell, badge, raw_json, table
from harness.report.charts import fmt
from harness.report.gate import evaluate_gate, headline_phase
from harness.report.sections import PURPOSES, scenario_blocks

REDACTED = "[redacted]"
LOG_TAIL_LINES = 40
TEMPLATES = Path(__file__).parent / "templates"

# ---------------------------------------------------------------------------------------
# Redaction

_SECRET_WORDS = {
    "password", "passwd", "pwd", "secret", "secrets", "token", "tokens", "key", "apikey",
    "credential", "credentials", "passphrase", "authorization", "cookie",
}
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^\s:/@]+):([^\s@/]+)@")
_ASSIGNED_SECRET = re.compile(
    r"(?i)\b(password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|secret[_-]?key|"
    r"private[_-]?key|credentials?|passphrase)(\s*[\"']?\s*[:=]\s*[\"']?)([^\s\"',;&]+)"
)
_AUTH_HEADER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")


def _is_secret_key(name: str) -> bool:
    """A mapping key names a secret: password, api_key, authToken, credentials...

    Keys with spaces are human labels (SOP class names such as 'Key Object Selection
    Document Storage'), never configuration keys, so they are not taken for secrets.
    """
    if " " in name:
        return False
    words = re.findall(r"[a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower())
    return any(word in _SECRET_WORDS for word in words)


def redact_text(text: str) -> str:
    """Hide `user:pass@` in URLs, `password=...`-style assignments and auth headers."""
    text = _URL_USERINFO.sub(lambda m: f"{m.group(1)}{m.group(2)}:{REDACTED}@", text)
    text = _ASSIGNED_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    return _AUTH_HEADER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)


def redact(value: Any) -> Any:
    """A copy of a JSON-like value with secret-named keys' values and secret text replaced."""
    if isinstance(value, dict):
        return {
            key: (REDACTED if _is_secret_key(str(key)) else redact(item))
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return redact_text(value)
    return value




# ---------------------------------------------------------------------------------------
# The page


@cache
def _environment() -> jinja2.Environment:
    """Templates beside this module; every expression is HTML-escaped (autoescape)."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
    )


def _log_tails(report_dir: Path) -> dict[str, str]:
    logs = {}
    log_dir = report_dir / "logs"
    if log_dir.is_dir():
        for path in sorted(log_dir.glob("*.log")):
            try:
                lines = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            logs[path.stem] = redact_text("\n".join(lines[-LOG_TAIL_LINES:]))
    return logs


def reproduce_command(report: dict[str, Any]) -> str:
    """The `pacs-harness run` line that repeats this run (topology, phase, seed)."""
    if report.get("command"):
        return str(report["command"])
    argv = ["pacs-harness", "run"]
    source = (report.get("topology") or {}).get("source")
    if source and source != "<default>":
        argv += ["--topology", str(source)]
    if report.get("phase"):
        argv += ["--phase", str(report["phase"])]
    for name in report.get("scenario_filter") or []:
        argv += ["--scenario", str(name)]
    return shlex.join(argv)


def _seed(report: dict[str, Any]) -> str:
    if report.get("seed") is not None:
        return str(report["seed"])
    seeds = sorted({
        f"{s.get('name')}: {v}" for s in report.get("scenarios", [])
        for k, v in (s.get("metrics") or {}).items() if k == "seed" or k.endswith(".seed")
    })
    if seeds:
        return "; ".join(seeds)
    return "fixed seeds in the scenarios (synthetic data is the same on every run)"


def _ladder(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each rollout phase's gate on this run, in order."""
    steps = []
    for phase in PHASES:
        try:
            result = evaluate_gate(report, phase)
        except ConfigError:
            continue
        own = [str(s.get("name")) for s in report.get("scenarios", []) if s.get("phase") == phase]
        steps.append({"phase": phase, "ready": result.ready, "tip": "; ".join(result.reasons),
                      "own": ", ".join(own)})
    return steps


def _nodes_named(text: str, nodes: list[str]) -> list[str]:
    return [n for n in nodes if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text)]


def _first_line(text: str | None) -> str:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    errors = [line[2:].strip() for line in lines if line.startswith("E ")]
    return (errors[0] if errors else (lines[-1] if lines else ""))[:200]


def _scenario_view(scenario: dict[str, Any], logs: dict[str, str]) -> dict[str, Any]:
    name = str(scenario.get("name"))
    tests = scenario.get("tests") or []
    failing = [t for t in tests if t.get("outcome") in ("failed", "error")]
    named: list[str] = []
    if failing:
        said = " ".join(str(t.get("nodeid", "")) + str(t.get("message", "")) for t in failing)
        named = _nodes_named(said, list(logs)) or list(logs)
    title, purpose = PURPOSES.get(name, (name[:1].upper() + name[1:].replace("-", " "), ""))
    blocks, rest = scenario_blocks(scenario)
    return {
        "id": f"scenario-{name}", "name": name, "title": title, "purpose": purpose,
        "outcome": str(scenario.get("outcome")), "badge": badge(scenario.get("outcome")),
        "phase": scenario.get("phase") or "any", "test_count": len(tests),
        "duration": fmt(scenario.get("duration_s")),
        "failing": [{"nodeid": t.get("nodeid"), "badge": badge(t.get("outcome")),
                     "message": t.get("message")} for t in failing],
        "log_tails": [(node, logs[node]) for node in named],
        "blocks": blocks, "rest": rest,
        "raw": raw_json("raw metrics (JSON, as in report.json)", scenario.get("metrics") or {}),
        "tests": table(["Test", "Outcome", "Duration (s)", "Message"], [
            [str(t.get("nodeid", "")).split("::")[-1], badge(t.get("outcome")),
             t.get("duration_s"), _first_line(t.get("message"))] for t in tests]),
    }


def _overview(scenarios: list[dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for s in scenarios:
        tests = s.get("tests") or []
        failed = sum(1 for t in tests if t.get("outcome") in ("failed", "error"))
        rows.append([Cell(str(s.get("name")), href=f"#scenario-{s.get('name')}"),
                     s.get("phase") or "any", badge(s.get("outcome")),
                     f"{len(tests) - failed}/{len(tests)}", s.get("duration_s")])
    return table(["Scenario", "Phase", "Outcome", "Tests ok", "Duration (s)"], rows)


def _run_tables(report: dict[str, Any], report_dir: Path) -> dict[str, Any]:
    topology = report.get("topology") or {}
    nodes = [[n.get("name"), n.get("kind"), n.get("version"), n.get("ae_title"), n.get("host"),
              n.get("dicom_port"), n.get("http_port"), n.get("disposable")]
             for n in topology.get("nodes") or []]
    links = [{"href": rel, "text": text} for rel, text in (
        ("report.json", "report.json"), ("junit.xml", "JUnit XML"),
        ("sla-evidence.json", "SLA evidence"), ("allure-report/index.html", "Allure report"),
        ("allure-results", "Allure results")) if (report_dir / rel).exists()]
    facts = [
        ["harness version", report.get("harness_version")],
        ["topology", f"{topology.get('name', '?')} ({topology.get('source', '?')})"],
        ["phase asked", report.get("phase") or "all phases"],
        ["started", report.get("started")], ["finished", report.get("finished")],
        ["seed", _seed(report)],
    ]
    return {
        "command": reproduce_command(report), "links": links,
        "facts": table(["", ""], facts),
        "nodes": table(["Node", "Kind", "Version", "AE title", "Host", "DICOM port",
                        "HTTP port", "Disposable"], nodes),
    }


def render_html(report: dict[str, Any], logs: dict[str, str], report_dir: Path) -> str:
    """The whole page as a string (report and logs are redacted here, again, to be safe)."""
    report = redact(report)
    logs = {name: redact_text(text) for name, text in logs.items()}
    gate = evaluate_gate(report, headline_phase(report))
    scenarios = report.get("scenarios") or []
    ordered = sorted(scenarios, key=lambda s: (s.get("outcome") == "passed",
                                               PHASES.index(s["phase"])
                                               if s.get("phase") in PHASES else -1))
    counts = report.get("counts") or {}
    return _environment().get_template("page.html.j2").render(
        title=f"PACS go-live readiness: {gate.phase} — {'ready' if gate.ready else 'not ready'}",
        topology_name=(report.get("topology") or {}).get("name", "?"),
        finished=report.get("finished", ""), harness_version=report.get("harness_version", ""),
        gate=gate, ladder=_ladder(report), verdict=report.get("verdict", "?"),
        asked="phase asked" if report.get("phase") else "latest phase in this run",
        counts=", ".join(f"{fmt(v)} {k}" for k, v in counts.items()),
        environment_error=report.get("environment_error"), reason=report.get("reason"),
        overview=_overview(scenarios),
        scenarios=[_scenario_view(s, logs) for s in ordered],
        logs=logs, tail_lines=LOG_TAIL_LINES, **_run_tables(report, report_dir),
    )


def load_report(report_dir: Path) -> dict[str, Any]:
    """The parsed report.json of a run directory, or a one-line ConfigError (exit 2)."""
    source = Path(report_dir) / "report.json"
    if not source.is_file():
        raise ConfigError(f"{source}: no report.json (is {report_dir} a pacs-harness run?)")
    try:
        report = json.loads(source.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{source}: not readable JSON ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("scenarios"), list):
        raise ConfigError(f"{source}: not a pacs-harness report (no 'scenarios' list)")
    return report


def write_html_report(report_dir: Path) -> Path:
    """Read report_dir/report.json and logs/, write report_dir/index.html, return its path."""
    report_dir = Path(report_dir)
    report = load_report(report_dir)
    page = render_html(report, _log_tails(report_dir), report_dir)
    target = report_dir / "index.html"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(target)
    return target
