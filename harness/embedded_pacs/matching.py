"""Attribute matching of the embedded PACS's C-FIND (PS3.4 C.2.2.2).

One query value against one stored value, by kind of attribute: single value, universal
(empty, handled by the caller), ``*``/``?`` wildcards (case-sensitive except PN), DA/TM ranges
``A-B``, ``-B``, ``A-`` (partial bounds such as ``-2020`` allowed). Backslash lists (UID lists,
OR-lists for other keys) are split by the caller. Wildcard matching never backtracks.
"""

from __future__ import annotations


def has_wildcard(q: str) -> bool:
    return "*" in q or "?" in q


def wildcard_match(pattern: str, value: str, ignore_case: bool = False) -> bool:
    """PS3.4 C.2.2.2.4 wildcard matching: ``*`` any run of characters, ``?`` exactly one.

    Without backtracking, so a hostile pattern such as ``*A*A*A*A*B`` costs at most
    len(pattern) x len(value) character comparisons: the pattern is split at ``*``; the first
    piece must start the value, the last must end it, and each middle piece is placed at its
    earliest position after the previous one (an earliest placement never loses a match).
    """
    if ignore_case:
        pattern_chars = [c.lower() for c in pattern]
        value_chars = [c.lower() for c in value]
    else:
        pattern_chars, value_chars = list(pattern), list(value)
    pieces: list[list[str]] = [[]]
    for char in pattern_chars:
        if char == "*":
            pieces.append([])
        else:
            pieces[-1].append(char)

    def fits(piece: list[str], at: int) -> bool:
        return all(p == "?" or p == value_chars[at + i] for i, p in enumerate(piece))

    if len(pieces) == 1:
        return len(value_chars) == len(pieces[0]) and fits(pieces[0], 0)
    first, *middle, last = pieces
    end = len(value_chars) - len(last)
    if len(first) > end or not fits(first, 0) or not fits(last, end):
        return False
    position = len(first)
    for piece in middle:
        while position + len(piece) <= end and not fits(piece, position):
            position += 1
        if position + len(piece) > end:
            return False
        position += len(piece)
    return True


def _range(q: str, value: str, strip: str) -> bool:
    """PS3.4 C.2.2.2.5 range matching on DA/TM text (``strip``: the old '.'/':' separators)."""
    lo, hi = (part.strip().replace(strip, "") for part in q.split("-", 1))
    value = value.replace(strip, "")
    if not value:
        return False
    if lo and value < lo:
        return False
    return not (hi and value[: len(hi)] > hi)


def match_one(kind: str, q: str, value: str) -> bool:
    """Does stored ``value`` match query value ``q``, for an attribute of ``kind`` (uid, date,
    time, pn, int, str)? PN matches either the whole value or its alphabetic group, ignoring
    case; TM without a range matches by prefix (a query of hours matches any minute)."""
    value = value.strip()
    if kind == "uid":
        return q == value
    if kind in ("date", "time"):
        strip = "." if kind == "date" else ":"
        if "-" in q:
            return _range(q, value, strip)
        if has_wildcard(q):
            return wildcard_match(q, value)
        q, value = q.replace(strip, ""), value.replace(strip, "")
        return q == value if kind == "date" else bool(value) and value.startswith(q)
    if kind == "pn":
        candidates = {value, value.split("=")[0]}
        if has_wildcard(q):
            return any(wildcard_match(q, v, ignore_case=True) for v in candidates)
        return any(q.casefold() == v.casefold() for v in candidates)
    if has_wildcard(q):
        return wildcard_match(q, value)
    if kind == "int":
        try:
            return int(q) == int(value)
        except ValueError:
            return q == value
    return q == value
