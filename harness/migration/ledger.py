"""The ledger: what one PACS node holds, crawled once into SQLite and compared later.

One file per crawl. Tables (see SCHEMA): `meta` (node, depth, sample, crawl state),
`patients`, `studies` (also the crawl progress: `state` is `listed` until the study's
instances are committed, so a killed crawl resumes at the first unfinished study),
`series`, `instances` (key attributes and digests, kept narrow so a 1M x 1M reconciliation
is a fast join) and `instance_attrs` (the normalised attributes as JSON, read only for the
few instances whose digests differ), plus `issues` (what the crawl could not read).

A row means the same thing whichever node it came from, because everything that depends on
the encoding is normalised away before hashing:

- group 0002, group lengths, pixel data and its encapsulation helpers, PlanarConfiguration
  and trailing padding are dropped;
- text is decoded with the instance's own character set (a charset conversion that keeps
  the text is equal), trailing padding is stripped, DS/IS become numbers;
- private elements are compared as their little-endian value bytes, so an element that is
  `UN` after a change to implicit VR equals its explicit-VR original;
- `pixel_digest` hashes the *decoded* pixels (dtype, shape, values), so a lossless change of
  transfer syntax is equal; when a syntax cannot be decoded here the raw PixelData bytes are
  hashed instead and `pixel_mode` says `raw`;
- colour pixels are decoded to RGB (pydicom converts YBR_FULL, YBR_FULL_422, ... when it
  decodes), so PhotometricInterpretation of a colour image is recorded as `RGB` whichever
  colour model it was stored in: a JPEG decoded on retrieval (YBR_FULL_422 -> RGB, PS3.5
  8.2.1) has the same row as its original.

An instance that was listed but could not be retrieved keeps its listing-level row
(`retrieved` 0) with the reason in `retrieval_error`: it is never dropped, so counts at depth
full equal those at depth attributes and reconciliation reports it as unretrievable.

Patient identity (PatientID, IssuerOfPatientID, PatientName, PatientBirthDate, PatientSex),
SOPInstanceUID and SpecificCharacterSet are columns of their own and are left out of
`attrs_digest`, so migration rules on them (prefix, issuer added, charset conversion) are
checked in SQL, and an instance stored again under a new SOP Instance UID has the same
(`attrs_digest`, `pixel_digest`) as the original: that is how duplicates are found.

A ledger of a node that may hold real patients (external, not declared `synthetic: true`)
holds no identity: meta `identities` = `tokens` and every identity column, the study keys and
the identifying attributes in `instance_attrs` are keyed tokens (harness/report/identities.py,
LedgerTokens; the key stays in the state directory). Digests are computed before, over the
clear values, so equal data still has equal digests.

`keys_digest` covers KEY_ATTRS only: the attributes every kind of node answers in C-FIND
(and QIDO). It is what two ledgers are compared on where an instance was not retrieved on
both sides (depth `attributes`, or outside the sample).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_sequence
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue

from harness import sqlite_db
from harness.errors import ConfigError

SCHEMA_VERSION = 2  # in meta `schema_version`; 2: instances.retrieval_error

#: Patient identity: a column each in `instances`, not part of attrs_digest.
IDENTITY_COLUMNS: dict[str, str] = {
    "PatientID": "patient_id",
    "IssuerOfPatientID": "issuer",
    "PatientName": "patient_name",
    "PatientBirthDate": "birth_date",
    "PatientSex": "sex",
}
#: Attributes kept out of attrs_digest (they are columns, or the join key itself).
NOT_DIGESTED = frozenset({*IDENTITY_COLUMNS, "SOPInstanceUID", "SpecificCharacterSet"})
#: Compared where an instance was not retrieved on both sides: what C-FIND always answers.
KEY_ATTRS: tuple[str, ...] = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "InstanceNumber",
)
STUDY_QUERY_KEYS: tuple[str, ...] = (
    *IDENTITY_COLUMNS,
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_QUERY_KEYS: tuple[str, ...] = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
)
IMAGE_QUERY_KEYS: tuple[str, ...] = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber")

#: Which entity an attribute describes; used to roll findings up (reconcile.py).
PATIENT_ATTRS = frozenset(
    {
        *IDENTITY_COLUMNS,
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "PatientBirthTime",
        "PatientBirthName",
        "PatientMotherBirthName",
        "EthnicGroup",
        "PatientComments",
        "IssuerOfPatientIDQualifiersSequence",
        "TypeOfPatientID",
        "ResponsiblePerson",
        "PatientSpeciesDescription",
    }
)
STUDY_ATTRS = frozenset(
    {
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "IssuerOfAccessionNumberSequence",
        "StudyID",
        "StudyDescription",
        "ReferringPhysicianName",
        "ProcedureCodeSequence",
        "NameOfPhysiciansReadingStudy",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "AdmittingDiagnosesDescription",
        "RequestAttributesSequence",
    }
)
SERIES_ATTRS = frozenset(
    {
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "SeriesDate",
        "SeriesTime",
        "BodyPartExamined",
        "Laterality",
        "ProtocolName",
        "PatientPosition",
        "FrameOfReferenceUID",
        "Manufacturer",
        "ManufacturerModelName",
        "InstitutionName",
        "StationName",
        "DeviceSerialNumber",
        "SoftwareVersions",
        "OperatorsName",
        "PerformingPhysicianName",
    }
)

# Elements whose presence or value depends on the encoding, never on the content.
_DROPPED_TAGS = frozenset(
    {
        0x00280006,  # PlanarConfiguration: how a codec lays out samples
        0x7FE00001,  # ExtendedOffsetTable
        0x7FE00002,  # ExtendedOffsetTableLengths
        0x7FE00003,  # EncapsulatedPixelDataValueTotalLength
        0x7FE00008,  # FloatPixelData (hashed as pixels)
        0x7FE00009,  # DoubleFloatPixelData (hashed as pixels)
        0x7FE00010,  # PixelData (hashed as pixels)
        0xFFFCFFFC,  # DataSetTrailingPadding
    }
)
#: Colour models whose pixels pydicom decodes to RGB (PS3.3 C.7.6.3.1.2): stored as "RGB".
_COLOUR_MODELS = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420",
                            "YBR_PARTIAL_422", "YBR_ICT", "YBR_RCT"})
_PHOTOMETRIC = 0x00280004
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
                       "UI", "UR", "UT"})
_INT_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
_FLOAT_VRS = frozenset({"FL", "FD"})
_SCALAR_VRS = _TEXT_VRS | _INT_VRS | _FLOAT_VRS | {"IS", "DS", "AT"}
_INLINE_BYTES = 64  # longer binary values are stored as a digest in attrs_json
_ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian: the value is a sequence


def digest(data: bytes) -> str:
    """The one hash used everywhere in a ledger (BLAKE2b, 128 bits, hex)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def json_digest(obj: Any) -> str:
    return digest(json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                  .encode())


