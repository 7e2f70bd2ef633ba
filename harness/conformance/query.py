"""C-FIND matching probes: does the node match keys the way PS3.4 C.2.2.2 says?

Each probe asks the node C-FIND questions about the probe corpus (corpus.py), whose right
answers are known from the corpus's facts, and compares the corpus studies it gets back
(anything else the node holds is ignored: only the corpus's own UIDs are counted). The
judgement is the standard's, written here from its text, never our own SCP's matching code.

Most queries are restricted to the corpus with a PatientID wild card (CONFPROBE-*), so a
node full of other studies answers little; the wild card itself is probed separately.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pynetdicom import build_context
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation

from harness.conformance.corpus import CORPUS_PREFIX, JIS, LATIN1, UTF8, Corpus
from harness.conformance.model import (
    Observation,
    ProbeContext,
    conforms,
    differs,
    not_supported,
    probe,
)
from harness.dicom.contexts import FIND_MODELS
from harness.dicom.peer import DimseConnectionError
from harness.dicom.query import query_identifier
from harness.dicom.status import FindResult, Status

IN_CORPUS = f"{CORPUS_PREFIX}*"
#: what a C-FIND response may hold besides the requested keys (PS3.4 C.4.1.1.3.2)
ALLOWED_IN_RESPONSE = frozenset({
    "SpecificCharacterSet", "QueryRetrieveLevel", "TimezoneOffsetFromUTC", "RetrieveAETitle",
    "StorageMediaFileSetID", "StorageMediaFileSetUID", "InstanceAvailability",
})


# -- asking and recording ------------------------------------------------------------------


def _describe_keys(keys: dict[str, Any] | Dataset) -> str:
    items = ((e.keyword, e.value) for e in keys) if isinstance(keys, Dataset) else keys.items()
    shown = []
    for keyword, value in items:
        if isinstance(value, Sequence):
            value = "[" + "; ".join(_describe_keys(item) for item in value) + "]"
        elif isinstance(value, list | tuple | MultiValue):
            value = "\\".join(str(v) for v in value)
        shown.append(f"{keyword}={'' if value is None else str(value)!r}")
    return " ".join(shown)


def _find(ctx: ProbeContext, level: str, keys: dict[str, Any] | Dataset,
          model: str = "study") -> FindResult:
    """One C-FIND on the node, kept as evidence in words (corpus studies by short name)."""
    result = ctx.node.dimse().find(level, keys, model=model)
    corpus: Corpus = ctx.corpus
    if result.ok:
        hits = sorted(corpus.key_of(uid) for uid in _study_uids(result, corpus))
        others = len(result.matches) - len(hits)
        answer = f"{result.status}; corpus matches: {', '.join(hits) or 'none'}"
        answer += f"; {others} other matches" if others else ""
    else:
        answer = result.error or str(result.status)
    ctx.record(f"C-FIND {level} ({model} root) {_describe_keys(keys)}", answer)
    return result


def _study_uids(result: FindResult, corpus: Corpus) -> list[str]:
    """The corpus studies among the matches (a study at SERIES/IMAGE level once per match)."""
    return [str(m.get("StudyInstanceUID", "")) for m in result.matches
            if str(m.get("StudyInstanceUID", "")) in corpus.study_uids]


def _found(ctx: ProbeContext, keys: dict[str, Any] | Dataset) -> tuple[FindResult,
                                                                      frozenset[str]]:
    """A STUDY-level query (study root) and the corpus studies it matched."""
    if isinstance(keys, Dataset):
        keys.StudyInstanceUID = keys.get("StudyInstanceUID", "")
    else:
        keys = {"StudyInstanceUID": None, **keys}
    result = _find(ctx, "STUDY", keys)
    return result, frozenset(_study_uids(result, ctx.corpus))


def _names(corpus: Corpus, uids: Iterable[str]) -> str:
    return "{" + ", ".join(sorted(corpus.key_of(u) for u in uids)) + "}"


def _expect_sets(ctx: ProbeContext, cases: list[tuple[str, dict[str, Any], frozenset[str]]],
                 what: str) -> Observation:
    """Conforms when every query matched exactly its expected corpus studies."""
    corpus: Corpus = ctx.corpus
    wrong = []
    for label, keys, expected in cases:
        result, found = _found(ctx, keys)
        if not result.ok:
            wrong.append(f"{label}: {result.error or result.status}")
        elif found != expected:
            wrong.append(f"{label}: expected {_names(corpus, expected)}, "
                         f"got {_names(corpus, found)}")
    if wrong:
        return differs("; ".join(wrong), failed=[w.split(":")[0] for w in wrong])
    return conforms(f"{len(cases)} {what} matched exactly the expected corpus studies")


# -- the probes --------------------------------------------------------------------------


@probe("query.universal", title="universal matching",
       expected="A zero-length key matches every entity and asks for the attribute's value "
                "in each response, the entities whose value is empty included.",
       reference="PS3.4 C.2.2.2.3", needs_corpus=True)
def universal(ctx: ProbeContext) -> Observation:
    corpus: Corpus = ctx.corpus
    asked = ("PatientName", "StudyDate", "StudyTime", "AccessionNumber")
    result, found = _found(ctx, {"PatientID": IN_CORPUS, **dict.fromkeys(asked)})
    if not result.ok:
        return differs(f"the query failed: {result.error or result.status}")
    missing = corpus.study_uids - found
    if missing:
        return differs(f"studies missing from a universal match: {_names(corpus, missing)}",
                       missing=sorted(corpus.key_of(u) for u in missing))
    wrong = []
    for match in result.matches:
        uid = str(match.get("StudyInstanceUID", ""))
        if uid not in corpus.study_uids:
            continue
        study = corpus.study(corpus.key_of(uid))
        stored = {"PatientName": study.patient_name, "StudyDate": study.study_date,
                  "StudyTime": study.study_time, "AccessionNumber": study.accession}
        for keyword in asked:
            if keyword == "PatientName" and study.charset:
                continue  # names in other character sets: the charset-* probes
            if keyword not in match:
                wrong.append(f"{study.key}: {keyword} not returned")
            elif _text(match, keyword) != stored[keyword] and keyword != "StudyTime":
                wrong.append(f"{study.key}: {keyword} {_text(match, keyword)!r}")
            elif keyword == "StudyTime" and not _same_time(_text(match, keyword),
                                                           study.study_time):
                wrong.append(f"{study.key}: StudyTime {_text(match, keyword)!r}")
    if wrong:
        return differs("values returned for empty keys differ: " + "; ".join(wrong[:6]),
                       wrong=wrong)
    return conforms(f"all {len(corpus.study_uids)} corpus studies matched (the one with an "
                    "empty name included), each with the requested values")


def _text(match: Dataset, keyword: str) -> str:
    value = match.get(keyword)
    return "" if value is None else str(value).strip()


def _same_time(returned: str, stored: str) -> bool:
    """TM values by meaning: '083000' is '083000.000' (PS3.4 C.2.2.2.1.3 note 1)."""
    digits = returned.replace(":", "").split(".")[0]
    return digits.ljust(6, "0") == stored.ljust(6, "0")


@probe("query.single-value", title="single value matching",
       expected="A value without wild cards matches exactly the entities with that value, "
                "case-sensitively for VRs other than PN (SH, LO, DA).",
       reference="PS3.4 C.2.2.2.1", needs_corpus=True)
def single_value(ctx: ProbeContext) -> Observation:
    corpus: Corpus = ctx.corpus
    return _expect_sets(ctx, [
        ("AccessionNumber=CPB001", {"PatientID": IN_CORPUS, "AccessionNumber": "CPB001"},
         corpus.uids("beta")),
        ("AccessionNumber=cpb001 (case)", {"PatientID": IN_CORPUS,
                                           "AccessionNumber": "cpb001"}, frozenset()),
        ("PatientID", {"PatientID": f"{CORPUS_PREFIX}01"}, corpus.uids("alpha-1", "alpha-2")),
        ("StudyDate=20150620", {"PatientID": IN_CORPUS, "StudyDate": "20150620"},
         corpus.uids("alpha-2")),
    ], "single value queries")


@probe("query.wildcard-star", title="* wild card",
       expected="'*' matches any sequence of characters, the empty one included (SH "
                "case-sensitively).",
       reference="PS3.4 C.2.2.2.4", needs_corpus=True)
def wildcard_star(ctx: ProbeContext) -> Observation:
    corpus: Corpus = ctx.corpus
    return _expect_sets(ctx, [
        ("AccessionNumber=CPA*", {"PatientID": IN_CORPUS, "AccessionNumber": "CPA*"},
         corpus.uids("alpha-1", "alpha-2")),
        ("AccessionNumber=CPA001*", {"PatientID": IN_CORPUS, "AccessionNumber": "CPA001*"},
         corpus.uids("alpha-1")),
        ("AccessionNumber=*G001", {"PatientID": IN_CORPUS, "AccessionNumber": "*G001"},
         corpus.uids("gamma")),
        ("PatientID=CONFPROBE-*", {"PatientID": IN_CORPUS}, corpus.study_uids),
        ("PatientName=CONFPROBE^Gam*", {"PatientName": "CONFPROBE^Gam*"},
         corpus.uids("gamma")),
    ], "'*' queries")


@probe("query.wildcard-question", title="? wild card",
       expected="'?' matches exactly one character.",
       reference="PS3.4 C.2.2.2.4", needs_corpus=True)
def wildcard_question(ctx: ProbeContext) -> Observation:
    corpus: Corpus = ctx.corpus
    return _expect_sets(ctx, [
        ("AccessionNumber=CPA00?", {"PatientID": IN_CORPUS, "AccessionNumber": "CPA00?"},
         corpus.uids("alpha-1", "alpha-2")),
        ("AccessionNumber=CP?001", {"PatientID": IN_CORPUS, "AccessionNumber": "CP?001"},
         corpus.where(lambda s: s.accession.endswith("001"))),
        ("AccessionNumber=CPA0?", {"PatientID": IN_CORPUS, "AccessionNumber": "CPA0?"},
         frozenset()),
        ("PatientName=CONFPROBE^?lpha", {"PatientName": "CONFPROBE^?lpha"},
         corpus.uids("alpha-1", "alpha-2")),
    ], "'?' queries")


def _dates(corpus: Corpus, low: str = "", high: str = "") -> frozenset[str]:
    return corpus.where(lambda s: (not low or s.study_date >= low)
                        and (not high or s.study_date <= high))


@probe("query.date-range", title="date range A-B",
       expected="'<date1>-<date2>' matches the dates between them, both included.",
       reference="PS3.4 C.2.2.2.5.1", needs_corpus=True)
def date_range(ctx: ProbeContext) -> Observation:
    corpus: Corpus = ctx.corpus
    return _expect_sets(ctx, [
        ("StudyDate=20100115-20200229", {"PatientID": IN_CORPUS,
                                         "StudyDate": "20100115-20200229"},
         _dates(corpus, "20100115", "20200229")),
        ("StudyDate=20160101-20171231", {"PatientID": IN_CORPUS,
                                         "StudyDate": "20160101-20171231"}, frozenset()),
    ], "closed date ranges")


@probe("query.date-range-open-start", title="date range -B",
       expected="'-<date>' matches that date and all earlier ones.",
       reference="PS3.4 C.2.2.2.5.1", needs_corpus=True)
def date_range_open_start(ctx: ProbeContext) -> Observation:
    corpus: Corpus = ctx.corpus
    return _expect_sets(ctx, [
        ("StudyDate=-20150620", {"PatientID": IN_CORPUS, "StudyDate": "-20150620"},
         _dates(corpus, high="20150620")),
    ], "open-start date ranges")


@probe("query.date-range-open-end", title="date range A-",
       expected="'<date>-' matches that date and all later ones.",
       reference="PS3.4 C.2.2.2.5.1", needs_corpus=True)
def date_range_open_end(ctx: ProbeContext) -> Observation:
    corpus: Corpus = ctx.corpus
    return _expect_sets(ctx, [
        ("StudyDate=20210704-", {"PatientID": IN_CORPUS, "StudyDate": "20210704-"},
         _dates(corpus, low="20210704")),
    ], "open-end date ranges")


@probe("query.time-range", title="time range",
       expected="'<time1>-<time2>', '-<time>' and '<time>-' match times within one day, "
                "bounds included.",
       reference="PS3.4 C.2.2.2.5.2", needs_corpus=True)
def time_range(ctx: ProbeContext) -> Observation:
    corpus: Corpus = ctx.corpus

    def times(low: str, high: str) -> frozenset[str]:
        return corpus.where(lambda s: low <= s.study_time <= high)

    return _expect_sets(ctx, [
        ("StudyTime=083000-120000", {"PatientID": IN_CORPUS, "StudyTime": "083000-120000"},
         times("083000", "120000")),
        ("StudyTime=-093000", {"PatientID": IN_CORPUS, "StudyTime": "-093000"},
         times("000000", "093000")),
        ("StudyTime=170000-", {"PatientID": IN_CORPUS, "StudyTime": "170000-"},
         times("170000", "235959")),
    ], "time ranges")


@probe("query.datetime-range", title="date and time ranges together",
       expected="Without combined date-time matching negotiated, a StudyDate range and a "
                "StudyTime range are matched each on its own (the time range on every day "
                "of the date range); with it, as one period from the first date and time "
                "to the last.",
       reference="PS3.4 C.2.2.2.5.4", needs_corpus=True)
def datetime_range(ctx: ProbeContext) -> Observation:
    corpus: Corpus = ctx.corpus
    keys = {"PatientID": IN_CORPUS, "StudyDate": "20100115-20180301",
            "StudyTime": "100000-120000"}
    separate = corpus.where(lambda s: "20100115" <= s.study_date <= "20180301"
                            and "100000" <= s.study_time <= "120000")
    combined = corpus.where(lambda s: "20100115100000" <= s.study_date + s.study_time
                            <= "20180301120000")
    result, found = _found(ctx, dict(keys))
    if not result.ok:
        return differs(f"the query failed: {result.error or result.status}")
    if found != separate:
        how = "as one period " if found == combined else ""
        return differs(f"without negotiation, matched {how}{_names(corpus, found)}; expected "
                       f"{_names(corpus, separate)}", datetime_matching="wrong")
    accepted, outcome = _negotiated_find(ctx, "STUDY", {**keys, "StudyInstanceUID": None},
                                         COMBINED_DATETIME)
    request = f"C-FIND STUDY (study root, combined date-time proposed) {_describe_keys(keys)}"
    if isinstance(outcome, str) or not outcome.ok:
        ctx.record(request, outcome if isinstance(outcome, str) else str(outcome.error))
        return conforms("date and time matched separately; the query proposing combined "
                        "date-time matching was not answered", datetime_matching="separate",
                        combined_negotiated=accepted)
    hits = frozenset(_study_uids(outcome, corpus))
    ctx.record(request, f"combined {'accepted' if accepted else 'not accepted'}; "
                        f"{outcome.status}; corpus matches: {_names(corpus, hits)}")
    if hits != (combined if accepted else separate):
        return differs(f"combined date-time {'accepted' if accepted else 'not accepted'}, "
                       f"but matched {_names(corpus, hits)}", datetime_matching="separate",
                       combined_negotiated=accepted)
    return conforms(f"date and time matched separately ({_names(corpus, found)})"
                    + ("; as one period once negotiated" if accepted else ""),
                    datetime_matching="separate", combined_negotiated=accepted)


@probe("query.uid-list", title="list of UID matching",
       expected="A backslash-separated list of Study Instance UIDs matches each study "
                "listed.",
       reference="PS3.4 C.2.2.2.2", needs_corpus=True)
def uid_list(ctx: ProbeContext) -> Observation:
    corpus: Corpus = ctx.corpus
    chosen = ("alpha-1", "beta", "latin1")
    uids = [corpus.study(k).study_uid for k in chosen]
    result, found = _found(ctx, {"StudyInstanceUID": uids, "PatientID": None})
    if not result.ok:
        return differs(f"the query failed: {result.error or result.status}")
    if found != corpus.uids(*chosen):
        return differs(f"expected {_names(corpus, uids)}, got {_names(corpus, found)}",
                       found=len(found))
    return conforms("the three listed studies matched, no other")


@probe("query.pn-case", title="PN case sensitivity",
       expected="Single value matching is case-sensitive; for PN an SCP may match "
                "case-insensitively, which its conformance statement must say.",
       reference="PS3.4 C.2.2.2.1.1", needs_corpus=True)
def pn_case(ctx: ProbeContext) -> Observation:
    corpus: Corpus = ctx.corpus
    exact = {"confprobe^beta": "beta", "CONFPROBE^Alpha": "alpha-1"}
    other_case = {"CONFPROBE^BETA": "beta", "confprobe^alpha": "alpha-1"}
    for name, key in exact.items():
        result, found = _found(ctx, {"PatientName": name})
        if not result.ok or corpus.study(key).study_uid not in found:
            return differs(f"the exact name {name!r} did not match its study",
                           pn_matching="broken")
    folded = []
    for name, key in other_case.items():
        result, found = _found(ctx, {"PatientName": name})
        if not result.ok:
            return differs(f"the query {name!r} failed: {result.error or result.status}")
        if corpus.study(key).study_uid in found:
            folded.append(name)
    result, found = _found(ctx, {"PatientName": "confprobe^a*"})
    wildcard = "case-insensitive" if corpus.study("alpha-1").study_uid in found else \
        "case-sensitive"
    if not folded:
        return conforms("PN matched case-sensitively", pn_matching="case-sensitive",
                        pn_wildcard=wildcard)
    if len(folded) == len(other_case):
        return differs("PN matched case-insensitively (allowed for PN, but a query finds "
                       "other studies than on a case-sensitive node)",
                       pn_matching="case-insensitive", pn_wildcard=wildcard)
    return differs(f"PN case folded for {folded} only", pn_matching="inconsistent",
                   pn_wildcard=wildcard)


@probe("query.pn-components", title="PN components and '^'",
       expected="A PN key is matched as the whole value: a family name alone does not match "
                "a name with a given name, nor 'Family^Given' one with a middle name.",
       reference="PS3.4 C.2.2.2.1; PS3.5 6.2.1", needs_corpus=True)
def pn_components(ctx: ProbeContext) -> Observation:
    corpus: Corpus = ctx.corpus
    judged = _expect_sets(ctx, [
        ("CONFPROBE (family only)", {"PatientName": "CONFPROBE"}, frozenset()),
        ("CONFPROBE^Gamma (no middle name)", {"PatientName": "CONFPROBE^Gamma"}, frozenset()),
        ("CONFPROBE^Gamma^Middle", {"PatientName": "CONFPROBE^Gamma^Middle"},
         corpus.uids("gamma")),
    ], "component queries")
    # facts only: PS3.5 6.2.1 lets trailing empty components be dropped, and PS3.4
    # C.2.2.2.1.1 leaves matching one group of a multi-group name to the implementation
    _, trailing = _found(ctx, {"PatientName": "CONFPROBE^Alpha^"})
    _, group = _found(ctx, {"PatientName": "Yamada^Tarou"})
    return Observation(judged.outcome, judged.observed, {
        **judged.facts,
        "trailing_caret_matches": corpus.study("alpha-1").study_uid in trailing,
        "alphabetic_group_matches": corpus.study("jis").study_uid in group,
    })


def _charset_probe(ctx: ProbeContext, key: str, charset: str | list[str]) -> Observation:
    """Query the study's full name in its own character set: exactly that study, and the
    name back as stored once decoded with the response's Specific Character Set."""
    corpus: Corpus = ctx.corpus
    study = corpus.study(key)
    keys = Dataset()
    keys.SpecificCharacterSet = charset
    keys.PatientName = study.patient_name
    keys.PatientID = IN_CORPUS
    result, found = _found(ctx, keys)
    if not result.ok:
        return differs(f"the query failed: {result.error or result.status}")
    if found != {study.study_uid}:
        return differs(f"expected {{{key}}}, got {_names(corpus, found)}",
                       found=sorted(corpus.key_of(u) for u in found))
    match = next(m for m in result.matches if str(m.get("StudyInstanceUID")) == study.study_uid)
    returned = _text(match, "PatientName")
    answered_in = match.get("SpecificCharacterSet", "")
    if isinstance(answered_in, list | tuple | MultiValue):
        answered_in = "\\".join(answered_in)
    if returned != study.patient_name:
        return differs(f"matched, but the name came back as {returned!r} "
                       f"(answered in {answered_in or 'the default repertoire'})",
                       returned=returned, answered_in=answered_in)
    return conforms(f"matched, name returned intact (answered in {answered_in or 'default'})",
                    answered_in=answered_in)


