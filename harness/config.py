"""Topology files: which PACS nodes a merger has, validated before anything starts.

A topology is YAML::

    name: merger-pilot
    nodes:
      legacy:  {kind: dcmqrscp, ae_title: LEGACY}
      central: {kind: orthanc,  ae_title: CENTRAL}
      site_b:  {kind: external, ae_title: SITEB, host: 127.0.0.1, dicom_port: 11112}
    settings: {}          # free-form scenario settings (thresholds, volumes)

Every mistake is reported as one `ConfigError` line naming the file, the line, the field and
what is allowed, e.g. ``topo.yaml:3: nodes.legacy.kind: unknown kind 'orthank' (allowed:
orthanc, dcmqrscp, embedded, external)``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.errors import ConfigError

LAUNCHED_KINDS = ("orthanc", "dcmqrscp", "embedded", "dcm4chee")
KINDS = (*LAUNCHED_KINDS, "external")
LAUNCHES = ("process", "docker")
#: kinds that run as a local process; dcm4chee exists only as containers
PROCESS_KINDS = ("orthanc", "dcmqrscp", "embedded")
INDEXES = ("sqlite", "postgresql")

TOP_LEVEL_FIELDS = ("name", "nodes", "links", "settings")
LINK_FIELDS = {
    "from": "a node name (leave out: the harness itself)",
    "to": "a node name",
    "preset": "a WAN preset, e.g. wan-30ms-100mbit",
    "latency_ms": "a number >= 0",
    "jitter_ms": "a number >= 0",
    "bandwidth_mbit": "a number > 0",
}
NODE_FIELDS = {
    "kind": "orthanc, dcmqrscp, embedded, dcm4chee or external",
    "launch": "process or docker (dcm4chee: docker only)",
    "image": "the container image for launch: docker",
    "index": "sqlite or postgresql (orthanc only)",
    "ae_title": "1-16 characters: letters, digits, space, _ - .",
    "host": "a host name or IP address (launched nodes: 127.0.0.0/8 only)",
    "dicom_port": "an integer 1-65535",
    "http_port": "an integer 1-65535",
    "disposable": "true or false",
    "writable": "true or false: the harness may store synthetic data (not wipe)",
    "credentials": "{username_env: VAR, password_env: VAR}",
    "dicomweb_root": "URL path of the DICOMweb service, e.g. /dicom-web",
    "orthanc_rest": "true when an external node is an Orthanc with its REST API",
    "orthanc_config": "a mapping merged into the generated orthanc.json (orthanc only)",
    "description": "free text",
}
CREDENTIAL_FIELDS = ("username_env", "password_env")
AE_TITLE_RE = re.compile(r"^[A-Za-z0-9_\-. ]{1,16}$")
NODE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,31}$")


@dataclass(frozen=True)
class Credentials:
    """Names of environment variables holding a login; the values are never stored."""

    username_env: str | None = None
    password_env: str | None = None

    def resolve(self) -> tuple[str, str] | None:
        """Read the login from the environment, or None when not configured."""
        if not self.username_env:
            return None
        user = os.environ.get(self.username_env)
        password = os.environ.get(self.password_env or "", "")
        if user is None:
            raise ConfigError(f"credentials: environment variable {self.username_env} is not set")
        return user, password


@dataclass(frozen=True)
class NodeSpec:
    """One node as declared (ports may still be None: picked free at start)."""

    name: str
    kind: str
    ae_title: str
    host: str = "127.0.0.1"
    dicom_port: int | None = None
    http_port: int | None = None
    disposable: bool = True
    writable: bool = False  # may store synthetic data without being disposable
    credentials: Credentials = field(default_factory=Credentials)
    dicomweb_root: str | None = None
    orthanc_rest: bool = False
    description: str = ""
    launch: str = "process"
    image: str | None = None
    index: str = "sqlite"
    orthanc_config: dict[str, Any] = field(default_factory=dict)
    line: int = 0

    @property
    def launched(self) -> bool:
        return self.kind in LAUNCHED_KINDS

    @property
    def may_write(self) -> bool:
        """Write permission: store synthetic data (docs/safety.md, Permissions)."""
        return self.disposable or self.writable


@dataclass(frozen=True)
class LinkSpec:
    """A network path that goes through a fault proxy: from a node (or the harness) to a node."""

    name: str  # "<from>-><to>", "harness-><to>" for the harness's own traffic
    to: str
    source: str | None = None  # None: the harness
    latency_s: float = 0.0
    jitter_s: float = 0.0
    bandwidth_bps: float | None = None


@dataclass(frozen=True)
class Topology:
    """The validated topology: nodes by name, links, and free-form scenario settings."""

    name: str
    nodes: dict[str, NodeSpec]
    settings: dict[str, Any] = field(default_factory=dict)
    links: dict[str, LinkSpec] = field(default_factory=dict)
    source: str = "<default>"

    @property
    def is_default(self) -> bool:
        return self.source == "<default>"

    def node(self, name: str) -> NodeSpec:
        try:
            return self.nodes[name]
        except KeyError:
            raise ConfigError(
                f"{self.source}: no node named {name!r} (nodes: {', '.join(self.nodes)})"
            ) from None


# ---------------------------------------------------------------------------------------
# YAML with line numbers


def _construct(node: yaml.Node, lines: dict[tuple, int], path: tuple) -> Any:
    """Turn a composed YAML node into plain Python, remembering each path's line."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.safe_load(yaml.serialize(key_node)) if key_node.tag else key_node.value
            key = str(key)
            if key in result:
                raise _DuplicateKey(key, key_node.start_mark.line + 1, path)
            lines[(*path, key)] = key_node.start_mark.line + 1
            result[key] = _construct(value_node, lines, (*path, key))
            lines[(*path, key)] = key_node.start_mark.line + 1
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, lines, (*path, i)) for i, item in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int, path: tuple) -> None:
        self.key, self.line, self.path = key, line, path


