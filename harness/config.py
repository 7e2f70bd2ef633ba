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

Every configuration file of the harness (topology, rules, workload, contract) is read by
`read_config_text` and `load_yaml`, with limits so that a hostile file ends in one such line,
never a hang or a traceback: at most 1 MiB, 100 aliases, 50 levels of nesting and 100,000
values once aliases are expanded; no recursive alias, no complex key, no non-standard tag.
Numbers must be finite and in range; the topology name (it names the state folder) is
``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``. Hosts are IPv4 only: ``::1`` is refused at check time.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from harness.errors import ConfigError

if TYPE_CHECKING:
    from harness.nodes.capabilities import Capabilities

LAUNCHES = ("process", "docker")


def kind_capabilities(kind: str) -> Capabilities:
    """What a kind can do, declared on its class (harness/nodes/catalog.py finds them)."""
    from harness.nodes import catalog

    return catalog.capabilities(kind)


def kinds_with(predicate: Callable[[Capabilities], bool]) -> tuple[str, ...]:
    from harness.nodes import catalog

    return catalog.kinds_with(predicate)

TOP_LEVEL_FIELDS = ("name", "nodes", "links", "settings")
LINK_FIELDS = {
    "from": "a node name (leave out: the harness itself)",
    "to": "a node name",
    "preset": "a WAN preset, e.g. wan-30ms-100mbit",
    "latency_ms": "a number >= 0 and <= 60000",
    "jitter_ms": "a number >= 0 and <= 60000",
    "bandwidth_mbit": "a number > 0 and <= 100000",
}
#: link latency and jitter above a minute would only make every DICOM timeout fire
#: settings of a link between facilities: one-way latency, jitter, bandwidth (bits/s)
WAN_PRESETS: dict[str, dict[str, float]] = {
    "lan": {"latency_s": 0.0005, "jitter_s": 0.0, "bandwidth_bps": 1e9},
    "wan-10ms-1gbit": {"latency_s": 0.010, "jitter_s": 0.001, "bandwidth_bps": 1e9},
    "wan-30ms-100mbit": {"latency_s": 0.030, "jitter_s": 0.003, "bandwidth_bps": 100e6},
    "wan-80ms-20mbit": {"latency_s": 0.080, "jitter_s": 0.010, "bandwidth_bps": 20e6},
    "satellite-600ms-5mbit": {"latency_s": 0.600, "jitter_s": 0.050, "bandwidth_bps": 5e6},
}
MAX_LINK_MS = 60_000
MAX_LINK_MBIT = 100_000
NODE_FIELDS = {
    "kind": "a module of harness/nodes: orthanc, dcmqrscp, embedded, dcm4chee, external...",
    "launch": "process or docker, as the kind allows",
    "image": "the container image for launch: docker",
    "index": "sqlite or postgresql, as the kind allows",
    "ae_title": "1-16 characters: letters, digits, space, _ - .",
    "host": "a host name or IP address (launched nodes: 127.0.0.0/8 only)",
    "dicom_port": "an integer 1-65535",
    "http_port": "an integer 1-65535",
    "disposable": "true or false",
    "writable": "true or false: the harness may store synthetic data (not wipe)",
    "synthetic": "true when an external node holds only synthetic patients (reports then "
                 "show identities; default false: redacted, see docs/safety.md)",
    "credentials": "{username_env: VAR, password_env: VAR}",
    "dicomweb_root": "URL path of the DICOMweb service, e.g. /dicom-web",
    "orthanc_rest": "true when an external node is an Orthanc with its REST API",
    "orthanc_config": "a mapping merged into the generated orthanc.json (orthanc only)",
    "description": "free text",
}
CREDENTIAL_FIELDS = ("username_env", "password_env")
AE_TITLE_RE = re.compile(r"^[A-Za-z0-9_\-. ]{1,16}\Z")
#: the topology name names the state folder and temporary folders: no path separators
TOPOLOGY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
NODE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,31}\Z")


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
    synthetic: bool = False  # an external node declared to hold only synthetic patients
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
        return kind_capabilities(self.kind).launched

    @property
    def may_write(self) -> bool:
        """Write permission: store synthetic data (docs/safety.md, Permissions)."""
        return self.disposable or self.writable

    @property
    def holds_synthetic_only(self) -> bool:
        """Launched nodes hold what the harness loads; external ones real patients unless
        declared `synthetic: true` (their identities are redacted in reports otherwise)."""
        return self.launched or self.synthetic


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
# YAML with line numbers, read with limits
#
# A configuration file may come from anyone; reading it must never hang nor exhaust memory.
# Aliases are allowed (a few, for shared settings) but an alias that contains itself is
# refused, and so is any file whose aliases expand to more than MAX_YAML_NODES values
# ("billion laughs"). Mapping keys must be plain scalars.