_CHARSET_EXPECTED = ("A name queried in {0} (Specific Character Set of the identifier) "
                     "matches the study stored with it, and the response gives the name "
                     "back intact in a character set it declares.")


@probe("query.charset-latin1", title="ISO_IR 100 name",
       expected=_CHARSET_EXPECTED.format("ISO_IR 100 (Latin-1)"),
       reference="PS3.4 C.2.2.2; PS3.5 6.1.2.5", needs_corpus=True)
def charset_latin1(ctx: ProbeContext) -> Observation:
    return _charset_probe(ctx, "latin1", LATIN1)


@probe("query.charset-utf8", title="ISO_IR 192 name",
       expected=_CHARSET_EXPECTED.format("ISO_IR 192 (UTF-8)"),
       reference="PS3.4 C.2.2.2; PS3.5 6.1.2.5", needs_corpus=True)
def charset_utf8(ctx: ProbeContext) -> Observation:
    return _charset_probe(ctx, "utf8", UTF8)


@probe("query.charset-jis", title="ISO 2022 IR 87 name",
       expected=_CHARSET_EXPECTED.format("ISO 2022 IR 87 (Japanese, three groups)"),
       reference="PS3.4 C.2.2.2; PS3.5 H.3.1", needs_corpus=True)
def charset_jis(ctx: ProbeContext) -> Observation:
    return _charset_probe(ctx, "jis", ["", JIS])


