"""The one way the harness opens its SQLite files: connection pragmas, transactions, schema
version.

Users: the migration state file (harness/migration/state.py), the embedded PACS index
(harness/embedded_pacs/storage.py), the migration ledger (its version in its ``meta`` table:
``check_version``) and the ledgers' read-only readers (``connect_readonly``). Standard library
only and no import of other harness modules: the embedded PACS container image carries this
file beside the package.

Conventions, so a file written by one process can be read and written by another at once:

* autocommit connections (``isolation_level=None``); a multi-statement write goes through
  ``transaction()``, which takes the write lock up front (``BEGIN IMMEDIATE``). A deferred
  transaction that reads first and writes later fails with "database is locked" at once when
  another writer committed meanwhile (WAL snapshot), whatever the busy timeout; an immediate
  one waits for the lock instead.
* WAL journal (readers never block the writer), ``synchronous=NORMAL`` unless said otherwise:
  a commit survives a crash of the process, not necessarily a power loss.
* ``PRAGMA user_version`` holds the file's schema version; 0 is a new file. A version the code
  does not know (written by a newer harness) is refused before anything is changed.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

DEFAULT_BUSY_TIMEOUT_S = 30.0


class SchemaVersionError(Exception):
    """The file's schema version is not one this code reads; the message is one line naming
    the file. Exit code 2 (the user chose the file), like harness.errors.ConfigError."""

    exit_code = 2


def connect(
    path: str | os.PathLike[str],
    *,
    journal_mode: str | None = "WAL",
    synchronous: str | None = "NORMAL",
    busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    check_same_thread: bool = False,
) -> sqlite3.Connection:
    """An autocommit connection with ``sqlite3.Row`` rows that waits ``busy_timeout_s`` for a
    lock held by another connection or process instead of failing.

    ``journal_mode`` / ``synchronous`` None leave the file's (persistent) journal mode and the
    connection's default durability alone: cheaper for short-lived readers of a file whose
    creator already set WAL.
    """
    conn = sqlite3.connect(
        Path(path),
        timeout=busy_timeout_s,  # sqlite3_busy_timeout: wait for another writer's lock
        isolation_level=None,
        check_same_thread=check_same_thread,
    )
    try:
        conn.row_factory = sqlite3.Row
        if journal_mode is not None:
            conn.execute(f"PRAGMA journal_mode = {journal_mode}")
        if synchronous is not None:
            conn.execute(f"PRAGMA synchronous = {synchronous}")
    except BaseException:
        conn.close()
        raise
    return conn


def readonly_uri(path: str | os.PathLike[str]) -> str:
    """A read-only SQLite URI for `path` (for connect or ATTACH); `as_uri` escapes '?', '#'
    and '%', which a plain ``file:{path}?mode=ro`` would take as URI syntax."""
    return Path(path).absolute().as_uri() + "?mode=ro"


def connect_readonly(
    path: str | os.PathLike[str],
    *,
    busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    check_same_thread: bool = False,
) -> sqlite3.Connection:
    """An autocommit connection with ``sqlite3.Row`` rows that cannot change the file, not
    even its journal mode: for reading a file another run wrote (a ledger being compared),
    which must stay as it was. Fails with sqlite3.OperationalError when the file is missing
    (read-only never creates one)."""
    uri = readonly_uri(path)
    conn = sqlite3.connect(
        uri,
        uri=True,
        timeout=busy_timeout_s,
        isolation_level=None,
        check_same_thread=check_same_thread,
    )
    conn.row_factory = sqlite3.Row
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Hold the write lock for the block: COMMIT at its end, ROLLBACK if it raises (the
    exception propagates). Waits up to the busy timeout for another writer to finish."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def schema_version(conn: sqlite3.Connection) -> int:
    """The file's schema version (``PRAGMA user_version``); 0 for a new file."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def check_schema_version(
    conn: sqlite3.Connection,
    current: int,
    *,
    what: str,
    readable: Iterable[int] = (),
    hint: str = "",
) -> int:
    """The file's version if this code can use it: 0 (new), ``current`` or one of the older
    ``readable`` ones (the caller upgrades those). Otherwise SchemaVersionError, e.g.
    ``state.sqlite: schema version 7 is newer than this harness's 2 (written by a newer
    pacs-harness)``; ``what`` names the file, ``hint`` says what to do."""
    return check_version(schema_version(conn), current, what=what, readable=readable, hint=hint)


def check_version(
    found: int,
    current: int,
    *,
    what: str,
    readable: Iterable[int] = (),
    hint: str = "",
) -> int:
    """check_schema_version for a version the file keeps elsewhere than ``user_version``
    (the migration ledger keeps it in its ``meta`` table, readable by any SQLite reader)."""
    if found == 0 or found == current or found in set(readable):
        return found
    if found > current:
        problem = (
            f"schema version {found} is newer than this harness's {current} "
            "(written by a newer pacs-harness)"
        )
    else:
        known = ", ".join(str(v) for v in sorted({current, *readable}))
        problem = f"schema version {found} unknown (this harness reads {known})"
    raise SchemaVersionError(f"{what}: {problem}" + (f"; {hint}" if hint else ""))


def set_schema_version(conn: sqlite3.Connection, version: int) -> None:
    """Record the schema version the file now has (after creating or upgrading its tables)."""
    conn.execute(f"PRAGMA user_version = {int(version)}")