def attr_name(tag: int) -> str:
    """The attrs_json key of a tag: its keyword, or GGGGEEEE for private and unknown tags."""
    keyword = "" if (tag >> 16) % 2 else keyword_for_tag(tag)
    return keyword or f"{tag:08X}"


# ---------------------------------------------------------------------------------------
# normalisation


def _decode_strict(raw: bytes, encodings: list[str]) -> str | None:
    """Text when `raw` is valid in the charset, else None (pydicom would substitute)."""
    try:
        return raw.decode(encodings[0])
    except (UnicodeDecodeError, LookupError):
        if b"\x1b" not in raw or len(encodings) < 2:
            return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            text = decode_bytes(raw, encodings, set())  # ISO 2022 escape sequences
        except (UnicodeError, LookupError, ValueError):
            return None
    return None if "\ufffd" in text else text


def _bytes_repr(raw: bytes, encodings: list[str]) -> Any:
    """A private or UN value: a nested sequence, text, or the bytes themselves."""
    if raw[:4] == _ITEM_TAG:
        try:
            items = read_sequence(BytesIO(raw), True, True, len(raw), encodings)
            return [normalise(item, encodings) for item in items]
        except Exception:  # noqa: BLE001 - not a sequence after all: compare the bytes
            pass
    raw = raw.rstrip(b"\x00 ")
    if not raw:
        return None
    text = _decode_strict(raw, encodings)
    if text is not None and text.isprintable():
        return text
    return _binary_repr(raw)