def _code_item(value: str | None) -> Dataset:
    item = Dataset()
    item.CodeValue = value or ""
    item.CodingSchemeDesignator = ""
    return item


@probe("query.sequence", title="sequence matching",
       expected="A sequence key with one item matches the entities with an item whose "
                "attributes all match (an optional key: an SCP may not support it, then "
                "it ignores the key and does not return it).",
       reference="PS3.4 C.2.2.2.6; C.2.2.1.3", needs_corpus=True)
def sequence(ctx: ProbeContext) -> Observation:
    corpus: Corpus = ctx.corpus
    keys = {"PatientID": IN_CORPUS, "ProcedureCodeSequence": Sequence([_code_item("CPX-HEAD")])}
    result, found = _found(ctx, keys)
    if not result.ok:
        return differs(f"the query failed: {result.error or result.status}")
    returned = [m.get("ProcedureCodeSequence") for m in result.matches
                if str(m.get("StudyInstanceUID", "")) in found]
    if found == corpus.uids("alpha-1"):
        items = returned[0] if returned else None
        value = str(items[0].get("CodeValue", "")) if items else ""
        if value != "CPX-HEAD":
            return differs(f"matched, but the item came back as {value!r}")
        return conforms("matched the one study with that code, and returned its item")
    if found == corpus.study_uids:
        return not_supported("the sequence key was ignored: every corpus study matched",
                             sequence_matching=False,
                             returned=any(bool(r) for r in returned))
    return differs(f"expected {{alpha-1}}, got {_names(corpus, found)}")


