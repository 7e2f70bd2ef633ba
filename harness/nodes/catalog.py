"""The node kinds: kind name -> Node class, found in the modules of harness/nodes/.

A Node subclass that sets its own `kind` registers itself here when its class is defined
(`Node.__init_subclass__`); `kinds()` first imports every module of this package, so a new
kind is one new module and no caller lists kind names. This module imports no node module
by name (the topology checks in harness.config ask it for kinds, and node modules import
harness.config), only through importlib once the catalog is first consulted.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, Protocol

from harness.nodes.capabilities import Capabilities

#: modules of this package that define no kind (the embedded server is run, not imported)
_NOT_KINDS = ("base", "capabilities", "catalog", "embedded_server")


class KindClass(Protocol):
    kind: str
    capabilities: Capabilities

    def __call__(self, spec: Any, workdir: Path | None) -> Any: ...


_registry: dict[str, KindClass] = {}
_discovered = False


def register(cls: KindClass) -> None:
    """Called by `Node.__init_subclass__` for a class that declares its own `kind`."""
    known = _registry.get(cls.kind)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"node kind {cls.kind!r} is declared twice: {known} and {cls}")
    _registry[cls.kind] = cls


def forget(kind: str) -> None:
    """Drop a kind (a test's own kind, after the test)."""
    _registry.pop(kind, None)


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    for module in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        if module.name not in _NOT_KINDS and not module.name.startswith("_"):
            importlib.import_module(f"{__package__}.{module.name}")
    _discovered = True


def kinds() -> dict[str, KindClass]:
    """Every kind, in name order."""
    _discover()
    return dict(sorted(_registry.items()))


def kind_names() -> tuple[str, ...]:
    return tuple(kinds())


def node_class(kind: str) -> KindClass:
    """The Node class of `kind` (KeyError for an unknown kind: the topology check says which)."""
    return kinds()[kind]


def capabilities(kind: str) -> Capabilities:
    return node_class(kind).capabilities


def kinds_with(predicate: Any) -> tuple[str, ...]:
    """Names of the kinds whose capabilities satisfy `predicate(capabilities)`."""
    return tuple(name for name, cls in kinds().items() if predicate(cls.capabilities))


def make_node(spec: Any, workdir: Path | None) -> Any:
    """A Node of the spec's kind (`spec` is a harness.config.NodeSpec)."""
    return node_class(spec.kind)(spec, workdir)
