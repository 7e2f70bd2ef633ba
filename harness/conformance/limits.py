"""Result limits: how many matches a study-level C-FIND returns before the node stops.

Why it matters: a migration plans from the source's study list. A node that stops a C-FIND
after N matches (PS3.4 C.4.1.1.4 lets an SCP end matching early; C.4.1.2.3 lets it limit
what it returns) hands a migrator N studies of many; if it still answers Success, nothing
says the list is short.

How it is measured, read-only (so a site's archive can be probed): one universal study
query, then the same query split by StudyDate ranges (halved until no part is cut,
harness/migration/discovery.py). If the parts list more studies than the universal answer
held, the node truncates, and the final status of the universal answer says whether it
told. The probe stores nothing: a limit above the number of studies a node holds cannot be
seen whatever the probe stored, and storing a few hundred studies would only reveal limits
below a few hundred while writing into every writable node of every run; the facts say up
to how many studies the node was checked (`checked_up_to`).

Bounded: at most PROBE_QUERIES queries, each at most PROBE_MAX_MATCHES matches (a node
answering more than that without stopping has no limit below it).
"""

from __future__ import annotations

from typing import Any

from harness.conformance.model import (
    Observation,
    ProbeContext,
    conforms,
    differs,
    not_tested,
    probe,
)
from harness.dicom.status import NO_STATUS, Status
from harness.migration.discovery import discover_studies
from synthetic_data.templates import clone_study, template_instance

PROBE_QUERIES = 256
PROBE_MAX_MATCHES = 10_000
UNIVERSAL = "C-FIND STUDY (study root) StudyInstanceUID='' StudyDate='' (universal)"


def _status_words(status: Status) -> str:
    """The final status as PS3.4 Table C.4-1 names it."""
    names = {
        0x0000: "Success", 0xFE00: "Cancel: matching terminated due to Cancel request",
        0xA700: "Refused: Out of Resources", 0xA900: "Identifier does not match SOP Class",
    }
    if status.code in names:
        return f"{status} {names[status.code]}"
    if 0xC000 <= status.code <= 0xCFFF:
        return f"{status} Unable to process"
    return str(status)


@probe(
    "limits.find-results",
    title="C-FIND result limit",
    expected="a study-level C-FIND returns every match with a final Success; a node that "
    "stops early says so with a final status other than Success",
    reference="PS3.4 C.4.1.1.4, C.4.1.2.3",
)
def find_result_limit(ctx: ProbeContext) -> Observation:
    client = ctx.node.dimse()
    client.max_find_matches = PROBE_MAX_MATCHES
    first = client.find("STUDY", {"StudyInstanceUID": None, "StudyDate": None})
    if first.status == NO_STATUS:
        ctx.record(UNIVERSAL, first.error or "no answer")
        if first.error and f"more than {PROBE_MAX_MATCHES} matches" in first.error:
            return conforms(
                f"more than {PROBE_MAX_MATCHES} matches without stopping (the probe's bound)",
                limit=None, says_so=False, checked_up_to=PROBE_MAX_MATCHES,
            )
        return not_tested(f"the universal study query was not answered: {first.error}")
    held = len(first.matches)
    ctx.record(UNIVERSAL, f"{_status_words(first.status)}; {held} matches")
    says_so = not first.ok
    if first.ok and held == 0:
        return not_tested("the node holds no study: a limit cannot be seen",
                          limit=None, says_so=False, checked_up_to=0)
    # told: split by status only; silent: every part holding `held` matches may be cut too
    listing = discover_studies(
        client, split=True, silent_limit=None if says_so else max(held, 1),
        max_queries=PROBE_QUERIES, enough=held,
    )
    found = len(listing.uids)
    ctx.record(
        f"the same query split by StudyDate ranges ({listing.queries} queries, halved "
        "until no part is cut or more studies than the universal answer are known)",
        f"{found} distinct studies"
        + (f"; still cut: {', '.join(listing.unresolved[:3])}" if listing.unresolved else ""),
    )
    facts: dict[str, Any] = {"checked_up_to": found, "status": f"0x{first.status.code:04X}"}
    if found > held:
        how = (f"says so: final status {_status_words(first.status)}" if says_so
               else "silently: final status Success")
        if first.status.code == 0xFE00:
            how += " (although the probe sent no C-CANCEL)"
        stops = f"stops after {held} matches" if held else "refuses the universal query"
        return differs(
            f"{stops} ({found} or more studies found by date ranges); {how}",
            limit=held, says_so=says_so, **facts,
        )
    if says_so:
        return differs(
            f"final status {_status_words(first.status)} with {held} matches, although the "
            f"date ranges found no more studies ({found})",
            limit=held if held else None, says_so=True, **facts,
        )
    if listing.unresolved:
        return not_tested(
            f"all {held} studies fall in a range that cannot be split ({listing.unresolved[0]})"
            ": a limit of exactly that many cannot be told apart",
            limit=None, says_so=False, **facts,
        )
    return conforms(f"all {held} studies returned with Success (no limit up to {held})",
                    limit=None, says_so=False, **facts)


