"""Reference migrator: copy every study of a source PACS to a target, with zero-loss proof.

Why it exists: a migration project needs a migrator it can trust as a baseline (and to
compare the site's own tool against). The unit of work is a study. The plan (the source's
study list, from a study-level C-FIND) is kept in the state file (state.py), so a run that
is killed, even with SIGKILL, resumes with the same plan: studies confirmed on the target
are not sent again, partially sent ones are sent again whole (a PACS keeps one copy per SOP
Instance UID, so re-sending creates no duplicate).

A study is *confirmed* when the target's IMAGE-level C-FIND (per series) shows every SOP
Instance UID the source's IMAGE-level C-FIND listed, each listing settled first
(discovery.py). Only then is it written as confirmed, one transaction per study. This
module is the orchestration: workers, rate limit, retries with backoff, confirmation; how
a study travels is methods.py, the site's own tool external.py.

Run it from the command line with ``pacs-harness migrate`` (harness/cli/migrate.py).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.dicom.dicomweb import AuthenticationFailed
from harness.errors import ConfigError
from harness.migration.discovery import (
    IncompleteListing,
    ListingHook,
    StudyContent,
    StudyListing,
    UnstableListing,
    discover_studies,
    stable_study_content,
    study_content,
)
from harness.migration.methods import (
    METHODS,
    check_method,
    release_in_background,
    send_study,
)
from harness.migration.state import (
    DEFAULT_SLOW_STUDY_S,
    MigrationError,
    MigrationResult,
    MigrationState,
    ProgressCallback,
    StudyOutcome,
    describe_error,
)
from harness.nodes.base import Node


@contextlib.contextmanager
def _timed(outcome: StudyOutcome, phase: str) -> Iterator[None]:
    """Add the block's wall time to the study's `phase` (state.PHASES)."""
    start = time.monotonic()
    try:
        yield
    finally:
        outcome.phases[phase] = outcome.phases.get(phase, 0.0) + time.monotonic() - start


class _RateLimiter:
    """At most `rate` acquisitions per second over all workers (evenly spaced)."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self.next_at = time.monotonic()
        self.lock = threading.Lock()

    def acquire(self, stop: threading.Event) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            slot = max(now, self.next_at)
            self.next_at = slot + self.interval
        stop.wait(max(0.0, slot - time.monotonic()))


