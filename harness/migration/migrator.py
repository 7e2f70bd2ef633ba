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

import os
import threading
import time
from collections import deque
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
)
from harness.migration.methods import METHODS, check_method, send_study
from harness.migration.state import (
    MigrationError,
    MigrationResult,
    MigrationState,
    ProgressCallback,
    StudyOutcome,
    describe_error,
)
from harness.nodes.base import Node


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
    ) -> None:
        if method not in METHODS:
            raise ConfigError(f"method {method!r}: unknown (allowed: {', '.join(METHODS)})")
        if workers < 1:
            raise ConfigError(f"workers: must be >= 1, got {workers}")
        if rate_limit is not None and rate_limit <= 0:
            raise ConfigError(f"rate limit: must be > 0 studies/s, got {rate_limit}")
        if retries < 0 or backoff_s < 0:
            raise ConfigError("retries and backoff must be >= 0")
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
        auth_failures: list[AuthenticationFailed] = []
        self.run_id = state.start_run(self.method if send else "verify")
        result = MigrationResult(
            self.method if send else "verify",
            self.source.name,
            self.target.name,
            studies_total=len(studies),
        )
        lock = threading.Lock()
        done = 0
        say = progress or (lambda _done, _total, _outcome: None)
        say(0, len(studies), None)

        def finish(outcome: StudyOutcome) -> None:
            nonlocal done
            with lock:
                result.add(outcome)
                done += 1
                count = done
            say(count, len(studies), outcome)

        work: deque[str] = deque()
        for uid in studies:
            if self.is_confirmed(uid):
                finish(StudyOutcome(uid, "skipped_already_confirmed"))
            else:
                work.append(uid)
        queue_lock = threading.Lock()
        limiter = _RateLimiter(self.rate_limit if send else None)

        def worker() -> None:
            while not self._stop.is_set():
                with queue_lock:
                    if not work:
                        return
                    uid = work.popleft()
                limiter.acquire(self._stop)
                if self._stop.is_set():
                    return
                try:
                    outcome = self._study(uid, send)
                except AuthenticationFailed as exc:  # no retry logs in: stop every worker
                    auth_failures.append(exc)
                    self._stop.set()
                    return
                except Exception as exc:  # e.g. the state file's disk is full: report, go on
                    outcome = StudyOutcome(uid, "failed", error=f"internal: {describe_error(exc)}")
                finish(outcome)

        threads = [
            threading.Thread(target=worker, name=f"migrate-{n}", daemon=True)
            for n in range(min(self.workers, max(1, len(work))))
        ]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.2)
        except KeyboardInterrupt:
            self._stop.set()  # the state file is consistent after every study; just stop
            raise
        result.elapsed_s = time.monotonic() - start
        state.finish_run(self.run_id, result)
        if auth_failures:
            raise auth_failures[0]
        return result

    def _study(self, uid: str, send: bool) -> StudyOutcome:
        """All attempts at one study: list, check the target, send, confirm."""
        state = self.open()
        start = time.monotonic()
        outcome = StudyOutcome(uid, "failed")
        source_content: StudyContent | None = None
        attempts = 1 + self.retries if send else 1
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                if self._stop.wait(self.backoff_s * 2 ** (attempt - 2)):
                    break
            outcome.attempts = attempt
            send_id = None
            try:
                if source_content is None:
                    listed = self._listing(self.source, "source", uid, outcome)
                    if not listed.instances:
                        raise MigrationError(
                            f"source {self.source.name} lists no instance of study {uid}"
                        )
                    source_content = listed
                    state.record_instances(uid, source_content.instances)
                    outcome.instances = len(source_content.instances)
                missing = self._missing(uid, source_content, outcome)
                if missing and send:
                    send_id = state.start_send(self.run_id, uid, attempt, self.method)
                    sent = send_study(
                        self.method, self.source, self.target, uid, source_content
                    )
                    outcome.instances_sent += sent
                    state.finish_send(send_id, sent, None)
                    send_id = None
                    missing = self._wait_confirmed(uid, source_content, outcome)
                if missing:
                    raise MigrationError(
                        f"{len(missing)} of {len(source_content.instances)} instances not on "
                        f"target {self.target.name}" + (" after sending" if send else "")
                    )
            except AuthenticationFailed as exc:  # not transient: a retry is refused again
                if send_id is not None:
                    state.finish_send(send_id, 0, describe_error(exc))
                raise
            except Exception as exc:  # any failure of this attempt is retried, then recorded
                outcome.error = describe_error(exc)
                if send_id is not None:
                    state.finish_send(send_id, 0, outcome.error)
                continue
            state.confirm(self.run_id, uid)
            with self._confirmed_lock:
                self._confirmed.add(uid)
            outcome.status = "migrated" if outcome.instances_sent else "already_on_target"
            outcome.error = None
            break
        else:
            state.fail(uid, outcome.error or "failed")
        if outcome.status == "failed" and outcome.error is None:
            outcome.error = "stopped before the study was confirmed"
        outcome.elapsed_s = time.monotonic() - start
        return outcome

    def _listing(self, node: Node, role: str, uid: str, outcome: StudyOutcome) -> StudyContent:
        """The study as `node` lists it once the listing settled; disagreeing reads are
        noted in the outcome and the state file (also when it never settles)."""
        state = self.open()
        try:
            content, notes = stable_study_content(
                node.dimse(),
                uid,
                role=role,
                tries=self.listing_tries,
                deadline_s=self.listing_timeout_s,
                on_listing=self.on_listing,
                stop=self._stop,
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

    def _missing(
        self, uid: str, source_content: StudyContent, outcome: StudyOutcome
    ) -> set[str]:
        """SOP Instance UIDs of the source study that the target's C-FIND does not show."""
        on_target = self._listing(self.target, "target", uid, outcome)
        wanted = set(source_content.instances)
        return wanted - set(on_target.instances)

    def _wait_confirmed(
        self, uid: str, source_content: StudyContent, outcome: StudyOutcome
    ) -> set[str]:
        """Poll the target briefly: some PACS index what they received a moment later."""
        deadline = time.monotonic() + self.confirm_timeout_s
        while True:
            missing = self._missing(uid, source_content, outcome)
            if not missing or time.monotonic() >= deadline or self._stop.is_set():
                return missing
            self._stop.wait(0.5)  # poll the target; a stop() ends the wait at once