#: parallel C-STORE probe: this many associations at once, each with its own study
PARALLEL_ASSOCIATIONS = 4
PARALLEL_INSTANCES_PER_STUDY = 6


@probe(
    "limits.parallel-stores",
    title="parallel C-STORE associations",
    expected="every instance acknowledged with Success over several associations at once is "
    "held, each study listed once; a node that cannot take them in parallel refuses the "
    "association or the instance instead (A-ASSOCIATE-RJ, 0xA7xx)",
    reference="PS3.4 B.2.3, PS3.8 9.3.4",
    writes=True,
)
def parallel_stores(ctx: ProbeContext) -> Observation:
    """A migrator with N workers stores over N associations. dcmqrscp 3.6.7 acknowledges
    instances it then loses (its forked children pick the same file names) and PixelMed
    lists a study stored over two associations as several: the kind's `store_associations`
    keeps the harness's own stores to one, so this probe bypasses it on purpose."""
    client = ctx.node.dimse()
    client.max_store_associations = None  # measure the node, not the harness's cap
    template = template_instance("tiny", "CT", seed=16)
    studies = [clone_study(template, PARALLEL_INSTANCES_PER_STUDY, patient_id=f"CONFPAR{n}")
               for n in range(PARALLEL_ASSOCIATIONS)]
    # interleaved so that every association carries instances of every study
    objects = [study[i] for i in range(PARALLEL_INSTANCES_PER_STUDY) for study in studies]
    report = client.store(objects, associations=PARALLEL_ASSOCIATIONS)
    acknowledged = {r.sop_instance_uid for r in report.succeeded}
    refused = len(report.failed)
    ctx.record(
        f"C-STORE of {len(objects)} instances in {PARALLEL_ASSOCIATIONS} studies over "
        f"{PARALLEL_ASSOCIATIONS} associations at once",
        f"{len(acknowledged)} acknowledged, {refused} refused"
        + (f" (first: {report.failed[0].error or report.failed[0].status})" if refused else ""),
    )
    held: set[str] = set()
    listed_more_than_once = []
    for study in studies:
        study_uid = str(study[0].StudyInstanceUID)
        listed = client.find("STUDY", {"StudyInstanceUID": study_uid})
        if len(listed.matches) > 1:
            listed_more_than_once.append(f"{study_uid} x{len(listed.matches)}")
        found = client.find("IMAGE", {"StudyInstanceUID": study_uid,
                                      "SeriesInstanceUID": str(study[0].SeriesInstanceUID),
                                      "SOPInstanceUID": None})
        held |= {str(m.get("SOPInstanceUID", "")) for m in found.matches}
    lost = sorted(acknowledged - held)
    ctx.record("C-FIND STUDY and IMAGE level of each of the studies",
               f"{len(held & acknowledged)} of {len(acknowledged)} acknowledged instances "
               f"found; studies listed more than once: {listed_more_than_once or 'none'}")
    facts = {"associations": PARALLEL_ASSOCIATIONS, "sent": len(objects),
             "acknowledged": len(acknowledged), "refused": refused, "lost": len(lost),
             "listed_more_than_once": len(listed_more_than_once)}
    if lost:
        return differs(f"{len(lost)} of {len(acknowledged)} instances acknowledged with "
                       f"Success over {PARALLEL_ASSOCIATIONS} associations are not held "
                       f"(first: {lost[0]})", **facts)
    if listed_more_than_once:
        return differs(f"studies stored over {PARALLEL_ASSOCIATIONS} associations are listed "
                       f"more than once: {', '.join(listed_more_than_once)}", **facts)
    if not acknowledged:
        return differs(f"every instance refused over {PARALLEL_ASSOCIATIONS} associations",
                       **facts)
    return conforms(f"{len(acknowledged)} acknowledged instances all held"
                    + (f"; {refused} refused (allowed: the sender retries)" if refused else ""),
                    **facts)
