"""Facilities, people and the patient records they get, with identity traps as ground truth.

A *person* is the truth; a *record* is what one facility knows about that person (MRN,
issuer, name and birth date as registered). Traps make records that a PACS or an MPI must
not merge, or must link:

- ``mrn_collision``: two different people carry the same MRN at two facilities;
- ``mrn_split``: one person has different MRNs at two facilities;
- ``demographic_variant``: one person registered again with a name spelling and/or birth
  date variant (at another facility, or the same one if there is only one).
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, field

from synthetic_data.charsets import JAPANESE, KOREAN, NameParts, make_name

_FACILITY_NAMES = (
    "Northside General Hospital", "St. Aurelia Medical Center", "Lakeview Imaging Clinic",
    "Riverside University Hospital", "Hillcrest Community Hospital", "Harbor Point Radiology",
    "Meadowbrook Regional Medical", "Cedar Valley Diagnostic Center",
)


@dataclass(frozen=True)
class Facility:
    """One site: its own name, issuer of patient ID, AE titles and MRN scheme."""

    index: int
    code: str  # short folder-safe code, e.g. F01
    name: str
    issuer: str
    ae_titles: tuple[str, ...]
    mrn_prefix: str
    mrn_digits: int
    accession_prefix: str

    def mrn(self, number: int) -> str:
        return f"{self.mrn_prefix}{number % 10 ** self.mrn_digits:0{self.mrn_digits}d}"


def make_facilities(count: int, seed: int) -> list[Facility]:
    """Facilities with distinct MRN schemes: some prefixed, some bare numbers of other lengths."""
    rng = random.Random(f"facilities|{seed}")
    out = []
    for i in range(count):
        base = _FACILITY_NAMES[i % len(_FACILITY_NAMES)]
        name = base if i < len(_FACILITY_NAMES) else f"{base} {i // len(_FACILITY_NAMES) + 1}"
        code = f"F{i + 1:02d}"
        initials = "".join(w[0] for w in name.split() if w[0].isalpha())[:4].upper()
        scheme = i % 3
        prefix, digits = [("", 7), ("MRN", 6), (f"{initials[:2]}-", 8)][scheme]
        aes = (f"{initials}_CT{i + 1:02d}"[:16], f"{initials}_MR{i + 1:02d}"[:16],
               f"{initials}_PACS"[:16])
        out.append(Facility(i, code, name, f"{initials}{i + 1:02d}.MRN", aes, prefix, digits,
                            f"{initials[:2]}{rng.randrange(10, 99)}"))
    return out


@dataclass(frozen=True)
class Person:
    """Ground truth identity of one synthetic human."""

    person_id: str
    name: NameParts
    sex: str
    birth_date: dt.date
    charset: str


@dataclass
class PatientRecord:
    """What one facility registered: this is what goes into the DICOM Patient module."""

    record_id: str
    person: Person
    facility: Facility
    patient_id: str
    name: NameParts
    birth_date: dt.date
    traps: list[dict] = field(default_factory=list)

    @property
    def sex(self) -> str:
        return self.person.sex


def _variant_name(name: NameParts, charset: str, rng: random.Random) -> tuple[NameParts, str]:
    """A realistic misspelling of the alphabetic group, keeping it in the same charset."""
    fam, giv = name.family, name.given
    choices = []
    for a, b in (("ü", "ue"), ("ö", "oe"), ("ä", "ae"), ("é", "e"), ("ß", "ss")):
        if a in fam:
            choices.append((fam.replace(a, b), giv, f"transliteration {a}->{b}"))
    if charset == JAPANESE and "ou" in (fam + giv):
        choices.append((fam.replace("ou", "o"), giv.replace("ou", "o"), "romanization ou->o"))
    if len(fam) > 3:
        i = rng.randrange(1, len(fam) - 1)
        if fam[i] != fam[i + 1]:
            swapped = fam[:i] + fam[i + 1] + fam[i] + fam[i + 2:]
            choices.append((swapped, giv, "transposed letters"))
        choices.append((fam[:i] + fam[i + 1:], giv, "dropped letter"))
    choices.append((fam.upper(), giv.upper(), "upper case"))
    choices.append((fam, giv[:1], "given name initial only"))
    if charset == KOREAN:
        choices.append((giv, fam, "family and given swapped"))
    v_fam, v_giv, how = choices[rng.randrange(len(choices))]
    return name.replace_alphabetic(v_fam, v_giv), how


def _variant_date(d: dt.date, rng: random.Random) -> tuple[dt.date, str]:
    options = [(d + dt.timedelta(days=1), "birth date +1 day")]
    if d.day <= 12 and d.day != d.month:
        options.append((d.replace(month=d.day, day=d.month), "day and month swapped"))
    try:
        options.append((d.replace(year=d.year + 10), "birth year +10"))
    except ValueError:
        pass
    return options[rng.randrange(len(options))]


def make_population(persons: int, facilities: list[Facility], charsets: tuple[str, ...],
                    trap_rate: float, seed: int) -> list[PatientRecord]:
    """All patient records, in a fixed order; traps chosen by the seeded trap_rate."""
    rng = random.Random(f"population|{seed}")
    used: dict[int, set[str]] = {f.index: set() for f in facilities}
    records: list[PatientRecord] = []

    def new_mrn(fac: Facility) -> str:
        while True:
            mrn = fac.mrn(rng.randrange(10 ** fac.mrn_digits))
            if mrn not in used[fac.index]:
                used[fac.index].add(mrn)
                return mrn

    def add(person: Person, fac: Facility, mrn: str, name: NameParts | None = None,
            birth: dt.date | None = None) -> PatientRecord:
        rec = PatientRecord(f"R{len(records) + 1:06d}", person, fac, mrn, name or person.name,
                            birth or person.birth_date)
        records.append(rec)
        return rec

    homes: list[PatientRecord] = []
    for i in range(persons):
        sex = "F" if rng.random() < 0.5 else "M"
        charset = charsets[i % len(charsets)]
        birth = dt.date(1935, 1, 1) + dt.timedelta(days=rng.randrange(365 * 80))
        person = Person(f"P{i + 1:06d}", make_name(charset, sex, rng.randrange(2**31)), sex,
                        birth, charset)
        fac = facilities[i % len(facilities)]
        homes.append(add(person, fac, new_mrn(fac)))

    n_traps = 0
    for i, home in enumerate(homes):
        if rng.random() >= trap_rate:
            continue
        others = [f for f in facilities if f.index != home.facility.index]
        kinds = ["demographic_variant"]
        if others:
            kinds.append("mrn_split")
            if any(h.facility.index != home.facility.index for h in homes[:i]):
                kinds.append("mrn_collision")
        kind = kinds[rng.randrange(len(kinds))]
        n_traps += 1
        group = f"T{n_traps:04d}"
        if kind == "mrn_collision":
            other = [h for h in homes[:i] if h.facility.index != home.facility.index]
            victim = other[rng.randrange(len(other))]
            if victim.patient_id in used[home.facility.index]:
                continue
            used[home.facility.index].discard(home.patient_id)
            used[home.facility.index].add(victim.patient_id)
            home.patient_id = victim.patient_id
            trap = {"kind": kind, "group": group, "patient_id": victim.patient_id,
                    "records": [victim.record_id, home.record_id],
                    "persons": [victim.person.person_id, home.person.person_id],
                    "note": "same MRN at two facilities, different people"}
            victim.traps.append(trap)
            home.traps.append(trap)
        elif kind == "mrn_split":
            fac = others[rng.randrange(len(others))]
            rec = add(home.person, fac, new_mrn(fac))
            trap = {"kind": kind, "group": group, "person": home.person.person_id,
                    "records": [home.record_id, rec.record_id],
                    "note": "same person, different MRNs at two facilities"}
            home.traps.append(trap)
            rec.traps.append(trap)
        else:
            fac = others[rng.randrange(len(others))] if others else home.facility
            changes = []
            name, birth = home.name, home.birth_date
            what = rng.randrange(3)  # 0 name, 1 birth date, 2 both
            if what in (0, 2):
                name, how = _variant_name(home.name, home.person.charset, rng)
                changes.append(how)
            if what in (1, 2):
                birth, how = _variant_date(home.birth_date, rng)
                changes.append(how)
            rec = add(home.person, fac, new_mrn(fac), name, birth)
            trap = {"kind": kind, "group": group, "person": home.person.person_id,
                    "records": [home.record_id, rec.record_id], "variants": changes,
                    "note": "same person, name spelling and/or birth date variant"}
            home.traps.append(trap)
            rec.traps.append(trap)
    return records
