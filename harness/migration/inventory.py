"""Inventory: crawl a PACS node into a ledger (harness/migration/ledger.py), resumably.

The crawl lists every study first (C-FIND at STUDY level, or QIDO-RS where the node serves
DICOMweb: sources.py), partition by partition (partitions.py: date ranges halved past an
archive's C-FIND cap, or UID buckets), then reads the studies on `workers` threads, each
with its own source, and commits them one at a time through one writer:

- depth `attributes`: the study's instances with their key attributes, from C-FIND at SERIES
  and IMAGE level over one association, or from one QIDO-RS request;
- depth `full`: the study's instances listed as at depth `attributes`, then every instance
  retrieved (WADO-RS streamed per study where the node serves DICOMweb, else C-GET streamed
  with `keep=False`), its attributes normalised and its pixels decoded and hashed; nothing is
  written to disk but the ledger. The listing is the truth of what exists: an instance that
  is listed but not retrieved keeps its listing row with `retrieval_error` set (and an issue),
  so counts at depth full equal those at depth attributes.

`sample=N` (depth full only) retrieves N studies fully, chosen by a hash of their
StudyInstanceUID so that a source and a target crawled with the same N retrieve the same
studies, and lists the others at depth `attributes` (counts and key attributes for all).

Killed half-way, a crawl resumes at the first partition not yet listed, then at the studies
not yet committed (what is listed is kept); `resume=False` starts again from scratch, and
so does a crawl into a ledger that finished.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset

from harness.errors import ConfigError
from harness.migration import partitions
from harness.migration.ledger import Ledger
from harness.migration.normalise import (
    IDENTITY_COLUMNS,
    STUDY_QUERY_KEYS,
    InstanceRow,
    SeriesRow,
    StudyRow,
    row_from_dataset,
    row_from_keys,
)
from harness.migration.sources import keys_of, reports_stored_syntax, source_for
from harness.nodes.base import Node

Progress = Callable[[int, int], None]
DEPTHS = ("attributes", "full")
_COUNT_KEYS = ("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")


@dataclass
class CrawlSummary:
    """What one crawl did; `counts` are those of the whole ledger afterwards."""

    node: str
    kind: str
    ledger: str
    depth: str
    sample: int | None
    via: str
    counts: dict[str, int]
    studies_total: int = 0
    studies_crawled: int = 0  # in this run
    studies_resumed: int = 0  # already committed by an earlier, interrupted run
    studies_retrieved: int = 0  # fully retrieved (all at depth full, N with a sample)
    instances_retrieved: int = 0
    pixels_undecoded: int = 0  # hashed as raw bytes: no decoder here for their syntax
    unretrievable: int = 0  # listed, but retrieving them failed (kept with the reason)
    issues: int = 0  # what the crawl could not read or the node answered inconsistently
    elapsed_s: float = 0.0
    workers: int = 1
    partition: str = "date"
    partitions: dict[str, int] = field(default_factory=dict)  # by state
    writer_s: float = 0.0  # time spent committing studies (the one writer)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# the crawl


def sample_rank(study_uid: str) -> str:
    """Sampling order: the same studies are picked on every node holding them."""
    return hashlib.blake2b(study_uid.encode(), digest_size=8).hexdigest()


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _study_row(ds: Dataset) -> StudyRow | None:
    keys = keys_of(ds, STUDY_QUERY_KEYS)
    uid = keys.get("StudyInstanceUID")
    if not uid:
        return None
    identity = {col: "" if keys.get(kw) is None else str(keys[kw])
                for kw, col in IDENTITY_COLUMNS.items()}
    return StudyRow(
        study_uid=str(uid),
        **identity,
        keys={k: v for k, v in keys.items() if k not in _COUNT_KEYS},
        reported_series=_int(keys.get("NumberOfStudyRelatedSeries")),
        reported_instances=_int(keys.get("NumberOfStudyRelatedInstances")),
    )


def _check_depth(depth: str, sample: int | None) -> None:
    if depth not in DEPTHS:
        raise ConfigError(f"depth: unknown depth {depth!r} (allowed: {', '.join(DEPTHS)})")
    if sample is not None:
        if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
            raise ConfigError(f"sample: must be a whole number of studies >= 1, got {sample!r}")
        if depth != "full":
            raise ConfigError("sample: only with depth full (it says how many studies to "
                              "retrieve fully; the others are listed at depth attributes)")


# what must match to resume a crawl
_RESUME_KEYS = ("ae_title", "depth", "sample", "via", "identities", "identity_prefixes",
                "partition", "study_dates")


def _open_ledger(node: Node, path: Path, depth: str, sample: int | None, via: str,
                 resume: bool, prefixes: tuple[str, ...] = (),
                 identities: str | None = None, partition: str = "date",
                 study_dates: str | None = None) -> tuple[Ledger, bool]:
    """The ledger to write into, and whether it continues an earlier crawl."""
    from harness.report.identities import redactor_for

    wanted = {"node": node.name, "kind": node.kind, "ae_title": node.ae_title,
              "depth": depth, "sample": "" if sample is None else str(sample), "via": via,
              # a site's patients are tokens in the file (docs/safety.md, Patient identities)
              "identities": identities or ("clear" if redactor_for(node) is None else "tokens"),
              "identity_prefixes": json.dumps(sorted(set(prefixes))), "partition": partition,
              "study_dates": study_dates or ""}
    if resume and path.exists():
        ledger = Ledger.open(path)
        meta = ledger.meta()
        if "finished" in meta:  # a complete crawl is not resumed: it is done again
            ledger.close()
            return Ledger.create(path, wanted), False
        # a ledger from before shares existed was a crawl of the whole node
        meta.setdefault("study_dates", "")
        different = {k: (meta.get(k), wanted[k]) for k in _RESUME_KEYS if meta.get(k) != wanted[k]}
        if different:
            ledger.close()
            what = ", ".join(f"{k} {a!r} (now {b!r})" for k, (a, b) in different.items())
            raise ConfigError(f"{path}: this ledger was crawled with {what}; give another "
                              "path or start again (resume=False)")
        return ledger, True
    return Ledger.create(path, wanted), False


def crawl(
    node: Node,
    ledger_path: str | Path,
    depth: str = "attributes",
    sample: int | None = None,
    progress: Progress | None = None,
    *,
    resume: bool = True,
    via: str = "auto",
    identity_prefixes: tuple[str, ...] = (),
    identities: str | None = None,
    workers: int = 1,
    partition: str = "date",
    partition_size: int | None = None,
    study_dates: str | None = None,
    stop: threading.Event | None = None,
) -> CrawlSummary:
    """Crawl every patient, study, series and instance of `node` into `ledger_path`.

    `progress(done, total)` is called with study counts. `via`: `auto` (DICOMweb where the
    node serves it, else DIMSE), `dimse` or `dicomweb`. `identity_prefixes`: the PatientID
    prefixes a migration adds, kept in clear before the token in a tokenised ledger;
    `identities` `tokens` or `clear` (default: tokens unless the node holds synthetic data only).
    `workers` studies are read at once, each worker on its own associations (or HTTP
    session); one writer commits them. `partition` (`date`, `uid`, `none`) and
    `partition_size` (studies per partition at most) say how the study listing is cut
    (partitions.py). `study_dates` crawls one share of the node (a StudyDate range, or
    `undated`) for a crawl spread over machines (partitions.py, merge.py). Setting `stop`
    ends the crawl after the studies in hand, resumable.
    """
    _check_depth(depth, sample)
    partitions.check_mode(partition, partition_size)
    partitions.check_study_dates(study_dates, partition)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers: must be a whole number >= 1, got {workers!r}")
    started = time.perf_counter()
    source = source_for(node, via)
    path = Path(ledger_path)
    ledger, resumed = _open_ledger(node, path, depth, sample, via, resume,
                                   tuple(identity_prefixes), identities, partition,
                                   study_dates)
    summary = CrawlSummary(node.name, node.kind, str(path), depth, sample, source.name, {},
                           workers=workers, partition=partition)
    stored_syntax = reports_stored_syntax(node, source)
    if not stored_syntax:
        summary.notes.append(f"transfer syntaxes not recorded: {node.kind} may convert "
                             "instances on retrieval, so the stored syntax is unknown")
    ledger.set_meta(transfer_syntax="stored" if stored_syntax else "unknown")
    try:
        partitions.ensure_tables(ledger.conn)
        if ledger.meta().get("listing") != "complete":
            size = partition_size or partitions.DEFAULT_SIZE
            listing = partitions.PartitionedListing(ledger.conn, partition, size,
                                                    study_dates).run(
                source.list_range, lambda found: _add_studies(ledger, found), str(node.name))
            summary.notes.extend(listing.notes)
            if depth == "full":
                uids = [uid for (uid,) in ledger.conn.execute("SELECT study_uid FROM studies")]
                ledger.mark_for_retrieval(sorted(uids, key=sample_rank)[:sample] if sample
                                          else uids)
            ledger.set_meta(listing="complete")
        total = ledger.conn.execute("SELECT count(*) FROM studies").fetchone()[0]
        pending = partitions.pending_studies(ledger.conn)
        summary.studies_total = total
        summary.studies_resumed = total - len(pending) if resumed else 0
        _run_workers(node, via, ledger, pending, summary, stored_syntax, progress, stop)
        partitions.mark_done(ledger.conn)
        summary.partitions = partitions.states(ledger.conn)
        if stop is not None and stop.is_set() and summary.studies_crawled < len(pending):
            summary.notes.append("stopped: crawl again with the same ledger to resume")
            summary.elapsed_s = round(time.perf_counter() - started, 3)
            return summary
        ledger.finish()
        q = ledger.conn.execute
        summary.counts = ledger.counts()
        summary.studies_retrieved = q("SELECT count(*) FROM studies WHERE retrieve = 1"
                                      ).fetchone()[0]
        summary.instances_retrieved = q("SELECT count(*) FROM instance_rows WHERE retrieved = 1"
                                        ).fetchone()[0]
        summary.pixels_undecoded = q("SELECT count(*) FROM instance_rows WHERE pixel_mode = 'raw'"
                                     ).fetchone()[0]
        summary.unretrievable = ledger.unretrievable()
        summary.issues = q("SELECT count(*) FROM issues").fetchone()[0]
        summary.elapsed_s = round(time.perf_counter() - started, 3)
        ledger.set_meta(summary=summary.as_dict())
    finally:
        ledger.close()
    return summary


def _add_studies(ledger: Ledger, found: list[Dataset]) -> list[str]:
    """Record one partition's studies; their UIDs (those with one)."""
    rows = [row for row in map(_study_row, found) if row is not None]
    ledger.add_studies(rows)
    return [row.study_uid for row in rows]


