"""Topology files: which PACS nodes a merger has, validated before anything starts.

A topology is YAML::

    name: merger-pilot
    nodes:
      legacy:  {kind: dcmqrscp, ae_title: LEGACY}
      central: {kind: orthanc,  ae_title: CENTRAL}
      site_b:  {kind: external, ae_title: SITEB, host: 127.0.0.1, dicom_port: 11112}
    links:                # network paths through a fault proxy (from a node or the harness)
      - {to: central, preset: wan-30ms-100mbit}
    settings: {}          # free-form scenario settings; settings.faults: harness/config/faults.py

The file is read with limits (harness/config/yaml.py) and checked by the schema below: every
mistake is one `ConfigError` line naming the file, the line, the field and what is allowed,
e.g. ``topo.yaml:3: nodes.legacy.kind: unknown kind 'orthank' (allowed: orthanc, dcmqrscp,
embedded, dcm4chee, external)``; an unknown field is refused. Numbers must be finite and in
range (harness/config/numbers.py); the topology name (it names the state folder) is
``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``. Hosts are IPv4 only: ``::1`` is refused at check time.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import BeforeValidator, Field, StrictBool, StrictStr, model_validator

from harness.config.errors import Checker, ConfigModel, Text, choice, fail, validate
from harness.config.faults import FaultSpec, parse_faults
from harness.config.numbers import Number, Port
from harness.config.security import (
    AuditModel,
    AuditSpec,
    PemPath,
    TLSModel,
    TLSSpec,
    audit_field,
)
from harness.config.wan import MAX_LINK_MBIT, MAX_LINK_MS, WAN_PRESETS
from harness.config.yaml import load_yaml, read_config_text
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


def kind_names() -> tuple[str, ...]:
    from harness.nodes import catalog

    return catalog.kind_names()


AE_TITLE_TEXT = "1-16 characters: letters, digits, space, _ - ."
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
    tls: TLSSpec | None = None  # DICOM over TLS (harness/config/security.py)
    https: bool = False  # its REST/DICOMweb over TLS: http_url is https://
    https_ca: str | None = None  # the CA of its HTTPS certificate, when not tls.ca
    audit: AuditSpec | None = None  # where its ATNA audit messages reach the harness
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
    #: settings.faults, checked (the settings keep what the file says)
    faults: tuple[FaultSpec, ...] = ()

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
# Schema: what a topology file may hold; defaults that depend on the kind are resolved when
# the NodeSpec is built, and checks across nodes (AE titles, ports, links) come after.


def _ae_title(value: Any) -> str:
    if not isinstance(value, str) or not AE_TITLE_RE.match(value) or value.strip() != value:
        raise fail(
            f"invalid AE title {value!r} (allowed: {AE_TITLE_TEXT}, "
            "no leading or trailing space)"
        )
    return value


def _host(value: Any) -> str:
    """The harness listens, proxies and connects on IPv4 only (127.0.0.1 for what it
    launches), so an IPv6 host such as ::1 is refused here rather than failing at `up`."""
    if not isinstance(value, str) or not value:
        raise fail(f"invalid host {value!r} (allowed: a host name or IP)")
    if ":" in value:
        raise fail(
            f"IPv6 address {value!r} not supported: the harness uses IPv4 only "
            "(use 127.0.0.1 for loopback)"
        )
    return value


def _env_name(value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*\Z", value):
        raise fail("must name an environment variable, e.g. SITEB_PASSWORD")
    return value


def _orthanc_config(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise fail("must be a mapping of Orthanc settings")
    return value


def _image(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise fail("only for launch: docker, as a non-empty image name")
    return value


EnvName = Annotated[str, BeforeValidator(_env_name)]
def _kind(value: Any) -> str:
    """One of the kinds harness/nodes declares (asked at check time: a kind added as a
    module is known without touching this file)."""
    kinds = kind_names()
    if not isinstance(value, str) or value not in kinds:
        raise fail(f"unknown kind {value!r} (allowed: {', '.join(kinds)})")
    return value


def _index(value: Any) -> str:
    kinds = kind_names()
    indexes = tuple(dict.fromkeys(
        ["sqlite", *(i for k in kinds for i in kind_capabilities(k).index_backends)]
    ))
    if not isinstance(value, str) or value not in indexes:
        raise fail(f"unknown index {value!r} (allowed: {', '.join(indexes)})")
    return value


Kind = Annotated[str, BeforeValidator(_kind)]
Launch = choice("launch", LAUNCHES)
Index = Annotated[str, BeforeValidator(_index)]
Preset = choice("preset", tuple(WAN_PRESETS))
LinkMilliseconds = Number(0, MAX_LINK_MS)
LinkMegabits = Number(0, MAX_LINK_MBIT, low_open=True)


class CredentialsModel(ConfigModel):
    """Names of environment variables holding a login; the values are never in the file."""

    shape: ClassVar[str] = "{username_env: VAR, password_env: VAR}"
    unknown_note: ClassVar[str] = (
        ": names of environment variables; never put the secret itself in the file"
    )

    username_env: EnvName | None = None
    password_env: EnvName | None = None


class NodeModel(ConfigModel):
    """One node as written; None: the default for its kind (see `spec`)."""

    shape: ClassVar[str] = "a mapping with at least 'kind'"

    kind: Kind = Field(
        description="a module of harness/nodes: orthanc, dcmqrscp, embedded, dcm4chee, external..."
    )
    launch: Launch | None = Field(
        None, description="process or docker, as the kind allows"
    )
    image: Annotated[str, BeforeValidator(_image)] | None = Field(
        None, description="the container image for launch: docker"
    )
    index: Index | None = Field(
        None, description="sqlite or postgresql, as the kind allows"
    )
    ae_title: Annotated[str, BeforeValidator(_ae_title)] | None = Field(
        None, description=AE_TITLE_TEXT
    )
    host: Annotated[str, BeforeValidator(_host)] | None = Field(
        None, description="a host name or IPv4 address (launched nodes: 127.0.0.0/8 only)"
    )
    dicom_port: Port | None = None
    http_port: Port | None = None
    disposable: StrictBool | None = Field(
        None, description="the harness may wipe it (default: true for launched nodes)"
    )
    writable: StrictBool = Field(
        False, description="the harness may store synthetic data (not wipe)"
    )
    synthetic: StrictBool = Field(
        False, description="an external node holds only synthetic patients (reports then show "
        "identities; default false: redacted, see docs/safety.md)"
    )
    credentials: CredentialsModel | None = None
    dicomweb_root: StrictStr | None = Field(
        None, description="URL path of the DICOMweb service, e.g. /dicom-web"
    )
    orthanc_rest: StrictBool | None = Field(
        None, description="an external node is an Orthanc with its REST API"
    )
    orthanc_config: Annotated[dict[str, Any], BeforeValidator(_orthanc_config)] = Field(
        {}, description="a mapping merged into the generated orthanc.json (orthanc only)"
    )
    tls: TLSModel | None = Field(
        None, description="DICOM over TLS: {generate: true} or the site's files"
    )
    https: StrictBool = Field(
        False, description="its REST API and DICOMweb are served over HTTPS (the certificate "
        "is checked against https_ca, tls.ca, the run's CA for a launched node, else the "
        "system's)"
    )
    https_ca: PemPath | None = Field(
        None, description="an external node's HTTPS CA (PEM) when its DICOM is not TLS"
    )
    audit: Annotated[AuditModel | None, BeforeValidator(audit_field)] = Field(
        None, description="true, or {port, transport}: its IHE ATNA audit messages"
    )
    description: Text = ""

    @model_validator(mode="after")
    def _fits_kind(self) -> NodeModel:
        kind, caps = self.kind, kind_capabilities(self.kind)
        if not caps.launched:
            if not self.host:
                raise fail(f"missing: an {kind} node needs the host where it runs", "host")
            if self.dicom_port is None:
                raise fail(f"missing: an {kind} node needs its DICOM port", "dicom_port")
        elif self.host is not None and not is_loopback(self.host):
            raise fail(
                f"launched nodes listen on loopback only, not {self.host!r} "
                "(allowed: 127.0.0.0/8 or localhost)",
                "host",
            )
        if not caps.launched and self.launch is not None:
            raise fail(f"an {kind} node is not launched by the harness", "launch")
        launch = self.resolved_launch
        if caps.launched and launch not in caps.launches:
            raise fail(f"{kind} runs only with launch: {' or '.join(caps.launches)}", "launch")
        if self.image is not None and launch != "docker":
            raise fail("only for launch: docker, as a non-empty image name", "image")
        if self.index not in (None, "sqlite") and self.index not in caps.index_backends:
            having = kinds_with(lambda c: self.index in c.index_backends)
            raise fail(f"index: {self.index} is for {', '.join(having)} nodes only", "index")
        if self.orthanc_config and "orthanc_config" not in caps.own_fields:
            having = kinds_with(lambda c: "orthanc_config" in c.own_fields)
            raise fail(f"orthanc_config is for {', '.join(having)} nodes only", "orthanc_config")
        self._security_fits_kind(kind, caps)
        return self

    def _security_fits_kind(self, kind: str, caps: Capabilities) -> None:
        if self.tls is not None:
            if caps.launched and not caps.tls:
                having = kinds_with(lambda c: c.tls and c.launched)
                raise fail(f"{kind} nodes cannot be launched with TLS (kinds that can: "
                           f"{', '.join(having) or 'none'})", "tls")
            if caps.launched and not self.tls.generate:
                raise fail("a launched node takes tls: {generate: true} (the harness makes "
                           "its certificates)", "tls")
            if not caps.launched and self.tls.generate:
                raise fail(f"an {kind} node has its own certificates: give ca (and "
                           "certificate, key if it wants a client certificate)", "tls")
            if not caps.launched and self.tls.ca is None:
                raise fail(f"an {kind} node needs tls.ca to verify its certificate", "tls")
        if self.https and caps.launched and not caps.https:
            having = kinds_with(lambda c: c.https and c.launched)
            raise fail(f"{kind} nodes cannot be launched with https (kinds that can: "
                       f"{', '.join(having) or 'none'})", "https")
        if self.https_ca is not None and (caps.launched or not self.https):
            raise fail("https_ca is for an external node declared https: true", "https_ca")
        if self.https and not caps.launched and self.http_port is None:
            raise fail(f"an {kind} node serves HTTPS only on a declared http_port", "https")
        if self.audit is not None:
            if caps.launched and not caps.audit_trail:
                having = kinds_with(lambda c: c.audit_trail and c.launched)
                raise fail(f"{kind} sends no audit messages (kinds that do: "
                           f"{', '.join(having) or 'none'})", "audit")
            if caps.launched and self.audit.transport == "tls" and self.tls is None:
                raise fail("audit over TLS sends with the node's own certificate: declare "
                           "tls: {generate: true} too", "audit")
            if not caps.launched and self.audit.port is None:
                raise fail(f"an {kind} node needs audit.port: where its syslog reaches the "
                           "harness", "audit")

    @property
    def resolved_launch(self) -> str:
        return self.launch or kind_capabilities(self.kind).default_launch

    def spec(self, name: str, line: int) -> NodeSpec:
        """The node with every default of its kind filled in."""
        kind, caps = self.kind, kind_capabilities(self.kind)
        credentials = self.credentials or CredentialsModel()
        return NodeSpec(
            name=name,
            kind=kind,
            ae_title=self.ae_title or name.upper().replace("-", "_")[:16],
            host=self.host or "127.0.0.1",
            dicom_port=self.dicom_port,
            http_port=self.http_port,
            disposable=caps.launched if self.disposable is None else self.disposable,
            writable=self.writable,
            synthetic=self.synthetic,
            credentials=Credentials(credentials.username_env, credentials.password_env),
            dicomweb_root=self.dicomweb_root or caps.dicomweb_root,
            orthanc_rest=caps.orthanc_rest if self.orthanc_rest is None else self.orthanc_rest,
            description=self.description,
            launch=self.resolved_launch,
            image=self.image,
            index=self.index or "sqlite",
            orthanc_config=dict(self.orthanc_config),
            tls=self.tls.spec() if self.tls else None,
            https=self.https,
            https_ca=self.https_ca,
            audit=self.audit.spec() if self.audit else None,
            line=line,
        )


class LinkModel(ConfigModel):
    """`links:` items: {from?, to, preset? | latency_ms?, jitter_ms?, bandwidth_mbit?}."""

    shape: ClassVar[str] = "a mapping with at least 'to'"

    source: StrictStr | None = Field(
        None, alias="from", description="a node name (leave out: the harness itself)"
    )
    to: StrictStr = Field(description="a node name")
    preset: Preset | None = Field(None, description="a WAN preset: " + ", ".join(WAN_PRESETS))
    latency_ms: LinkMilliseconds | None = None
    jitter_ms: LinkMilliseconds | None = None
    bandwidth_mbit: LinkMegabits | None = None

    def spec(self) -> LinkSpec:
        settings: dict[str, Any] = {"latency_s": 0.0, "jitter_s": 0.0, "bandwidth_bps": None}
        if self.preset is not None:
            settings.update(WAN_PRESETS[self.preset])
        if self.latency_ms is not None:
            settings["latency_s"] = self.latency_ms / 1000
        if self.jitter_ms is not None:
            settings["jitter_s"] = self.jitter_ms / 1000
        if self.bandwidth_mbit is not None:
            settings["bandwidth_bps"] = self.bandwidth_mbit * 1e6
        return LinkSpec(name=self.name, to=self.to, source=self.source, **settings)

    @property
    def name(self) -> str:
        return f"{self.source or 'harness'}->{self.to}"


def _topology_name(value: Any) -> str:
    if not isinstance(value, str) or not TOPOLOGY_NAME_RE.fullmatch(value):
        raise fail(
            f"invalid name {value!r} (allowed: a letter or digit, then letters, digits, "
            ". _ or -, max 64; it names the state folder)"
        )
    return value


def _nodes(value: Any) -> Any:
    if not isinstance(value, dict) or not value:
        raise fail("missing or empty: declare at least one node")
    for name in value:
        if not NODE_NAME_RE.match(name):
            raise fail(
                "invalid node name (allowed: a letter then letters, digits, _ or -, max 32)",
                name,
            )
    return value


def _links(value: Any) -> Any:
    if value is not None and not isinstance(value, list):
        raise fail("must be a list of {from, to, preset, latency_ms, ...}")
    return value or []


def _settings(value: Any) -> Any:
    if value is not None and not isinstance(value, dict):
        raise fail("must be a mapping")
    return value or {}


class TopologyModel(ConfigModel):
    shape: ClassVar[str] = "a mapping with 'name' and 'nodes'"

    name: Annotated[str, BeforeValidator(_topology_name)] | None = None
    nodes: Annotated[dict[str, NodeModel], BeforeValidator(_nodes)] = Field(
        None, validate_default=True
    )
    links: Annotated[list[LinkModel], BeforeValidator(_links)] = []
    settings: Annotated[dict[str, Any], BeforeValidator(_settings)] = {}


def is_loopback(host: str) -> bool:
    """localhost or an address in 127.0.0.0/8 (where launched nodes may listen)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_topology(text: str, source: str = "<string>") -> Topology:
    """Validate topology YAML text; raise ConfigError naming file, line and field."""
    data, lines = load_yaml(text, source)
    check = Checker(source, lines)
    if not isinstance(data, dict):
        raise check.fail((), "a topology must be a mapping with 'name' and 'nodes'")
    model = validate(TopologyModel, data, check)
    name = model.name
    if name is None:
        name = re.sub(r"[^A-Za-z0-9._-]", "-", Path(source).stem).lstrip("._-")[:64] or "topology"
    nodes = {
        node_name: raw.spec(node_name, check.line(("nodes", node_name)))
        for node_name, raw in model.nodes.items()
    }
    _check_unique(check, nodes)
    links = _check_links(check, model.links, nodes)
    faults = parse_faults(model.settings.get("faults"), check)
    return Topology(name=name, nodes=nodes, settings=model.settings, source=source,
                    links=links, faults=faults)


