"""The deadline of one wire-layer operation, which a peer cannot push back (docs/safety.md).

pynetdicom's timeouts bound each read, not an operation: a peer trickling one byte per
timeout keeps it alive forever. This budget grows only with the bytes actually moved.
"""

from __future__ import annotations

import time


class OperationDeadline:
    """When the operation under way must be over (docs/safety.md, "hostile peers").

    The budget is `timeout_s` plus every byte moved (sent or received) at `min_rate`, from
    the start or the last `progress()` (a C-GET sub-operation, a C-FIND match): a byte
    buys 1/min_rate s, so a peer trickling slower than `min_rate` loses ground with each
    read while an honest slow link keeps up. Each read also waits at most `idle_s` (the
    DIMSE timeout), except for the first answer after we sent: what we sent may still be
    on its way to the peer. `hard_s` (C-FIND's `deadline_s`) caps the whole operation.
    """

    def __init__(
        self, waiting_for: str, idle_s: float, min_rate: float, hard_s: float | None = None
    ) -> None:
        self.waiting_for = waiting_for
        self.idle_s = idle_s
        self.min_rate = min_rate
        now = time.monotonic()
        self.hard_at = None if hard_s is None else now + hard_s
        self.hard_message = f"{waiting_for} not finished within {hard_s} s"  # callers say more
        self.progress_count = 0
        self.pending_in_a_row = 0
        self._restart(now)
        self.awaiting_peer = False  # we sent last: the peer may still be reading it
        self.idle_wait = False  # the last wait was bounded by idle_s, not the deadline

    def _restart(self, now: float) -> None:
        self.started = now
        self.moved = 0
        self.at = now + self.idle_s

    def progress(self) -> None:
        """A sub-operation or match arrived: a fresh budget."""
        self.progress_count += 1
        self.pending_in_a_row = 0
        self._restart(time.monotonic())

    def sent(self, count: int) -> None:
        self.moved += count
        self.at += count / self.min_rate
        self.awaiting_peer = True

    def received(self, count: int) -> None:
        self.moved += count
        self.at += count / self.min_rate
        self.awaiting_peer = False

    def remaining(self) -> float:
        """Seconds left before the deadline (the hard cap included)."""
        at = self.at if self.hard_at is None else min(self.at, self.hard_at)
        return at - time.monotonic()

    def read_wait(self) -> float:
        """How long the next read may wait; TimeoutError when the time is up."""
        remaining = self.remaining()
        if remaining <= 0:
            raise TimeoutError
        self.idle_wait = not self.awaiting_peer and self.idle_s < remaining
        return self.idle_s if self.idle_wait else remaining

    def expired(self) -> str:
        """One line: what we waited for and which bound ran out."""
        if self.idle_wait:
            return f"no answer within {self.idle_s:g} s"
        if self.hard_at is not None and self.hard_at <= self.at:
            return self.hard_message
        since = f" since the last of {self.progress_count} received" if self.progress_count else ""
        return (
            f"{self.waiting_for} not complete within the operation deadline of "
            f"{self.at - self.started:.1f} s{since} ({self.idle_s:g} s + {self.moved} bytes "
            f"at {self.min_rate / 1024:g} KiB/s)"
        )
