"""Fixtures shared by the harness's own test modules."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import run_cli


@pytest.fixture(scope="session")
def default_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The main job, once per test session: `pacs-harness run` on the default topology with
    every scenario (about five minutes); its report directory and the finished process."""
    target = tmp_path_factory.mktemp("main-job") / "report"
    proc = run_cli("run", "--report-dir", str(target), "-q", timeout=1500)
    return target, proc
