"""Migration risks: which probe outcomes break a migration between two given nodes.

Why per ordered pair: a difference matters only for a direction. A source that truncates
C-FIND loses studies whatever the target; a target that refuses a transfer syntax matters
only when the source may hold it. Each rule reads the probe results of the source and the
target (ProbeResult or its as_dict()) and says why the migration breaks and what the
remedy is; `remedy_id` is what the reference migrator acts on (harness/migration/).

A rule whose probe is unknown, missing or "not tested" on a node yields nothing: the
matrix says what was not measured, the risks only what was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

SPLIT_BY_DATE = "split-queries-by-date"
BY_UID_LIST = "query-by-uid-list"
TRANSCODE = "transcode-before-store"
CLASS_NOT_STORED = "convert-or-exclude-class"
RETRIEVE_BY_GET = "retrieve-by-get"
RETRIEVE_OTHER = "retrieve-outside-dimse"
KEEP_ATTRIBUTES = "preserve-or-allow-changes"
DUPLICATES = "deduplicate-before-migrating"
DELETE_BEFORE_RESEND = "delete-before-resend"
RECONCILE_FULL = "reconcile-full-depth"
ONE_ASSOCIATION = "store-over-one-association"

LIMIT_PROBE = "limits.find-results"
PARALLEL_PROBE = "limits.parallel-stores"
TRANSCODING_PROBE = "storage.transcoding"
DUPLICATE_PROBE = "storage.duplicate-uid"
#: C-FIND matching probes whose difference makes query-based discovery or verification
#: list different studies on the two nodes (PS3.4 C.2.2.2)
MATCHING_PROBES = (
    "query.single-value", "query.wildcard-star", "query.wildcard-question",
    "query.date-range", "query.date-range-open-start", "query.date-range-open-end",
    "query.time-range", "query.datetime-range", "query.pn-case", "query.pn-components",
    "query.charset-latin1", "query.charset-utf8", "query.charset-jis", "query.empty-value",
    "query.sequence", "query.universal",
)
DATE_PROBES = ("query.date-range", "query.date-range-open-start", "query.date-range-open-end")
MEASURED = ("conforms", "differs", "not supported")


@dataclass(frozen=True)
class MigrationRisk:
    """One way a migration from `source` to `target` can lose or change studies."""

    source: str
    target: str
    probe: str  # the probe whose outcome shows it
    risk: str  # what breaks, and why
    remedy: str  # what to do about it
    remedy_id: str  # stable, for the migrator: "split-queries-by-date", ...

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    def line(self) -> str:
        return f"{self.source} -> {self.target}: {self.risk} Remedy: {self.remedy}"


@dataclass(frozen=True)
class _Seen:
    outcome: str
    observed: str
    facts: dict[str, Any]


class _Results:
    """The measured probe results by (node, probe); 'not tested' ones left out."""

    def __init__(self, results: Iterable[Any]) -> None:
        self.seen: dict[tuple[str, str], _Seen] = {}
        for result in results:
            row = result if isinstance(result, dict) else result.as_dict()
            outcome = str(row.get("outcome", ""))
            if outcome in MEASURED:
                facts = row.get("facts") if isinstance(row.get("facts"), dict) else {}
                self.seen[(str(row.get("node")), str(row.get("probe")))] = _Seen(
                    outcome, str(row.get("observed", "")), facts)

    def get(self, node: str, probe: str) -> _Seen | None:
        return self.seen.get((node, probe))


def _node_names(nodes: Iterable[Any]) -> list[tuple[str, bool | None]]:
    """(name, writable or None when unknown) of Node objects, node dicts or names."""
    named = []
    for node in nodes:
        if isinstance(node, str):
            named.append((node, None))
        elif isinstance(node, dict):
            named.append((str(node.get("name")), node.get("writable")))
        else:
            named.append((str(node.name), getattr(node, "writable", None)))
    return named


Rule = Callable[[str, str, _Results], list[MigrationRisk]]


def _same(one: _Seen | None, other: _Seen | None) -> bool:
    return (one is not None and other is not None and one.outcome == other.outcome
            and one.observed == other.observed)


def _find_limit(source: str, target: str, seen: _Results) -> list[MigrationRisk]:
    """PS3.4 C.4.1.1.4: the source ends matching after N; a plan from one query is short."""
    limit = seen.get(source, LIMIT_PROBE)
    if limit is None or limit.facts.get("limit") is None:
        return []
    count = limit.facts["limit"]
    told = ("it says so with a final status other than Success" if limit.facts.get("says_so")
            else "silently: the final status is Success")
    risk = (f"{source} stops a study-level C-FIND after {count} matches ({told}): a "
            f"migration planned from one universal query misses every study past the "
            f"first {count}.")
    dates = [p for p in DATE_PROBES if (s := seen.get(source, p)) and s.outcome != "conforms"]
    if dates:
        return [MigrationRisk(
            source, target, LIMIT_PROBE, risk,
            f"date-range matching on {source} is not reliable ({', '.join(dates)}): list its "
            "studies by UID (a study list from the site, queried in UID lists) and check "
            "the count against the archive's own statistics", BY_UID_LIST)]
    return [MigrationRisk(
        source, target, LIMIT_PROBE, risk,
        "list the source's studies by StudyDate ranges, halved until no answer is cut (then "
        "by StudyTime; a day still cut needs a study UID list from the site); the reference "
        "migrator does this when an answer is cut or given the conformance results "
        "(pacs-harness migrate --conformance)", SPLIT_BY_DATE)]


def _matching(source: str, target: str, seen: _Results) -> list[MigrationRisk]:
    """PS3.4 C.2.2.2: nodes that match keys differently list different studies for the
    same query, so discovery on the source or verification on the target by anything but
    the UID silently misses studies. One risk per pair, naming every probe that differs."""
    differing = []
    for probe in MATCHING_PROBES:
        on_source, on_target = seen.get(source, probe), seen.get(target, probe)
        if on_source is None or on_target is None:
            continue
        if on_source.outcome == on_target.outcome == "conforms" or _same(on_source, on_target):
            continue  # the same behaviour on both: the same studies match
        differing.append((probe, on_source, on_target))
    if not differing:
        return []
    uid_list = seen.get(source, "query.uid-list"), seen.get(target, "query.uid-list")
    by_uid = ("check each study on the target by its Study Instance UID"
              + ("" if all(u and u.outcome == "conforms" for u in uid_list)
                 else " (one UID per query: list-of-UID matching is not reliable on both)"))
    details = "; ".join(f"{probe}: {s.outcome} / {t.outcome}" for probe, s, t in differing)
    return [MigrationRisk(
        source, target, ", ".join(probe for probe, _, _ in differing),
        f"{source} and {target} match C-FIND keys differently ({details}; what each did: "
        "the matrix): the same query "
        "lists different studies on the two nodes, so query-based discovery or "
        "verification may miss studies.",
        f"discover by universal or date-range queries only, then {by_uid}", BY_UID_LIST)]


def _syntaxes(source: str, target: str, seen: _Results) -> list[MigrationRisk]:
    """PS3.8 9.3.3.2: a C-STORE needs a context the target accepts; objects the source holds
    in a syntax the target refuses for their class are not stored as they are."""
    on_source = seen.get(source, "association.storage-syntaxes")
    on_target = seen.get(target, "association.storage-syntaxes")
    if on_source is None or on_target is None:
        return []
    held, taken = on_source.facts.get("accepted"), on_target.facts.get("accepted")
    if not isinstance(held, dict) or not isinstance(taken, dict):
        return []
    refused_syntax: dict[str, list[str]] = {}
    refused_class = []
    for sop_class, syntaxes in held.items():
        if sop_class not in taken:
            refused_class.append(sop_class)
            continue
        missing = [s for s in syntaxes or [] if s not in (taken.get(sop_class) or [])]
        if missing:
            refused_syntax[sop_class] = missing
    risks = []
    if refused_syntax:
        syntaxes = sorted({s for missing in refused_syntax.values() for s in missing})
        classes = sorted(refused_syntax)
        words = (f"{', '.join(syntaxes)}; for {len(classes)} SOP classes: "
                 f"{', '.join(classes[:3])}" + (", ..." if len(classes) > 3 else ""))
        risks.append(MigrationRisk(
            source, target, "association.storage-syntaxes",
            f"{target} refuses transfer syntaxes {source} accepts, so may hold ({words}): "
            "such objects fail C-STORE or reach the target converted.",
            f"transcode them before storing (to a syntax {target} accepts, lossless only) "
            "and reconcile pixels at full depth", TRANSCODE))
    if refused_class:
        risks.append(MigrationRisk(
            source, target, "association.storage-syntaxes",
            f"{target} accepts no context for {', '.join(refused_class)}, which {source} "
            "stores: those objects cannot be migrated by C-STORE.",
            f"configure {target} to accept these SOP classes, or convert or exclude those "
            "objects with the project's sign-off", CLASS_NOT_STORED))
    return risks


def _retrieval(source: str, target: str, seen: _Results) -> list[MigrationRisk]:
    """PS3.4 C.4.2: the reference migrator's default method has the source C-MOVE."""
    move = seen.get(source, "retrieve.move-known")
    if move is None or move.outcome == "conforms":
        return []
    get = seen.get(source, "retrieve.get-study")
    risk = (f"{source} does not complete a C-MOVE ({move.outcome}: {move.observed}): a "
            "migration by C-MOVE loses studies.")
    if get is not None and get.outcome == "conforms":
        return [MigrationRisk(source, target, "retrieve.move-known", risk,
                              "migrate by C-GET (pacs-harness migrate --method get)",
                              RETRIEVE_BY_GET)]
    return [MigrationRisk(source, target, "retrieve.move-known", risk,
                          "retrieve outside C-MOVE/C-GET: DICOMweb or the archive's own API "
                          "(--method dicomweb or orthanc), or the site's tool",
                          RETRIEVE_OTHER)]