def _binary_repr(raw: bytes) -> str | None:
    if not raw:
        return None
    if len(raw) <= _INLINE_BYTES:
        return "hex:" + raw.hex()
    return f"blake2b:{digest(raw)}:{len(raw)}"


def _private_bytes(elem: DataElement, encodings: list[str]) -> bytes:
    """The little-endian value bytes of an element, as implicit VR would write them."""
    if isinstance(elem.value, bytes | bytearray):
        return bytes(elem.value)
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    write_data_element(fp, elem, encodings)
    return fp.getvalue()[8:]


def _scalar(vr: str, value: Any) -> Any:
    if value is None:
        return None
    if vr in _INT_VRS:
        return int(value)
    if vr in _FLOAT_VRS:
        number = float(value)
        return number if math.isfinite(number) else str(number)
    if vr == "IS":
        try:
            return int(value)
        except (TypeError, ValueError):
            return str(value).strip() or None
    if vr == "DS":
        try:
            number = float(value)
        except (TypeError, ValueError):
            return str(value).strip() or None
        return number if math.isfinite(number) else str(number)
    if vr == "AT":
        return f"{int(value):08X}"
    text = str(value).rstrip(" \x00")
    if vr not in ("LT", "ST", "UT"):
        text = text.lstrip(" ")
    return text or None


def element_value(elem: DataElement, encodings: list[str]) -> Any:
    """One element's value in encoding-independent form (JSON-ready)."""
    vr = elem.VR
    if vr == "SQ":
        return [normalise(item, encodings) for item in elem.value]
    if elem.tag.is_private or vr == "UN":
        if vr == "SQ":
            return [normalise(item, encodings) for item in elem.value]
        return _bytes_repr(_private_bytes(elem, encodings), encodings)
    value = elem.value
    if isinstance(value, bytes | bytearray):
        return _binary_repr(bytes(value))
    if vr not in _SCALAR_VRS:
        vr = "LO"
    if isinstance(value, MultiValue | list | tuple):
        return [_scalar(vr, v) for v in value] or None
    return _scalar(vr, value)


def dataset_encodings(ds: Dataset, inherited: list[str] | None = None) -> list[str]:
    charset = ds.get("SpecificCharacterSet")
    if charset is None:
        return inherited or ["iso8859"]
    try:
        return convert_encodings(charset)
    except (LookupError, ValueError):
        return inherited or ["iso8859"]


def normalise(ds: Dataset, inherited: list[str] | None = None) -> dict[str, Any]:
    """Every attribute of `ds` (recursively) in encoding-independent form, by attr_name."""
    encodings = dataset_encodings(ds, inherited)
    out: dict[str, Any] = {}
    for tag in ds.keys():
        if tag.group == 0x0002 or tag.element == 0 or tag in _DROPPED_TAGS:
            continue
        try:
            elem = ds[tag]
            value = element_value(elem, encodings)
        except Exception:  # noqa: BLE001 - an unreadable value is still a value to compare
            raw = ds.get_item(tag)
            value = _bytes_repr(bytes(getattr(raw, "value", b"") or b""), encodings)
        if tag == _PHOTOMETRIC and value in _COLOUR_MODELS:
            value = "RGB"  # pixels are compared decoded to RGB (see pixel_digest)
        out[attr_name(int(tag))] = value
    return out


