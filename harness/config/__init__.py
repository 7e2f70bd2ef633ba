"""Configuration files, each checked by a pydantic schema before anything starts.

One module per file kind: `topology` (nodes, links, settings), `faults` (settings.faults),
`workload`, `contract` and `rules`; `yaml` reads every file with limits and the line of each
value, `errors` turns a schema error into one ``file:line: field: message`` line (exit 2),
`numbers` is the one finite-number parser of all of them.

What other modules import from `harness.config` is the topology part, re-exported here.
"""

from harness.config.errors import Checker
from harness.config.topology import (
    AE_TITLE_RE,
    LAUNCHES,
    NODE_NAME_RE,
    TOPOLOGY_NAME_RE,
    Credentials,
    DefaultChoice,
    LinkSpec,
    NodeSpec,
    Topology,
    default_topology,
    kind_capabilities,
    kinds_with,
    load_topology,
    parse_topology,
    resolve_topology,
)
from harness.config.wan import MAX_LINK_MBIT, MAX_LINK_MS, WAN_PRESETS
from harness.config.yaml import (
    MAX_CONFIG_BYTES,
    MAX_YAML_ALIASES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    load_yaml,
    read_config_text,
)

__all__ = [
    "AE_TITLE_RE",
    "LAUNCHES",
    "MAX_CONFIG_BYTES",
    "MAX_LINK_MBIT",
    "MAX_LINK_MS",
    "MAX_YAML_ALIASES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_NODES",
    "NODE_NAME_RE",
    "TOPOLOGY_NAME_RE",
    "WAN_PRESETS",
    "Checker",
    "Credentials",
    "DefaultChoice",
    "LinkSpec",
    "NodeSpec",
    "Topology",
    "default_topology",
    "kind_capabilities",
    "kinds_with",
    "load_topology",
    "load_yaml",
    "parse_topology",
    "read_config_text",
    "resolve_topology",
]
