"""One security check's outcome: what was tried, what happened, and what to do about it.

Why a shared shape: the TLS, access-control, REST, audit and canary probes are different
protocols but one report; a `Check` is a row of the compliance matrix (node x check).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

#: pass: the node behaves as the reference says; fail: a finding; skip: not applicable
Outcome = Literal["pass", "fail", "skip"]


@dataclass(frozen=True)
class Check:
    node: str
    area: str  # "tls", "access", "rest", "audit", "phi"
    name: str  # short, stable: "plaintext refused", "unknown calling AE: C-FIND"
    outcome: Outcome
    observed: str  # what the probe saw, in words (never a secret)
    remedy: str = ""  # what the site changes when it fails
    reference: str = ""  # where the rule comes from: "PS3.15 B.9", "RFC 9110 15.5.2"

    @property
    def failed(self) -> bool:
        return self.outcome == "fail"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """One line for a log or an assertion message."""
        text = f"{self.node}: {self.area}: {self.name}: {self.outcome} ({self.observed})"
        return f"{text}; remedy: {self.remedy}" if self.failed and self.remedy else text


def failures(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.failed]