# a study in hand: (StudyInstanceUID, its series, its instances, its issues)
StudyResult = tuple[str, list[SeriesRow], list[InstanceRow], list[tuple[str, str]]]


def _run_workers(node: Node, via: str, ledger: Ledger, pending: list[tuple[str, bool]],
                 summary: CrawlSummary, stored_syntax: bool, progress: Progress | None,
                 stop: threading.Event | None) -> None:
    """Read `pending` studies on `summary.workers` threads, each with its own source (its
    own associations or HTTP session), and commit them here, one writer on the ledger's
    connection (SQLite has one writer at a time anyway). At most two studies per worker
    are in hand; each network step has the client's deadline. On an exception (Ctrl-C, a
    node that stops answering, `progress` raising) or `stop`, nothing more is started and
    what is not committed stays `listed`: the ledger resumes there."""
    halt = threading.Event()
    local = threading.local()
    total = summary.studies_total
    done = total - len(pending)

    def read(study_uid: str, retrieve: bool, keys: dict[str, Any],
             reported: int | None) -> StudyResult | None:
        if halt.is_set() or (stop is not None and stop.is_set()):
            return None
        if not hasattr(local, "source"):
            local.source = source_for(node, via)
        if retrieve:
            return _read_full(local.source, study_uid, keys, reported, stored_syntax)
        return _read_attributes(local.source, study_uid, keys)

    def ask(study_uid: str, retrieve: bool) -> Future:
        reported = ledger.conn.execute("SELECT reported_instances FROM studies "
                                       "WHERE study_uid = ?", (study_uid,)).fetchone()[0]
        return pool.submit(read, study_uid, retrieve, ledger.study_keys(study_uid), reported)

    if progress:
        progress(done, total)
    queue = iter(pending)
    in_hand: set[Future] = set()
    writer_s = 0.0
    with ThreadPoolExecutor(summary.workers, thread_name_prefix="crawl") as pool:
        try:
            while True:
                while len(in_hand) < 2 * summary.workers and not (stop and stop.is_set()):
                    task = next(queue, None)
                    if task is None:
                        break
                    in_hand.add(ask(*task))
                if not in_hand:
                    break
                finished, in_hand = wait(in_hand, return_when=FIRST_COMPLETED)
                for future in finished:
                    result = future.result()
                    if result is None:
                        continue
                    began = time.perf_counter()
                    ledger.commit_study(*result)
                    writer_s += time.perf_counter() - began
                    summary.studies_crawled += 1
                    done += 1
                    if done % 200 == 0:
                        partitions.mark_done(ledger.conn)
                    if progress:
                        progress(done, total)
        except BaseException:
            halt.set()
            for future in in_hand:
                future.cancel()
            raise
        finally:
            summary.writer_s = round(writer_s, 3)


