"""Canary identities: a made-up patient with a unique token, planted and then searched for.

A site's patients must stay in the PACS: reports, logs, ledgers and attachments of a run
against a site's archive hold tokens instead (harness/report/identities.py). A canary makes
that testable end to end: a synthetic study whose token sits wherever PS3.15 Annex E says
identity hides (PatientName, PatientID, OtherPatientIDsSequence, free text, a private
element, a nested sequence item), stored into a node the harness may write, inventoried as
a site's archive (identities tokenised), and then every file the run wrote is searched for
the token: plain files streamed in chunks (text, JSON, HTML, XML, JSONL, logs, binaries),
.gz and .zip decompressed as streams, every table of every SQLite file read row by row.

Each planted value is the token followed by a marker of its place (`-PID`, `-PN`, ...), so a
leak also says which attribute leaked.
"""

from __future__ import annotations

import gzip
import json
import secrets
import sqlite3
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydicom import Dataset
from pydicom.sequence import Sequence

from harness.errors import EnvironmentProblem
from harness.nodes.base import Node
from harness.security.checks import Check

AREA = "phi"
REFERENCE = "PS3.15 E.1 (attributes that identify a patient), E.3.1 (clean descriptors)"
#: where each planted value goes, by its marker after the token
FIELDS: dict[str, str] = {
    "PN": "PatientName",
    "PID": "PatientID",
    "OPID": "OtherPatientIDsSequence[0].PatientID",
    "TXT": "ImageComments (free text)",
    "PRIV": "private element (0011,1010) of creator PACSHARNESS CANARY",
    "SEQ": "RequestAttributesSequence[0].RequestedProcedureDescription",
}
PRIVATE_CREATOR = "PACSHARNESS CANARY"
PRIVATE_GROUP = 0x0011
MAX_FILE_MB = 256  # larger files (and decompressed members) are skipped with a note
CHUNK = 1 << 20
JSON_PATHS_MB = 8  # JSON files up to this size are parsed to name the key that leaked
MAX_LEAKS_PER_FILE = 20


def new_token() -> str:
    """A token no real record holds: CANARY and 48 random bits in hex."""
    return "CANARY" + secrets.token_hex(6).upper()


def canary_study(token: str, seed: int) -> list[Dataset]:
    """Two instances of one synthetic study (synthetic_data.samples) carrying `token`
    in every place a patient's identity hides (FIELDS)."""
    from synthetic_data.samples import sample_study

    study = sample_study(seed=seed, instances=2)
    for ds in study:
        ds.PatientName = f"{token}-PN^CANARY"
        ds.PatientID = f"{token}-PID"
        other = Dataset()
        other.PatientID = f"{token}-OPID"
        other.IssuerOfPatientID = "CANARY"
        ds.OtherPatientIDsSequence = Sequence([other])
        ds.ImageComments = f"canary patient {token}-TXT reported pain"
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        block.add_new(0x10, "LO", f"{token}-PRIV")
        request = ds.RequestAttributesSequence[0] if "RequestAttributesSequence" in ds else None
        if request is None:
            request = Dataset()
            ds.RequestAttributesSequence = Sequence([request])
        request.RequestedProcedureDescription = f"{token}-SEQ"
    return study


# -- the scan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Leak:
    """A canary token found where it does not belong."""

    path: str
    where: str  # "line 12", "$.findings[0].patient_id", "table studies, column keys, row 3"
    token: str = ""
    field: str = ""  # the planted attribute, from the marker after the token ("" unknown)

    def line(self) -> str:
        what = f" ({self.field})" if self.field else ""
        return f"{self.path}: {self.where}{what}"


@dataclass
class Scan:
    """What a scan read, skipped and found."""

    files: int = 0
    skipped: list[str] = field(default_factory=list)  # "path: why"
    leaks: list[Leak] = field(default_factory=list)


