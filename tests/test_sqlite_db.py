"""harness/sqlite_db.py, the SQLite helper of the migration state file and the embedded PACS
index: transactions, schema versions, two processes writing one file.

File contents are checked with the sqlite3 command-line shell (/usr/bin/sqlite3), not with
the helper itself.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from harness import sqlite_db
from harness.errors import ConfigError
from harness.migration.ledger import SCHEMA_VERSION as LEDGER_SCHEMA_VERSION
from harness.migration.ledger import Ledger
from harness.migration.state import STATE_SCHEMA_VERSION, MigrationState

REPO = Path(__file__).resolve().parents[1]
SQLITE3 = Path("/usr/bin/sqlite3")
needs_shell = pytest.mark.skipif(not SQLITE3.exists(), reason="/usr/bin/sqlite3 not installed")


def shell(db: Path, sql: str) -> str:
    """Run SQL with the sqlite3 shell: an independent reader of the file."""
    return subprocess.run(
        [str(SQLITE3), str(db), sql], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


@needs_shell
def test_transaction_commits_at_the_end_and_rolls_back_on_error(tmp_path: Path) -> None:
    db = tmp_path / "t.sqlite"
    conn = sqlite_db.connect(db)
    conn.execute("CREATE TABLE t (v TEXT)")
    with sqlite_db.transaction(conn):
        conn.execute("INSERT INTO t VALUES ('kept')")
    with pytest.raises(KeyError), sqlite_db.transaction(conn):
        conn.execute("INSERT INTO t VALUES ('first of a failed pair')")
        raise KeyError("the second half failed")
    assert not conn.in_transaction
    conn.close()
    assert shell(db, "SELECT v FROM t") == "kept"
    assert shell(db, "PRAGMA journal_mode") == "wal"


@needs_shell
def test_a_newer_schema_version_is_refused_in_one_line_and_the_file_left_alone(
    tmp_path: Path,
) -> None:
    db = tmp_path / "future.sqlite"
    shell(db, "CREATE TABLE later (x); PRAGMA user_version = 9")
    conn = sqlite_db.connect(db)
    with pytest.raises(sqlite_db.SchemaVersionError) as refused:
        sqlite_db.check_schema_version(conn, 2, what=str(db), hint="use another file")
    conn.close()
    message = str(refused.value)
    assert "\n" not in message
    assert message == (
        f"{db}: schema version 9 is newer than this harness's 2 (written by a newer "
        "pacs-harness); use another file"
    )
    assert refused.value.exit_code == 2
    assert shell(db, "PRAGMA user_version") == "9"
    assert shell(db, "SELECT name FROM sqlite_master") == "later"


@needs_shell
def test_versions_the_code_reads_are_accepted_and_set(tmp_path: Path) -> None:
    db = tmp_path / "v.sqlite"
    conn = sqlite_db.connect(db)
    assert sqlite_db.check_schema_version(conn, 3, what="v", readable=(2,)) == 0  # new file
    sqlite_db.set_schema_version(conn, 2)
    assert sqlite_db.check_schema_version(conn, 3, what="v", readable=(2,)) == 2
    with pytest.raises(sqlite_db.SchemaVersionError, match=r"^v: schema version 2 unknown "):
        sqlite_db.check_schema_version(conn, 3, what="v")
    sqlite_db.set_schema_version(conn, 3)
    conn.close()
    assert shell(db, "PRAGMA user_version") == "3"


@needs_shell
def test_migration_state_file_of_a_newer_harness_is_a_config_error(tmp_path: Path) -> None:
    """What `pacs-harness migrate --state FILE` meets: exit code 2, one line, file unchanged,
    and the file's lock released (a second attempt says the same, not 'in use')."""
    state = tmp_path / "state.sqlite"
    newer = STATE_SCHEMA_VERSION + 1
    shell(state, f"PRAGMA user_version = {newer}")
    for _attempt in range(2):
        with pytest.raises(ConfigError) as refused:
            MigrationState(state)
        assert str(refused.value) == (
            f"{state}: state file: schema version {newer} is newer than this harness's "
            f"{STATE_SCHEMA_VERSION} (written by a newer pacs-harness); use a new --state file"
        )
        assert refused.value.exit_code == 2
    assert shell(state, "PRAGMA user_version") == str(newer)
    assert shell(state, "SELECT count(*) FROM sqlite_master") == "0"


