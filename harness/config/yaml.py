"""YAML with line numbers, read with limits: every configuration file goes through here.

A configuration file may come from anyone; reading it must never hang nor exhaust memory.
Aliases are allowed (a few, for shared settings) but an alias that contains itself is
refused, and so is any file whose aliases expand to more than MAX_YAML_NODES values
("billion laughs"). Mapping keys must be plain scalars; no non-standard tag.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from harness.errors import ConfigError

#: largest configuration file read, in bytes
MAX_CONFIG_BYTES = 1024 * 1024
#: aliases (*name) allowed in one file
MAX_YAML_ALIASES = 100
#: nesting depth of mappings and lists
MAX_YAML_DEPTH = 50
#: values after every alias is expanded
MAX_YAML_NODES = 100_000

#: the line (1-based) of each path (a tuple of keys and list indexes) in a file
Lines = dict[tuple, int]


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


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int, path: tuple) -> None:
        self.key, self.line, self.path = key, line, path


class _Builder:
    """Turn a composed YAML node into plain Python, remembering each path's line."""

    def __init__(self) -> None:
        self.lines: Lines = {}
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
                result[key] = self.build(value_node, (*path, key))
                self.lines[(*path, key)] = key_line  # a field's line is its key's line
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        return self.scalars.construct_object(node)


def load_yaml(text: str, source: str) -> tuple[Any, Lines]:
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
        raise ConfigError(one_line(f"{source}:{dup.line}: {dotted}: duplicate key")) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark else f"{source}:1"
        problem = " ".join(str(exc.problem or exc).split())
        raise ConfigError(one_line(f"{where}: invalid YAML: {problem}")) from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(one_line(f"{source}:1: invalid YAML: {message}")) from None
    except RecursionError:
        raise ConfigError(f"{source}:1: invalid YAML: nested too deeply") from None


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


def one_line(text: str) -> str:
    """`text` with every non-printable character escaped (\\n, \\x1b...): a key or value
    from the file cannot forge a second error line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