class Migrator:
    """Copies every study of `source` to `target` with one of METHODS; resumable.

    rate_limit is in studies per second (the unit of work), over all workers together.
    Retries: each study gets 1 + `retries` attempts, waiting backoff_s, 2*backoff_s, ...
    between them. Workers are capped by the target's own limit (dcmqrscp: 1 association).
    Each listing (source and target) takes at most `listing_tries` reads within
    `listing_timeout_s` to settle; `on_listing` is called during each read (tests use it
    to change a node between two reads).

    Discovery (the plan): one universal study-level C-FIND, listed again by date ranges
    when the source cuts its answer (discovery.discover_studies), when `split_queries`
    (the conformance remedy "split-queries-by-date"), or when it holds `source_find_limit`
    matches (a source known to truncate silently, from the probe limits.find-results).
    """

    def __init__(
        self,
        source: Node,
        target: Node,
        method: str = "move",
        *,
        state_path: str | os.PathLike[str],
        workers: int = 4,
        rate_limit: float | None = None,
        retries: int = 3,
        backoff_s: float = 0.5,
        confirm_timeout_s: float = 10.0,
        listing_tries: int = 5,
        listing_timeout_s: float = 60.0,
        on_listing: ListingHook | None = None,
        split_queries: bool = False,
        source_find_limit: int | None = None,
        slow_study_s: float = DEFAULT_SLOW_STUDY_S,
    ) -> None:
        if method not in METHODS:
            raise ConfigError(f"method {method!r}: unknown (allowed: {', '.join(METHODS)})")
        if workers < 1:
            raise ConfigError(f"workers: must be >= 1, got {workers}")
        if rate_limit is not None and rate_limit <= 0:
            raise ConfigError(f"rate limit: must be > 0 studies/s, got {rate_limit}")
        if retries < 0 or backoff_s < 0:
            raise ConfigError("retries and backoff must be >= 0")
        if slow_study_s < 0:
            raise ConfigError(f"slow study bound: must be >= 0 s, got {slow_study_s}")
        if listing_tries < 2:
            raise ConfigError(f"listing tries: must be >= 2, got {listing_tries}")
        if source.name == target.name:
            raise ConfigError(f"source and target are the same node ({source.name})")
        target.require_writable("migrate studies into it")
        self.source, self.target, self.method = source, target, method
        cap = target.capabilities.store_associations
        self.workers = min(workers, cap) if cap else workers
        self.rate_limit = rate_limit
        self.retries = retries
        self.backoff_s = backoff_s
        self.confirm_timeout_s = confirm_timeout_s
        self.listing_tries = listing_tries
        self.listing_timeout_s = listing_timeout_s
        self.on_listing = on_listing
        self.split_queries = split_queries
        self.source_find_limit = source_find_limit
        self.slow_study_s = slow_study_s
        self.discovery: StudyListing | None = None  # how this run listed the source
        self.state_path = Path(state_path)
        check_method(method, source, target)
        self.state: MigrationState | None = None
        self._plan: list[str] | None = None
        self._confirmed: set[str] = set()
        self._confirmed_lock = threading.Lock()
        self._stop = threading.Event()
        self.run_id = 0

    def __repr__(self) -> str:
        return f"<Migrator {self.method} {self.source.name} -> {self.target.name}>"

    # -- state -------------------------------------------------------------------------
    def open(self) -> MigrationState:
        if self.state is None:
            state = MigrationState(self.state_path)
            try:
                state.bind({"source_ae": self.source.ae_title, "target_ae": self.target.ae_title})
            except BaseException:
                state.close()
                raise
            with self._confirmed_lock:
                self._confirmed = state.confirmed()
            self.state = state
        return self.state

    def close(self) -> None:
        if self.state is not None:
            self.state.close()
            self.state = None

    def __enter__(self) -> Migrator:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def plan(self) -> list[str]:
        """The studies to migrate: saved in the state file, else listed from the source."""
        if self._plan is None:
            state = self.open()
            saved = state.plan()
            if not saved:
                saved = self._discover()
                state.save_plan(saved)
            self._plan = saved
        return list(self._plan)

    def _discover(self) -> list[str]:
        """Every study of the source, however it cuts its C-FIND answers; a plan that would
        miss studies is refused (IncompleteListing) rather than saved."""
        listing = discover_studies(
            self.source.dimse(),
            split=self.split_queries or self.source_find_limit is not None,
            silent_limit=self.source_find_limit,
        )
        self.discovery = listing
        if listing.unresolved:
            raise IncompleteListing(listing)
        return listing.uids

    def is_confirmed(self, study: str) -> bool:
        """True once the study is confirmed on the target (thread-safe; for the monitor)."""
        with self._confirmed_lock:
            return study in self._confirmed

    def stop(self) -> None:
        """Ask the workers to finish the study at hand and take no more."""
        self._stop.set()

    # -- run ---------------------------------------------------------------------------
    def run(self, progress: ProgressCallback | None = None) -> MigrationResult:
        """Migrate every study of the plan not yet confirmed; returns this run's totals."""
        return self._run(progress, send=True)

    def verify(self, progress: ProgressCallback | None = None) -> MigrationResult:
        """Confirm studies already on the target without sending (after an external tool).

        Studies found complete count as `already_on_target`, the others as failed.
        """
        return self._run(progress, send=False)

    def _run(self, progress: ProgressCallback | None, *, send: bool) -> MigrationResult:
        start = time.monotonic()
        studies = self.plan()
        state = self.open()
        self._stop.clear()
        self.run_id = state.start_run(self.method if send else "verify")
        result = MigrationResult(
            self.method if send else "verify",
            self.source.name,
            self.target.name,
            studies_total=len(studies),
            slow_study_s=self.slow_study_s,
        )
        say = progress or (lambda _done, _total, _outcome: None)
        say(0, len(studies), None)
        pipeline = _Pipeline(self, result, say, send)
        for uid in studies:
            if self.is_confirmed(uid):
                pipeline.finish(_Job(uid, StudyOutcome(uid, "skipped_already_confirmed")),
                                record=False)
            else:
                pipeline.to_send.append(_Job(uid, StudyOutcome(uid, "failed")))
        pipeline.run(min(self.workers, max(1, len(pipeline.to_send))))
        result.elapsed_s = time.monotonic() - start
        state.finish_run(self.run_id, result)
        if pipeline.auth_failures:
            raise pipeline.auth_failures[0]
        return result

    # -- one study's steps (called by _Pipeline's threads) ----------------------------------
    def _attempt(self, job: _Job, links: _Links, send: bool) -> bool:
        """One attempt at a study up to its send: list the source (once), check the target,
        send what it lacks. True: sent, to be confirmed; False: the study is finished or
        waits for a retry (job.outcome says which)."""
        state = self.open()
        outcome = job.outcome
        outcome.attempts += 1
        send_id = None
        try:
            if job.source_content is None:
                with _timed(outcome, "list_source"):
                    listed = self._listing(links.source, "source", job.uid, outcome)
                if not listed.instances:
                    raise MigrationError(
                        f"source {self.source.name} lists no instance of study {job.uid}"
                    )
                job.source_content = listed
                state.record_instances(job.uid, listed.instances)
                outcome.instances = len(listed.instances)
            with _timed(outcome, "confirm_target"):
                missing = self._missing(job, links.target)
            if not missing:
                self._confirmed_now(job)
                return False
            if not send:
                raise self._not_on_target(job, missing, sent=False)
            links.release()  # idle during the send: see _Finder
            send_id = state.start_send(self.run_id, job.uid, outcome.attempts, self.method)
            with _timed(outcome, "send"):
                sent = send_study(
                    self.method, self.source, self.target, job.uid, job.source_content
                )
            outcome.instances_sent += sent
            state.finish_send(send_id, sent, None)
            return True
        except AuthenticationFailed as exc:  # not transient: a retry is refused again
            if send_id is not None:
                state.finish_send(send_id, 0, describe_error(exc))
            raise
        except Exception as exc:  # any failure of this attempt is retried, then recorded
            outcome.error = describe_error(exc)
            if send_id is not None:
                state.finish_send(send_id, 0, outcome.error)
            return False

    def _confirm_sent(self, job: _Job, links: _Links) -> None:
        """After a send: poll the target until its C-FIND shows every instance the source
        listed (some PACS index what they received a moment later), within
        confirm_timeout_s. A read that shows them all is the proof, whatever its count (a
        short read is what a busy PACS gets wrong, never an extra UID); only a study still
        short at the deadline gets a settled listing, which decides and is reported."""
        outcome = job.outcome
        content = job.source_content
        assert content is not None
        wanted = set(content.instances)
        deadline = time.monotonic() + self.confirm_timeout_s
        with _timed(outcome, "confirm_target"):
            try:
                while True:
                    shown = study_content(
                        links.target.client, job.uid, sorted(content.series),
                        assoc=links.target.association(), sop_classes=False,
                    )
                    if not wanted - set(shown.instances):
                        self._confirmed_now(job)
                        return
                    if time.monotonic() >= deadline or self._stop.is_set():
                        break
                    links.release()  # idle while it waits: see _Finder
                    self._stop.wait(CONFIRM_POLL_S)
                missing = self._missing(job, links.target)
            except AuthenticationFailed:
                raise
            except Exception as exc:
                outcome.error = describe_error(exc)
                return
        if missing:
            outcome.error = describe_error(self._not_on_target(job, missing, sent=True))
        else:
            self._confirmed_now(job)

    def _confirmed_now(self, job: _Job) -> None:
        self.open().confirm(self.run_id, job.uid)
        with self._confirmed_lock:
            self._confirmed.add(job.uid)
        job.outcome.status = "migrated" if job.outcome.instances_sent else "already_on_target"
        job.outcome.error = None

    def _not_on_target(self, job: _Job, missing: set[str], *, sent: bool) -> MigrationError:
        assert job.source_content is not None
        return MigrationError(
            f"{len(missing)} of {len(job.source_content.instances)} instances not on "
            f"target {self.target.name}" + (" after sending" if sent else "")
        )

    def _listing(self, finder: _Finder, role: str, uid: str, outcome: StudyOutcome
                 ) -> StudyContent:
        """The study as the node lists it once the listing settled; disagreeing reads are
        noted in the outcome and the state file (also when it never settles)."""
        state = self.open()
        try:
            content, notes = stable_study_content(
                finder.client,
                uid,
                role=role,
                tries=self.listing_tries,
                deadline_s=self.listing_timeout_s,
                on_listing=self.on_listing,
                stop=self._stop,
                assoc=finder.association(),
                # the SOP classes only for C-GET's presentation contexts (methods.py)
                sop_classes=role == "source" and self.method == "get",
            )
        except UnstableListing as exc:
            gave_up = [*exc.notes, str(exc)]
            outcome.unstable_listings += gave_up
            state.record_unstable(self.run_id, uid, gave_up, settled=False)
            raise
        if notes:
            outcome.unstable_listings += notes
            state.record_unstable(self.run_id, uid, notes, settled=True)
        return content

    def _missing(self, job: _Job, finder: _Finder) -> set[str]:
        """SOP Instance UIDs of the source study that the target's settled C-FIND lacks."""
        assert job.source_content is not None
        on_target = self._listing(finder, "target", job.uid, job.outcome)
        return set(job.source_content.instances) - set(on_target.instances)


