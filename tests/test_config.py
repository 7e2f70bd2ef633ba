"""Topology validation: every bad file is refused before anything starts, naming the line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.config import default_topology, load_topology, parse_topology
from harness.errors import ConfigError

GOOD = """\
name: merger-pilot
nodes:
  legacy:  {kind: dcmqrscp, ae_title: LEGACY}
  central: {kind: orthanc,  ae_title: CENTRAL}
  site_b:  {kind: external, ae_title: SITEB, host: 127.0.0.1, dicom_port: 11112}
"""


def test_minimal_topology_from_the_issue():
    topology = parse_topology(GOOD, "t.yaml")
    assert list(topology.nodes) == ["legacy", "central", "site_b"]
    assert topology.node("legacy").kind == "dcmqrscp"
    assert topology.node("central").disposable is True
    assert topology.node("site_b").disposable is False  # external: not unless declared
    assert topology.node("site_b").dicom_port == 11112


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "name: x\nnodes:\n  a: {kind: orthank}\n",
            "t.yaml:3: nodes.a.kind: unknown kind 'orthank' (allowed: ctn, dcm4chee, dcmqrscp, "
            "embedded, external, orthanc, pixelmed)",
        ),
        (
            "name: x\nnodes:\n  a: {kind: orthanc, ae_title: SAME}\n"
            "  b: {kind: embedded, ae_title: SAME}\n",
            "t.yaml:4: nodes.b.ae_title: duplicate AE title 'SAME'",
        ),
        (
            "name: x\nnodes:\n  a: {kind: orthanc, dicom_port: 4242}\n"
            "  b:\n    kind: embedded\n    dicom_port: 4242\n",
            "t.yaml:6: nodes.b.dicom_port: port 4242 clashes with a.dicom_port",
        ),
        (
            "name: x\nnodes:\n  a: {kind: orthanc, dicom_port: 4242, http_port: 4242}\n",
            "t.yaml:3: nodes.a.http_port: port 4242 clashes with a.dicom_port",
        ),
        (
            "name: x\nnodes:\n  site:\n    kind: external\n    dicom_port: 104\n",
            "t.yaml:3: nodes.site.host: missing: an external node needs the host",
        ),
        ("name: x\nnodes:\n  a: {kind: orthanc\n", "t.yaml:4: invalid YAML"),
        ("name: x\nnodes: [a, b]\n", "t.yaml:2: nodes: missing or empty"),
        (
            "name: x\nnodes:\n  a: {kind: orthanc, colour: red}\n",
            "t.yaml:3: nodes.a.colour: unknown field (allowed: kind, launch, image, index, "
            "ae_title",
        ),
        (
            "name: x\nnodes:\n  a: {kind: orthanc, dicom_port: 70000}\n",
            "t.yaml:3: nodes.a.dicom_port: invalid port 70000 (allowed: an integer 1-65535)",
        ),
        (
            "name: x\nnodes:\n  a: {kind: orthanc, ae_title: THIS_IS_FAR_TOO_LONG}\n",
            "t.yaml:3: nodes.a.ae_title: invalid AE title 'THIS_IS_FAR_TOO_LONG'",
        ),
        (
            "name: x\nnodes:\n  a: {kind: orthanc, host: 192.168.1.20}\n",
            "t.yaml:3: nodes.a.host: launched nodes listen on loopback only",
        ),
        (
            "name: x\nnodes:\n  a: {kind: orthanc}\n  a: {kind: embedded}\n",
            "t.yaml:4: nodes.a: duplicate key",
        ),
        (
            "name: x\nnodes:\n  s:\n    kind: external\n    host: 127.0.0.1\n    dicom_port: 1\n"
            "    credentials: {password: hunter2}\n",
            "t.yaml:7: nodes.s.credentials.password: unknown field",
        ),
        ("name: x\nnodes:\n  a: {ae_title: A}\n", "t.yaml:3: nodes.a.kind: missing"),
        (
            "name: x\nnodez: {}\n",
            "t.yaml:2: nodez: unknown field (allowed: name, nodes, links, settings)",
        ),
        ("", "t.yaml:1: (top level): a topology must be a mapping"),
        (
            "name: x\nnodes:\n  a: {kind: orthanc, launch: kubernetes}\n",
            "t.yaml:3: nodes.a.launch: unknown launch 'kubernetes' (allowed: process, docker)",
        ),
        (
            "name: x\nnodes:\n  a: {kind: dcm4chee, launch: process}\n",
            "t.yaml:3: nodes.a.launch: dcm4chee runs only with launch: docker",
        ),
        (
            "name: x\nnodes:\n  a: {kind: orthanc, image: 'orthancteam/orthanc'}\n",
            "t.yaml:3: nodes.a.image: only for launch: docker",
        ),
        (
            "name: x\nnodes:\n  a: {kind: dcmqrscp, index: postgresql}\n",
            "t.yaml:3: nodes.a.index: index: postgresql is for orthanc nodes only",
        ),
        (
            "name: x\nnodes:\n  a: {kind: orthanc, index: oracle}\n",
            "t.yaml:3: nodes.a.index: unknown index 'oracle' (allowed: sqlite, postgresql)",
        ),
    ],
)
def test_bad_topologies_name_file_line_and_field(text, expected):
    with pytest.raises(ConfigError) as err:
        parse_topology(text, "t.yaml")
    assert str(err.value).startswith(expected), str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="topology file not found"):
        load_topology(tmp_path / "nope.yaml")


def test_default_topology_uses_real_servers_when_installed():
    topology, choices = default_topology(which=lambda name: f"/usr/bin/{name}")
    assert {n: s.kind for n, s in topology.nodes.items()} == {
        "legacy": "dcmqrscp",
        "target": "orthanc",
    }
    assert all("found at" in c.reason for c in choices)


def test_default_topology_falls_back_to_embedded():
    topology, choices = default_topology(which=lambda name: None)
    assert {s.kind for s in topology.nodes.values()} == {"embedded"}
    assert [c.reason for c in choices] == [
        "dcmqrscp (DCMTK) not installed",
        "Orthanc not installed",
    ]


@pytest.mark.parametrize("command", ["up", "status", "down"])
def test_cli_exits_2_with_one_line_on_bad_topology(tmp_path: Path, command: str):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nnodes:\n  a: {kind: pacs9000}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "harness", command, "--topology", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {bad}:3: nodes.a.kind: unknown kind 'pacs9000' (allowed: "
                     "ctn, dcm4chee, dcmqrscp, embedded, external, orthanc, pixelmed)"]
    assert "Traceback" not in proc.stderr


LINKED = """\
name: linked
nodes:
  legacy: {kind: embedded}
  central: {kind: orthanc, orthanc_config: {StableAge: 5}}