def pixel_digest(ds: Dataset) -> tuple[str | None, str | None]:
    """(digest, mode) of the decoded pixels; mode `raw` when they could not be decoded here."""
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            break
    else:
        return None, None
    if keyword == "PixelData":
        try:
            arr = ds.pixel_array
            head = f"{arr.dtype.str}:{arr.shape}:".encode()
            return digest(head + arr.tobytes()), "decoded"
        except Exception:  # noqa: BLE001 - an undecodable syntax is recorded, never fatal
            pass
    raw = ds[keyword].value
    return digest(bytes(raw or b"")), "raw"


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "\\".join("" if v is None else str(v) for v in value)
    return str(value)


# ---------------------------------------------------------------------------------------
# rows


@dataclass
class StudyRow:
    study_uid: str
    patient_id: str = ""
    issuer: str = ""
    patient_name: str = ""
    birth_date: str = ""
    sex: str = ""
    keys: dict[str, Any] = field(default_factory=dict)  # normalised STUDY_QUERY_KEYS
    reported_series: int | None = None
    reported_instances: int | None = None
    retrieve: bool = False  # retrieved fully (depth full, or in the sample)


@dataclass
class SeriesRow:
    series_uid: str
    study_uid: str
    modality: str = ""
    series_number: str = ""
    description: str = ""


@dataclass
class InstanceRow:
    sop_uid: str
    series_uid: str
    study_uid: str
    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    sop_class: str
    transfer_syntax: str | None
    charset: str | None
    keys_digest: str
    attrs_digest: str | None
    pixel_digest: str | None
    pixel_mode: str | None
    retrieved: int
    attrs_json: str
    retrieval_error: str | None = None  # listed, but retrieving it failed: why


    def values(self) -> tuple:
        return tuple(getattr(self, c) for c in INSTANCE_COLUMNS)


INSTANCE_COLUMNS: tuple[str, ...] = (
    "sop_uid", "series_uid", "study_uid", "patient_id", "issuer", "patient_name",
    "birth_date", "sex", "sop_class", "transfer_syntax", "charset", "keys_digest",
    "attrs_digest", "pixel_digest", "pixel_mode", "retrieved", "retrieval_error",
)


def keys_digest(attrs: dict[str, Any]) -> str:
    return json_digest({k: attrs.get(k) for k in KEY_ATTRS})


def row_from_dataset(ds: Dataset, transfer_syntax: str | None = None) -> InstanceRow:
    """The ledger row of a retrieved instance (depth full)."""
    attrs = normalise(ds)
    pixels, mode = pixel_digest(ds)
    if transfer_syntax is None:
        meta = getattr(ds, "file_meta", None)
        transfer_syntax = str(meta.TransferSyntaxUID) if meta and "TransferSyntaxUID" in meta \
            else None
    digested = {k: v for k, v in attrs.items() if k not in NOT_DIGESTED}
    return InstanceRow(
        sop_uid=_text(attrs.get("SOPInstanceUID")),
        series_uid=_text(attrs.get("SeriesInstanceUID")),
        study_uid=_text(attrs.get("StudyInstanceUID")),
        **{col: _text(attrs.get(kw)) for kw, col in IDENTITY_COLUMNS.items()},
        sop_class=_text(attrs.get("SOPClassUID")),
        transfer_syntax=transfer_syntax,
        charset=_text(attrs.get("SpecificCharacterSet")),
        keys_digest=keys_digest(attrs),
        attrs_digest=json_digest(digested),
        pixel_digest=pixels,
        pixel_mode=mode,
        retrieved=1,
        attrs_json=json.dumps(attrs, sort_keys=True, ensure_ascii=False),
    )


def row_from_keys(attrs: dict[str, Any]) -> InstanceRow:
    """The ledger row of an instance known from C-FIND or QIDO only (depth attributes).

    `attrs` holds the normalised study, series and image keys merged for this instance.
    """
    return InstanceRow(
        sop_uid=_text(attrs.get("SOPInstanceUID")),
        series_uid=_text(attrs.get("SeriesInstanceUID")),
        study_uid=_text(attrs.get("StudyInstanceUID")),
        **{col: _text(attrs.get(kw)) for kw, col in IDENTITY_COLUMNS.items()},
        sop_class=_text(attrs.get("SOPClassUID")),
        transfer_syntax=None,
        charset=None,
        keys_digest=keys_digest(attrs),
        attrs_digest=None,
        pixel_digest=None,
        pixel_mode=None,
        retrieved=0,
        attrs_json=json.dumps(attrs, sort_keys=True, ensure_ascii=False),
    )