def _read_attributes(source: Any, study_uid: str, study_keys: dict[str, Any]) -> StudyResult:
    series: dict[str, SeriesRow] = {}
    rows: list[InstanceRow] = []
    issues: list[tuple[str, str]] = []
    for keys in source.instances(study_uid):
        if not keys.get("SOPInstanceUID"):
            issues.append(("", "an IMAGE-level match without SOPInstanceUID"))
            continue
        attrs = {**study_keys, **keys, "StudyInstanceUID": study_uid}
        rows.append(row_from_keys(attrs))
        uid = str(attrs.get("SeriesInstanceUID") or "")
        if uid not in series:
            series[uid] = _series_row(attrs, study_uid)
    return study_uid, list(series.values()), rows, issues


def _series_row(attrs: dict[str, Any], study_uid: str) -> SeriesRow:
    def text(key: str) -> str:
        value = attrs.get(key)
        return "" if value is None else str(value)

    return SeriesRow(text("SeriesInstanceUID"), study_uid, text("Modality"),
                     text("SeriesNumber"), text("SeriesDescription"))


def _read_full(source: Any, study_uid: str, study_keys: dict[str, Any], reported: int | None,
               stored_syntax: bool) -> StudyResult:
    """List the study's instances, then retrieve them; an instance that is listed but not
    retrieved keeps its listing-level row with the reason in `retrieval_error`, so a failed
    retrieval is a fact in the ledger, never a missing row (the listing is what exists)."""
    listed: dict[str, InstanceRow] = {}
    issues: list[tuple[str, str]] = []
    for keys in source.instances(study_uid):
        if not keys.get("SOPInstanceUID"):
            issues.append(("", "an IMAGE-level match without SOPInstanceUID"))
            continue
        row = row_from_keys({**study_keys, **keys, "StudyInstanceUID": study_uid})
        listed.setdefault(row.sop_uid, row)
    retrieved: dict[str, InstanceRow] = {}
    series: dict[str, SeriesRow] = {}

    def on_dataset(ds: Dataset, transfer_syntax: str | None) -> None:
        try:
            row = row_from_dataset(ds, transfer_syntax)
            if not stored_syntax:
                row.transfer_syntax = None
        except Exception as exc:  # noqa: BLE001 - one unreadable object must not stop a crawl
            uid = str(ds.get("SOPInstanceUID", ""))
            failed[uid] = f"the retrieved instance could not be read: {exc}"
            return
        if row.study_uid != study_uid:
            issues.append((row.sop_uid, f"retrieved with study {study_uid} but belongs to "
                                        f"study {row.study_uid}"))
        retrieved[row.sop_uid] = row
        if row.series_uid not in series:
            series[row.series_uid] = SeriesRow(
                row.series_uid, row.study_uid, str(ds.get("Modality", "") or ""),
                str(ds.get("SeriesNumber", "") or ""), str(ds.get("SeriesDescription", "") or ""))

    failed: dict[str, str] = {}
    general = []
    for uid, problem in source.retrieve(study_uid, on_dataset):
        if uid:
            failed.setdefault(uid, problem)
        else:
            general.append(problem)
    issues.extend(("", problem) for problem in general)
    not_received = f"not received ({'; '.join(general) or 'no error reported'})"
    rows: list[InstanceRow] = []
    for uid, row in listed.items():
        if uid in retrieved:
            rows.append(retrieved.pop(uid))
            continue
        row.retrieval_error = failed.get(uid, not_received)
        issues.append((uid, f"listed but not retrieved: {row.retrieval_error}"))
        rows.append(row)
        attrs = json.loads(row.attrs_json)
        if row.series_uid not in series:
            series[row.series_uid] = _series_row(attrs, study_uid)
    for uid, row in retrieved.items():  # answered by the retrieval, absent from the listing
        issues.append((uid, "retrieved but not listed by the node's query"))
        rows.append(row)
    if reported is not None and reported != len(listed):
        issues.append(("", f"the node reports {reported} instances, its listing has "
                           f"{len(listed)}"))
    return study_uid, list(series.values()), rows, issues
