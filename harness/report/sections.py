"""One purpose-built section per scenario: the figures a go-live decision needs, labelled.

Each builder reads the metrics its scenario records (scenarios/test_*.py) and returns blocks
(harness.report.blocks) and the metric keys it consumed; what it does not know is rendered
by shape afterwards, and the whole metric dict stays available as JSON behind a fold.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from harness.report.blocks import (
    availability_blocks,
    badge,
    card,
    cards,
    chart,
    events_of,
    events_table,
    fold,
    heading,
    label,
    percent,
    table,
    text,
)
from harness.report.charts import bar_chart, fmt, line_chart, num, status_strip
from harness.report.compat import connectivity, ingest
from harness.report.compliance import compliance
from harness.report.generic import metric_blocks
from harness.report.interop import KEY as CONFORMANCE_KEY
from harness.report.interop import interop_section, is_conformance
from harness.report.workflow import workflow

Built = tuple[list[Any], set[str]]

#: scenario name -> (title, what it proves)
PURPOSES = {
    "assessment": ("Assessment", "What every archive holds, counted twice (query service and "
                   "an independent count), and the identity decisions to take before moving."),
    "connectivity": ("Connectivity", "Every node answers C-ECHO, accepts, finds and returns "
                     "an instance; nodes move studies to each other."),
    "ingest": ("Ingest", "What each node does with every modality, character set and "
                         "transfer syntax: kept, coerced, altered, rejected or lost."),
    "migration": ("Migration", "Studies copied from source to target while both stay "
                  "available, then the target reconciled against the source at full depth."),
    "migration-under-faults": ("Migration under faults", "The migration resumes through "
                               "killed nodes and cut or slow links: nothing lost, no duplicate."),
    "failover": ("Failover", "The primary of the HA pair is killed mid-stream: how long until "
                 "service returns (RTO), what acknowledged data is missing (RPO)."),
    "disaster-recovery": ("Disaster recovery", "Back up a node, destroy it, restore it: every "
                          "instance back with the same pixels, within the restore time."),
    "performance": ("Performance", "The contract's SLA clauses measured under a realistic "
                    "workload."),
    "security": ("Security and compliance", "Encryption in transit, access control, REST "
                 "authentication, audit trails and patient data, checked on every node: the "
                 "infrastructure phase is not ready while any check fails."),
    "conformance": ("Interoperability", "The same conformance probes against every node, "
                    "side by side, and the migration risks each source/target pair runs, "
                    "with their remedies."),
    "workflow": ("Scheduled workflow", "Orders -> worklist -> MPPS -> stored -> committed -> "
                 "reported: every order performed once, as ordered, MPPS listing what was "
                 "stored; patient updates and merges applied and verified."),
}
FINDING_PREFIX_MISSING = "missing_"
ALTERED_TYPES = ("altered_attributes", "altered_pixels", "recompressed_lossy")
LEVELS = ("patients", "studies", "series", "instances")


def _slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", value).strip("-") or "x"


def _limit_state(value: Any, limit: Any) -> str:
    if num(limit) is None:
        return ""
    return "bad" if num(value) is None or num(value) > num(limit) else "good"


# ---------------------------------------------------------------------------------------
# Migration


def identity_blocks(identity: Any) -> list[Any]:
    """Colliding patient IDs and likely duplicates (values already tokenised for a site)."""
    if not isinstance(identity, dict):
        return []
    collisions = identity.get("collisions") or []
    duplicates = identity.get("likely_duplicates") or []
    unresolved = identity.get("unresolved_collisions", 0)
    blocks: list[Any] = [heading("Patient identities"), cards([
        card("Patient IDs shared by different people", len(collisions)),
        card("Unresolved ID collisions", unresolved, state="bad" if unresolved else "good"),
        card("Likely duplicates to review", len(duplicates))])]
    rows = [[c.get("patient_id"), r.get("issuer"), r.get("name"), r.get("birth_date"),
             r.get("sex"), c.get("resolved_by_rules")]
            for c in collisions for r in c.get("records") or []]
    if rows:
        blocks.append(table(["Patient ID", "Issuer", "Name", "Birth date", "Sex",
                             "Resolved by rules"], rows))
    rows = [[d.get("family_name"), d.get("birth_year"), r.get("patient_id"), r.get("issuer"),
             r.get("name"), r.get("birth_date")]
            for d in duplicates for r in d.get("records") or []]
    if rows:
        blocks.append(fold(f"likely duplicates ({len(duplicates)})", [table(
            ["Family name", "Birth year", "Patient ID", "Issuer", "Name", "Birth date"], rows)]))
    return blocks


def _migration_run(key: str, run: dict[str, Any]) -> list[Any]:
    result = run.get("migration") or {}
    counts = run.get("counts") or {}
    source, target = counts.get("source") or {}, counts.get("target") or {}
    by_type = run.get("findings_by_type") or {}
    missing = sum(n for t, n in by_type.items() if t.startswith(FINDING_PREFIX_MISSING))
    altered = sum(n for t, n in by_type.items() if t in ALTERED_TYPES)
    merged = run.get("merged_patients") or []
    stage = {"pilot": "Pilot", "staged": "Staged rollout"}.get(key.split("-")[0], label(key))
    figures = [
        card("Reconciliation verdict", str(run.get("verdict", "–")),
             state="good" if run.get("verdict") == "pass" else "bad"),
        card("Instances on source", source.get("instances")),
        card("Instances on target", target.get("instances")),
        card("Studies migrated", f"{fmt(result.get('migrated'))} of "
             f"{fmt(result.get('studies_total'))}",
             note=f"{fmt(result.get('already_on_target', 0))} already on target"),
    ]
    for field, fallback, count in (("missing", "Missing on target (findings)", missing),
                                   ("altered", "Altered on target (findings)", altered)):
        value = run.get(field, count)
        figures.append(card(label(field) if field in run else fallback, value,
                            state="bad" if num(value) else "good"))
    figures += [card("Patients merged", len(merged), state="bad" if merged else "good"),
                card("Retries used", result.get("retries_used")),
                card("Migration time (s)", result.get("elapsed_s"))]
    level_rows = [[label(level), source.get(level), target.get(level),
                   (num(target.get(level)) or 0) - (num(source.get(level)) or 0)]
                  for level in LEVELS if level in source or level in target]
    blocks: list[Any] = [
        heading(f"{stage}, method {run.get('method', '?')}: {run.get('source', '?')} → "
                f"{run.get('target', '?')}"),
        cards(figures),
        table(["Level", "Source", "Target", "Target − source"], level_rows,
              row_classes=["differs" if r[3] else "" for r in level_rows]),
        heading("Findings by type"),
        table(["Finding", "Count"], [[label(t), n] for t, n in by_type.items()]) if by_type
        else text("No finding: the target holds every instance, attribute and pixel of the "
                  "source (allowed changes excepted).", "good"),
    ]
    errors = result.get("errors") or {}
    if errors:
        blocks += [heading("Studies that failed"),
                   table(["Study", "Error"], [[k, v] for k, v in errors.items()])]
    if isinstance(run.get("availability"), dict):
        blocks += availability_blocks("availability", run["availability"], [],
                                      title="Availability while migrating")
    blocks += identity_blocks(run.get("identity"))
    if merged:
        blocks += [heading("Patients merged on the target"), table(["Merged"], [[m]
                                                                               for m in merged])]
    return blocks


def migration(metrics: dict[str, Any], scenario: dict[str, Any]) -> Built:
    runs = {k: v for k, v in metrics.items()
            if isinstance(v, dict) and ("migration" in v or "counts" in v)}
    blocks = [{"kind": "group", "cls": "run", "id": f"migration-{_slug(k)}",
               "blocks": _migration_run(k, v)} for k, v in runs.items()]
    return blocks, set(runs)


# ---------------------------------------------------------------------------------------
# Failover


FAILOVER_KEYS = ("setup", "rto_s", "rpo_instances", "acknowledged_lost", "error_rate",
                 "error_rate_during_outage", "acked", "acked_before_fault", "failback_s",
                 "thresholds", "timeline", "fault_events")


def failover(metrics: dict[str, Any], scenario: dict[str, Any]) -> Built:
    if "rto_s" not in metrics or not isinstance(metrics.get("timeline"), list):
        return [], set()
    limits = metrics.get("thresholds") or {}
    rto, rpo, lost = metrics.get("rto_s"), metrics.get("rpo_instances"), metrics.get(
        "acknowledged_lost")
    blocks: list[Any] = [text(f"Setup: {metrics.get('setup', '?')}"), cards([
        card("Recovery time, RTO", "no recovery" if rto is None else f"{fmt(rto)} s",
             note=f"threshold ≤ {fmt(limits.get('rto_s'))} s", state=_limit_state(
                 rto, limits.get("rto_s"))),
        card("Recovery point, RPO", f"{fmt(rpo)} instances",
             note=f"threshold ≤ {fmt(limits.get('rpo_instances'))}",
             state=_limit_state(rpo, limits.get("rpo_instances"))),
        card("Acknowledged instances lost", lost, note="must be 0",
             state=_limit_state(lost, 0)),
        card("Error rate", percent(metrics.get("error_rate"))),
        card("Error rate during the outage", percent(metrics.get("error_rate_during_outage"))),
        card("Failback time", f"{fmt(metrics.get('failback_s'))} s"),
        card("Instances acknowledged", metrics.get("acked"),
             note=f"{fmt(metrics.get('acked_before_fault'))} before the fault"),
    ])]
    rows = [["Recovery time, RTO (s)", rto, limits.get("rto_s")],
            ["Recovery point, RPO (instances)", rpo, limits.get("rpo_instances")],
            ["Acknowledged instances lost", lost, 0]]
    blocks += [heading("Against the thresholds"), table(
        ["Figure", "Measured", "Threshold (at most)", "Verdict"],
        [[*r, badge("passed" if _limit_state(r[1], r[2]) == "good" else "failed")]
         for r in rows])]
    events = [e for e in metrics.get("fault_events") or [] if isinstance(e, dict)]
    kill = next((e for e in events if e.get("what") == "kill"), None)
    back = next((e for e in events if e.get("what") == "recovered"), None)
    marks: list[dict[str, Any]] = []
    if kill and num(kill.get("t")) is not None:
        end = num((back or {}).get("t"))
        marks.append({"t": kill["t"], "what": f"{kill.get('target', 'primary')} killed: outage",
                      "duration_s": (end - kill["t"]) if end is not None else None})
        blocks.append(text(
            f"The {kill.get('target', 'primary')} was killed at t = {fmt(kill['t'])} s; "
            + (f"a store and a retrieve succeeded again through the virtual address at "
               f"t = {fmt(back.get('t'))} s (RTO {fmt(rto)} s)." if back else
               "service did not return.")))
    marks += [{"t": e["t"], "what": str(e.get("what")), "duration_s": e.get("duration_s")}
              for e in events if e.get("what") not in ("kill", "recovered")
              and num(e.get("t")) is not None]
    attempts = [e for e in metrics["timeline"] if isinstance(e, dict)
                and num(e.get("t")) is not None]
    good: dict[str, list[tuple[float, float]]] = {}
    bad: dict[str, list[tuple[float, float]]] = {}
    for e in attempts:
        (good if e.get("ok") else bad).setdefault(str(e.get("op")), []).append(
            (float(e["t"]), num(e.get("latency_s")) or 0.0))
    blocks.append(chart(status_strip([[e["t"], str(e.get("op")), bool(e.get("ok"))]
                                      for e in attempts],
                                     "Failover: attempts through the virtual address (t in s)")))
    blocks.append(chart(line_chart(good, "Failover timeline: latency of each attempt", "t (s)",
                                   "s", events=marks, bad_points=bad)))
    if events:
        blocks += [heading("Fault, recovery and failback"), events_table(events)]
    return blocks, set(FAILOVER_KEYS)


# ---------------------------------------------------------------------------------------
# Performance


THRESHOLD = re.compile(r"^\s*(<=|>=|<|>)\s*([0-9]+(?:\.[0-9]+)?)\s*(\S+)")
LATENCY_COLUMNS = ("p50", "p90", "p95", "p99", "p99.9", "max")


def _clause_operations(scenario: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """clause id -> (workload, operation), from the test that judged the clause."""
    pairs: dict[str, tuple[str, str]] = {}
    for test in scenario.get("tests") or []:
        keys = list(test.get("metrics") or {})
        ops = [k.split(".", 2)[1:] for k in keys if k.startswith("load.") and k.count(".") >= 2
               and k.split(".", 2)[2] not in ("totals", "harness")]
        for key in keys:
            if key.startswith("sla.") and len(ops) == 1:
                pairs[key[4:]] = (ops[0][0], ops[0][1])
    return pairs


def _limit_ms(threshold: Any) -> float | None:
    match = THRESHOLD.match(str(threshold or ""))
    if not match or match.group(3).lower() not in ("s", "ms"):
        return None
    return float(match.group(2)) * (1000.0 if match.group(3).lower() == "s" else 1.0)


def performance(metrics: dict[str, Any], scenario: dict[str, Any]) -> Built:
    clauses = {k[4:]: v for k, v in metrics.items() if k.startswith("sla.") and
               isinstance(v, dict)}
    loads = {k[5:]: v for k, v in metrics.items() if k.startswith("load.") and
             isinstance(v, dict) and k.count(".") >= 2}
    timelines = {k[5:-len(".timeline")]: v for k, v in metrics.items()
                 if k.startswith("load.") and k.endswith(".timeline") and isinstance(v, list)}
    if not clauses and not loads:
        return [], set()
    pairs = _clause_operations(scenario)
    passed = sum(1 for c in clauses.values() if c.get("verdict") == "pass")
    blocks: list[Any] = [cards([card("SLA clauses met", f"{passed} of {len(clauses)}",
                                     state="good" if passed == len(clauses) else "bad")])]
    blocks += [heading("SLA clauses of the contract"), table(
        ["Clause", "Verdict", "Measured", "Threshold", "Operation", "Workload", "Node"],
        [[cid, badge("passed" if c.get("verdict") == "pass" else "failed"),
          f"{fmt(c.get('measured'))} {c.get('unit', '')}".strip(), c.get("threshold"),
          pairs.get(cid, ("", "–"))[1], c.get("workload"), c.get("node")]
         for cid, c in clauses.items()])]
    workloads: dict[str, dict[str, Any]] = {}
    for key, value in loads.items():
        workload, part = key.split(".", 1)
        workloads.setdefault(workload, {})[part] = value
    for workload, parts in workloads.items():
        ops = {k: v for k, v in parts.items() if k not in ("totals", "harness")}
        blocks.append(heading(f"Workload {workload}"))
        totals, harness = parts.get("totals") or {}, parts.get("harness") or {}
        figures = [card(label(k), totals[k]) for k in ("operations", "errors",
                                                        "instances_per_s", "mb_per_s")
                   if k in totals]
        if harness:
            figures.append(card("Harness CPU (cores)", harness.get("cpu_cores"),
                                note="saturated: figures understate the PACS"
                                if harness.get("saturated") else "not saturated",
                                state="bad" if harness.get("saturated") else ""))
        blocks.append(cards(figures))
        series = {op: [(x, float(v)) for k, v in (o.get("latency_ms") or {}).items()
                       if (x := _percentile(k)) is not None and num(v) is not None]
                  for op, o in ops.items()}
        limits = [(f"{cid}: {c.get('threshold')}", ms) for cid, c in clauses.items()
                  if pairs.get(cid, ("", ""))[0] == workload
                  and (ms := _limit_ms(c.get("threshold"))) is not None]
        highest = max((y for pts in series.values() for _, y in pts), default=0.0)
        shown = [(name, ms) for name, ms in limits if ms <= 3 * highest]
        blocks.append(chart(line_chart(
            {k: v for k, v in series.items() if v},
            f"Workload {workload}: latency by percentile against the contract", "percentile",
            "ms", limits=shown)))
        over_time = _latency_over_time(timelines.get(workload) or [])
        if over_time:
            blocks.append(chart(line_chart(
                over_time, f"Workload {workload}: latency per second of the run against the "
                "contract", "seconds", "ms", limits=shown)))
        above = [f"{name} ({fmt(ms)} ms)" for name, ms in limits if (name, ms) not in shown]
        blocks.append(text("Percentiles of the whole measured window, then each second of "
                           "the run; dashed lines are the contract's latency thresholds" + (
                               f"; far above the chart: {', '.join(above)}" if above else "")
                           + ".", "note"))
        blocks.append(table(
            ["Operation", "Requests", "Errors", "Instances/s", "MB/s",
             *[f"{c} (ms)" for c in LATENCY_COLUMNS]],
            [[op, o.get("count"), o.get("errors"), o.get("instances_per_s"), o.get("mb_per_s"),
              *[(o.get("latency_ms") or {}).get(c) for c in LATENCY_COLUMNS]]
             for op, o in ops.items()]))
        failed = [[op, status, n] for op, o in ops.items()
                  for status, n in (o.get("errors_by_status") or {}).items()]
        if failed:
            blocks.append(table(["Operation", "Status", "Count"], failed))
    return blocks, ({f"sla.{k}" for k in clauses} | {f"load.{k}" for k in loads}
                    | {f"load.{k}.timeline" for k in timelines})


def _latency_over_time(timeline: list[Any]) -> dict[str, list[tuple[float, float]]]:
    """p50, p95 and the slowest operation of each second of a load run (runner's timeline)."""
    series: dict[str, list[tuple[float, float]]] = {"p50": [], "p95": [], "max": []}
    for row in timeline:
        latency = row.get("latency_ms") if isinstance(row, dict) else None
        if not isinstance(latency, dict) or num(row.get("t_s")) is None:
            continue
        for name in series:
            if num(latency.get(name)) is not None:
                series[name].append((float(row["t_s"]), float(latency[name])))
    return {name: points for name, points in series.items() if points}


def _percentile(key: str) -> float | None:
    if key == "max":
        return 100.0
    if key.startswith("p"):
        try:
            return float(key[1:])
        except ValueError:
            return None
    return None


# ---------------------------------------------------------------------------------------
# Assessment, disaster recovery, migration under faults


def assessment(metrics: dict[str, Any], scenario: dict[str, Any]) -> Built:
    nodes = {k.split(".", 1)[1]: v for k, v in metrics.items()
             if k.startswith("inventory.") and isinstance(v, dict)}
    blocks: list[Any] = []
    for name, inventory in nodes.items():
        held, answered = inventory.get("held") or {}, inventory.get("answered") or {}
        findings = inventory.get("findings") or []
        rows = [[label(level), held.get(level) if held else None, answered.get(level)]
                for level in LEVELS]
        blocks += [heading(f"Node {name}"), table(
            ["Level", "Held (independent count)", "Answered by the query service"], rows,
            row_classes=["differs" if held and r[1] != r[2] else "" for r in rows])]
        blocks.append(text(f"Independent count: {held.get('means')}" if held else
                           "No count independent of the query service: inventory only.",
                           "note"))
        if findings:
            blocks.append(table(["Finding"], [[f] for f in findings]))
        if inventory.get("first_reading_disagreed"):
            blocks.append(text("The first reading disagreed and was repeated (a live archive "
                               "or a lost answer); the second reading is shown.", "note"))
        blocks += identity_blocks(inventory.get("identity"))
    return blocks, {f"inventory.{n}" for n in nodes}


DR_FIELDS = ("expected", "restored", "lost", "altered", "backup_s", "restore_time_s")
DR_VARIANTS = {"": "Orthanc, SQLite index", "postgresql": "Orthanc, PostgreSQL index",
               "docker": "Orthanc in a container", "dcmqrscp": "DCMTK dcmqrscp",
               "embedded": "Embedded PACS"}


def disaster_recovery(metrics: dict[str, Any], scenario: dict[str, Any]) -> Built:
    variants: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        base, _, suffix = key.partition(".")
        if base in DR_FIELDS and num(value) is not None:
            variants.setdefault(suffix, {})[base] = value
    if not variants:
        return [], set()
    rows = [[DR_VARIANTS.get(v, v), *[f.get(k) for k in DR_FIELDS]] for v, f in variants.items()]
    lost = sum(num(f.get("lost")) or 0 for f in variants.values())
    altered = sum(num(f.get("altered")) or 0 for f in variants.values())
    blocks = [cards([card("Node kinds drilled", len(variants)),
                     card("Instances lost", lost, state="bad" if lost else "good"),
                     card("Instances altered", altered, state="bad" if altered else "good")]),
              table(["Node kind", *map(label, DR_FIELDS)], rows,
                    row_classes=["differs" if (num(r[3]) or num(r[4])) else "" for r in rows]),
              chart(bar_chart({DR_VARIANTS.get(v, v): {
                  "backup": num(f.get("backup_s")) or 0.0,
                  "restore": num(f.get("restore_time_s")) or 0.0} for v, f in variants.items()},
                  "Backup and restore time per node kind (s)"))]
    return blocks, {f"{k}.{v}" if v else k for v, f in variants.items() for k in f}


def migration_faults(metrics: dict[str, Any], scenario: dict[str, Any]) -> Built:
    keys = ("runs", "retries", "studies", "instances", "lost", "duplicates",
            "target_instances", "fault_events", "fault_errors", "results")
    if "lost" not in metrics or "runs" not in metrics:
        return [], set()
    figures = [card(label(k), metrics.get(k), state=("bad" if num(metrics.get(k)) else "good")
                    if k in ("lost", "duplicates") else "")
               for k in keys[:7] if k in metrics]
    blocks: list[Any] = [cards(figures)]
    events = [e for e in metrics.get("fault_events") or [] if isinstance(e, dict)]
    if events:
        blocks += [heading("Faults injected"), events_table(events)]
    if metrics.get("fault_errors"):
        blocks += [heading("Faults that did not apply"),
                   table(["Error"], [[e] for e in metrics["fault_errors"]])]
    results = [r for r in metrics.get("results") or [] if isinstance(r, dict)]
    if results:
        columns = ("migrated", "already_on_target", "failed", "instances_sent", "retries_used",
                   "elapsed_s", "ok")
        blocks += [heading("Migration runs (each resumes from the state file)"), table(
            ["Run", *map(label, columns)],
            [[n, *[r.get(c) for c in columns]] for n, r in enumerate(results, 1)])]
    return blocks, set(keys)


BUILDERS: dict[str, Callable[[dict[str, Any], dict[str, Any]], Built]] = {
    "migration": migration, "failover": failover, "performance": performance,
    "ingest": ingest, "connectivity": connectivity, "assessment": assessment,
    "disaster-recovery": disaster_recovery, "dr": disaster_recovery,
    "migration-under-faults": migration_faults, "migration_faults": migration_faults,
    "security": compliance, "conformance": interop_section,
    "workflow": workflow,
}


def scenario_blocks(scenario: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """(the scenario's purpose-built blocks, blocks of the metrics it does not know)."""
    metrics = scenario.get("metrics") or {}
    builder = BUILDERS.get(str(scenario.get("name")))
    if builder is None and is_conformance(metrics.get(CONFORMANCE_KEY)):
        builder = interop_section  # another scenario that recorded a conformance run
    built, used = builder(metrics, scenario) if builder else ([], set())
    rest = {k: v for k, v in metrics.items() if k not in used}
    return [b for b in built if b], metric_blocks(rest, events_of(metrics)) if rest else []