@probe("query.empty-value", title="empty values",
       expected="A zero-length key matches entities whose value is empty too; '\"\"' is "
                "Empty Value Matching only in recent editions and only when negotiated (it "
                "is not here), otherwise a literal value that matches no corpus name.",
       reference="PS3.4 C.2.2.2.3; C.2.2.1.2", needs_corpus=True)
def empty_value(ctx: ProbeContext) -> Observation:
    corpus: Corpus = ctx.corpus
    empty = corpus.uids("empty-name")
    result, found = _found(ctx, {"PatientID": IN_CORPUS, "PatientName": ""})
    if not result.ok:
        return differs(f"the query failed: {result.error or result.status}")
    if not empty <= found:
        return differs("a zero-length PatientName did not match the patient without a name")
    result, quoted = _found(ctx, {"PatientID": IN_CORPUS, "PatientName": '""'})
    if not result.ok:
        return differs(f"the '\"\"' query failed: {result.error or result.status}",
                       quoted="refused")
    if not quoted:
        return conforms("empty names match a zero-length key; '\"\"' matched nothing",
                        quoted="literal")
    if quoted == empty:
        return conforms("empty names match a zero-length key; '\"\"' matched the empty name "
                        "without negotiation", quoted="empty value matching")
    return differs(f"'\"\"' matched {_names(corpus, quoted)}", quoted="other")