# ---------------------------------------------------------------------------------------
# the SQLite file

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS patients (
    patient_id TEXT NOT NULL, issuer TEXT NOT NULL DEFAULT '',
    patient_name TEXT NOT NULL DEFAULT '', birth_date TEXT NOT NULL DEFAULT '',
    sex TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (patient_id, issuer)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL DEFAULT '', issuer TEXT NOT NULL DEFAULT '',
    study_date TEXT NOT NULL DEFAULT '', accession TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    reported_series INTEGER, reported_instances INTEGER,
    keys_json TEXT NOT NULL DEFAULT '{}',
    retrieve INTEGER NOT NULL DEFAULT 0,   -- 1: instances retrieved (full depth or sample)
    state TEXT NOT NULL DEFAULT 'listed'   -- listed -> done once its instances are committed
);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL,
    modality TEXT NOT NULL DEFAULT '', series_number TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL, study_uid TEXT NOT NULL,
    patient_id TEXT NOT NULL, issuer TEXT NOT NULL, patient_name TEXT NOT NULL,
    birth_date TEXT NOT NULL, sex TEXT NOT NULL,
    sop_class TEXT NOT NULL, transfer_syntax TEXT, charset TEXT,
    keys_digest TEXT NOT NULL, attrs_digest TEXT, pixel_digest TEXT, pixel_mode TEXT,
    retrieved INTEGER NOT NULL,
    retrieval_error TEXT  -- listed but not retrievable (depth full): the reason
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS instance_attrs (sop_uid TEXT PRIMARY KEY, attrs_json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS issues (
    study_uid TEXT NOT NULL DEFAULT '', sop_uid TEXT NOT NULL DEFAULT '', problem TEXT NOT NULL
);
"""
#: Built when a crawl finishes (cheaper than maintaining them row by row).
INDEXES = """
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_uid);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_uid);
CREATE INDEX IF NOT EXISTS instances_content ON instances (attrs_digest, pixel_digest)
    WHERE attrs_digest IS NOT NULL;