#: largest configuration file read, in bytes
MAX_CONFIG_BYTES = 1024 * 1024
#: aliases (*name) allowed in one file
MAX_YAML_ALIASES = 100
#: nesting depth of mappings and lists
MAX_YAML_DEPTH = 50
#: values after every alias is expanded
MAX_YAML_NODES = 100_000


class _YamlLimit(Exception):
    """A limit was hit at `line` (1-based)."""

    def __init__(self, line: int, message: str) -> None:
        self.line, self.message = line, message


class _LimitedLoader(yaml.SafeLoader):
    """SafeLoader that counts aliases, refuses recursive ones and bounds the nesting depth."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0
        self._open_anchors: list[str] = []

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise _YamlLimit(line, f"more than {MAX_YAML_ALIASES} aliases (*name)")
            if event.anchor in self._open_anchors:
                raise _YamlLimit(line, f"recursive alias *{event.anchor} (it contains itself)")
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise _YamlLimit(line, f"nested deeper than {MAX_YAML_DEPTH} levels")
        anchor = getattr(event, "anchor", None)
        if anchor:
            self._open_anchors.append(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor:
                self._open_anchors.pop()


#: mappings and lists carry only the standard tags (no !!python/..., !!set, !!omap)
_PLAIN_TAGS = {
    yaml.MappingNode: "tag:yaml.org,2002:map",
    yaml.SequenceNode: "tag:yaml.org,2002:seq",
}


class _Builder:
    """Turn a composed YAML node into plain Python, remembering each path's line."""

    def __init__(self) -> None:
        self.lines: dict[tuple, int] = {}
        self.count = 0
        self.scalars = yaml.SafeLoader("")  # only its scalar constructors are used

    def build(self, node: yaml.Node, path: tuple) -> Any:
        self.count += 1
        if self.count > MAX_YAML_NODES:
            raise _YamlLimit(
                node.start_mark.line + 1,
                f"more than {MAX_YAML_NODES} values once aliases are expanded",
            )
        self.lines[path] = node.start_mark.line + 1
        if type(node) in _PLAIN_TAGS and node.tag != _PLAIN_TAGS[type(node)]:
            raise _YamlLimit(node.start_mark.line + 1, f"unsupported tag {node.tag!r}")
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key_line = key_node.start_mark.line + 1
                if not isinstance(key_node, yaml.ScalarNode):
                    raise _YamlLimit(key_line, "a key must be a plain value, not a list or mapping")
                key = str(self.scalars.construct_object(key_node))
                if key in result:
                    raise _DuplicateKey(key, key_line, path)
                self.lines[(*path, key)] = key_line
                result[key] = self.build(value_node, (*path, key))
                self.lines[(*path, key)] = key_line
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        return self.scalars.construct_object(node)


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int, path: tuple) -> None:
        self.key, self.line, self.path = key, line, path