@probe("query.extra-attributes", title="no unrequested attributes",
       expected="A response holds the requested keys and only the attributes C.4.1.1.3.2 "
                "adds (Query/Retrieve Level, Specific Character Set, Retrieve AE Title or "
                "File-Set ID/UID, Instance Availability, Timezone Offset).",
       reference="PS3.4 C.4.1.1.3.2", needs_corpus=True)
def extra_attributes(ctx: ProbeContext) -> Observation:
    requested = {"PatientID": IN_CORPUS, "StudyInstanceUID": None, "AccessionNumber": None}
    result, found = _found(ctx, requested)
    if not result.ok:
        return differs(f"the query failed: {result.error or result.status}")
    extra: set[str] = set()
    missing: set[str] = set()
    for match in result.matches:
        if str(match.get("StudyInstanceUID", "")) not in found:
            continue
        keywords = {e.keyword or str(e.tag) for e in match}
        extra |= keywords - set(requested) - ALLOWED_IN_RESPONSE
        missing |= set(requested) - keywords
    if not found:
        return differs("no corpus study matched")
    if missing:
        return differs(f"requested keys not returned: {sorted(missing)}",
                       missing=sorted(missing))
    if extra:
        return differs(f"unrequested attributes returned: {sorted(extra)}",
                       extra=sorted(extra))
    return conforms("responses held the requested keys and allowed attributes only")


