"""What a node holds of a study, listed over C-FIND so that one bad read proves nothing.

Why: a study is confirmed on the target when the target's IMAGE-level C-FIND (per series)
shows every SOP Instance UID the source's listed (PS3.4 C.4.1). A PACS under load may
answer one query short, so neither listing is taken on one read: each must agree with the
node's NumberOfStudyRelatedInstances or with a second read (``stable_study_content``);
the reads that disagreed are returned so the migrator can report them per study.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.dicom.client import DimseClient
from harness.dicom.status import NO_STATUS
from harness.errors import EnvironmentProblem
from harness.migration.state import MigrationError


@dataclass
class StudyContent:
    """SOP Instance UIDs of one study on one node, by series."""

    series: dict[str, set[str]] = field(default_factory=dict)
    sop_classes: set[str] = field(default_factory=set)  # where the node returned them
    # NumberOfStudyRelatedInstances as the node answered it (0: no such study; None: the
    # node does not return the attribute)
    reported_instances: int | None = None

    @property
    def instances(self) -> dict[str, str]:
        return {sop: series for series, sops in self.series.items() for sop in sops}


# called once per listing read, between the IMAGE-level walk and the study-level count
# (role "source" or "target", study UID, read number from 1); tests change a node there
ListingHook = Callable[[str, str, int], None]


class UnstableListing(MigrationError):
    """A node's listing of a study did not settle within the tries or the deadline."""

    def __init__(self, message: str, notes: list[str]) -> None:
        super().__init__(message)
        self.notes = notes


def list_studies(
    client: DimseClient, *, split: bool = False, silent_limit: int | None = None
) -> list[str]:
    """Every Study Instance UID the node lists at study level, in the order it answered.

    A node that stops early (PS3.4 C.4.1.1.4: a final status other than Success, e.g.
    Orthanc's LimitFindResults answers Cancel FE00) is listed again by date ranges
    (``discover_studies``); so is every node when `split` or `silent_limit` is given.
    IncompleteListing when a range cannot be split below the node's limit."""
    listing = discover_studies(client, split=split, silent_limit=silent_limit)
    if listing.unresolved:
        raise IncompleteListing(listing)
    return listing.uids


class IncompleteListing(EnvironmentProblem):
    """The node cut the answer of a range that cannot be split further (exit 3): some of
    its studies cannot be listed over C-FIND."""

    def __init__(self, listing: StudyListing) -> None:
        super().__init__(
            f"peer {listing.peer}: study-level C-FIND still cut at the finest split for "
            f"{', '.join(listing.unresolved[:5])}"
            + (f" and {len(listing.unresolved) - 5} more" if len(listing.unresolved) > 5 else "")
            + f" ({len(listing.uids)} studies listed); list these studies by UID instead"
        )
        self.listing = listing


# Date-range partition (the remedy "split-queries-by-date"). Dates are bisected between
# FIRST_DAY and LAST_DAY, the outer parts open-ended ("-20010630", "20010701-") so dates
# outside that span are still matched (PS3.4 C.2.2.2.5 range matching); a day that is still
# cut is bisected by StudyTime down to TIME_FLOOR_S seconds.
FIRST_DAY = dt.date(1900, 1, 1)
LAST_DAY = dt.date(2099, 12, 31)
DAY_SECONDS = 86_400
TIME_FLOOR_S = 60
MAX_LISTING_QUERIES = 50_000
OUT_OF_RESOURCES = 0xA700  # PS3.4 C.4.1.1.4: too much asked; a smaller range may pass


@dataclass
class StudyListing:
    """How a node's studies were listed: every UID found, and whether and where the node
    cut its answers."""

    peer: str
    uids: list[str] = field(default_factory=list)
    status: str = ""  # of the universal query's final response
    capped: bool = False  # the node cut an answer (a non-Success final status, or the limit)
    largest_cut: int | None = None  # most matches a cut answer held: the node's limit
    queries: int = 0
    split: bool = False  # listed by date ranges
    unresolved: list[str] = field(default_factory=list)  # ranges still cut at the floor

    def as_dict(self) -> dict[str, Any]:
        return {
            "peer": self.peer, "studies": len(self.uids), "status": self.status,
            "capped": self.capped, "limit": self.largest_cut, "queries": self.queries,
            "split_by_date": self.split, "unresolved": list(self.unresolved),
        }


