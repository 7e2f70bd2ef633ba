"""A conformance probe, the context it runs in, and what it found.

Why one shape: association, C-FIND matching, retrieval, storage fidelity and the services
offered are different questions, but one matrix (nodes x probes) and one list of migration
risks are built from their answers. A probe is defined once, with the behaviour the standard
expects and its PS3 reference; its outcome on a node is one of:

* ``conforms``: the node did what the reference says;
* ``differs``: it did something else (``observed`` says what), which may still be allowed
  (a PACS may refuse a service it does not offer) but may break a migration;
* ``not supported``: the node does not offer what the probe needs (refused the SOP class,
  the role, the service);
* ``not tested``: the probe could not run here (the node is not writable, it did not answer,
  a prerequisite probe failed); ``observed`` says why. Never counted as conforming.

Probes register themselves with the ``@probe`` decorator when their module is imported;
``all_probes()`` imports the area modules of this package and returns them in a stable order.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from harness.dicom.peer import DimseConnectionError
from harness.errors import EnvironmentProblem

Outcome = Literal["conforms", "differs", "not supported", "not tested"]
OUTCOMES: tuple[Outcome, ...] = ("conforms", "differs", "not supported", "not tested")

#: the areas, in the order the matrix lists them; each is a module of this package
AREAS = ("association", "query", "limits", "retrieve", "storage", "services")

#: evidence is kept for the report, never whole data sets: each side is cut to this length
MAX_EVIDENCE_CHARS = 2000


def _bounded(text: str) -> str:
    if len(text) <= MAX_EVIDENCE_CHARS:
        return text
    return text[: MAX_EVIDENCE_CHARS - 20] + f" ... ({len(text)} chars)"


@dataclass(frozen=True)
class Evidence:
    """One exchange as the probe saw it: what it sent and what came back, in words."""

    request: str  # e.g. "C-FIND STUDY (study root) PatientName='PROBE^A*'"
    response: str  # e.g. "Success; 2 matches: 1.2.3..., 1.2.4..."

    def __post_init__(self) -> None:
        object.__setattr__(self, "request", _bounded(self.request))
        object.__setattr__(self, "response", _bounded(self.response))

    def as_dict(self) -> dict[str, str]:
        return {"request": self.request, "response": self.response}


@dataclass(frozen=True)
class Observation:
    """What a probe's function returns: the outcome and what was seen."""

    outcome: Outcome
    observed: str
    #: machine-readable facts for risks.py and the migrator (e.g. {"limit": 5})
    facts: dict[str, Any] = field(default_factory=dict)


class ProbeNotApplicable(Exception):
    """Raised inside a probe whose prerequisite is missing on this node (a corpus study it
    refused, ...): the probe is "not tested" with the message as the reason."""


def conforms(observed: str, **facts: Any) -> Observation:
    return Observation("conforms", observed, facts)


def differs(observed: str, **facts: Any) -> Observation:
    return Observation("differs", observed, facts)


def not_supported(observed: str, **facts: Any) -> Observation:
    return Observation("not supported", observed, facts)


def not_tested(why: str, **facts: Any) -> Observation:
    return Observation("not tested", why, facts)


@dataclass
class ProbeContext:
    """What a probe gets: the node, what was stored there for probes, and an evidence log.

    ``node`` is a harness Node (launched or external; ``node.dimse()``, ``node.writable``,
    ``node.capabilities``). ``corpus`` is what ``corpus.py`` stored into the node before the
    probes ran (None when the node is not writable). ``move_destination`` is another node of
    the topology that this node knows as a C-MOVE destination and whose content the harness
    can read back (None when there is none).
    """

    node: Any
    corpus: Any = None
    move_destination: Any = None
    evidence: list[Evidence] = field(default_factory=list)

    def record(self, request: str, response: str) -> None:
        """Keep one exchange as evidence for the report."""
        self.evidence.append(Evidence(request, response))


ProbeFunction = Callable[[ProbeContext], Observation]


@dataclass(frozen=True)
class Probe:
    """One question, defined once: what the standard expects and where it says so."""

    id: str  # stable, "area.name": "query.wildcard-star"
    area: str  # one of AREAS
    title: str  # short, for the matrix: "* wildcard"
    expected: str  # the behaviour the reference requires, in a sentence
    reference: str  # "PS3.4 C.2.2.2.4"
    function: ProbeFunction
    needs_corpus: bool = False  # reads what corpus.py stored (so: the node must be writable)
    writes: bool = False  # stores objects of its own into the node (so: it must be writable)

    def run(self, context: ProbeContext) -> ProbeResult:
        """Run on one node. A node that does not answer makes the probe 'not tested'; any
        other exception is a bug of the probe and propagates."""
        node = context.node
        if (self.needs_corpus or self.writes) and not node.writable:
            seen = not_tested(f"{node.name} is not writable: the probe stores test objects")
        elif self.needs_corpus and context.corpus is None:
            seen = not_tested("the probe corpus was not stored on this node")
        else:
            try:
                seen = self.function(context)
            except (DimseConnectionError, EnvironmentProblem) as exc:
                seen = not_tested(f"the node did not answer: {exc}")
            except ProbeNotApplicable as exc:
                seen = not_tested(str(exc))
        return ProbeResult(
            probe=self.id,
            node=node.name,
            outcome=seen.outcome,
            observed=seen.observed,
            evidence=tuple(context.evidence),
            facts=dict(seen.facts),
        )

    def info(self) -> dict[str, str]:
        return {
            "id": self.id,
            "area": self.area,
            "title": self.title,
            "expected": self.expected,
            "reference": self.reference,
        }


@dataclass(frozen=True)
class ProbeResult:
    """One cell of the matrix."""

    probe: str
    node: str
    outcome: Outcome
    observed: str
    evidence: tuple[Evidence, ...] = ()
    facts: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "probe": self.probe,
            "node": self.node,
            "outcome": self.outcome,
            "observed": self.observed,
            "evidence": [e.as_dict() for e in self.evidence],
            "facts": self.facts,
        }

    def line(self) -> str:
        return f"{self.node}: {self.probe}: {self.outcome} ({self.observed})"


_registry: dict[str, Probe] = {}


def probe(
    id: str,
    *,
    title: str,
    expected: str,
    reference: str,
    needs_corpus: bool = False,
    writes: bool = False,
) -> Callable[[ProbeFunction], ProbeFunction]:
    """Register the decorated function as the probe `id` ("area.name")."""
    area = id.split(".", 1)[0]
    if area not in AREAS:
        raise ValueError(f"probe {id!r}: area {area!r} is not one of {AREAS}")

    def register(function: ProbeFunction) -> ProbeFunction:
        if id in _registry and _registry[id].function.__qualname__ != function.__qualname__:
            raise ValueError(f"probe {id!r} is defined twice")
        _registry[id] = Probe(id, area, title, expected, reference, function, needs_corpus, writes)
        return function

    return register


def all_probes(areas: tuple[str, ...] = AREAS) -> list[Probe]:
    """Every registered probe of `areas`, by area order then definition order."""
    for area in areas:
        try:
            importlib.import_module(f"{__package__}.{area}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{area}":
                raise
    by_area = {a: [p for p in _registry.values() if p.area == a] for a in areas}
    return [p for a in areas for p in by_area[a]]


def probe_by_id(probe_id: str) -> Probe:
    """One probe (KeyError naming the id when unknown)."""
    all_probes()
    try:
        return _registry[probe_id]
    except KeyError:
        raise KeyError(f"unknown conformance probe {probe_id!r}") from None