links:
  - {to: central, preset: wan-30ms-100mbit}
  - {from: legacy, to: central, latency_ms: 10, bandwidth_mbit: 50}
"""


def test_links_and_orthanc_config():
    topology = parse_topology(LINKED, "t.yaml")
    assert list(topology.links) == ["harness->central", "legacy->central"]
    wan = topology.links["harness->central"]
    assert (wan.latency_s, wan.bandwidth_bps) == (0.03, 100e6)
    lan = topology.links["legacy->central"]
    assert (lan.source, lan.latency_s, lan.bandwidth_bps) == ("legacy", 0.01, 50e6)
    assert topology.node("central").orthanc_config == {"StableAge": 5}


@pytest.mark.parametrize(
    ("links", "expected"),
    [
        ("[{to: nowhere}]", "t.yaml:5: links.0.to: unknown node 'nowhere' (nodes: a, b)"),
        ("[{from: a}]", "t.yaml:5: links.0.to: missing"),
        ("[{to: a, preset: dialup}]", "t.yaml:5: links.0.preset: unknown preset 'dialup'"),
        ("[{to: a, latency_ms: -1}]", "t.yaml:5: links.0.latency_ms: must be a number >= 0"),
        ("[{to: a, bandwidth_mbit: 0}]", "t.yaml:5: links.0.bandwidth_mbit: must be a number > 0"),
        ("[{to: a}, {to: a}]", "t.yaml:5: links.1: duplicate link harness->a"),
        ("[{from: a, to: a}]", "t.yaml:5: links.0: a link joins two different nodes"),
        ("{to: a}", "t.yaml:5: links: must be a list"),
    ],
)
def test_bad_links(links, expected):
    text = f"name: x\nnodes:\n  a: {{kind: embedded}}\n  b: {{kind: orthanc}}\nlinks: {links}\n"
    with pytest.raises(ConfigError) as err:
        parse_topology(text, "t.yaml")
    assert str(err.value).startswith(expected), str(err.value)


def test_orthanc_config_only_for_orthanc():
    with pytest.raises(ConfigError, match="orthanc_config is for orthanc nodes only"):
        parse_topology("name: x\nnodes:\n  a: {kind: embedded, orthanc_config: {A: 1}}\n", "t")


def test_a_few_aliases_still_work():
    """Anchors and aliases for shared settings are allowed; only abuse is refused."""
    text = (
        "name: x\nnodes:\n  a: {kind: embedded}\n"
        "settings:\n  common: &common {studies: 3, retries: 2}\n"
        "  first: *common\n  second: *common\n"
    )
    topology = parse_topology(text, "t.yaml")
    assert topology.settings["first"] == topology.settings["second"] == {
        "studies": 3, "retries": 2,
    }


def test_limits_refuse_with_the_line_of_the_alias():
    text = "name: x\nnodes:\n  a: {kind: embedded}\nsettings:\n  loop: &loop\n    - *loop\n"
    with pytest.raises(ConfigError, match=r"^t\.yaml:6: invalid YAML: recursive alias \*loop"):
        parse_topology(text, "t.yaml")


def test_name_from_the_file_name_is_made_safe(tmp_path: Path):
    path = tmp_path / "my pilot (v2).yaml"
    path.write_text("nodes:\n  a: {kind: embedded}\n")
    assert load_topology(path).name == "my-pilot--v2-"


def test_fault_schedule_is_checked_with_the_topology():
    good = (
        "name: x\nnodes:\n  a: {kind: embedded}\nlinks: [{to: a}]\nsettings:\n  faults:\n"
        "    - {at_s: 1, fault: latency, target: harness->a, duration_s: 2, latency_s: 0.05}\n"
        "    - {at_s: 2, fault: kill, target: a}\n"
    )
    assert len(parse_topology(good, "t.yaml").settings["faults"]) == 2
    bad = good.replace("latency_s: 0.05", "latency_s: -1")
    with pytest.raises(ConfigError, match=r"^t\.yaml:7: settings\.faults\.0\.latency_s: must be"):
        parse_topology(bad, "t.yaml")


@pytest.mark.parametrize("latency", [".nan", ".inf", "-.inf", "-1", "1.0e+9", "true", "'5'"])
def test_link_latency_is_a_finite_number_in_range(latency: str):
    text = "name: x\nnodes:\n  a: {kind: embedded}\nlinks:\n"
    text += f"  - {{to: a, latency_ms: {latency}}}\n"
    with pytest.raises(ConfigError, match=r"^t\.yaml:5: links\.0\.latency_ms: must be a number"):
        parse_topology(text, "t.yaml")
