"""Specific Character Sets and person names that fit each of them.

A name is only generated in a character set that can encode it: Müller fits ISO_IR 100
(Latin-1), Dvořák needs ISO_IR 192 (UTF-8), Japanese names use ISO 2022 IR 87 (JIS X 0208
with escape sequences) and Korean names ISO 2022 IR 149 (KS X 1001).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from faker import Faker
from pydicom.charset import convert_encodings
from pydicom.valuerep import PersonName

from harness.errors import ConfigError
from synthetic_data.names import CHARSET_NAMES, DEFAULT, JAPANESE, KOREAN, LATIN1, UTF8

_ALIASES = {
    "default": DEFAULT, "ascii": DEFAULT, "iso_ir 6": DEFAULT, "iso_ir_6": DEFAULT,
    "iso_ir 100": LATIN1, "iso_ir_100": LATIN1, "latin1": LATIN1, "latin-1": LATIN1,
    "iso_ir 192": UTF8, "iso_ir_192": UTF8, "utf8": UTF8, "utf-8": UTF8,
    "iso 2022 ir 87": JAPANESE, "\\iso 2022 ir 87": JAPANESE, "ir87": JAPANESE,
    "japanese": JAPANESE,
    "iso 2022 ir 149": KOREAN, "\\iso 2022 ir 149": KOREAN, "ir149": KOREAN, "korean": KOREAN,
}


def resolve_charset(name: str) -> str:
    """Map a user-given charset name or alias to its canonical name, or raise ConfigError."""
    key = " ".join(name.strip().lower().split())
    if key not in _ALIASES:
        raise ConfigError(
            f"charsets: unknown character set {name!r} (allowed: {', '.join(CHARSET_NAMES)})"
        )
    return _ALIASES[key]


def specific_character_set(charset: str) -> str | list[str] | None:
    """The (0008,0005) value to write; None means the default repertoire (attribute absent)."""
    if charset == DEFAULT:
        return None
    if charset in (JAPANESE, KOREAN):
        return ["", charset]  # written as "\ISO 2022 IR 87": ASCII first, then the extension
    return charset


def fits(charset: str, text: str) -> bool:
    """True if text can be written in that character set."""
    try:
        if charset == DEFAULT:
            text.encode("ascii")
        elif charset == LATIN1:
            text.encode("latin_1")
        elif charset == JAPANESE:
            text.encode("iso2022_jp")
        elif charset == KOREAN:
            text.encode("euc_kr")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class NameParts:
    """A person name with optional ideographic and phonetic groups (PS3.5 6.2.1)."""

    family: str
    given: str
    ideographic: tuple[str, str] | None = None
    phonetic: tuple[str, str] | None = None

    def dicom(self) -> str:
        groups = [f"{self.family}^{self.given}"]
        if self.ideographic or self.phonetic:
            groups.append("^".join(self.ideographic) if self.ideographic else "")
        if self.phonetic:
            groups.append("^".join(self.phonetic))
        return "=".join(groups)

    def replace_alphabetic(self, family: str, given: str) -> NameParts:
        return NameParts(family, given, self.ideographic, self.phonetic)


_LOCALES = {
    DEFAULT: ("en_US", "en_GB"),
    LATIN1: ("de_DE", "fr_FR", "es_ES", "sv_SE"),
    UTF8: ("cs_CZ", "pl_PL", "el_GR", "de_DE"),
    JAPANESE: ("ja_JP",),
    KOREAN: ("ko_KR",),
}

_FAKERS: dict[str, Faker] = {}


def faker_for(locale: str, seed: int) -> Faker:
    """One Faker per locale, re-seeded per use so every draw depends only on the seed."""
    fk = _FAKERS.get(locale)
    if fk is None:
        fk = _FAKERS[locale] = Faker(locale)
    fk.seed_instance(seed)
    return fk


# Revised Romanization of Korean, enough for names (initial, medial, final jamo).
_KO_INITIAL = ["g", "kk", "n", "d", "tt", "r", "m", "b", "pp", "s", "ss", "", "j", "jj", "ch",
               "k", "t", "p", "h"]
_KO_MEDIAL = ["a", "ae", "ya", "yae", "eo", "e", "yeo", "ye", "o", "wa", "wae", "oe", "yo", "u",
              "wo", "we", "wi", "yu", "eu", "ui", "i"]
_KO_FINAL = ["", "k", "k", "k", "n", "n", "n", "t", "l", "k", "m", "l", "l", "l", "p", "l", "m",
             "p", "p", "t", "t", "ng", "t", "t", "k", "t", "p", "t"]
_KO_SURNAMES = {"김": "Kim", "이": "Lee", "박": "Park", "최": "Choi", "정": "Jung", "강": "Kang",
                "조": "Cho", "윤": "Yoon", "장": "Jang", "임": "Lim", "한": "Han", "오": "Oh",
                "서": "Seo", "신": "Shin", "권": "Kwon", "황": "Hwang", "안": "Ahn", "송": "Song",
                "류": "Ryu", "홍": "Hong", "전": "Jeon", "고": "Ko", "문": "Moon", "손": "Son"}


def romanize_korean(text: str) -> str:
    """Romanize Hangul syllables (Revised Romanization, no sound-change rules)."""
    out = []
    for ch in text:
        code = ord(ch) - 0xAC00
        if 0 <= code < 11172:
            out.append(_KO_INITIAL[code // 588] + _KO_MEDIAL[(code % 588) // 28]
                       + _KO_FINAL[code % 28])
        else:
            out.append(ch)
    return "".join(out).capitalize()


def make_name(charset: str, sex: str, seed: int) -> NameParts:
    """A plausible name in that charset's culture that the charset can encode."""
    rng = random.Random(seed)
    locales = _LOCALES[charset]
    for attempt in range(50):
        locale = locales[rng.randrange(len(locales))]
        fk = faker_for(locale, seed * 131 + attempt)
        if charset == JAPANESE:
            fam = fk.last_name_pair()
            giv = fk.first_name_male_pair() if sex == "M" else fk.first_name_female_pair()
            name = NameParts(fam[2], giv[2], (fam[0], giv[0]), (fam[1], giv[1]))
        elif charset == KOREAN:
            fam_k = fk.last_name()
            giv_k = fk.first_name_male() if sex == "M" else fk.first_name_female()
            family = _KO_SURNAMES.get(fam_k, romanize_korean(fam_k))
            name = NameParts(family, romanize_korean(giv_k), None, (fam_k, giv_k))
        else:
            family = fk.last_name()
            given = fk.first_name_male() if sex == "M" else fk.first_name_female()
            name = NameParts(family, given)
        if _name_ok(charset, name):
            return name
    raise RuntimeError(f"could not make a name for {charset}")  # pragma: no cover


def encoded_name(charset: str, text: str) -> bytes:
    """The bytes pydicom writes for a PN value in that charset (escape sequences included)."""
    value = specific_character_set(charset)
    terms = [value] if isinstance(value, str) else (value or [""])
    return PersonName(text).encode(convert_encodings(terms))


def _name_ok(charset: str, name: NameParts) -> bool:
    alpha = f"{name.family}^{name.given}"
    if any(c in alpha for c in "=\\^") and alpha.count("^") != 1:
        return False
    if charset in (JAPANESE, KOREAN):
        if not alpha.isascii():
            return False
        if not all(fits(charset, "".join(g)) for g in (name.ideographic, name.phonetic) if g):
            return False
    elif not fits(charset, alpha):
        return False
    raw = encoded_name(charset, name.dicom())
    # PN allows 64 characters per group, but validators count the whole value's bytes; a JIS
    # X 0208 character whose code contains 0x5C (e.g. 本) is read as a value delimiter by
    # some tools, so such names are skipped to keep every object validator-clean.
    return len(raw) <= 64 and b"\\" not in raw
