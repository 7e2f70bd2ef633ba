"""Hostile configuration files, run through the CLI as a user would.

A harness pointed at a hospital's PACS reads topology, rules, workload and contract files
that anyone may have written. Each bad file must end in exit 2 and exactly one stderr line
naming the file and the field: never a hang (the subprocess timeout is the guard), never a
traceback, never a path outside the state folder.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.config import MAX_CONFIG_BYTES, MAX_YAML_ALIASES

#: generous: a hang is what this guards against, not slowness (CPUs are shared)
TIMEOUT_S = 300

NODES = "nodes:\n  a: {kind: embedded}\n  b: {kind: embedded}\n"
WORKLOAD = "groups:\n  - {operation: c-echo, users: 1}\n"
CONTRACT_HEAD = "workloads:\n  w:\n    groups: [{operation: c-echo, users: 1}]\n"
CLAUSE = "{id: c1, metric: availability, operation: all, threshold: '>= 99 %', workload: w}"


def _laughs(prefix: str = "") -> str:
    """Nine levels of nine aliases: 9**9 strings once expanded ("billion laughs")."""
    lines = [prefix + 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, 10):
        refs = ", ".join([f"*l{level - 1}"] * 9)
        lines.append(f"{prefix}l{level}: &l{level} [{refs}]")
    return "\n".join(lines) + "\n"


def _deep_block(levels: int) -> str:
    """Block mappings nested `levels` deep under `settings:`."""
    keys = "".join(f"{'  ' * (depth + 1)}k{depth}:\n" for depth in range(levels))
    return keys + "  " * (levels + 1) + "1\n"


def _faults(item: str) -> str:
    return f"name: t\n{NODES}links: [{{to: a}}]\nsettings:\n  faults:\n    - {item}\n"


def _link(item: str) -> str:
    return f"name: t\n{NODES}links:\n  - {item}\n"


#: (case id, file contents, what stderr must contain besides the file name)
TOPOLOGIES = [
    ("billion-laughs", "name: t\n" + NODES + "settings:\n" + _laughs("  "),
     "values once aliases are expanded"),
    ("recursive-alias-list", "name: t\n" + NODES + "settings: &s [*s]\n", "recursive alias *s"),
    ("recursive-alias-map", "name: t\nnodes: &n\n  a: *n\n", "recursive alias *n"),
    ("deep-flow-lists", "name: t\n" + NODES + "settings: {x: " + "[" * 5000 + "]" * 5000 + "}\n",
     "nested deeper than"),
    ("deep-flow-maps", "settings: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n",
     "nested deeper than"),
    ("deep-block", "name: t\n" + NODES + "settings:\n" + _deep_block(200), "nested deeper than"),
    ("too-many-aliases", "name: t\n" + NODES + "settings:\n  a: &a 1\n  b: ["
     + ", ".join(["*a"] * (MAX_YAML_ALIASES + 1)) + "]\n", "aliases"),
    ("huge-file", "name: t\n" + NODES + "#" * (MAX_CONFIG_BYTES + 10) + "\n", "too large"),
    ("complex-key", "name: t\n" + NODES + "settings:\n  ? [a, b]\n  : 1\n", "a key must be"),
    ("python-tag", "name: !!python/object/apply:os.system ['true']\n" + NODES, "invalid YAML"),
    ("not-utf8", None, "cannot read"),
    ("latency-nan", _link("{to: a, latency_ms: .nan}"), "links.0.latency_ms"),
    ("latency-inf", _link("{to: a, latency_ms: .inf}"), "links.0.latency_ms"),
    ("latency-negative", _link("{to: a, latency_ms: -5}"), "links.0.latency_ms"),
    ("latency-huge", _link("{to: a, latency_ms: 1e12}"), "links.0.latency_ms"),
    ("jitter-text", _link("{to: a, jitter_ms: fast}"), "links.0.jitter_ms"),
    ("bandwidth-zero", _link("{to: a, bandwidth_mbit: 0}"), "links.0.bandwidth_mbit"),
    ("bandwidth-inf", _link("{to: a, bandwidth_mbit: .inf}"), "links.0.bandwidth_mbit"),
    ("link-to-list", _link("{to: [a]}"), "links.0.to"),
    ("preset-list", _link("{to: a, preset: [lan]}"), "links.0.preset"),
    ("fault-at-negative", _faults("{at_s: -1, fault: cut, target: harness->a, duration_s: 1}"),
     "settings.faults.0.at_s"),
    ("fault-at-nan", _faults("{at_s: .nan, fault: cut, target: harness->a, duration_s: 1}"),
     "settings.faults.0.at_s"),
    ("fault-duration-inf", _faults("{at_s: 1, fault: kill, target: a, duration_s: .inf}"),
     "settings.faults.0.duration_s"),
    ("fault-duration-negative", _faults("{at_s: 1, fault: cut, target: harness->a, "
                                        "duration_s: -2}"), "settings.faults.0.duration_s"),
    ("fault-duration-bool", _faults("{at_s: 1, fault: cut, target: harness->a, "
                                    "duration_s: true}"), "settings.faults.0.duration_s"),
    ("fault-latency-inf", _faults("{at_s: 1, fault: latency, target: harness->a, duration_s: 1, "
                                  "latency_s: .inf}"), "settings.faults.0.latency_s"),
    ("fault-drop-rate", _faults("{at_s: 1, fault: drop, target: harness->a, duration_s: 1, "
                                "rate: 2}"), "settings.faults.0.rate"),
    ("fault-unknown-param", _faults("{at_s: 1, fault: cut, target: harness->a, duration_s: 1, "
                                    "latency_s: 1}"), "settings.faults.0.latency_s"),
    ("fault-list-name", _faults("{at_s: 1, fault: [cut], target: harness->a, duration_s: 1}"),
     "settings.faults.0.fault"),
    ("name-dotdot", "name: ../../../tmp/escape\n" + NODES, ":1: name: invalid name"),
    ("name-slash", "name: a/b\n" + NODES, ":1: name: invalid name"),
    ("name-newline", 'name: "ok\\nerror: forged line"\n' + NODES, ":1: name: invalid name"),
    ("name-trailing-newline", 'name: "ok\\n"\n' + NODES, ":1: name: invalid name"),
    ("name-list", "name: [a]\n" + NODES, ":1: name: invalid name"),
    ("node-name-newline", 'name: t\nnodes:\n  "a\\nerror: forged": {kind: embedded}\n',
     ":3: nodes.a\\nerror: forged: invalid node name"),
    ("key-newline", 'name: t\n' + NODES + '"x\\nerror: forged": 1\n',
     ":5: x\\nerror: forged: unknown field"),
    ("host-ipv6-loopback", "name: t\nnodes:\n  a: {kind: embedded, host: '::1'}\n",
     ":3: nodes.a.host: IPv6 address '::1' not supported: the harness uses IPv4 only"),
    ("host-ipv6-external", "name: t\nnodes:\n  a: {kind: external, host: '::1', dicom_port: 104}\n",
     "nodes.a.host: IPv6 address"),
    ("nodes-list", "name: t\nnodes: [a, b]\n", ":2: nodes: missing or empty"),
    ("port-text", "name: t\nnodes:\n  a: {kind: embedded, dicom_port: '104'}\n",
     "nodes.a.dicom_port: invalid port"),
    ("fault-unknown-field", _faults("{at_s: 1, fault: kill, target: a, when: 2}"),
     ":8: settings.faults.0.when: unknown field"),
]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S,
    )


def _assert_one_line(result: subprocess.CompletedProcess, path: Path, expected: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith(f"error: {path}:"), lines[0]
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in TOPOLOGIES],
                         ids=[c[0] for c in TOPOLOGIES])
def test_hostile_topology(tmp_path, text, expected):
    path = tmp_path / "topology.yaml"
    if text is None:
        path.write_bytes(b"name: t\n" + NODES.encode() + b"settings: {x: '\xff\xfe'}\n")
    else:
        path.write_text(text)
    result = _run(["status", "-t", str(path)], tmp_path)
    _assert_one_line(result, path, expected)
    assert not (tmp_path.parent / "escape").exists()


def test_a_device_is_read_only_up_to_the_limit(tmp_path):
    """/dev/zero never ends: the reader stops at the size limit."""
    result = _run(["status", "-t", "/dev/zero"], tmp_path)
    _assert_one_line(result, Path("/dev/zero"), "too large")


WORKLOADS = [
    ("billion-laughs", WORKLOAD + "description: x\n" + _laughs(), "values once aliases"),
    ("recursive-alias", "groups: &g [*g]\n", "recursive alias *g"),
    ("deep-nesting", "groups: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than"),
    ("rate-nan", "groups:\n  - {operation: c-echo, rate: .nan}\n", "groups.0.rate"),
    ("users-inf", "groups:\n  - {operation: c-echo, users: .inf}\n", "groups.0.users"),
    ("duration-negative", WORKLOAD + "duration_s: -5\n", ":3: duration_s: must be"),
    ("warmup-inf", WORKLOAD + "warmup_s: .inf\n", ":3: warmup_s: must be"),
    ("operation-list", "groups:\n  - {operation: [c-echo], users: 1}\n", "groups.0.operation"),
    ("modality-unknown", WORKLOAD + "dataset: {modality: XYZ}\n", "dataset.modality"),
    ("scale-list", WORKLOAD + "dataset: {scale: [tiny]}\n", "dataset.scale"),
    ("destination-newline", "groups:\n  - {operation: c-move, users: 1, destination: \"A\\n\"}\n",
     "groups.0.destination"),
    ("group-unknown-field", "groups:\n  - {operation: c-echo, users: 1, colour: red}\n",
     ":2: groups.0.colour: unknown field"),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in WORKLOADS],
                         ids=[c[0] for c in WORKLOADS])
def test_hostile_workload(tmp_path, text, expected):
    path = tmp_path / "workload.yaml"
    path.write_text(text)
    result = _run(["load", "--node", "a", "--workload", str(path)], tmp_path)
    _assert_one_line(result, path, expected)


CONTRACTS = [
    ("billion-laughs", CONTRACT_HEAD + f"clauses: [{CLAUSE}]\ndescription: x\n" + _laughs(),
     "values once aliases"),
    ("recursive-alias", CONTRACT_HEAD + "clauses: &c [*c]\n", "recursive alias *c"),
    ("threshold-infinite", CONTRACT_HEAD + "clauses:\n  - " + CLAUSE.replace(
        "'>= 99 %'", "'<= " + "9" * 400 + " s'").replace("availability", "latency")
     .replace("operation: all", "operation: c-echo, percentile: 95"), "clauses.0.threshold"),
    ("percentile-nan", CONTRACT_HEAD + "clauses:\n  - " + CLAUSE.replace(
        "'>= 99 %'", "'<= 1 s'").replace("availability", "latency")
     .replace("operation: all", "operation: c-echo, percentile: .nan"), "clauses.0.percentile"),
    ("metric-list", CONTRACT_HEAD + "clauses:\n  - " + CLAUSE.replace(
        "metric: availability", "metric: [availability]"), "clauses.0.metric"),
    ("workload-list", CONTRACT_HEAD + "clauses:\n  - " + CLAUSE.replace(
        "workload: w", "workload: [w]"), "clauses.0.workload"),
    ("name-dotdot", "name: ../../evidence\n" + CONTRACT_HEAD + f"clauses: [{CLAUSE}]\n",
     ":1: name: invalid name"),
    ("inline-workload-rate-inf", "workloads:\n  w:\n    groups: [{operation: c-echo, "
     "rate: .inf}]\n" + f"clauses: [{CLAUSE}]\n", "groups.0.rate"),
    ("clause-unknown-field", CONTRACT_HEAD + "clauses:\n  - " + CLAUSE.replace(
        "workload: w}", "workload: w, owner: x}"), ":5: clauses.0.owner: unknown field"),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CONTRACTS],
                         ids=[c[0] for c in CONTRACTS])
def test_hostile_contract(tmp_path, text, expected):
    path = tmp_path / "contract.yaml"
    path.write_text(text)
    result = _run(["sla", "--contract", str(path), "--node", "a"], tmp_path)
    _assert_one_line(result, path, expected)
    assert not list(tmp_path.parent.glob("evidence*"))


RULES = [
    ("billion-laughs", "charset_conversion: true\nadded: []\n" + _laughs(), "values once aliases"),
    ("recursive-alias", "added: &a [*a]\n", "recursive alias *a"),
    ("deep-nesting", "added: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than"),
    ("prefix-list", "prefix: {default: [X]}\n", "prefix.default"),
    ("prefix-unknown-field", "prefix: {default: X-, strip: true}\n",
     ":1: prefix.strip: unknown field"),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in RULES],
                         ids=[c[0] for c in RULES])
def test_hostile_rules(tmp_path, text, expected):
    """A bad rules file is reported before the nodes are even looked up."""
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    result = _run(["verify", "--source", "a", "--target", "b", "--rules", str(path)], tmp_path)
    _assert_one_line(result, path, expected)