def load_yaml(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    """Parse a configuration file's text with limits; every problem is one ConfigError line
    ``file:line: ...``. Returns the data and the line of each path (tuple of keys/indexes)."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{source}:1: file too large ({len(text)} characters; a configuration file "
            f"is at most {MAX_CONFIG_BYTES} bytes)"
        )
    builder = _Builder()
    try:
        loader = _LimitedLoader(text)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
        if node is None:
            return None, builder.lines
        return builder.build(node, ()), builder.lines
    except _YamlLimit as limit:
        raise ConfigError(f"{source}:{limit.line}: invalid YAML: {limit.message}") from None
    except _DuplicateKey as dup:
        dotted = ".".join(str(p) for p in (*dup.path, dup.key))
        raise ConfigError(f"{source}:{dup.line}: {dotted}: duplicate key") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark else f"{source}:1"
        problem = " ".join(str(exc.problem or exc).split())
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(f"{source}:1: invalid YAML: {message}") from None
    except RecursionError:
        raise ConfigError(f"{source}:1: invalid YAML: nested too deeply") from None


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
        """One line, whatever the file holds: control characters in keys are escaped so a
        key cannot forge a second error line."""
        dotted = ".".join(str(p) for p in path) or "(top level)"
        return ConfigError(_one_line(f"{self.source}:{self.line(path)}: {dotted}: {message}"))


def _one_line(text: str) -> str:
    """`text` with every non-printable character escaped (\\n, \\x1b...)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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
    kinds = kinds_with(lambda _caps: True)
    if kind is None:
        raise check.fail((*path, "kind"), f"missing (allowed: {', '.join(kinds)})")
    if kind not in kinds:
        raise check.fail((*path, "kind"), f"unknown kind {kind!r} (allowed: {', '.join(kinds)})")
    caps = kind_capabilities(kind)

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
    if not caps.launched:
        if not host:
            raise check.fail(
                (*path, "host"), f"missing: an {kind} node needs the host where it runs"
            )
        if raw.get("dicom_port") is None:
            raise check.fail(
                (*path, "dicom_port"), f"missing: an {kind} node needs its DICOM port"
            )
    else:
        host = host or "127.0.0.1"
    if not isinstance(host, str):
        raise check.fail((*path, "host"), f"invalid host {host!r} (allowed: a host name or IP)")
    if caps.launched and not _is_loopback(host):
        raise check.fail(
            (*path, "host"),
            f"launched nodes listen on loopback only, not {host!r} "
            "(allowed: 127.0.0.0/8 or localhost)",
        )

    launch = raw.get("launch", caps.default_launch)
    if launch not in LAUNCHES:
        raise check.fail(
            (*path, "launch"), f"unknown launch {launch!r} (allowed: {', '.join(LAUNCHES)})"
        )
    if not caps.launched and "launch" in raw:
        raise check.fail((*path, "launch"), f"an {kind} node is not launched by the harness")
    if caps.launched and launch not in caps.launches:
        raise check.fail(
            (*path, "launch"), f"{kind} runs only with launch: {' or '.join(caps.launches)}"
        )
    image = raw.get("image")
    if image is not None and (launch != "docker" or not isinstance(image, str) or not image):
        raise check.fail(
            (*path, "image"), "only for launch: docker, as a non-empty image name"
        )
    index = raw.get("index", "sqlite")
    indexes = tuple(dict.fromkeys(i for k in kinds for i in kind_capabilities(k).index_backends))
    if index not in indexes:
        raise check.fail(
            (*path, "index"), f"unknown index {index!r} (allowed: {', '.join(indexes)})"
        )
    if index != "sqlite" and index not in caps.index_backends:
        having = kinds_with(lambda c: index in c.index_backends)
        raise check.fail((*path, "index"), f"index: {index} is for {', '.join(having)} nodes only")

    orthanc_config = raw.get("orthanc_config", {})
    if not isinstance(orthanc_config, dict):
        raise check.fail((*path, "orthanc_config"), "must be a mapping of Orthanc settings")
    if orthanc_config and "orthanc_config" not in caps.own_fields:
        having = kinds_with(lambda c: "orthanc_config" in c.own_fields)
        raise check.fail(
            (*path, "orthanc_config"), f"orthanc_config is for {', '.join(having)} nodes only"
        )

    disposable = raw.get("disposable", caps.launched)
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
    for flag in ("orthanc_rest", "writable", "synthetic"):
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
        synthetic=bool(raw.get("synthetic", False)),
        credentials=Credentials(**creds_raw),
        dicomweb_root=raw.get("dicomweb_root") or caps.dicomweb_root,
        orthanc_rest=bool(raw.get("orthanc_rest", caps.orthanc_rest)),
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
    if "name" in data:
        name = data["name"]
        if not isinstance(name, str) or not TOPOLOGY_NAME_RE.fullmatch(name):
            raise check.fail(
                ("name",),
                f"invalid name {name!r} (allowed: a letter or digit, then letters, digits, "
                ". _ or -, max 64; it names the state folder)",
            )
    else:
        name = re.sub(r"[^A-Za-z0-9._-]", "-", Path(source).stem).lstrip("._-")[:64] or "topology"
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, dict) or not raw_nodes:
        raise check.fail(("nodes",), "missing or empty: declare at least one node")
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise check.fail(("settings",), "must be a mapping")

    for node_name, raw in raw_nodes.items():
        _refuse_ipv6(check, ("nodes", node_name, "host"), raw)
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
    if "faults" in settings:
        from harness.resilience.schedule import FaultSchedule

        FaultSchedule.from_settings(settings["faults"], "settings.faults", check)
    return Topology(name=name, nodes=nodes, settings=settings, source=source, links=links)


