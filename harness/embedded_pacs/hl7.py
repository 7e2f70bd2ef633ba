"""HL7 v2 listener of the embedded PACS: ADT^A08 and ADT^A40 over MLLP (off by default).

The reference receiver for the harness's HL7 checks (harness/hl7/): what a PACS does with its
site's ADT feed.

* ADT^A08 (update patient information, HL7 v2.5 3.3.8): PatientName, PatientBirthDate and
  PatientSex of every stored instance of PID-3's PatientID become PID-5, PID-7, PID-8.
* ADT^A40 (merge patient, patient identifier list, 3.3.40): every instance of MRG-1's
  PatientID moves to PID-3's, with PID's demographics (those of the survivor's stored
  instances when PID leaves them empty).

Both change the index and the stored files (so C-FIND and C-GET agree), under the storage's
write lock; a file is rewritten to tmp/ and renamed into place, never half written.
Answers (original acknowledgement mode, HL7 v2.5 2.9.2): AA; AE with ERR-3 from HL7 table
0357 when the patient is unknown (204) or a required field is empty (101); AR for what is no
ADT^A08/A40 (200, 201) or no HL7 message at all (100).

Plain parsing, no HL7 library: this package runs in the embedded container image, which
carries only pydicom and pynetdicom (harness/launch/images.py); the few fields read here
(MSH, PID-3/5/7/8, MRG-1) do not justify adding hl7apy's 8 MB of v2.x tables to the image.
MLLP (HL7 v2.5.1 Appendix C.4): 0x0B, message, 0x1C 0x0D; a connection idle longer than the
timeout or a frame over MAX_MESSAGE_BYTES is closed. Patient names and IDs are never logged.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
import socketserver
import tempfile
import threading
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread

from harness import sqlite_db
from harness.embedded_pacs.storage import Storage

LOG = logging.getLogger("harness.embedded_pacs")

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_CONNECTIONS = 16
#: HL7 table 0001 (administrative sex) to DICOM PatientSex (PS3.3 C.7.1.1)
SEX = {"M": "M", "F": "F", "O": "O", "A": "O", "N": "O", "U": "", "": ""}
#: MSH-18 (HL7 table 0211) to a Python codec; absent: ASCII, read as UTF-8 (a superset)
CHARSETS = {"": "utf-8", "ASCII": "ascii", "8859/1": "latin-1", "UNICODE UTF-8": "utf-8"}


class Rejected(Exception):
    """The answer to a message that was not applied: code (AE/AR), HL7 table 0357 error."""

    def __init__(self, code: str, error: int, text: str) -> None:
        super().__init__(text)
        self.code, self.error, self.text = code, error, text


@dataclass
class Segments:
    """An ER7 message split into fields; components are split on demand."""

    segments: list[list[str]]
    component: str = "^"
    subcomponent: str = "&"
    escape: str = "\\"

    def first(self, name: str) -> list[str] | None:
        return next((s for s in self.segments if s and s[0] == name), None)

    def field(self, name: str, number: int) -> str:
        """Field `number` of the first `name` segment, first repetition ('' when absent)."""
        segment = self.first(name)
        if segment is None or number >= len(segment):
            return ""
        return segment[number].split("~", 1)[0]

    def components(self, value: str) -> list[str]:
        return [self.unescape(c.split(self.subcomponent, 1)[0])
                for c in value.split(self.component)]

    def unescape(self, value: str) -> str:
        """HL7 v2.5 2.7.4 escapes of the delimiters (others are dropped)."""
        e = self.escape
        if e not in value:
            return value
        out, parts = [], value.split(e)
        for i, part in enumerate(parts):
            if i % 2 == 0:
                out.append(part)
            else:
                out.append({"F": "|", "S": self.component, "T": self.subcomponent, "R": "~",
                            "E": e}.get(part, ""))
        return "".join(out)


def parse(raw: bytes) -> Segments:
    """Segments of one message; Rejected (AR, 100) when it does not start with MSH."""
    head = raw[:3]
    if head != b"MSH" or len(raw) < 8:
        raise Rejected("AR", 100, "no MSH segment: not an HL7 v2 message")
    separator = chr(raw[3])
    encoding = raw[4:8].decode("ascii", errors="replace")
    text = raw.decode("latin-1")
    charset = text.split("\r", 1)[0].split(separator)[17:18]
    codec = CHARSETS.get((charset[0].split("~")[0] if charset else "").strip(), "utf-8")
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError:
        raise Rejected("AR", 100, f"message is not valid {codec} (MSH-18)") from None
    lines = [line for line in text.replace("\n", "\r").split("\r") if line.strip()]
    segments = [line.split(separator) for line in lines]
    segments[0].insert(1, separator)  # MSH-1 is the separator: MSH-n at index n, as any field
    return Segments(segments, encoding[0], encoding[3] if len(encoding) > 3 else "&",
                    encoding[2] if len(encoding) > 2 else "\\")


def pn_from_xpn(message: Segments, xpn: str) -> str:
    """HL7 XPN (family^given^middle^suffix^prefix) as DICOM PN (..^prefix^suffix, PS3.5 6.2)."""
    parts = (message.components(xpn) + [""] * 5)[:5]
    family, given, middle, suffix, prefix = parts
    return "^".join((family, given, middle, prefix, suffix)).rstrip("^")


def ack(message: Segments | None, code: str, text: str = "", error: int | None = None) -> bytes:
    """An ACK (HL7 v2.5 2.14.1) in MLLP framing; MSA-3 and ERR-8 carry `text`."""
    def escaped(value: str) -> str:
        return (value.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
                .replace("&", "\\T\\").replace("~", "\\R\\"))

    field = message.field if message else (lambda _s, _n: "")
    event = (field("MSH", 9).split("^") + ["", ""])[1]
    now = dt.datetime.now().strftime("%Y%m%d%H%M%S")
    control = field("MSH", 10)
    segments = [
        "|".join(["MSH", "^~\\&", field("MSH", 5), field("MSH", 6), field("MSH", 3),
                  field("MSH", 4), now, "", f"ACK^{event}^ACK", f"A{control}"[:20], "P", "2.5",
                  "", "", "", "", "", "UNICODE UTF-8"]),
        "|".join(["MSA", code, control, escaped(text[:80])]),  # MSA-3: ST, 80 characters
    ]
    if error is not None:
        severity = "E"
        segments.append("|".join(["ERR", "", "", f"{error}^^HL70357", severity, "", "", "",
                                  escaped(text)]))
    return START_BLOCK + "\r".join(segments).encode("utf-8") + b"\r" + END_BLOCK


class AdtReceiver:
    """Applies ADT^A08 and ADT^A40 to the storage (index and files)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def handle(self, raw: bytes) -> tuple[bytes, str]:
        """The framed ACK for one message, and a log line (no names or IDs)."""
        message: Segments | None = None
        try:
            message = parse(raw)
            kind = message.field("MSH", 9).split("^")
            if kind[0] != "ADT" or len(kind) < 2:
                raise Rejected("AR", 200, f"unsupported message type {'^'.join(kind)!r} "
                                          "(this receiver takes ADT^A08 and ADT^A40)")
            if kind[1] not in ("A08", "A40"):
                raise Rejected("AR", 201, f"unsupported event ADT^{kind[1]} "
                                          "(this receiver takes ADT^A08 and ADT^A40)")
            changed = self.update(message) if kind[1] == "A08" else self.merge(message)
            return ack(message, "AA"), f"ADT^{kind[1]} AA instances={changed}"
        except Rejected as why:
            return ack(message, why.code, why.text, why.error), f"{why.code} error={why.error}"
        except Exception as exc:  # disk or index: the sender may retry
            LOG.error("HL7 message not applied: %s", type(exc).__name__)
            return (ack(message, "AE", f"not applied: {type(exc).__name__}", 207),
                    "AE error=207")

    def _demographics(self, message: Segments) -> dict[str, str]:
        name = pn_from_xpn(message, message.field("PID", 5))
        sex = message.field("PID", 8).strip().upper()
        if sex not in SEX:
            raise Rejected("AE", 103, f"PID-8 {sex!r} is not in HL7 table 0001")
        return {"patient_name": name, "patient_birth_date": message.field("PID", 7)[:8],
                "patient_sex": SEX[sex]}

    def _patient_id(self, message: Segments, segment: str, number: int) -> str:
        value = message.components(message.field(segment, number))[0].strip()
        if not value:
            raise Rejected("AE", 101, f"{segment}-{number} (patient identifier) is empty")
        return value

    def update(self, message: Segments) -> int:
        patient_id = self._patient_id(message, "PID", 3)
        values = self._demographics(message)
        if not values["patient_name"]:
            raise Rejected("AE", 101, "PID-5 (patient name) is empty")
        return self._rewrite(patient_id, patient_id, values)

    def merge(self, message: Segments) -> int:
        survivor = self._patient_id(message, "PID", 3)
        prior = self._patient_id(message, "MRG", 1)
        if prior == survivor:
            raise Rejected("AE", 103, "MRG-1 names the surviving patient itself")
        values = {k: v for k, v in self._demographics(message).items() if v}
        return self._rewrite(prior, survivor, values, fill_from=survivor)

    def _rewrite(self, patient_id: str, new_id: str, values: dict[str, str],
                 fill_from: str | None = None) -> int:
        """Every instance of `patient_id` gets `new_id` and `values` (index and file), in one
        index transaction under the storage's write lock."""
        storage = self.storage
        with storage._write_lock:  # the same lock C-STORE and wipe take (storage.py)
            conn = storage._index_for_stores()
            with sqlite_db.transaction(conn):
                rows = conn.execute(
                    "SELECT sop_instance_uid, path FROM instances WHERE patient_id = ?",
                    (patient_id,)).fetchall()
                if not rows:
                    raise Rejected("AE", 204, f"unknown patient {patient_id!r}: no stored "
                                              "instance has this PatientID")
                if fill_from is not None:
                    survivor = conn.execute(
                        "SELECT patient_name, patient_birth_date, patient_sex FROM instances "
                        "WHERE patient_id = ? LIMIT 1", (fill_from,)).fetchone()
                    known = dict(survivor) if survivor else {}
                    values = {**known, **values}
                values = {**values, "patient_id": new_id}
                for row in rows:
                    size, charset = rewrite_file(storage, row["path"], values)
                    columns = {**values, "size_bytes": size, "specific_character_set": charset}
                    assignments = ", ".join(f"{c} = ?" for c in columns)
                    conn.execute(
                        f"UPDATE instances SET {assignments} WHERE sop_instance_uid = ?",
                        [*columns.values(), row["sop_instance_uid"]])
        return len(rows)