class _Finder:
    """Searches byte streams for the tokens, case-insensitively, across chunk borders."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self.tokens = [t.lower().encode() for t in tokens if t]
        self.overlap = max((len(t) for t in self.tokens), default=1) + 8

    def field_of(self, data: bytes, end: int) -> str:
        marker = data[end:end + 6].lstrip(b"-").upper()
        for key in sorted(FIELDS, key=len, reverse=True):
            if data[end:end + 1] == b"-" and marker.startswith(key.encode()):
                return FIELDS[key]
        return ""

    def in_text(self, value: str | bytes) -> list[tuple[str, str]]:
        """(token, field) for each token in one value."""
        data = (value if isinstance(value, bytes) else value.encode("utf-8", "replace")).lower()
        found: list[tuple[str, str]] = []
        for token in self.tokens:
            at = data.find(token)
            while at >= 0:
                hit = (token.decode().upper(), self.field_of(data, at + len(token)))
                if hit not in found:  # one per planted attribute in this value
                    found.append(hit)
                at = data.find(token, at + 1)
        return found

    def in_stream(self, stream: IO[bytes], limit: int) -> Iterator[tuple[str, str, int, int]]:
        """(token, field, line, offset) of each occurrence; stops after `limit` bytes."""
        tail = b""
        consumed = 0  # bytes of the stream before `tail`
        lines = 1  # newlines before `tail`, plus one
        while consumed + len(tail) < limit:
            chunk = stream.read(min(CHUNK, limit - consumed - len(tail)))
            if not chunk:
                break
            data = tail + chunk.lower()
            for token in self.tokens:
                at = data.find(token)
                while at >= 0:
                    if at + len(token) > len(tail) or not tail:  # not already reported
                        line = lines + data.count(b"\n", 0, at)
                        yield (token.decode().upper(), self.field_of(data, at + len(token)),
                               line, consumed + at)
                    at = data.find(token, at + 1)
            keep = min(self.overlap, len(data))
            lines += data.count(b"\n", 0, len(data) - keep)
            consumed += len(data) - keep
            tail = data[len(data) - keep:]


def _is_sqlite(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(16) == b"SQLite format 3\x00"


def _json_paths(value: Any, finder: _Finder, at: str = "$") -> Iterator[tuple[str, str, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            for token, field_ in finder.in_text(str(key)):
                yield token, field_, f"{at} (a key)"
            yield from _json_paths(item, finder, f"{at}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _json_paths(item, finder, f"{at}[{index}]")
    elif isinstance(value, str):
        for token, field_ in finder.in_text(value):
            yield token, field_, at


def _scan_sqlite(path: Path, finder: _Finder) -> Iterator[tuple[str, str, str]]:
    """Every row of every table, opened read-only; then the raw pages when no row held a
    token (deleted rows stay in free pages until VACUUM)."""
    found = False
    # immutable: a read-only open of a WAL database would leave -wal and -shm files in the
    # artifacts; only when a -wal is already there (a writer) is it read through SQLite
    live = path.with_name(path.name + "-wal").exists()
    options = "mode=ro" if live else "mode=ro&immutable=1"
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?{options}", uri=True, timeout=10)
    try:
        tables = [name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            quoted = '"' + table.replace('"', '""') + '"'
            cursor = conn.execute(f"SELECT * FROM {quoted}")  # noqa: S608 - names from the file
            columns = [d[0] for d in cursor.description]
            for number, row in enumerate(cursor, start=1):
                for column, value in zip(columns, row, strict=False):
                    if isinstance(value, str | bytes):
                        for token, field_ in finder.in_text(value):
                            found = True
                            yield token, field_, f"table {table}, column {column}, row {number}"
    finally:
        conn.close()
    if not found:
        with path.open("rb") as handle:
            for token, field_, _, offset in finder.in_stream(handle, path.stat().st_size + 1):
                yield token, field_, f"raw page bytes at offset {offset} (not in any row)"


def _scan_file(path: Path, finder: _Finder, limit: int, scan: Scan) -> list[Leak]:
    hits: list[tuple[str, str, str]] = []
    name = path.name.lower()
    if _is_sqlite(path):
        hits.extend(_scan_sqlite(path, finder))
    elif name.endswith(".gz"):
        with gzip.open(path, "rb") as stream:
            hits.extend((t, f, f"line {line} (decompressed)")
                        for t, f, line, _ in finder.in_stream(stream, limit))
            if stream.read(1):
                scan.skipped.append(f"{path}: read only the first {limit >> 20} MB decompressed")
    elif name.endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                with archive.open(member) as stream:
                    hits.extend((t, f, f"member {member.filename}, line {line}")
                                for t, f, line, _ in finder.in_stream(stream, limit))
    elif name.endswith(".json") and path.stat().st_size <= JSON_PATHS_MB << 20:
        try:
            hits.extend(_json_paths(json.loads(path.read_bytes()), finder))
        except ValueError:  # not JSON after all: searched as text
            hits.extend(_text_hits(path, finder, limit))
    else:
        hits.extend(_text_hits(path, finder, limit))
    return [Leak(str(path), where, token, field_)
            for token, field_, where in hits[:MAX_LEAKS_PER_FILE]]


def _text_hits(path: Path, finder: _Finder, limit: int) -> list[tuple[str, str, str]]:
    """Text files say the line, others the byte offset (a binary has no lines)."""
    with path.open("rb") as stream:
        text = b"\0" not in stream.read(8192)
        stream.seek(0)
        return [(t, f, f"line {line}" if text else f"byte offset {offset}")
                for t, f, line, offset in finder.in_stream(stream, limit)]


def _files(paths: Iterable[str | Path]) -> Iterator[Path]:
    for root in paths:
        root = Path(root)
        if root.is_file():
            yield root
        elif root.is_dir():
            yield from sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def scan(paths: Iterable[str | Path], tokens: Iterable[str],
         max_file_mb: int = MAX_FILE_MB) -> Scan:
    """Search every file under `paths` for `tokens`; files over `max_file_mb` are skipped
    (noted), and a file that cannot be read is noted, never fatal."""
    finder = _Finder(tokens)
    limit = max_file_mb << 20
    result = Scan()
    for path in _files(paths):
        size = path.stat().st_size
        if size > limit:
            result.skipped.append(f"{path}: {size >> 20} MB, over the {max_file_mb} MB bound")
            continue
        try:
            result.leaks.extend(_scan_file(path, finder, limit, result))
        except (OSError, sqlite3.Error, zipfile.BadZipFile, EOFError) as exc:
            result.skipped.append(f"{path}: unreadable ({exc.__class__.__name__}: {exc})")
            continue
        result.files += 1
    return result


def scan_for_canaries(paths: Iterable[str | Path], tokens: Iterable[str],
                      max_file_mb: int = MAX_FILE_MB) -> list[Leak]:
    """Each place under `paths` where one of `tokens` appears (see `scan`)."""
    return scan(paths, tokens, max_file_mb).leaks


# -- the check -----------------------------------------------------------------------------


def _remove(node: Node, study_uid: str) -> str:
    """Delete the canary study (destroy permission: disposable nodes only)."""
    if not node.disposable:
        return "canary study left in the node (not disposable)"
    rest = node.rest()
    if rest is None:
        return f"canary study left in the node ({node.kind} offers no deletion of one study)"
    for match in rest.lookup(study_uid):
        rest.delete(match["Path"])
    return "canary study deleted afterwards"


def canary_checks(node: Node, artifacts_dir: str | Path, depth: str = "full",
                  token: str | None = None) -> list[Check]:
    """Plant a canary study into `node` (write permission), inventory the node as a site's
    archive (identities tokenised) into `artifacts_dir`, then search everything there (also
    what the run wrote before). `token`: the canary's (default: a new one)."""
    from harness.migration.inventory import crawl

    name = "canary identities"
    if not node.writable:
        return [Check(node.name, AREA, name, "skip", "canary not planted: node not writable")]
    node.require_writable("plant a canary study")
    token = token or new_token()
    study = canary_study(token, seed=zlib.crc32(token.encode()))
    try:
        stored = node.dimse().store(study)
    except EnvironmentProblem as exc:  # e.g. its certificate refused: the TLS check says so
        return [Check(node.name, AREA, name, "skip", f"canary not planted: {exc}")]
    if not stored.ok:
        return [Check(node.name, AREA, name, "skip", "canary not planted: the node refused "
                      f"{len(stored.failed)} of {len(study)} C-STOREs")]
    folder = Path(artifacts_dir)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        crawl(node, folder / f"canary-{node.name}.ledger.sqlite", depth=depth, resume=False,
              identities="tokens")
    finally:
        removal = _remove(node, str(study[0].StudyInstanceUID))
    result = scan([folder], [token])
    notes = "; ".join([removal, *result.skipped])
    if not result.leaks:
        return [Check(node.name, AREA, name, "pass", f"{result.files} files scanned, no "
                      f"canary (inventory depth {depth}); {notes}", reference=REFERENCE)]
    by_file: dict[str, list[Leak]] = {}
    for leak in result.leaks:
        by_file.setdefault(leak.path, []).append(leak)
    return [Check(node.name, AREA, f"canary leak: {Path(path).relative_to(folder)}", "fail",
                  f"canary token found in {path}: "
                  + "; ".join(f"{leak.where}" + (f" ({leak.field})" if leak.field else "")
                              for leak in leaks)
                  + f" (inventory depth {depth}); {notes}",
                  "tokenise or drop these values before they are written (docs/safety.md, "
                  "Patient identities)", REFERENCE)
            for path, leaks in by_file.items()]