# -- relational queries and the levels of each model ------------------------------------------


#: options of the C-FIND SOP class extended negotiation (PS3.4 C.5.1.1): byte index
RELATIONAL, COMBINED_DATETIME = 0, 1


def _negotiated_find(ctx: ProbeContext, level: str, keys: dict[str, Any],
                     option: int) -> tuple[bool, FindResult | str]:
    """A study root query on a pynetdicom association proposing one extended negotiation
    option (PS3.4 C.5.1.1): (did the SCP accept it?, the result or why there is none)."""
    client = ctx.node.dimse()
    sop_class = FIND_MODELS["study"]
    negotiation = SOPClassExtendedNegotiation()
    negotiation.sop_class_uid = sop_class
    negotiation.service_class_application_information = bytes([0] * option + [1])
    assoc = client.associate([build_context(sop_class)], ext_neg=[negotiation])
    try:
        if not assoc.accepted_contexts:
            return False, "the study root C-FIND context was refused"
        reply = assoc.acceptor.sop_class_extended.get(sop_class, b"")
        accepted = len(reply) > option and reply[option] == 1
        status, matches = None, []
        for answer, found in assoc.send_c_find(query_identifier(level, keys), sop_class):
            if answer is None or "Status" not in answer:
                return accepted, "no answer (association ended)"
            status = int(answer.Status)
            if status in (0xFF00, 0xFF01) and found is not None:
                matches.append(found)
    finally:
        if assoc.is_established:
            assoc.release()
    result = FindResult(Status(status), matches, 0.0,
                        None if status == 0 else f"status 0x{status:04X}")
    return accepted, result