def _refuse_ipv6(check: Checker, path: tuple, raw: Any) -> None:
    """The harness listens, proxies and connects on IPv4 only (127.0.0.1 for what it
    launches), so an IPv6 host such as ::1 is refused here rather than failing at `up`."""
    host = raw.get("host") if isinstance(raw, dict) else None
    if isinstance(host, str) and ":" in host:
        raise check.fail(
            path,
            f"IPv6 address {host!r} not supported: the harness uses IPv4 only "
            "(use 127.0.0.1 for loopback)",
        )


def _number(
    check: Checker, path: tuple, value: Any, minimum: float, strict: bool, maximum: float
) -> float:
    """A finite number in range; NaN and infinity are refused (`.nan`, `.inf` in YAML)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        ok = math.isfinite(value) and (value > minimum if strict else value >= minimum)
        ok = ok and value <= maximum
    if not ok:
        relation = ">" if strict else ">="
        raise check.fail(
            path, f"must be a number {relation} {minimum:g} and <= {maximum:g}, got {value!r}"
        )
    return float(value)


def _links(check: Checker, raw: Any, nodes: dict[str, NodeSpec]) -> dict[str, LinkSpec]:
    """`links:` is a list of {from?, to, preset? | latency_ms?, jitter_ms?, bandwidth_mbit?}."""
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
            if value is not None and (not isinstance(value, str) or value not in nodes):
                raise check.fail(
                    (*path, end), f"unknown node {value!r} (nodes: {', '.join(nodes)})"
                )
        if item.get("from") == item["to"]:
            raise check.fail(path, "a link joins two different nodes")
        settings = {"latency_s": 0.0, "jitter_s": 0.0, "bandwidth_bps": None}
        if "preset" in item:
            if not isinstance(item["preset"], str) or item["preset"] not in WAN_PRESETS:
                raise check.fail(
                    (*path, "preset"),
                    f"unknown preset {item['preset']!r} (allowed: {', '.join(WAN_PRESETS)})",
                )
            settings.update(WAN_PRESETS[item["preset"]])
        if "latency_ms" in item:
            settings["latency_s"] = _number(check, (*path, "latency_ms"), item["latency_ms"], 0,
                                            False, MAX_LINK_MS) / 1000
        if "jitter_ms" in item:
            settings["jitter_s"] = _number(check, (*path, "jitter_ms"), item["jitter_ms"], 0,
                                           False, MAX_LINK_MS) / 1000
        if "bandwidth_mbit" in item:
            settings["bandwidth_bps"] = _number(
                check, (*path, "bandwidth_mbit"), item["bandwidth_mbit"], 0, True, MAX_LINK_MBIT
            ) * 1e6
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
        with p.open("rb") as stream:
            data = stream.read(MAX_CONFIG_BYTES + 1)  # bounded: a device or a huge file
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{p}:1: {what} too large (a configuration file is at most "
                f"{MAX_CONFIG_BYTES} bytes)"
            )
        return data.decode("utf-8")
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
    from harness.launch.tools import find_binary

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
            dicomweb_root=kind_capabilities(c.kind).dicomweb_root,
            orthanc_rest=kind_capabilities(c.kind).orthanc_rest,
        )
        for c in choices
    }
    return Topology(name="default", nodes=nodes, source="<default>"), choices


def resolve_topology(path: str | os.PathLike[str] | None) -> tuple[Topology, list[DefaultChoice]]:
    """The topology from `path`, or the default one (with the choices made) when None."""
    if path is None:
        return default_topology()
    return load_topology(path), []