def load_yaml(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    lines: dict[tuple, int] = {}
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: invalid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    if node is None:
        return None, lines
    try:
        return _construct(node, lines, ()), lines
    except _DuplicateKey as dup:
        dotted = ".".join(str(p) for p in (*dup.path, dup.key))
        raise ConfigError(f"{source}:{dup.line}: {dotted}: duplicate key") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None


# ---------------------------------------------------------------------------------------
# Validation


class Checker:
    """Raises ConfigError with file:line: field: message."""

    def __init__(self, source: str, lines: dict[tuple, int]) -> None:
        self.source, self.lines = source, lines

    def line(self, path: tuple) -> int:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)

    def fail(self, path: tuple, message: str) -> ConfigError:
        dotted = ".".join(str(p) for p in path) or "(top level)"
        return ConfigError(f"{self.source}:{self.line(path)}: {dotted}: {message}")


def _port(check: Checker, path: tuple, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise check.fail(path, f"invalid port {value!r} (allowed: an integer 1-65535)")
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _node(check: Checker, name: Any, raw: Any) -> NodeSpec:
    path = ("nodes", name)
    if not isinstance(name, str) or not NODE_NAME_RE.match(name):
        raise check.fail(
            path, "invalid node name (allowed: a letter then letters, digits, _ or -, max 32)"
        )
    if not isinstance(raw, dict):
        raise check.fail(path, "must be a mapping with at least 'kind'")
    for key in raw:
        if key not in NODE_FIELDS:
            raise check.fail((*path, key), f"unknown field (allowed: {', '.join(NODE_FIELDS)})")
    kind = raw.get("kind")
    if kind is None:
        raise check.fail((*path, "kind"), f"missing (allowed: {', '.join(KINDS)})")
    if kind not in KINDS:
        raise check.fail((*path, "kind"), f"unknown kind {kind!r} (allowed: {', '.join(KINDS)})")

    ae_title = raw.get("ae_title", name.upper().replace("-", "_")[:16])
    if (
        not isinstance(ae_title, str)
        or not AE_TITLE_RE.match(ae_title)
        or ae_title.strip() != ae_title
    ):
        raise check.fail(
            (*path, "ae_title"),
            f"invalid AE title {ae_title!r} (allowed: {NODE_FIELDS['ae_title']}, "
            "no leading or trailing space)",
        )

    host = raw.get("host")
    if kind == "external":
        if not host:
            raise check.fail(
                (*path, "host"), "missing: an external node needs the host where it runs"
            )
        if raw.get("dicom_port") is None:
            raise check.fail(
                (*path, "dicom_port"), "missing: an external node needs its DICOM port"
            )
    else:
        host = host or "127.0.0.1"
    if not isinstance(host, str):
        raise check.fail((*path, "host"), f"invalid host {host!r} (allowed: a host name or IP)")
    if kind != "external" and not _is_loopback(host):
        raise check.fail(
            (*path, "host"),
            f"launched nodes listen on loopback only, not {host!r} "
            "(allowed: 127.0.0.0/8 or localhost)",
        )

    launch = raw.get("launch", "docker" if kind == "dcm4chee" else "process")
    if launch not in LAUNCHES:
        raise check.fail(
            (*path, "launch"), f"unknown launch {launch!r} (allowed: {', '.join(LAUNCHES)})"
        )
    if kind == "external" and "launch" in raw:
        raise check.fail((*path, "launch"), "an external node is not launched by the harness")
    if launch == "process" and kind not in PROCESS_KINDS and kind != "external":
        raise check.fail((*path, "launch"), f"{kind} runs only with launch: docker")
    image = raw.get("image")
    if image is not None and (launch != "docker" or not isinstance(image, str) or not image):
        raise check.fail(
            (*path, "image"), "only for launch: docker, as a non-empty image name"
        )
    index = raw.get("index", "sqlite")
    if index not in INDEXES:
        raise check.fail(
            (*path, "index"), f"unknown index {index!r} (allowed: {', '.join(INDEXES)})"
        )
    if index != "sqlite" and kind != "orthanc":
        raise check.fail((*path, "index"), "index: postgresql is for orthanc nodes only")

    orthanc_config = raw.get("orthanc_config", {})
    if not isinstance(orthanc_config, dict):
        raise check.fail((*path, "orthanc_config"), "must be a mapping of Orthanc settings")
    if orthanc_config and kind != "orthanc":
        raise check.fail((*path, "orthanc_config"), "orthanc_config is for orthanc nodes only")

    disposable = raw.get("disposable", kind != "external")
    if not isinstance(disposable, bool):
        raise check.fail(
            (*path, "disposable"), f"invalid value {disposable!r} (allowed: true or false)"
        )

    creds_raw = raw.get("credentials") or {}
    if not isinstance(creds_raw, dict):
        raise check.fail((*path, "credentials"), f"must be {NODE_FIELDS['credentials']}")
    for key, value in creds_raw.items():
        if key not in CREDENTIAL_FIELDS:
            raise check.fail(
                (*path, "credentials", key),
                "unknown field (allowed: username_env, password_env: names of environment "
                "variables; never put the secret itself in the file)",
            )
        if not isinstance(value, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", value):
            raise check.fail(
                (*path, "credentials", key),
                "must name an environment variable, e.g. SITEB_PASSWORD",
            )
    for flag in ("orthanc_rest", "writable"):
        if flag in raw and not isinstance(raw[flag], bool):
            raise check.fail((*path, flag), "invalid value (allowed: true or false)")

    return NodeSpec(
        name=name,
        kind=kind,
        ae_title=ae_title,
        host=host,
        dicom_port=_port(check, (*path, "dicom_port"), raw.get("dicom_port")),
        http_port=_port(check, (*path, "http_port"), raw.get("http_port")),
        disposable=disposable,
        writable=bool(raw.get("writable", False)),
        credentials=Credentials(**creds_raw),
        dicomweb_root=raw.get("dicomweb_root") or ("/dicom-web" if kind == "orthanc" else None),
        orthanc_rest=bool(raw.get("orthanc_rest", kind == "orthanc")),
        description=str(raw.get("description", "")),
        launch=launch,
        image=image,
        index=index,
        orthanc_config=orthanc_config,
        line=check.line(path),
    )


def parse_topology(text: str, source: str = "<string>") -> Topology:
    """Validate topology YAML text; raise ConfigError naming file, line and field."""
    data, lines = load_yaml(text, source)
    check = Checker(source, lines)
    if not isinstance(data, dict):
        raise check.fail((), "a topology must be a mapping with 'name' and 'nodes'")
    for key in data:
        if key not in TOP_LEVEL_FIELDS:
            raise check.fail((key,), f"unknown field (allowed: {', '.join(TOP_LEVEL_FIELDS)})")
    name = data.get("name", Path(source).stem)
    if not isinstance(name, str) or not name.strip():
        raise check.fail(("name",), "must be a non-empty string")
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, dict) or not raw_nodes:
        raise check.fail(("nodes",), "missing or empty: declare at least one node")
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise check.fail(("settings",), "must be a mapping")

    nodes = {node_name: _node(check, node_name, raw) for node_name, raw in raw_nodes.items()}

    seen_ae: dict[str, str] = {}
    seen_ports: dict[tuple[str, int], tuple[str, str]] = {}
    for spec in nodes.values():
        if spec.ae_title in seen_ae:
            raise check.fail(
                ("nodes", spec.name, "ae_title"),
                f"duplicate AE title {spec.ae_title!r} (already used by node "
                f"{seen_ae[spec.ae_title]!r}; AE titles must be unique)",
            )
        seen_ae[spec.ae_title] = spec.name
        for port_field in ("dicom_port", "http_port"):
            port = getattr(spec, port_field)
            if port is None:
                continue
            host_key = "loopback" if _is_loopback(spec.host) else spec.host
            if (host_key, port) in seen_ports:
                other, other_field = seen_ports[(host_key, port)]
                raise check.fail(
                    ("nodes", spec.name, port_field),
                    f"port {port} clashes with {other}.{other_field} (each port once per host)",
                )
            seen_ports[(host_key, port)] = (spec.name, port_field)
    links = _links(check, data.get("links"), nodes)
    return Topology(name=name, nodes=nodes, settings=settings, source=source, links=links)


def _number(check: Checker, path: tuple, value: Any, minimum: float, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or (
        value <= minimum if strict else value < minimum
    ):
        relation = ">" if strict else ">="
        raise check.fail(path, f"must be a number {relation} {minimum:g}, got {value!r}")
    return float(value)


def _links(check: Checker, raw: Any, nodes: dict[str, NodeSpec]) -> dict[str, LinkSpec]:
    """`links:` is a list of {from?, to, preset? | latency_ms?, jitter_ms?, bandwidth_mbit?}."""
    from harness.faults import WAN_PRESETS

    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise check.fail(("links",), "must be a list of {from, to, preset, latency_ms, ...}")
    links: dict[str, LinkSpec] = {}
    for index, item in enumerate(raw):
        path = ("links", index)
        if not isinstance(item, dict):
            raise check.fail(path, "must be a mapping with at least 'to'")
        for key in item:
            if key not in LINK_FIELDS:
                raise check.fail((*path, key), f"unknown field (allowed: {', '.join(LINK_FIELDS)})")
        for end in ("from", "to"):
            value = item.get(end)
            if end == "to" and value is None:
                raise check.fail((*path, "to"), "missing: the node the link leads to")
            if value is not None and value not in nodes:
                raise check.fail(
                    (*path, end), f"unknown node {value!r} (nodes: {', '.join(nodes)})"
                )
        if item.get("from") == item["to"]:
            raise check.fail(path, "a link joins two different nodes")
        settings = {"latency_s": 0.0, "jitter_s": 0.0, "bandwidth_bps": None}
        if "preset" in item:
            if item["preset"] not in WAN_PRESETS:
                raise check.fail(
                    (*path, "preset"),
                    f"unknown preset {item['preset']!r} (allowed: {', '.join(WAN_PRESETS)})",
                )
            settings.update(WAN_PRESETS[item["preset"]])
        if "latency_ms" in item:
            settings["latency_s"] = _number(check, (*path, "latency_ms"), item["latency_ms"], 0,
                                            False) / 1000
        if "jitter_ms" in item:
            settings["jitter_s"] = _number(check, (*path, "jitter_ms"), item["jitter_ms"], 0,
                                           False) / 1000
        if "bandwidth_mbit" in item:
            settings["bandwidth_bps"] = _number(
                check, (*path, "bandwidth_mbit"), item["bandwidth_mbit"], 0, True) * 1e6
        name = f"{item.get('from') or 'harness'}->{item['to']}"
        if name in links:
            raise check.fail(path, f"duplicate link {name}")
        links[name] = LinkSpec(name=name, to=item["to"], source=item.get("from"), **settings)
    return links


def read_config_text(path: str | os.PathLike[str], what: str) -> str:
    """The text of a user's YAML file (topology, rules, workload, contract), or one
    ConfigError line naming the file."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read {what}: {exc}") from None


def load_topology(path: str | os.PathLike[str]) -> Topology:
    """Read and validate a topology file."""
    return parse_topology(read_config_text(path, "topology file"), str(path))


# ---------------------------------------------------------------------------------------
# Default topology


@dataclass(frozen=True)
class DefaultChoice:
    """Which kind the default topology chose for a node, and why (printed to the user)."""

    node: str
    kind: str
    reason: str


def default_topology(
    which: Callable[[str], str | None] | None = None,
) -> tuple[Topology, list[DefaultChoice]]:
    """A `legacy` and a `target` node: real servers where installed, embedded otherwise.

    legacy is DCMTK's dcmqrscp when installed (an old-style archive), target is Orthanc
    when installed (the new central archive); each falls back to the embedded PACS.
    """
    from harness.tools import find_binary

    which = which or find_binary
    choices = []
    dcmqrscp = which("dcmqrscp")
    if dcmqrscp:
        choices.append(DefaultChoice("legacy", "dcmqrscp", f"DCMTK found at {dcmqrscp}"))
    else:
        choices.append(DefaultChoice("legacy", "embedded", "dcmqrscp (DCMTK) not installed"))
    orthanc = which("Orthanc")
    if orthanc:
        choices.append(DefaultChoice("target", "orthanc", f"Orthanc found at {orthanc}"))
    else:
        choices.append(DefaultChoice("target", "embedded", "Orthanc not installed"))
    nodes = {
        c.node: NodeSpec(
            name=c.node,
            kind=c.kind,
            ae_title=c.node.upper(),
            dicomweb_root="/dicom-web" if c.kind == "orthanc" else None,
            orthanc_rest=c.kind == "orthanc",
        )
        for c in choices
    }
    return Topology(name="default", nodes=nodes, source="<default>"), choices


def resolve_topology(path: str | os.PathLike[str] | None) -> tuple[Topology, list[DefaultChoice]]:
    """The topology from `path`, or the default one (with the choices made) when None."""
    if path is None:
        return default_topology()
    return load_topology(path), []
