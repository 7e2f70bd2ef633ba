"""Root conftest: only what the repository's own test runs need.

Every test run gets its own state directory, so tests never see or stop clusters that a
developer started with `pacs-harness up`, and subprocesses (the CLI) inherit it.
"""

from __future__ import annotations

import os
import tempfile

_STATE = tempfile.mkdtemp(prefix="pacs-harness-test-state-")
os.environ["PACS_HARNESS_STATE_DIR"] = _STATE
