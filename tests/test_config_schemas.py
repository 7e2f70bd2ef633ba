"""The configuration schemas: unknown fields, numbers and the line a mistake is reported on.

Every file kind (topology, fault schedule, workload, contract, rules) refuses a field it does
not know, naming the file, the line and the field; every number goes through one parser
that refuses NaN, infinity, booleans and out-of-range values.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.config import parse_topology
from harness.config.numbers import NumberError, finite_number, quantity
from harness.errors import ConfigError
from harness.migration.rules import parse_rules
from harness.performance.sla import parse_contract
from harness.performance.workload import parse_workload

TOPOLOGY = "name: x\nnodes:\n  a: {kind: embedded}\n"
WORKLOAD = "groups:\n  - {operation: c-echo, users: 1}\n"
CONTRACT = (
    "workloads:\n  w:\n    groups: [{operation: c-echo, users: 1}]\nclauses:\n"
    "  - {id: c1, metric: availability, operation: all, threshold: '>= 99 %', workload: w}\n"
)


def _error(parse, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(text, "f.yaml")
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("parse", "text", "expected"),
    [
        (parse_topology, TOPOLOGY + "colour: red\n", "f.yaml:4: colour: unknown field (allowed: "
         "name, nodes, links, settings)"),
        (parse_topology, TOPOLOGY + "links:\n  - {to: a, speed: 5}\n",
         "f.yaml:5: links.0.speed: unknown field (allowed: from, to, preset, latency_ms"),
        (parse_topology, "name: x\nnodes:\n  a:\n    kind: external\n    host: 127.0.0.1\n"
         "    dicom_port: 104\n    credentials:\n      username_env: U\n      password: p\n",
         "f.yaml:9: nodes.a.credentials.password: unknown field (allowed: username_env, "
         "password_env: names of environment variables; never put the secret"),
        (parse_topology, TOPOLOGY + "settings:\n  faults:\n    - at_s: 1\n      fault: kill\n"
         "      target: a\n      when: later\n",
         "f.yaml:9: settings.faults.0.when: unknown field (allowed: at_s, fault, target, "
         "duration_s"),
        (parse_workload, WORKLOAD + "dataset:\n  studies: 2\n  patients: 3\n",
         "f.yaml:5: dataset.patients: unknown field (allowed: studies, instances_per_study"),
        (parse_workload, "groups:\n  - operation: c-echo\n    users: 1\n    speed: 3\n",
         "f.yaml:4: groups.0.speed: unknown field (allowed: name, operation, users, rate"),
        (parse_contract, CONTRACT.replace("workload: w}", "workload: w, owner: me}"),
         "f.yaml:5: clauses.0.owner: unknown field (allowed: id, description, metric"),
        (parse_contract, CONTRACT + "signed: yes\n",
         "f.yaml:6: signed: unknown field (allowed: name, description, workloads, clauses)"),
        (parse_contract, CONTRACT.replace("users: 1}", "users: 1, colour: red}"),
         "f.yaml:3: workloads.w.groups.0.colour: unknown field"),
        (parse_rules, "added: [StationName]\nrename: {A: B}\n",
         "f.yaml:2: rename: unknown rule (allowed: prefix, added, charset_conversion"),
        (parse_rules, "prefix:\n  default: X-\n  strip: true\n",
         "f.yaml:3: prefix.strip: unknown field (allowed: by_issuer, default, required)"),
    ],
    ids=["topology", "link", "credentials", "fault", "dataset", "group", "clause", "contract",
         "inline-workload", "rules", "prefix"],
)
def test_unknown_fields_are_refused_with_file_line_and_field(parse, text, expected):
    message = _error(parse, text)
    assert message.startswith(expected), message


BAD_NUMBERS = [".nan", ".inf", "-.inf", "-1", "1.0e+300", "true", "'5'", "[1]"]


@pytest.mark.parametrize("bad", BAD_NUMBERS)
@pytest.mark.parametrize(
    ("parse", "template", "field"),
    [
        (parse_topology, TOPOLOGY + "links:\n  - {to: a, jitter_ms: @}\n",
         "f.yaml:5: links.0.jitter_ms"),
        (parse_topology, TOPOLOGY + "settings:\n  faults:\n    - {at_s: @, fault: kill, "
         "target: a}\n", "f.yaml:6: settings.faults.0.at_s"),
        (parse_topology, TOPOLOGY + "links: [{to: a}]\nsettings:\n  faults:\n    - {at_s: 1, "
         "fault: drop, target: harness->a, duration_s: 1, rate: @}\n",
         "f.yaml:7: settings.faults.0.rate"),
        (parse_workload, WORKLOAD + "warmup_s: @\n", "f.yaml:3: warmup_s"),
        (parse_workload, "groups:\n  - {operation: c-echo, users: 1, think_s: @}\n",
         "f.yaml:2: groups.0.think_s"),
        (parse_contract, CONTRACT.replace("metric: availability", "metric: latency").replace(
            "operation: all", "operation: c-echo, percentile: @").replace("99 %", "1 s"),
         "f.yaml:5: clauses.0.percentile"),
    ],
    ids=["link-jitter", "fault-at", "fault-rate", "warmup", "think", "percentile"],
)
def test_nan_inf_negative_huge_and_non_numbers_are_refused(parse, template, field, bad):
    message = _error(parse, template.replace("@", bad))
    assert message.startswith(f"{field}: must be a "), message
    assert "got" in message


def test_huge_threshold_is_refused():
    message = _error(parse_contract, CONTRACT.replace("99 %", "9" * 400 + " %"))
    assert message.startswith("f.yaml:5: clauses.0.threshold: out of range: must be a number"), (
        message)


def test_the_first_mistake_in_the_file_is_reported():
    """Several mistakes: the one nearest the top, whatever order the schema checks in."""
    text = "name: x\nnodes:\n  a: {kind: embedded, dicom_port: 0}\nlinks: 5\ncolour: red\n"
    assert _error(parse_topology, text).startswith("f.yaml:3: nodes.a.dicom_port: invalid port")
    text = "groups:\n  - {operation: c-echo, users: 1}\nwarmup_s: -1\nduration_s: 0\n"
    assert _error(parse_workload, text).startswith("f.yaml:3: warmup_s: must be")


def test_valid_numbers_keep_their_values():
    topology = parse_topology(
        TOPOLOGY + "links:\n  - {to: a, latency_ms: 60000, jitter_ms: 0, bandwidth_mbit: 0.5}\n",
        "f.yaml",
    )
    link = topology.links["harness->a"]
    assert (link.latency_s, link.jitter_s, link.bandwidth_bps) == (60.0, 0.0, 500_000.0)
    workload = parse_workload("groups:\n  - {operation: c-find, rate: 0.25}\n", "f.yaml")
    assert workload.groups[0].rate == 0.25 and workload.groups[0].users is None


def test_the_fault_schedule_is_parsed_with_the_topology():
    topology = parse_topology(
        TOPOLOGY + "links: [{to: a}]\nsettings:\n  faults:\n"
        "    - {at_s: 3, fault: bandwidth, target: harness->a, duration_s: 2, bps: 1000000}\n"
        "    - {at_s: 1, fault: pause, target: a}\n",
        "f.yaml",
    )
    assert [(f.at_s, f.fault) for f in topology.faults] == [(1.0, "pause"), (3.0, "bandwidth")]
    assert topology.faults[1].params == (("bps", 1e6),)
    assert topology.faults[0].duration_s is None  # a pause until the scenario ends


@given(st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
))
def test_the_number_parser_accepts_only_finite_numbers_in_range(value):
    try:
        result = finite_number(value, 0, 1000)
    except NumberError as exc:
        assert str(exc).startswith("must be a number >= 0 and <= 1000, got ")
        in_range = (isinstance(value, int | float) and not isinstance(value, bool)
                    and not (isinstance(value, float) and math.isnan(value))
                    and 0 <= value <= 1000)
        assert not in_range
    else:
        assert result is value
        assert not isinstance(result, bool) and math.isfinite(result) and 0 <= result <= 1000


@given(st.integers(min_value=-(10**30), max_value=10**30),
       st.floats(min_value=-1e6, max_value=1e6))
def test_the_number_parser_bounds_whole_numbers(whole, fractional):
    inside = 1 <= whole <= 256
    try:
        assert finite_number(whole, 1, 256, whole=True) == whole and inside
    except NumberError:
        assert not inside
    with pytest.raises(NumberError, match="must be a whole number > 0 and <= 10, got"):
        finite_number(fractional, 0, 10, low_open=True, whole=True)


@pytest.mark.parametrize(("text", "expected"), [
    ("5 s", (5.0, "s")), ("250ms", (250.0, "ms")), (" 12.5 MB/s ", (12.5, "mb/s")),
])
def test_quantities(text, expected):
    assert quantity(text, ("ms", "s", "mb/s"), 1e9) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("5 parsecs", "unit 'parsecs' does not fit"),
    ("-5 s", "cannot read"),
    ("1" + "0" * 400 + " s", "out of range"),
    ("nan s", "cannot read"),
])
def test_bad_quantities(text, message):
    with pytest.raises(NumberError, match=message):
        quantity(text, ("ms", "s"), 1e9)


def test_the_config_package_does_not_import_the_fault_runner():
    """config -> resilience was an import loop (resilience imports config)."""
    code = ("import sys, harness.config, harness.config.faults; "
            "print(sorted(m for m in sys.modules if m.startswith('harness.resilience')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "[]"