def _storage(source: str, target: str, seen: _Results) -> list[MigrationRisk]:
    """PS3.4 B.4.1: the target may keep a changed copy (private tags dropped, long text cut,
    a large object refused); what the source already did the same way is nothing new."""
    risks = []
    for (node, probe), on_target in seen.seen.items():
        if node != target or not probe.startswith("storage.") or probe in (
                TRANSCODING_PROBE, DUPLICATE_PROBE) or on_target.outcome == "conforms":
            continue
        if _same(seen.get(source, probe), on_target):
            continue
        risks.append(MigrationRisk(
            source, target, probe,
            f"{target} {on_target.outcome} on {probe} ({on_target.observed}): migrated "
            "objects do not come back as they were sent.",
            f"configure {target} to keep them, or list the change as allowed in the "
            "migration rules and reconcile at full depth", KEEP_ATTRIBUTES))
    return risks


def _transcoding(source: str, target: str, seen: _Results) -> list[MigrationRisk]:
    """PS3.5 10.1: a source that converts objects on retrieval hands the target another
    encoding (or other pixels, if lossy) than it holds."""
    on_source = seen.get(source, TRANSCODING_PROBE)
    if on_source is None or on_source.outcome == "conforms":
        return []
    return [MigrationRisk(
        source, target, TRANSCODING_PROBE,
        f"{source} converts objects on retrieval ({on_source.observed}): the target may "
        "receive another encoding than the source holds.",
        "offer the stored transfer syntax first when retrieving and reconcile pixels at "
        "full depth (pacs-harness verify --depth full)", RECONCILE_FULL)]