CONFIRM_POLL_S = 0.2  # between reads of the target while it indexes what it received


@dataclass
class _Job:
    """One study on its way through the pipeline, over all its attempts."""

    uid: str
    outcome: StudyOutcome
    started: float = 0.0  # when a sender took it up (a study's time excludes its queueing)
    source_content: StudyContent | None = None
    retry_at: float = 0.0  # monotonic time before which the next attempt must not start
    queued_at: float = 0.0  # when it was last handed on (to a confirmer or for a retry)


class _Finder:
    """One thread's C-FIND association to one node, kept while the thread has queries to
    ask (back-to-back confirmations) and opened again when released or closed by the peer.

    Never kept idle: Orthanc serves its associations in turns on DicomThreadsCount (4)
    threads, and a turn on an association with no request waits up to 1 s for one
    (Orthanc's CommandDispatcher::Step), so idle associations held on the target starve
    the C-STOREs of the C-MOVEs. Measured with 4 workers keeping 8 idle associations on
    the target Orthanc: the C-MOVEs of 4 studies of 48 CT took 21.5 s instead of 0.3 s.
    Hence release() before a send and whenever the thread waits for work."""

    def __init__(self, node: Node) -> None:
        self.client = node.dimse()
        self.assoc: Any = None

    def association(self) -> Any:
        if self.assoc is None or not self.assoc.is_open:
            self.assoc = self.client.find_association()
        return self.assoc

    def release(self) -> None:
        if self.assoc is not None and self.assoc.is_open:
            release_in_background(self.assoc)
        self.assoc = None