def _range(low: str, high: str, first: str, last: str) -> str:
    """A range value (PS3.4 C.2.2.2.5): open below at `first`, open above at `last`."""
    if low == first and high == last:
        return ""
    if low == high:
        return low
    return f"{'' if low == first else low}-{'' if high == last else high}"


def _hhmmss(seconds: int) -> str:
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


def time_range(low: int, high: int) -> str:
    """A StudyTime range of the whole seconds [low, high] of a day. The upper bound takes in
    the fractions of its last second (TM is HHMMSS.FFFFFF, PS3.5 6.2): a study at 11:59:59.5
    must not fall between the ranges ...-115959 and 120000-... of two halves."""
    end = f"{_hhmmss(DAY_SECONDS - 1)}.999999"
    return _range(_hhmmss(low), f"{_hhmmss(high)}.999999", "000000", end)


class _Partition:
    """Bisects study-level C-FINDs by StudyDate, then StudyTime, until no answer is cut.

    An answer is cut when its final status is not Success (the node said so) or, for a
    node known to truncate silently, when it holds `silent_limit` matches or more."""

    def __init__(
        self, client: DimseClient, silent_limit: int | None, max_queries: int,
        enough: int | None,
    ) -> None:
        self.client = client
        self.silent_limit = silent_limit
        self.max_queries = max_queries
        self.enough = enough  # stop once more studies than this are known (a probe's proof)
        self.listing = StudyListing(str(client))
        self.found: dict[str, None] = {}
        self.assoc: Any = None

    def close(self) -> None:
        if self.assoc is not None:
            self.assoc.release()
            self.assoc = None

    def query(self, keys: dict[str, str]) -> tuple[bool, Any]:
        """One study-level C-FIND; (is the answer cut, the result)."""
        if self.assoc is None or not self.assoc.is_open:
            self.assoc = self.client.find_association()
        self.listing.queries += 1
        result = self.client.find_over(
            self.assoc, "STUDY", {"StudyInstanceUID": None, "StudyDate": None, **keys}
        )
        if result.status == NO_STATUS:
            raise EnvironmentProblem(result.error or f"peer {self.client}: C-FIND unanswered")
        for ds in result.matches:
            uid = str(ds.get("StudyInstanceUID", "") or "")
            if uid:
                self.found[uid] = None
        cut = result.status.category != "success" or (
            self.silent_limit is not None and len(result.matches) >= self.silent_limit
        )
        if cut:
            self.listing.capped = True
            self.listing.largest_cut = max(self.listing.largest_cut or 0, len(result.matches))
        return cut, result

    def done(self) -> bool:
        return self.enough is not None and len(self.found) > self.enough

    def walk_days(self, low: dt.date, high: dt.date) -> None:
        """Bisect [low, high] (days) until no part is cut; a cut single day goes on by time."""
        pending = [(low, high)]
        while pending and not self.done():
            low, high = pending.pop()
            if low == high:
                self.walk_times(low.strftime("%Y%m%d"))
                continue
            middle = low + dt.timedelta(days=(high - low).days // 2)
            for part in ((middle + dt.timedelta(days=1), high), (low, middle)):
                if self._over_budget(f"StudyDate {self._days(*part)}"):
                    return
                where = f"StudyDate {self._days(*part)}"
                if self._split_further(where, {"StudyDate": self._days(*part)}):
                    pending.append(part)

    def walk_times(self, day: str) -> None:
        pending = [(0, DAY_SECONDS - 1)]
        while pending and not self.done():
            low, high = pending.pop()
            if high - low < TIME_FLOOR_S:
                where = f"StudyDate {day} StudyTime {self._times(low, high)}"
                self.listing.unresolved.append(where)
                continue
            middle = (low + high) // 2
            for part in ((middle + 1, high), (low, middle)):
                keys = {"StudyDate": day, "StudyTime": self._times(*part)}
                if self._over_budget(f"StudyDate {day} StudyTime {keys['StudyTime']}"):
                    return
                if self._split_further(f"StudyDate {day} StudyTime {keys['StudyTime']}", keys):
                    pending.append(part)

    def _split_further(self, where: str, keys: dict[str, str]) -> bool:
        """Query one part: True when its answer is cut. A part refused outright (a failure
        without any match, other than A700 Out of Resources) is not split: a node that
        cannot match that range refuses its halves too; it is named as unresolved."""
        cut, result = self.query(keys)
        refused = (result.status.category == "failure" and not result.matches
                   and result.status.code != OUT_OF_RESOURCES)
        if refused:
            self.listing.unresolved.append(f"{where} (refused: {result.status})")
            return False
        return cut

    def _over_budget(self, where: str) -> bool:
        if self.listing.queries < self.max_queries:
            return False
        self.listing.unresolved.append(f"{where} (query budget of {self.max_queries} spent)")
        return True

    @staticmethod
    def _days(low: dt.date, high: dt.date) -> str:
        return _range(low.strftime("%Y%m%d"), high.strftime("%Y%m%d"),
                      FIRST_DAY.strftime("%Y%m%d"), LAST_DAY.strftime("%Y%m%d"))

    @staticmethod
    def _times(low: int, high: int) -> str:
        return time_range(low, high)


def discover_studies(
    client: DimseClient,
    *,
    split: bool = False,
    silent_limit: int | None = None,
    max_queries: int = MAX_LISTING_QUERIES,
    enough: int | None = None,
) -> StudyListing:
    """The node's studies: one universal study-level C-FIND, then, when its answer is cut
    (or `split`), the same query bisected by StudyDate and StudyTime ranges.

    Why: a PACS may stop a C-FIND after N matches (PS3.4 C.4.1.1.4 lets an SCP end
    matching early; Orthanc's LimitFindResults answers Cancel FE00 after N), and a
    migration planned from that answer misses every other study. A node that truncates
    silently (final Success) is only caught with its `silent_limit` (from the conformance
    probe limits.find-results). Every query is bounded: at most `max_queries`, each within
    the client's match and time limits. Studies without StudyDate are only found by the
    universal query. `enough`: stop once more studies than this are known (the probe's
    proof that the universal answer was short).
    """
    partition = _Partition(client, silent_limit, max_queries, enough)
    listing = partition.listing
    try:
        cut, universal = partition.query({})
        listing.status = str(universal.status)
        if cut or split:
            listing.split = True
            partition.walk_days(FIRST_DAY, LAST_DAY)
    finally:
        partition.close()
    listing.uids = list(partition.found)
    return listing


def _find(assoc: Any, client: DimseClient, level: str, keys: dict[str, str | None]) -> list:
    """One Study Root C-FIND over the listing's association (the harness's own wire layer,
    which reads every response itself: harness/dicom/query.py); anything but success raises."""
    result = client.find_over(assoc, level, keys)
    if not result.ok:
        raise MigrationError(f"peer {client}: {level} C-FIND answered {result.status}")
    return result.matches


def _reported_instances(matches: list) -> int | None:
    """NumberOfStudyRelatedInstances of a study-level answer (PS3.4 C.3.4): 0 when the
    node has no such study, None when it does not return the (optional) attribute."""
    if not matches:
        return 0
    value = matches[0].get("NumberOfStudyRelatedInstances")
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def study_content(
    client: DimseClient,
    study: str,
    series_uids: list[str] | None = None,
    *,
    between: Callable[[], None] | None = None,
    assoc: Any = None,
    sop_classes: bool = True,
) -> StudyContent:
    """The study's instances via IMAGE-level C-FIND, one query per series, then the study's
    own NumberOfStudyRelatedInstances (where the node returns it) to cross-check them.

    Walks SERIES then IMAGE (each level with its parent's unique key), which every Q/R SCP
    supports, strict hierarchical ones like dcmqrscp included. `series_uids` skips the
    series query (the count is then not asked: it covers every series). `between` runs
    after the walk, before the count. `assoc`: a C-FIND association the caller keeps
    (find_association) and releases; None: one of its own for this listing.
    `sop_classes` False: SOPClassUID is not asked (Orthanc 1.10 reads every instance's file
    to answer it: an IMAGE C-FIND of 48 CT took 78-106 ms with it, 20-45 ms without).
    """
    content = StudyContent()
    whole_study = series_uids is None
    kept = assoc is not None
    if assoc is None:
        assoc = client.find_association()
    try:
        if series_uids is None:
            found = _find(
                assoc, client, "SERIES", {"StudyInstanceUID": study, "SeriesInstanceUID": None}
            )
            series_uids = list(
                dict.fromkeys(
                    str(ds.SeriesInstanceUID) for ds in found if ds.get("SeriesInstanceUID")
                )
            )
        for series in series_uids:
            images = _find(
                assoc,
                client,
                "IMAGE",
                {
                    "StudyInstanceUID": study,
                    "SeriesInstanceUID": series,
                    "SOPInstanceUID": None,
                    **({"SOPClassUID": None} if sop_classes else {}),
                },
            )
            sops = {str(ds.SOPInstanceUID) for ds in images if ds.get("SOPInstanceUID")}
            content.sop_classes |= {str(ds.SOPClassUID) for ds in images if ds.get("SOPClassUID")}
            if sops:
                content.series[series] = sops
        if between is not None:
            between()
        if whole_study:
            counted = _find(
                assoc,
                client,
                "STUDY",
                {"StudyInstanceUID": study, "NumberOfStudyRelatedInstances": None},
            )
            content.reported_instances = _reported_instances(counted)
    finally:
        if not kept:
            assoc.release()
    return content


def _describe_read(content: StudyContent) -> str:
    listed = len(content.instances)
    if content.reported_instances is None:
        return f"{listed} listed"
    return f"{listed} listed, NumberOfStudyRelatedInstances {content.reported_instances}"


def stable_study_content(
    client: DimseClient,
    study: str,
    *,
    role: str = "node",
    tries: int = 5,
    deadline_s: float = 60.0,
    pause_s: float = 0.2,
    on_listing: ListingHook | None = None,
    stop: threading.Event | None = None,
    assoc: Any = None,
    sop_classes: bool = True,
) -> tuple[StudyContent, list[str]]:
    """A listing of the study that a second means agrees with, and what was unstable.

    A PACS under load may answer one SERIES or IMAGE C-FIND with fewer matches (Orthanc
    was seen answering 0), so one listing proves nothing. A read is accepted when the
    node's NumberOfStudyRelatedInstances (PS3.4 C.3.4) equals the instances listed, or,
    where the node does not return that count, when two consecutive reads list the same
    SOP Instance UIDs. At most `tries` reads within `deadline_s`; else UnstableListing.
    Returns the accepted content and one note per read that disagreed (empty: stable).
    `assoc`, `sop_classes`: see study_content.
    """
    notes: list[str] = []
    reads: list[str] = []
    previous: StudyContent | None = None
    deadline = time.monotonic() + deadline_s
    for read in range(1, tries + 1):
        hook = (lambda read=read: on_listing(role, study, read)) if on_listing else None
        content = study_content(client, study, between=hook, assoc=assoc,
                                sop_classes=sop_classes)
        reads.append(_describe_read(content))
        listed = set(content.instances)
        counted = content.reported_instances
        if counted is not None:
            if counted == len(listed):
                return content, notes
            notes.append(f"{role} read {read}: {_describe_read(content)}")
        elif previous is not None and listed == set(previous.instances):
            return content, notes
        elif previous is not None:
            notes.append(
                f"{role} read {read}: listing changed ({len(previous.instances)} -> "
                f"{len(listed)} instances)"
            )
        previous = content
        if time.monotonic() >= deadline or read == tries:
            break
        if stop is not None and stop.is_set():
            break
        if stop is None:
            time.sleep(pause_s)
        else:
            stop.wait(pause_s)
    raise UnstableListing(
        f"{role} {client}: listing of study {study} did not settle in {len(reads)} reads "
        f"({'; '.join(reads)})",
        notes,
    )