def _duplicates(source: str, target: str, seen: _Results) -> list[MigrationRisk]:
    """PS3.4 B.4.1: the SCP decides what a second object with the same SOP Instance UID
    does; a migration that re-sends corrected objects, or a source holding two objects
    under one UID, depends on it."""
    on_target = seen.get(target, DUPLICATE_PROBE)
    on_source = seen.get(source, DUPLICATE_PROBE)
    policy = on_target.facts.get("duplicate_policy") if on_target else None
    held = on_source.facts.get("duplicate_policy") if on_source else None
    risks = []
    if policy in ("keep-first", "reject"):
        risks.append(MigrationRisk(
            source, target, DUPLICATE_PROBE,
            f"{target} {'keeps the first version' if policy == 'keep-first' else 'refuses'} "
            "when an object is sent again with other content: a study corrected on the "
            "source and migrated again stays old on the target"
            + (" although the C-STORE succeeded." if policy == "keep-first" else "."),
            f"delete a changed study on {target} before sending it again, then reconcile at "
            "full depth", DELETE_BEFORE_RESEND))
    elif policy in ("keep-both", "lost", "unknown"):
        risks.append(MigrationRisk(
            source, target, DUPLICATE_PROBE,
            f"{target} answers a second object with the same SOP Instance UID by "
            f"'{policy}' ({on_target.observed}).", "find SOP Instance UIDs held twice on the "
            "source before migrating and decide which copy wins", DUPLICATES))
    if held == "keep-both" and policy not in (None, "keep-both"):
        risks.append(MigrationRisk(
            source, target, DUPLICATE_PROBE,
            f"{source} may hold two objects under one SOP Instance UID; {target} keeps one "
            f"('{policy}'): the other is lost.", "find SOP Instance UIDs held twice on the "
            "source before migrating and decide which copy wins", DUPLICATES))
    return risks