class _Links:
    """A thread's kept C-FIND associations: to the source and to the target."""

    def __init__(self, migrator: Migrator) -> None:
        self.source = _Finder(migrator.source)
        self.target = _Finder(migrator.target)

    def release(self) -> None:
        """Release both associations (see _Finder: none is kept idle)."""
        for finder in (self.source, self.target):
            try:
                finder.release()
            except Exception:  # noqa: BLE001 - a peer gone meanwhile changes no outcome
                finder.assoc = None


class _Pipeline:
    """The threads of one run. Senders list a study on the source, check the target and
    send; confirmers (as many) confirm each sent study on the target meanwhile, so the
    confirmation of study k overlaps the send of study k+1. A failed attempt goes back to
    the senders after its backoff, until its attempts are spent."""

    def __init__(self, migrator: Migrator, result: MigrationResult, say: ProgressCallback,
                 send: bool) -> None:
        self.migrator, self.result, self.say, self.send = migrator, result, say, send
        self.to_send: deque[_Job] = deque()
        self.to_confirm: deque[_Job] = deque()
        self.cond = threading.Condition()
        self.done = 0
        self.senders_alive = 0
        self.auth_failures: list[AuthenticationFailed] = []
        self.attempts = 1 + migrator.retries if send else 1
        self.limiter = _RateLimiter(migrator.rate_limit if send else None)

    def run(self, workers: int) -> None:
        stop = self.migrator._stop
        self.senders_alive = workers
        threads = [threading.Thread(target=self._thread, args=(self._sender,),
                                    name=f"migrate-{n}", daemon=True) for n in range(workers)]
        threads += [threading.Thread(target=self._thread, args=(self._confirmer,),
                                     name=f"confirm-{n}", daemon=True) for n in range(workers)]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.2)
        except KeyboardInterrupt:
            stop.set()  # the state file is consistent after every study; just stop
            raise
        for job in list(self.to_send) + list(self.to_confirm):
            if job.outcome.attempts:  # a retry that never came: reported, left pending
                job.outcome.error = job.outcome.error or "stopped before the study was confirmed"
                self.finish(job)

    def _thread(self, loop: Callable[[_Links], None]) -> None:
        links = _Links(self.migrator)
        try:
            loop(links)
        except AuthenticationFailed as exc:  # no retry logs in: stop every thread
            self.auth_failures.append(exc)
            self.migrator._stop.set()
        finally:
            links.release()
            with self.cond:
                if loop == self._sender:
                    self.senders_alive -= 1
                self.cond.notify_all()

    def _next(self, queue: deque[_Job], links: _Links, confirming: bool) -> _Job | None:
        """The next job of `queue`, None once there is nothing more to do; the thread's
        associations are released before it waits."""
        stop = self.migrator._stop
        if not queue:  # a glance without the lock: releasing takes a round trip
            links.release()
        with self.cond:
            while not queue:
                if stop.is_set() and (not confirming or self.senders_alive == 0):
                    return None
                if self.done == self.result.studies_total - self.skipped:
                    return None
                if confirming and self.senders_alive == 0 and not self.to_send:
                    return None
                self.cond.wait(0.2)
            if stop.is_set() and not confirming:
                return None
            return queue.popleft()

    @property
    def skipped(self) -> int:
        return self.result.skipped_already_confirmed

    def _sender(self, links: _Links) -> None:
        migrator = self.migrator
        while (job := self._next(self.to_send, links, confirming=False)) is not None:
            wait = job.retry_at - time.monotonic()
            if wait > 0:
                links.release()
                migrator._stop.wait(wait)
            if job.queued_at:  # from the failed attempt to this one: retry backoff
                job.outcome.phases["backoff"] += time.monotonic() - job.queued_at
            if not job.outcome.attempts:
                self.limiter.acquire(migrator._stop)
                job.started = time.monotonic()
            if migrator._stop.is_set():
                self.requeue(job)
                return
            try:
                sent = migrator._attempt(job, links, self.send)
            except AuthenticationFailed:
                self.finish(job)
                raise
            except Exception as exc:  # e.g. the state file's disk is full: report, go on
                job.outcome.error = f"internal: {describe_error(exc)}"
                self.finish(job)
                continue
            if sent:
                with self.cond:
                    job.queued_at = time.monotonic()
                    self.to_confirm.append(job)
                    self.cond.notify_all()
            else:
                self.settle(job)

    def _confirmer(self, links: _Links) -> None:
        while (job := self._next(self.to_confirm, links, confirming=True)) is not None:
            # waiting for a confirmer counts as confirming on the target
            job.outcome.phases["confirm_target"] += time.monotonic() - job.queued_at
            try:
                self.migrator._confirm_sent(job, links)
            except AuthenticationFailed:
                self.finish(job)
                raise
            except Exception as exc:
                job.outcome.error = f"internal: {describe_error(exc)}"
            self.settle(job)

    def settle(self, job: _Job) -> None:
        """After an attempt: finished when confirmed or out of attempts, else queued for
        the next attempt after its backoff (backoff_s, 2 x backoff_s, ...)."""
        outcome = job.outcome
        if outcome.status != "failed":
            self.finish(job)
        elif outcome.attempts >= self.attempts or self.migrator._stop.is_set():
            if outcome.attempts >= self.attempts:
                self.migrator.open().fail(job.uid, outcome.error or "failed")
            self.finish(job)
        else:
            job.retry_at = (time.monotonic()
                            + self.migrator.backoff_s * 2 ** (outcome.attempts - 1))
            self.requeue(job)

    def requeue(self, job: _Job) -> None:
        with self.cond:
            job.queued_at = time.monotonic()
            self.to_send.append(job)
            self.cond.notify_all()

    def finish(self, job: _Job, record: bool = True) -> None:
        outcome = job.outcome
        if record:
            if outcome.status == "failed" and outcome.error is None:
                outcome.error = "stopped before the study was confirmed"
            outcome.elapsed_s = time.monotonic() - job.started if job.started else 0.0
            self.migrator.open().record_duration(self.migrator.run_id, outcome)
        with self.cond:
            self.result.add(outcome)
            if record:
                self.done += 1
            count = len(self.result.outcomes)
            self.cond.notify_all()
        self.say(count, self.result.studies_total, outcome)
