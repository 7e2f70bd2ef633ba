"""What a node holds of a study, listed over C-FIND so that one bad read proves nothing.

Why: a study is confirmed on the target when the target's IMAGE-level C-FIND (per series)
shows every SOP Instance UID the source's listed (PS3.4 C.4.1). A PACS under load may
answer one query short, so neither listing is taken on one read: each must agree with the
node's NumberOfStudyRelatedInstances or with a second read (``stable_study_content``);
the reads that disagreed are returned so the migrator can report them per study.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.dicom.client import DimseClient
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


def list_studies(client: DimseClient) -> list[str]:
    """Every Study Instance UID the node lists at study level, in the order it answered."""
    found = client.find("STUDY", {"StudyInstanceUID": None})
    if not found.ok:
        raise EnvironmentProblem(f"peer {client}: study-level C-FIND answered {found.status}")
    uids = [str(ds.get("StudyInstanceUID", "")) for ds in found.matches]
    return list(dict.fromkeys(u for u in uids if u))


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
) -> StudyContent:
    """The study's instances via IMAGE-level C-FIND, one query per series, then the study's
    own NumberOfStudyRelatedInstances (where the node returns it) to cross-check them.

    Walks SERIES then IMAGE (each level with its parent's unique key), which every Q/R SCP
    supports, strict hierarchical ones like dcmqrscp included. `series_uids` skips the
    series query (the count is then not asked: it covers every series). `between` runs
    after the walk, before the count.
    """
    content = StudyContent()
    whole_study = series_uids is None
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
                    "SOPClassUID": None,
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
) -> tuple[StudyContent, list[str]]:
    """A listing of the study that a second means agrees with, and what was unstable.

    A PACS under load may answer one SERIES or IMAGE C-FIND with fewer matches (Orthanc
    was seen answering 0), so one listing proves nothing. A read is accepted when the
    node's NumberOfStudyRelatedInstances (PS3.4 C.3.4) equals the instances listed, or,
    where the node does not return that count, when two consecutive reads list the same
    SOP Instance UIDs. At most `tries` reads within `deadline_s`; else UnstableListing.
    Returns the accepted content and one note per read that disagreed (empty: stable).
    """
    notes: list[str] = []
    reads: list[str] = []
    previous: StudyContent | None = None
    deadline = time.monotonic() + deadline_s
    for read in range(1, tries + 1):
        hook = (lambda read=read: on_listing(role, study, read)) if on_listing else None
        content = study_content(client, study, between=hook)
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

