"""Hypothesis strategies for property-based tests of a PACS (or of anything reading DICOM).

- ``datasets(modality=...)``: one complete, IOD-valid object (file_meta set);
- ``studies(modality=...)``: every object of one study;
- ``patients(charset=...)``: a Patient module dataset, IDs and dates including edge values;
- ``vr_values(vr)``: a value of one VR, biased towards its edges (empty, longest, extremes).

Everything drawn is synthetic; datasets come from the same generator as the archives, so a
failing example can be rebuilt from the options shown by hypothesis.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import math

from hypothesis import strategies as st
from pydicom.dataset import Dataset

from harness.errors import ConfigError
from synthetic_data.charsets import CHARSET_NAMES, make_name, specific_character_set
from synthetic_data.encodings import SYNTAXES
from synthetic_data.generator import generate
from synthetic_data.options import MODALITIES, GeneratorOptions


def available_syntaxes() -> list[str]:
    """Short names of the transfer syntaxes that can be encoded on this machine."""
    return [name for name, s in SYNTAXES.items()
            if all(importlib.util.find_spec(p) is not None for p in s.packages)]


def _options(draw: st.DrawFn, modality: str | None, charset: str | None,
             transfer_syntax: str | None) -> GeneratorOptions:
    return GeneratorOptions(
        patients=1, studies_per_patient=1, facilities=1, trap_rate=0.0, scale="tiny",
        modalities=[modality or draw(st.sampled_from(MODALITIES))],
        seed=draw(st.integers(min_value=0, max_value=2**32 - 1)),
        charsets=[charset or draw(st.sampled_from(CHARSET_NAMES))],
        transfer_syntaxes=[transfer_syntax or draw(st.sampled_from(available_syntaxes()))],
    )


@st.composite
def datasets(draw: st.DrawFn, modality: str | None = None, charset: str | None = None,
             transfer_syntax: str | None = None) -> Dataset:
    """The first object of a generated study of the chosen (or any) modality."""
    return next(iter(generate(_options(draw, modality, charset, transfer_syntax))))


@st.composite
def studies(draw: st.DrawFn, modality: str | None = None, charset: str | None = None,
            transfer_syntax: str | None = None) -> list[Dataset]:
    """Every object of one generated study."""
    return list(generate(_options(draw, modality, charset, transfer_syntax)))


_LO_CHARS = st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\")
_TEXT_CHARS = st.characters(min_codepoint=0x20, max_codepoint=0x7E, include_characters="\r\n\t")


@st.composite
def patients(draw: st.DrawFn, charset: str | None = None) -> Dataset:
    """Patient module: a name that fits the charset, an ID up to 64 chars, edge dates."""
    cs = charset or draw(st.sampled_from(CHARSET_NAMES))
    sex = draw(st.sampled_from(["M", "F", "O"]))
    name = make_name(cs, "F" if sex == "F" else "M", draw(st.integers(0, 2**31 - 1)))
    ds = Dataset()
    value = specific_character_set(cs)
    if value is not None:
        ds.SpecificCharacterSet = value
    ds.PatientName = name.dicom()
    pid = draw(st.one_of(st.just("0"), st.just("9" * 64),
                         st.text(_LO_CHARS, min_size=1, max_size=64)))
    ds.PatientID = pid.strip() or "0"
    ds.IssuerOfPatientID = draw(st.sampled_from(["", "HOSP.A", "X" * 64]))
    birth = draw(st.one_of(st.sampled_from([dt.date(1900, 1, 1), dt.date(2000, 2, 29)]),
                           st.dates(dt.date(1900, 1, 1), dt.date(2030, 12, 31))))
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = sex
    return ds


def _text(max_size: int, alphabet: st.SearchStrategy[str] = _LO_CHARS,
          multiline: bool = False) -> st.SearchStrategy[str]:
    chars = alphabet if not multiline else _TEXT_CHARS
    body = st.text(chars, max_size=max_size).map(lambda s: s[:max_size].rstrip())
    edge = st.sampled_from(["", "A" * max_size])
    return st.one_of(edge, body)


def _uid() -> st.SearchStrategy[str]:
    comp = st.integers(min_value=0, max_value=10**12).map(str)
    longest = "1." + "2" * 62
    return st.one_of(st.sampled_from(["1.2", longest, "2.25.0"]),
                     st.lists(comp, min_size=2, max_size=6).map(".".join)
                     .filter(lambda u: len(u) <= 64))


def _ds_value() -> st.SearchStrategy[str]:
    fixed = st.sampled_from(["0", "-0", "1e-10", "-1.5E+10", "9999999999999999",
                             "-999999999999999", "3.14159265358979"])
    floats = st.floats(-1e15, 1e15, allow_nan=False, allow_infinity=False).map(
        lambda f: f"{f:.8g}")
    return st.one_of(fixed, floats)


def _dates() -> st.SearchStrategy[str]:
    return st.dates(dt.date(1900, 1, 1), dt.date(9999, 12, 31)).map(
        lambda d: f"{d.year:04d}{d.month:02d}{d.day:02d}")


def _times() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(["000000", "235959.999999", "12", "1230"]),
                     st.times().map(lambda t: t.strftime("%H%M%S")))


def _int_range(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([lo, hi, 0]), st.integers(lo, hi))


def _floats(width: int) -> st.SearchStrategy[float]:
    edge = [0.0, -0.0, 1.0, -1.0, math.inf, -math.inf]
    return st.one_of(st.sampled_from(edge), st.floats(width=width, allow_nan=False))


def _bytes(even: bool = True) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=64).map(lambda b: b + b"\x00" if even and len(b) % 2 else b)


_VR_STRATEGIES: dict[str, st.SearchStrategy] = {
    "AE": _text(16, st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                                  exclude_characters="\\")).filter(lambda s: s.strip() == s),
    "AS": st.one_of(st.sampled_from(["000D", "999Y", "012W", "006M"]),
                    st.tuples(st.integers(0, 999), st.sampled_from("DWMY"))
                    .map(lambda t: f"{t[0]:03d}{t[1]}")),
    "AT": st.one_of(st.sampled_from([0x00000000, 0xFFFFFFFF, 0x00100010]),
                    st.integers(0, 0xFFFFFFFF)),
    "CS": _text(16, st.sampled_from(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ "))).map(
        lambda s: s.strip()),
    "DA": _dates(),
    "DS": _ds_value(),
    "DT": st.one_of(st.sampled_from(["2024", "20241231235959.999999+1400", "19000101"]),
                    st.datetimes().map(
                        lambda d: f"{d.year:04d}{d.month:02d}{d.day:02d}{d.hour:02d}"
                                  f"{d.minute:02d}{d.second:02d}")),
    "FL": _floats(32),
    "FD": _floats(64),
    "IS": _int_range(-(2**31), 2**31 - 1).map(str),
    "LO": _text(64),
    "LT": _text(10240, multiline=True),
    "OB": _bytes(),
    "OD": _bytes().map(lambda b: b + b"\x00" * ((-len(b)) % 8)),
    "OF": _bytes().map(lambda b: b + b"\x00" * ((-len(b)) % 4)),
    "OL": _bytes().map(lambda b: b + b"\x00" * ((-len(b)) % 4)),
    "OV": _bytes().map(lambda b: b + b"\x00" * ((-len(b)) % 8)),
    "OW": _bytes(),
    "PN": st.one_of(st.sampled_from(["", "A" * 64, "Doe^John^^Dr^Jr", "^Cher", "Yamada^Tarou"]),
                    st.integers(0, 2**31 - 1).map(lambda s: make_name("default", "F", s).dicom())),
    "SH": _text(16),
    "SL": _int_range(-(2**31), 2**31 - 1),
    "SS": _int_range(-(2**15), 2**15 - 1),
    "ST": _text(1024, multiline=True),
    "SV": _int_range(-(2**63), 2**63 - 1),
    "TM": _times(),
    "UC": _text(1000),
    "UI": _uid(),
    "UL": _int_range(0, 2**32 - 1),
    "UN": _bytes(),
    "UR": st.sampled_from(["", "http://example.org/a?b=c", "urn:oid:1.2.3"]),
    "US": _int_range(0, 2**16 - 1),
    "UT": _text(20000, multiline=True),
    "UV": _int_range(0, 2**64 - 1),
}

SUPPORTED_VRS = tuple(sorted(_VR_STRATEGIES))


def vr_values(vr: str) -> st.SearchStrategy:
    """Values of one VR as pydicom accepts them, with edge values drawn often."""
    try:
        return _VR_STRATEGIES[vr.upper()]
    except KeyError:
        raise ConfigError(f"vr_values: unknown VR {vr!r} (allowed: {', '.join(SUPPORTED_VRS)})"
                         ) from None
