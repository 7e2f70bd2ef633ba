"""Reference migrator: copy every study of a source PACS to a target, with zero-loss proof.

Why it exists: a migration project needs a migrator it can trust as a baseline (and to
compare the site's own tool against). The unit of work is a study. The plan (the source's
study list, from a study-level C-FIND) is kept in the state file (state.py), so a run that
is killed, even with SIGKILL, resumes with the same plan: studies confirmed on the target
are not sent again, partially sent ones are sent again whole (a PACS keeps one copy per SOP
Instance UID, so re-sending creates no duplicate).

A study is *confirmed* when the target's IMAGE-level C-FIND (per series) shows every SOP
Instance UID the source's IMAGE-level C-FIND listed, the source's listing settled first
(discovery.py). Only then is it written as confirmed, one transaction per study. This
module is the orchestration: sender threads (list the source, check the target, send) and
as many confirmer threads (confirm each sent study while the senders go on: pipeline.py),
rate limit, retries with backoff, and the time each study spends per phase (state.PHASES,
kept in the state file; a study slower than `slow_study_s` is reported with them). How a
study travels is methods.py, the site's own tool external.py.

Run it from the command line with ``pacs-harness migrate`` (harness/cli/migrate.py).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

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
from harness.migration.methods import METHODS, check_method, send_study
from harness.migration.pipeline import Finder, Job, Links, Pipeline, timed
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

CONFIRM_POLL_S = 0.2  # between reads of the target while it indexes what it received


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
        self.stopping = threading.Event()
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
        self.stopping.set()

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
        self.stopping.clear()
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
        pipeline = Pipeline(self, result, say, send)
        for uid in studies:
            if self.is_confirmed(uid):
                pipeline.finish(Job(uid, StudyOutcome(uid, "skipped_already_confirmed")),
                                record=False)
            else:
                pipeline.to_send.append(Job(uid, StudyOutcome(uid, "failed")))
        pipeline.run(min(self.workers, max(1, len(pipeline.to_send))))
        result.elapsed_s = time.monotonic() - start
        state.finish_run(self.run_id, result)
        if pipeline.auth_failures:
            raise pipeline.auth_failures[0]
        return result

    # -- one study's steps (called by Pipeline's threads) ----------------------------------
    def attempt_send(self, job: Job, links: Links, send: bool) -> bool:
        """One attempt at a study up to its send: list the source (once), check the target,
        send what it lacks. True: sent, to be confirmed; False: the study is finished or
        waits for a retry (job.outcome says which)."""
        state = self.open()
        outcome = job.outcome
        outcome.attempts += 1
        send_id = None
        try:
            if job.source_content is None:
                with timed(outcome, "list_source"):
                    listed = self._listing(links.source, "source", job.uid, outcome)
                if not listed.instances:
                    raise MigrationError(
                        f"source {self.source.name} lists no instance of study {job.uid}"
                    )
                job.source_content = listed
                state.record_instances(job.uid, listed.instances)
                outcome.instances = len(listed.instances)
            with timed(outcome, "confirm_target"):
                missing = self._missing(job, links.target)
            if not missing:
                self._confirmed_now(job)
                return False
            if not send:
                raise self._not_on_target(job, missing, sent=False)
            links.release()  # idle during the send: see Finder
            send_id = state.start_send(self.run_id, job.uid, outcome.attempts, self.method)
            with timed(outcome, "send"):
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

    def confirm_sent(self, job: Job, links: Links) -> None:
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
        with timed(outcome, "confirm_target"):
            try:
                while True:
                    shown = study_content(
                        links.target.client, job.uid, sorted(content.series),
                        assoc=links.target.association(), sop_classes=False,
                    )
                    if not wanted - set(shown.instances):
                        self._confirmed_now(job)
                        return
                    if time.monotonic() >= deadline or self.stopping.is_set():
                        break
                    links.release()  # idle while it waits: see Finder
                    self.stopping.wait(CONFIRM_POLL_S)
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

    def _confirmed_now(self, job: Job) -> None:
        self.open().confirm(self.run_id, job.uid)
        with self._confirmed_lock:
            self._confirmed.add(job.uid)
        job.outcome.status = "migrated" if job.outcome.instances_sent else "already_on_target"
        job.outcome.error = None

    def _not_on_target(self, job: Job, missing: set[str], *, sent: bool) -> MigrationError:
        assert job.source_content is not None
        return MigrationError(
            f"{len(missing)} of {len(job.source_content.instances)} instances not on "
            f"target {self.target.name}" + (" after sending" if sent else "")
        )

    def _listing(self, finder: Finder, role: str, uid: str, outcome: StudyOutcome
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
                stop=self.stopping,
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

    def _missing(self, job: Job, finder: Finder) -> set[str]:
        """SOP Instance UIDs of the source study that the target's settled C-FIND lacks."""
        assert job.source_content is not None
        on_target = self._listing(finder, "target", job.uid, job.outcome)
        return set(job.source_content.instances) - set(on_target.instances)