CREATE INDEX IF NOT EXISTS studies_patient ON studies (patient_id, issuer);
"""


def connect(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """The ledger's connection (harness/sqlite_db.py: WAL, autocommit, busy timeout) with
    plain tuple rows, which the crawl and its readers compare and unpack."""
    conn = sqlite_db.connect(path)
    conn.row_factory = None
    return conn


def _check_schema_version(path: Path, stored: str | None) -> None:
    """Refuse, in one line (ConfigError, exit 2), a ledger this harness does not read: one
    written by a newer or an older harness, or a file without a version."""
    try:
        found = int(stored or "")
    except ValueError:
        found = 0
    if found == SCHEMA_VERSION:
        return
    if found <= 0:
        raise ConfigError(f"{path}: ledger schema {stored!r}, this harness reads "
                          f"{str(SCHEMA_VERSION)!r}")
    try:
        sqlite_db.check_version(found, SCHEMA_VERSION, what=f"{path}: ledger")
    except sqlite_db.SchemaVersionError as exc:
        raise ConfigError(str(exc)) from None


class Ledger:
    """Writer and reader of one ledger file; each study is committed as one transaction."""

    def __init__(self, path: str | os.PathLike[str], conn: sqlite3.Connection) -> None:
        self.path = Path(path)
        self.conn = conn
        self._tokens: Any = False  # LedgerTokens | None once read from meta

    @property
    def tokens(self) -> Any:
        """LedgerTokens when this ledger holds identities as tokens (meta `identities`)."""
        if self._tokens is False:
            meta = self.meta()
            self._tokens = None
            if meta.get("identities") == "tokens":
                from harness.report.identities import LedgerTokens, ledger_key

                prefixes = json.loads(meta.get("identity_prefixes") or "[]")
                self._tokens = LedgerTokens(ledger_key(), tuple(prefixes))
        return self._tokens

    def _study_row(self, row: StudyRow) -> StudyRow:
        tokens = self.tokens
        if tokens is None:
            return row
        return StudyRow(
            study_uid=row.study_uid,
            **{col: tokens.column(kw, getattr(row, col)) for kw, col in IDENTITY_COLUMNS.items()},
            keys=tokens.attrs(row.keys), reported_series=row.reported_series,
            reported_instances=row.reported_instances, retrieve=row.retrieve,
        )

    def _instance_row(self, row: InstanceRow) -> InstanceRow:
        tokens = self.tokens
        if tokens is None:
            return row
        values = asdict(row)
        for kw, col in IDENTITY_COLUMNS.items():
            values[col] = tokens.column(kw, values[col])
        values["attrs_json"] = json.dumps(tokens.attrs(json.loads(row.attrs_json)),
                                          sort_keys=True, ensure_ascii=False)
        return InstanceRow(**values)

    def __repr__(self) -> str:
        return f"Ledger({self.path})"

    @classmethod
    def create(cls, path: str | os.PathLike[str], meta: dict[str, Any]) -> Ledger:
        """A new, empty ledger (an existing file at `path` is replaced)."""
        p = Path(path)
        if p.exists():
            try:
                cls.open(p).close()
            except ConfigError as exc:
                raise ConfigError(f"{exc}; refusing to replace it with a new ledger") from None
        p.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm"):
            Path(str(p) + suffix).unlink(missing_ok=True)
        ledger = cls(p, connect(p))
        ledger.conn.executescript(SCHEMA)
        ledger.set_meta(schema_version=SCHEMA_VERSION, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                        **meta)
        return ledger

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Ledger:
        """An existing ledger; ConfigError when it is missing or not a ledger."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: no such ledger file")
        # the version is read before anything is written (even the journal mode), so a file
        # that is not a ledger, or a newer harness's, is refused as it was found
        conn = sqlite_db.connect(p, journal_mode=None, synchronous=None)
        try:
            version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError:
            raise ConfigError(f"{p}: not a ledger (no meta table)") from None
        finally:
            conn.close()
        _check_schema_version(p, version and version[0])
        return cls(p, connect(p))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- meta -------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta"))

    def set_meta(self, **values: Any) -> None:
        self.conn.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in values.items()],
        )

    # -- writing ----------------------------------------------------------------------
    def add_studies(self, rows: Iterable[StudyRow]) -> int:
        """Record listed studies (and their patients); returns how many are new."""
        before = self.conn.total_changes
        rows = [self._study_row(row) for row in rows]
        with sqlite_db.transaction(self.conn):
            for row in rows:
                self.conn.execute(
                    "INSERT OR IGNORE INTO patients VALUES (?, ?, ?, ?, ?)",
                    (row.patient_id, row.issuer, row.patient_name, row.birth_date, row.sex),
                )
                cur = self.conn.execute(
                    "INSERT OR IGNORE INTO studies (study_uid, patient_id, issuer, study_date, "
                    "accession, description, reported_series, reported_instances, keys_json, "
                    "retrieve) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (row.study_uid, row.patient_id, row.issuer, _text(row.keys.get("StudyDate")),
                     _text(row.keys.get("AccessionNumber")),
                     _text(row.keys.get("StudyDescription")),
                     row.reported_series, row.reported_instances,
                     json.dumps(row.keys, sort_keys=True, ensure_ascii=False), int(row.retrieve)),
                )
                if not cur.rowcount:
                    self.conn.execute(
                        "INSERT INTO issues (study_uid, problem) VALUES (?, ?)",
                        (row.study_uid, f"study listed more than once (also under patient "
                                        f"{row.patient_id!r})"),
                    )
        return self.conn.total_changes - before

    def commit_study(self, study_uid: str, series: Iterable[SeriesRow],
                     instances: Iterable[InstanceRow], issues: Iterable[tuple[str, str]] = ()
                     ) -> int:
        """Write one study's series, instances and issues and mark it done, atomically."""
        instances = [self._instance_row(row) for row in instances]
        with sqlite_db.transaction(self.conn):
            self.conn.executemany(
                "INSERT OR IGNORE INTO series VALUES (?, ?, ?, ?, ?)",
                [(s.series_uid, s.study_uid, s.modality, s.series_number, s.description)
                 for s in series],
            )
            placeholders = ", ".join("?" * len(INSTANCE_COLUMNS))
            issues = list(issues)
            for row in instances:
                cur = self.conn.execute(
                    f"INSERT OR IGNORE INTO instances VALUES ({placeholders})", row.values()
                )
                if cur.rowcount:
                    self.conn.execute("INSERT INTO instance_attrs VALUES (?, ?)",
                                      (row.sop_uid, row.attrs_json))
                else:
                    issues.append((row.sop_uid, "SOP Instance UID seen twice on the node "
                                                f"(again in study {row.study_uid})"))
            self.conn.executemany(
                "INSERT INTO issues (study_uid, sop_uid, problem) VALUES (?, ?, ?)",
                [(study_uid, sop, problem) for sop, problem in issues],
            )
            self.conn.execute("UPDATE studies SET state = 'done' WHERE study_uid = ?",
                              (study_uid,))
        return len(instances)

    def finish(self, **meta: Any) -> None:
        """Build the indexes reconciliation needs and mark the crawl complete."""
        self.conn.executescript(INDEXES)
        self.set_meta(finished=time.strftime("%Y-%m-%dT%H:%M:%S"), **meta)
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- reading ----------------------------------------------------------------------
    def pending_studies(self) -> list[tuple[str, bool]]:
        """(StudyInstanceUID, retrieve fully?) of the studies not yet committed."""
        return [(uid, bool(r)) for uid, r in self.conn.execute(
            "SELECT study_uid, retrieve FROM studies WHERE state = 'listed' ORDER BY rowid")]

    def study_keys(self, study_uid: str) -> dict[str, Any]:
        row = self.conn.execute("SELECT keys_json FROM studies WHERE study_uid = ?",
                                (study_uid,)).fetchone()
        return json.loads(row[0]) if row else {}

    def counts(self) -> dict[str, int]:
        """Patients and studies as listed, series and instances as listed (retrievable or
        not: the listing is what the node holds)."""
        q = self.conn.execute
        return {
            "patients": q("SELECT count(*) FROM patients").fetchone()[0],
            "studies": q("SELECT count(*) FROM studies").fetchone()[0],
            "series": q("SELECT count(*) FROM series").fetchone()[0],
            "instances": q("SELECT count(*) FROM instances").fetchone()[0],
        }

    def unretrievable(self) -> int:
        """Listed instances whose retrieval failed (depth full)."""
        return self.conn.execute("SELECT count(*) FROM instances "
                                 "WHERE retrieval_error IS NOT NULL").fetchone()[0]

    def issues(self) -> list[dict[str, str]]:
        return [{"study_uid": s, "sop_uid": i, "problem": p}
                for s, i, p in self.conn.execute("SELECT study_uid, sop_uid, problem FROM issues")]

    def iter_instances(self) -> Iterator[dict[str, Any]]:
        cur = self.conn.execute(f"SELECT {', '.join(INSTANCE_COLUMNS)} FROM instances")
        for values in cur:
            yield dict(zip(INSTANCE_COLUMNS, values, strict=True))


@dataclass
class LedgerInfo:
    """What `ledger_info` reports about a file (for summaries)."""

    path: str
    meta: dict[str, str]
    counts: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ledger_info(path: str | os.PathLike[str]) -> LedgerInfo:
    with Ledger.open(path) as ledger:
        return LedgerInfo(str(path), ledger.meta(), ledger.counts())