def _parallel_stores(source: str, target: str, seen: _Results) -> list[MigrationRisk]:
    """PS3.4 B.2.3: Success means stored. A target that loses or mislists instances stored
    over parallel associations breaks a migrator running several workers."""
    on_target = seen.get(target, PARALLEL_PROBE)
    if on_target is None:
        return []
    if on_target.outcome == "differs":
        what = "loses or splits studies on it"
    elif on_target.facts.get("refused"):
        what = "meets refusals and retries on it (refusing is allowed, but slows it down)"
    else:
        return []
    return [MigrationRisk(
        source, target, PARALLEL_PROBE,
        f"{target} with several C-STORE associations at once: {on_target.observed}; a "
        f"migration with parallel workers {what}.",
        f"store into {target} over one association (one worker, or the kind's "
        "store_associations) and reconcile afterwards", ONE_ASSOCIATION)]


RULES: tuple[Rule, ...] = (
    _find_limit, _matching, _syntaxes, _retrieval, _storage, _transcoding, _duplicates,
    _parallel_stores,
)


def migration_risks(results: Iterable[Any], nodes: Iterable[Any]) -> list[MigrationRisk]:
    """The risks of every ordered pair (source, target) of `nodes`: a target must be
    writable (a node known not to be is only a source)."""
    seen = _Results(results)
    named = _node_names(nodes)
    risks: list[MigrationRisk] = []
    for source, _ in named:
        for target, writable in named:
            if source == target or writable is False:
                continue
            for rule in RULES:
                risks += rule(source, target, seen)
    return risks


# -- what the migrator reads ---------------------------------------------------------------


def conformance_of(document: dict[str, Any]) -> dict[str, Any] | None:
    """The conformance run (ConformanceRun.as_dict()) in `document`: that dict itself, or the
    first scenario of a report.json that recorded one as metrics["conformance"]."""
    if isinstance(document.get("results"), list):
        return document
    for scenario in document.get("scenarios") or []:
        found = ((scenario or {}).get("metrics") or {}).get("conformance")
        if isinstance(found, dict) and isinstance(found.get("results"), list):
            return found
    return None


def find_limit_of(conformance: dict[str, Any], node: str) -> tuple[int | None, bool]:
    """(the node's C-FIND limit or None, whether it says so) as limits.find-results saw it."""
    for row in conformance.get("results") or []:
        if row.get("node") == node and row.get("probe") == LIMIT_PROBE:
            facts = row.get("facts") or {}
            limit = facts.get("limit")
            return (int(limit) if isinstance(limit, int) else None), bool(facts.get("says_so"))
    return None, False


def remedies_for(conformance: dict[str, Any], source: str, target: str) -> set[str]:
    """The remedy ids the conformance run flagged for the pair (source, target)."""
    return {str(r.get("remedy_id")) for r in conformance.get("risks") or []
            if r.get("source") == source and r.get("target") == target}