@probe("query.relational", title="relational query",
       expected="A SERIES query without the study's unique key is a relational query, "
                "which needs relational-queries accepted in extended negotiation; a node "
                "that accepts it, or answers it right anyway, can serve it; one that "
                "refuses it or finds nothing without the negotiation does not support it.",
       reference="PS3.4 C.4.1.2.2.1; C.4.1.3.2", needs_corpus=True)
def relational(ctx: ProbeContext) -> Observation:
    corpus: Corpus = ctx.corpus
    keys = {"PatientID": IN_CORPUS, "Modality": "MR", "SeriesInstanceUID": None,
            "StudyInstanceUID": None}
    accepted, outcome = _negotiated_find(ctx, "SERIES", keys, RELATIONAL)
    request = f"C-FIND SERIES (study root, relational proposed) {_describe_keys(keys)}"
    if isinstance(outcome, str):
        ctx.record(request, outcome)
        return differs(f"relational query not answered: {outcome}", relational=accepted)
    hits = frozenset(_study_uids(outcome, corpus))
    ctx.record(request, f"relational {'accepted' if accepted else 'not accepted'}; "
                        f"{outcome.status}; corpus matches: {_names(corpus, hits)}")
    expected = corpus.where(lambda s: s.modality == "MR")
    if not outcome.ok:
        if accepted:
            return differs(f"relational accepted, but the query failed: {outcome.error}",
                           relational=True)
        return not_supported(f"relational queries not negotiated; the query was refused "
                             f"({outcome.error})", relational=False)
    if hits == expected:
        how = "accepted" if accepted else "not negotiated, answered anyway"
        return conforms(f"relational {how}: the MR series matched", relational=accepted,
                        lenient=not accepted)
    if not hits and not accepted:
        return not_supported("relational queries not negotiated; no match without the "
                             "study key (hierarchical)", relational=False)
    return differs(f"expected {_names(corpus, expected)}, got {_names(corpus, hits)}",
                   relational=accepted)


