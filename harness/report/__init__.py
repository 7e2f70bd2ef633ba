"""The go-live readiness report (index.html) and the rollout-phase gates.

`write_html_report` turns a run's report.json and node logs into one self-contained page that
a radiology director, a QA lead and a vendor can read; `evaluate_gate` decides whether a
finished run makes a rollout phase ready, the same way for `run --phase` and `gate`.
"""

from __future__ import annotations

from harness.report.gate import GateResult, evaluate_gate
from harness.report.html import redact, redact_text, write_html_report

__all__ = ["GateResult", "evaluate_gate", "redact", "redact_text", "write_html_report"]
