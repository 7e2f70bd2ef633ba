"""What the user asks for, checked once so every later step can trust it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from harness.errors import ConfigError
from synthetic_data.charsets import DEFAULT, resolve_charset
from synthetic_data.encodings import DEFAULT_SYNTAX, resolve_syntax
from synthetic_data.names import MODALITIES, SCALES
from synthetic_data.uids import normalise_root

_MODALITY_ALIASES = {"OT": "SC"}


def _as_list(value: Sequence[str] | str | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v for v in (p.strip() for p in value.split(",")) if v]
    return [str(v).strip() for v in value if str(v).strip()]


def _positive_int(name: str, value: object, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ConfigError(f"{name}: must be a whole number from 1 to {maximum}, got {value!r}")
    return value


@dataclass(frozen=True)
class GeneratorOptions:
    """Everything that determines an archive; the same options give byte-identical files.

    modalities: DICOM Modality names (SR = Basic Text SR report, DOC = encapsulated PDF,
    SC = secondary capture, written with Modality OT). charsets: None = default repertoire;
    else names from charsets.CHARSET_NAMES (patients are spread over them). transfer_syntaxes:
    None = explicit VR little endian; else short names or UIDs (series are spread over them).
    uid_root: None = '2.25.' (UUID-derived UIDs).
    """

    patients: int = 2
    studies_per_patient: int = 1
    modalities: Sequence[str] | str | None = ("CT", "MR")
    facilities: int = 2
    seed: int = 0
    scale: str = "tiny"
    quirks: bool = False
    charsets: Sequence[str] | str | None = None
    transfer_syntaxes: Sequence[str] | str | None = None
    uid_root: str | None = None
    trap_rate: float = 0.2
    # normalised copies, filled in by __post_init__
    modality_list: tuple[str, ...] = field(init=False, default=())
    charset_list: tuple[str, ...] = field(init=False, default=())
    syntax_list: tuple[str, ...] = field(init=False, default=())  # short names
    root: str = field(init=False, default="")

    def __post_init__(self) -> None:
        _positive_int("patients", self.patients, 1_000_000)
        _positive_int("studies_per_patient", self.studies_per_patient, 1000)
        _positive_int("facilities", self.facilities, 99)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed: must be a whole number >= 0, got {self.seed!r}")
        if self.scale not in SCALES:
            raise ConfigError(f"scale: unknown scale {self.scale!r} (allowed: {', '.join(SCALES)})")
        try:
            rate = float(self.trap_rate)
        except (TypeError, ValueError):
            rate = -1.0
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"trap_rate: must be a number from 0 to 1, got {self.trap_rate!r}")
        _set = object.__setattr__  # frozen: normalised values are set once, here
        _set(self, "trap_rate", rate)
        mods = []
        for m in _as_list(self.modalities) or ["CT", "MR"]:
            key = _MODALITY_ALIASES.get(m.upper(), m.upper())
            if key not in MODALITIES:
                raise ConfigError(
                    f"modalities: unknown modality {m!r} (allowed: {', '.join(MODALITIES)}, OT)"
                )
            if key not in mods:
                mods.append(key)
        _set(self, "modality_list", tuple(mods))
        charsets = [resolve_charset(c) for c in _as_list(self.charsets)] or [DEFAULT]
        _set(self, "charset_list", tuple(dict.fromkeys(charsets)))
        syntaxes = [resolve_syntax(s).name for s in _as_list(self.transfer_syntaxes)]
        _set(self, "syntax_list", tuple(dict.fromkeys(syntaxes or [DEFAULT_SYNTAX])))
        _set(self, "root", normalise_root(self.uid_root))

    def summary(self) -> dict:
        """The normalised options, as written into manifest.json."""
        d = asdict(self)
        d["modalities"] = list(self.modality_list)
        d["charsets"] = list(self.charset_list)
        d["transfer_syntaxes"] = list(self.syntax_list)
        d["uid_root"] = self.root
        for k in ("modality_list", "charset_list", "syntax_list", "root"):
            d.pop(k)
        return d