def test_migration_state_file_that_is_not_sqlite_is_a_config_error(tmp_path: Path) -> None:
    state = tmp_path / "notes.txt"
    state.write_text("not a database, just a long enough line of text " * 4)
    with pytest.raises(ConfigError, match=r"not a usable state file \(file is not a database\)"):
        MigrationState(state)


@needs_shell
def test_a_ledger_of_a_newer_harness_is_refused_in_one_line_and_kept(tmp_path: Path) -> None:
    """The ledger keeps its version in its meta table (any SQLite reader sees it); a newer
    one is a ConfigError (exit 2) naming the file, and a new crawl does not overwrite it."""
    path = tmp_path / "source.ledger.sqlite"
    Ledger.create(path, {"node": "a"}).close()
    newer = LEDGER_SCHEMA_VERSION + 1
    shell(path, f"UPDATE meta SET value = '{newer}' WHERE key = 'schema_version'")
    with pytest.raises(ConfigError) as refused:
        Ledger.open(path)
    assert str(refused.value) == (
        f"{path}: ledger: schema version {newer} is newer than this harness's "
        f"{LEDGER_SCHEMA_VERSION} (written by a newer pacs-harness)"
    )
    assert refused.value.exit_code == 2
    with pytest.raises(ConfigError, match="refusing to replace it with a new ledger$"):
        Ledger.create(path, {"node": "b"})
    assert shell(path, "SELECT value FROM meta WHERE key = 'node'") == "a"


# Each writer adds 1 to a counter, `rounds` times, each in its own transaction: a read then a
# write, the pattern that loses updates or fails with "database is locked" unless the write
# lock is taken up front and a busy writer is waited for.
WRITER = """
import sys
from harness import sqlite_db
db, rounds = sys.argv[1], int(sys.argv[2])
conn = sqlite_db.connect(db)
print("ready", flush=True)
sys.stdin.readline()
for _ in range(rounds):
    with sqlite_db.transaction(conn):
        (value,) = conn.execute("SELECT value FROM counter").fetchone()
        conn.execute("UPDATE counter SET value = ?", (value + 1,))
print("done", flush=True)
"""


@needs_shell
def test_concurrent_writers_from_two_processes_wait_rather_than_fail(tmp_path: Path) -> None:
    """Two processes increment one counter while this one holds the write lock at the start:
    both wait for it, none fails, no update is lost."""
    db = tmp_path / "shared.sqlite"
    rounds = 200
    holder = sqlite_db.connect(db)
    holder.execute("CREATE TABLE counter (value INTEGER NOT NULL)")
    holder.execute("INSERT INTO counter VALUES (0)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), str(rounds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    try:
        for proc in writers:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with sqlite_db.transaction(holder):
            holder.execute("UPDATE counter SET value = value + 1000")
            for proc in writers:  # both start while the lock is held here
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            # the writers' first transactions now queue behind this one
            assert holder.execute("SELECT value FROM counter").fetchone()[0] == 1000
        outcomes = [proc.communicate(timeout=300) for proc in writers]
    finally:
        for proc in writers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        holder.close()
    for proc, (out, err) in zip(writers, outcomes, strict=True):
        assert proc.returncode == 0, err
        assert out.split() == ["done"]
    assert shell(db, "SELECT value FROM counter") == str(1000 + 2 * rounds)


def test_connect_without_journal_mode_keeps_the_files_mode(tmp_path: Path) -> None:
    """Short-lived readers pass journal_mode=None: the WAL mode a creator set stays."""
    db = tmp_path / "r.sqlite"
    sqlite_db.connect(db).close()
    reader = sqlite_db.connect(db, journal_mode=None, synchronous=None)
    try:
        assert reader.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert isinstance(reader.execute("SELECT 1 AS one").fetchone(), sqlite3.Row)
    finally:
        reader.close()