def _check_unique(check: Checker, nodes: dict[str, NodeSpec]) -> None:
    """AE titles are unique, and each port is used once per host."""
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
            host_key = "loopback" if is_loopback(spec.host) else spec.host
            if (host_key, port) in seen_ports:
                other, other_field = seen_ports[(host_key, port)]
                raise check.fail(
                    ("nodes", spec.name, port_field),
                    f"port {port} clashes with {other}.{other_field} (each port once per host)",
                )
            seen_ports[(host_key, port)] = (spec.name, port_field)


def _check_links(
    check: Checker, models: list[LinkModel], nodes: dict[str, NodeSpec]
) -> dict[str, LinkSpec]:
    """Links join two different declared nodes (or the harness and a node), once each."""
    links: dict[str, LinkSpec] = {}
    for index, item in enumerate(models):
        path = ("links", index)
        for end, value in (("from", item.source), ("to", item.to)):
            if value is not None and value not in nodes:
                raise check.fail(
                    (*path, end), f"unknown node {value!r} (nodes: {', '.join(nodes)})"
                )
        if item.source == item.to:
            raise check.fail(path, "a link joins two different nodes")
        if item.name in links:
            raise check.fail(path, f"duplicate link {item.name}")
        links[item.name] = item.spec()
    return links


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
