"""The embedded PACS against hostile input: wildcard patterns built to backtrack, and raw-socket
peers that announce huge PDUs, drip, stall or send junk, while honest peers keep being served.

Servers are real subprocesses on 127.0.0.1 (started by tests/test_embedded_server.py's
``start_node``), always stopped by a finalizer.
"""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.nodes.embedded_server import wildcard_match

# ---------------------------------------------------------------------------------------------
# Wildcard matching (PS3.4 C.2.2.2.4)
# ---------------------------------------------------------------------------------------------


def reference_match(pattern: str, value: str, ignore_case: bool) -> bool:
    """fnmatch's semantics restricted to ``*`` and ``?`` (``[`` escaped): an independent means."""
    if ignore_case:
        pattern, value = pattern.lower(), value.lower()
    return fnmatch.fnmatchcase(value, pattern.replace("[", "[[]"))


@settings(max_examples=600, deadline=None)
@given(
    pattern=st.text(alphabet="ab*?[A", max_size=8),
    value=st.text(alphabet="abAB[", max_size=10),
    ignore_case=st.booleans(),
)
def test_wildcard_match_agrees_with_fnmatch(pattern: str, value: str, ignore_case: bool) -> None:
    assert wildcard_match(pattern, value, ignore_case) == reference_match(
        pattern, value, ignore_case
    )


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("*", "", True),
        ("?", "", False),
        ("DOE^*", "DOE^JOHN", True),
        ("*^J?HN", "DOE^JOHN", True),
        ("*A*A*", "A", False),
        ("A*A", "A", False),
        ("A*A", "AA", True),
    ],
)
def test_wildcard_examples(pattern: str, value: str, expected: bool) -> None:
    assert wildcard_match(pattern, value) is expected


@pytest.mark.timeout(60)
def test_pathological_pattern_completes() -> None:
    """A backtracking matcher takes ~10x longer per ``*A``; this one finishes (the test timeout
    bounds it, no timing assert)."""
    value = "A" * 5000
    assert not wildcard_match("*A" * 40 + "*B", value)
    assert wildcard_match("*A" * 40 + "*", value)
    assert not wildcard_match("*a*a*a*a*a*a*a*a*b", value, ignore_case=True)