def _levels(ctx: ProbeContext, model: str) -> Observation:
    """A hierarchical walk of the two-study patient at each level of `model`."""
    corpus: Corpus = ctx.corpus
    first, second = corpus.study("alpha-1"), corpus.study("alpha-2")
    patient = {"PatientID": first.patient_id} if model == "patient" else {}
    cases: list[tuple[str, dict[str, Any], set[str], str]] = [
        ("STUDY", {**patient, "StudyInstanceUID": None,
                   **({} if patient else {"PatientID": first.patient_id})},
         {first.study_uid, second.study_uid}, "StudyInstanceUID"),
        ("SERIES", {**patient, "StudyInstanceUID": first.study_uid, "SeriesInstanceUID": None},
         {first.series_uid}, "SeriesInstanceUID"),
        ("IMAGE", {**patient, "StudyInstanceUID": first.study_uid,
                   "SeriesInstanceUID": first.series_uid, "SOPInstanceUID": None},
         {first.sop_uid}, "SOPInstanceUID"),
    ]
    if model == "patient":
        cases.insert(0, ("PATIENT", {"PatientID": first.patient_id, "PatientName": None},
                         {first.patient_id}, "PatientID"))
    try:
        ctx.node.dimse().find_association(model).release()
    except DimseConnectionError as exc:
        ctx.record(f"A-ASSOCIATE-RQ {model} root C-FIND", str(exc))
        return not_supported(f"{model} root C-FIND refused: {exc}", levels=[])
    right, wrong = [], []
    for level, keys, expected, unique in cases:
        result = _find(ctx, level, keys, model=model)
        got = {str(m.get(unique, "")) for m in result.matches}
        if result.ok and got == expected:
            right.append(level)
        else:
            wrong.append(f"{level}: {result.error or f'{len(got)} matches'}")
    facts: dict[str, Any] = {"levels": right}
    if model == "study":  # PATIENT is not a level of Study Root (PS3.4 C.6.2.1): a fact
        refused = not _find(ctx, "PATIENT", {"PatientID": first.patient_id}, model).ok
        facts["patient_level"] = "refused" if refused else "answered"
    if wrong:
        return differs("; ".join(wrong), **facts)
    return conforms(f"{', '.join(right)} answered as expected", **facts)


@probe("query.levels-patient-root", title="patient root levels",
       expected="Patient Root C-FIND answers at PATIENT, STUDY, SERIES and IMAGE level with "
                "the hierarchical search method.",
       reference="PS3.4 C.3.1; C.4.1.3.1.1; C.6.1", needs_corpus=True)
def levels_patient_root(ctx: ProbeContext) -> Observation:
    return _levels(ctx, "patient")


@probe("query.levels-study-root", title="study root levels",
       expected="Study Root C-FIND answers at STUDY, SERIES and IMAGE level with the "
                "hierarchical search method.",
       reference="PS3.4 C.3.2; C.4.1.3.1.1; C.6.2", needs_corpus=True)
def levels_study_root(ctx: ProbeContext) -> Observation:
    return _levels(ctx, "study")
