"""The one number parser of every configuration schema: finite, in range, never a bool.

YAML reads ``.nan``, ``.inf``, ``true`` and ``1e400``-like text as numbers or as things
Python compares oddly (NaN is neither below nor above any bound, True is 1), so every
number, duration (seconds, ``_s`` fields) and size of a topology, fault schedule, workload,
contract or rules file is checked here, with one wording:
``must be a number >= 0 and <= 60000, got -1``.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator

from harness.config.errors import fail


class NumberError(ValueError):
    """A value that is not a finite number in range; the message says what is allowed."""


def show(bound: float) -> str:
    """A bound as a person writes it: 3600, 0.5, 100000000000 (not 1e+11)."""
    if float(bound).is_integer() and abs(bound) < 1e18:
        return str(int(bound))
    return f"{bound:g}"


def allowed(low: float, high: float, *, low_open: bool = False, whole: bool = False) -> str:
    """What a number must be, e.g. ``a whole number >= 1 and <= 256``."""
    kind = "a whole number" if whole else "a number"
    return f"{kind} {'>' if low_open else '>='} {show(low)} and <= {show(high)}"


def finite_number(
    value: Any, low: float, high: float, *, low_open: bool = False, whole: bool = False
) -> int | float:
    """`value` when it is a finite int or float (not a bool) with low <= value <= high
    (low < value when `low_open`; an int when `whole`); NumberError otherwise."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and whole:
        ok = isinstance(value, int)
    if ok and isinstance(value, float):
        ok = math.isfinite(value)
    # an int of any size compares exactly with a float bound: no overflow to infinity
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise NumberError(
            f"must be {allowed(low, high, low_open=low_open, whole=whole)}, got {value!r}"
        )
    return value


def Number(  # noqa: N802 - used like a type: `users: Number(1, 256, whole=True)`
    low: float, high: float, *, low_open: bool = False, whole: bool = False
) -> Any:
    """A schema field type for `finite_number` (ints stay ints, floats stay floats)."""

    def check(value: Any) -> int | float:
        try:
            return finite_number(value, low, high, low_open=low_open, whole=whole)
        except NumberError as exc:
            raise fail(str(exc)) from None

    return Annotated[int if whole else float, BeforeValidator(check)]


#: a number and a unit: "5 s", "200 ms", "50 instances/s", "10 MB/s", "99.9 %"
QUANTITY_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(\S+)\s*$")


def quantity(
    text: str, units: tuple[str, ...], high: float, what: str = "this value"
) -> tuple[float, str]:
    """A duration, rate or size written with its unit (a number 0 to `high`); the unit is
    returned lower case and must be one of `units`. NumberError names what is wrong."""
    match = QUANTITY_RE.match(text)
    if not match:
        raise NumberError(f"cannot read {text!r} as a number and a unit (e.g. '5 s')")
    # the text matched digits only, so float() cannot fail; a 400-digit number is inf
    try:
        value = float(finite_number(float(match.group(1)), 0, high))
    except NumberError as exc:
        raise NumberError(f"out of range: {exc}") from None
    unit = match.group(2).lower()
    if unit not in units:
        raise NumberError(
            f"unit {match.group(2)!r} does not fit {what} (allowed: {', '.join(units)})"
        )
    return value, unit


def _port(value: Any) -> int:
    try:
        return int(finite_number(value, 1, 65535, whole=True))
    except NumberError:
        raise fail(f"invalid port {value!r} (allowed: an integer 1-65535)") from None


#: a TCP or UDP port (topology nodes, audit receivers)
Port = Annotated[int, BeforeValidator(_port)]
