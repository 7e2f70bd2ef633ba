"""The threads of one migration run: senders and confirmers, and what they share.

Why a module of its own: harness/migration/migrator.py says what happens to one study
(list, check, send, confirm); this is how the studies flow through threads so that the
confirmation of study k overlaps the send of study k+1, retries wait their backoff without
holding a thread's associations, and each study's time is kept per phase (state.PHASES).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harness.dicom.dicomweb import AuthenticationFailed
from harness.migration.discovery import StudyContent
from harness.migration.state import (
    MigrationResult,
    ProgressCallback,
    StudyOutcome,
    describe_error,
)
from harness.nodes.base import Node

if TYPE_CHECKING:
    from harness.migration.migrator import Migrator


@contextlib.contextmanager
def timed(outcome: StudyOutcome, phase: str) -> Iterator[None]:
    """Add the block's wall time to the study's `phase` (state.PHASES)."""
    start = time.monotonic()
    try:
        yield
    finally:
        outcome.phases[phase] = outcome.phases.get(phase, 0.0) + time.monotonic() - start


class RateLimiter:
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


@dataclass
class Job:
    """One study on its way through the pipeline, over all its attempts."""

    uid: str
    outcome: StudyOutcome
    started: float = 0.0  # when a sender took it up (a study's time excludes its queueing)
    source_content: StudyContent | None = None
    retry_at: float = 0.0  # monotonic time before which the next attempt must not start
    queued_at: float = 0.0  # when it was last handed on (to a confirmer or for a retry)


class Finder:
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
            self.assoc.release_in_background()
        self.assoc = None


class Links:
    """A thread's kept C-FIND associations: to the source and to the target."""

    def __init__(self, migrator: Migrator) -> None:
        self.source = Finder(migrator.source)
        self.target = Finder(migrator.target)

    def release(self) -> None:
        """Release both associations (see Finder: none is kept idle)."""
        for finder in (self.source, self.target):
            try:
                finder.release()
            except Exception:  # noqa: BLE001 - a peer gone meanwhile changes no outcome
                finder.assoc = None


class Pipeline:
    """The threads of one run. Senders list a study on the source, check the target and
    send; confirmers (as many) confirm each sent study on the target meanwhile, so the
    confirmation of study k overlaps the send of study k+1. A failed attempt goes back to
    the senders after its backoff, until its attempts are spent."""

    def __init__(self, migrator: Migrator, result: MigrationResult, say: ProgressCallback,
                 send: bool) -> None:
        self.migrator, self.result, self.say, self.send = migrator, result, say, send
        self.to_send: deque[Job] = deque()
        self.to_confirm: deque[Job] = deque()
        self.cond = threading.Condition()
        self.done = 0
        self.senders_alive = 0
        self.auth_failures: list[AuthenticationFailed] = []
        self.attempts = 1 + migrator.retries if send else 1
        self.limiter = RateLimiter(migrator.rate_limit if send else None)

    def run(self, workers: int) -> None:
        stop = self.migrator.stopping
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

    def _thread(self, loop: Callable[[Links], None]) -> None:
        links = Links(self.migrator)
        try:
            loop(links)
        except AuthenticationFailed as exc:  # no retry logs in: stop every thread
            self.auth_failures.append(exc)
            self.migrator.stopping.set()
        finally:
            links.release()
            with self.cond:
                if loop == self._sender:
                    self.senders_alive -= 1
                self.cond.notify_all()

    def _next(self, queue: deque[Job], links: Links, confirming: bool) -> Job | None:
        """The next job of `queue`, None once there is nothing more to do; the thread's
        associations are released before it waits."""
        stop = self.migrator.stopping
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

    def _sender(self, links: Links) -> None:
        migrator = self.migrator
        while (job := self._next(self.to_send, links, confirming=False)) is not None:
            wait = job.retry_at - time.monotonic()
            if wait > 0:
                links.release()
                migrator.stopping.wait(wait)
            if job.queued_at:  # from the failed attempt to this one: retry backoff
                job.outcome.phases["backoff"] += time.monotonic() - job.queued_at
            if not job.outcome.attempts:
                self.limiter.acquire(migrator.stopping)
                job.started = time.monotonic()
            if migrator.stopping.is_set():
                self.requeue(job)
                return
            try:
                sent = migrator.attempt_send(job, links, self.send)
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

    def _confirmer(self, links: Links) -> None:
        while (job := self._next(self.to_confirm, links, confirming=True)) is not None:
            # waiting for a confirmer counts as confirming on the target
            job.outcome.phases["confirm_target"] += time.monotonic() - job.queued_at
            try:
                self.migrator.confirm_sent(job, links)
            except AuthenticationFailed:
                self.finish(job)
                raise
            except Exception as exc:
                job.outcome.error = f"internal: {describe_error(exc)}"
            self.settle(job)

    def settle(self, job: Job) -> None:
        """After an attempt: finished when confirmed or out of attempts, else queued for
        the next attempt after its backoff (backoff_s, 2 x backoff_s, ...)."""
        outcome = job.outcome
        if outcome.status != "failed":
            self.finish(job)
        elif outcome.attempts >= self.attempts or self.migrator.stopping.is_set():
            if outcome.attempts >= self.attempts:
                self.migrator.open().fail(job.uid, outcome.error or "failed")
            self.finish(job)
        else:
            job.retry_at = (time.monotonic()
                            + self.migrator.backoff_s * 2 ** (outcome.attempts - 1))
            self.requeue(job)

    def requeue(self, job: Job) -> None:
        with self.cond:
            job.queued_at = time.monotonic()
            self.to_send.append(job)
            self.cond.notify_all()

    def finish(self, job: Job, record: bool = True) -> None:
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