_KEYWORDS = {"patient_id": "PatientID", "patient_name": "PatientName",
             "patient_birth_date": "PatientBirthDate", "patient_sex": "PatientSex"}


def rewrite_file(storage: Storage, relative: str, values: dict[str, str]) -> tuple[int, str]:
    """The stored file with the new patient attributes, in its own transfer syntax; its new
    size and Specific Character Set (ISO_IR 192 when the old one cannot hold a new value)."""
    final = storage.root / relative
    ds = dcmread(final)
    for column, keyword in _KEYWORDS.items():
        if column in values:
            setattr(ds, keyword, values[column])
    charset = ds.get("SpecificCharacterSet", "")
    if isinstance(charset, str) and charset in ("", "ISO_IR 6") and not all(
            str(values.get(c, "")).isascii() for c in _KEYWORDS):
        for elem in ds.iterall():  # decode every text value before the character set changes
            _ = elem.value
        ds.SpecificCharacterSet = "ISO_IR 192"
    fd, tmp_name = tempfile.mkstemp(prefix="hl7-", suffix=".part", dir=storage.tmp_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=False)
        os.replace(tmp_name, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    value = ds.get("SpecificCharacterSet", "")
    text = value if isinstance(value, str) else "\\".join(value)
    return final.stat().st_size, text


class _Handler(socketserver.BaseRequestHandler):
    server: _MllpServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        buffer = bytearray()
        while True:
            end = buffer.find(END_BLOCK)
            if end < 0:
                if len(buffer) > MAX_MESSAGE_BYTES:
                    LOG.warning("HL7 peer %s: frame over %d bytes, connection closed", peer,
                                MAX_MESSAGE_BYTES)
                    return
                try:
                    chunk = sock.recv(65536)
                except OSError:  # the timeout: an idle or silent peer
                    LOG.info("HL7 peer %s: idle for %g s, connection closed", peer,
                             self.server.timeout_s)
                    return
                if not chunk:
                    return
                buffer += chunk
                continue
            frame, buffer = bytes(buffer[:end]), buffer[end + len(END_BLOCK):]
            if not frame.startswith(START_BLOCK):
                LOG.warning("HL7 peer %s: data outside an MLLP block, connection closed", peer)
                return
            answer, note = self.server.receiver.handle(frame[1:])
            LOG.info("HL7 peer=%s %s", peer, note)
            try:
                sock.sendall(answer)
            except OSError:
                return

    def setup(self) -> None:
        self.request.settimeout(self.server.timeout_s)


class _MllpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], receiver: AdtReceiver, timeout_s: float):
        self.receiver = receiver
        self.timeout_s = timeout_s
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            LOG.warning("HL7: %d connections already, %s refused", MAX_CONNECTIONS,
                        client_address[0])
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class Hl7Listener:
    """The MLLP listener thread; `start` binds (OSError when the port is taken)."""

    def __init__(self, storage: Storage, host: str, port: int, timeout_s: float) -> None:
        self.server = _MllpServer((host, port), AdtReceiver(storage), timeout_s)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="hl7",
                                        kwargs={"poll_interval": 0.5}, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
