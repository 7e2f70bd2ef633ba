"""Rollups: the instances the SQL passes (reconcile.py) kept, turned into findings so that one
defect is one finding.

- missing/extra: a series whose every instance is missing (and whose UID the other side does
  not have) is one `missing_series` finding listing its instances; likewise a study whose
  every series is missing, and a patient whose every study is missing. Anything smaller is one
  `missing_instance` finding per instance. `extra_*` mirror this on the target.
- duplicate: an extra target instance with the same attributes (apart from SOP Instance UID)
  and pixels as another instance is one `duplicate_instance` finding, not an extra.
- reassignment: a study (all of its instances) now filed under another *source* patient is one
  `study_reassignment` (patient attributes then not reported again); when every study of a
  patient went to the same other patient it is one `patient_reassignment`. A merge the rules
  declare (`patient_merges`, an HL7 ADT^A40 the target applied) is no reassignment: the
  prior patient's studies under the survivor, with the survivor's identity, are no finding.
- altered: instances with the same difference (same attributes, same before and after) are
  reported once for the highest entity they cover entirely (patient, study, series, else each
  instance), but not higher than the level the attributes belong to (StudyDate at most study,
  Modality at most series). `altered_pixels` rolls up the same way.
- recompressed_lossy: pixels or LossyImageCompression that show a lossy recompression (see
  `_lossy`) are that finding, not altered_pixels/altered_attributes. The transfer syntax
  itself is never compared: content is (docs/verification.md).

Split from reconcile.py because it works in Python on the few rows the SQL passes kept, and
is most of the code; `Rollups` holds the state the reconciler's steps share.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

from harness.migration.findings import Finding
from harness.migration.ledger import attrs_text
from harness.migration.normalise import (
    IDENTITY_COLUMNS,
    INSTANCE_COLUMNS,
    KEY_ATTRS,
    PATIENT_ATTRS,
    SERIES_ATTRS,
    STUDY_ATTRS,
)
from harness.migration.rules import LOSSLESS_SYNTAXES, Rules

#: Attributes a lossy compression sets (PS3.3 C.7.6.1.1.5); reported as recompressed_lossy.
LOSSY_ATTRS = frozenset({"LossyImageCompression", "LossyImageCompressionRatio",
                         "LossyImageCompressionMethod"})
_COMPARED_WHEN_NOT_RETRIEVED = (*KEY_ATTRS, *IDENTITY_COLUMNS, "SOPClassUID")
_CHUNK = 500  # UIDs per IN (...) list


def _in_chunks(conn: sqlite3.Connection, sql: str, values: Iterable[Any]) -> list[tuple]:
    """Run `sql` (with one `{}` for an IN list) over `values` in chunks."""
    values = list(values)
    rows: list[tuple] = []
    for start in range(0, len(values), _CHUNK):
        chunk = values[start:start + _CHUNK]
        rows.extend(conn.execute(sql.format(", ".join("?" * len(chunk))), chunk))
    return rows


class Rollups:
    """One reconciliation's findings and warnings, and the steps that roll instances up."""

    def __init__(self, conn: sqlite3.Connection, rules: Rules) -> None:
        self.conn = conn
        self.rules = rules
        self.findings: list[Finding] = []
        self.warnings: list[str] = []
        self.study_patient: dict[str, dict[str, tuple[str, str]]] = {"s": {}, "t": {}}
        self.altered_studies: set[str] = set()

    def patient_of(self, alias: str, study_uid: str, fallback: tuple[str, str]
                   ) -> tuple[str, str]:
        cache = self.study_patient[alias]
        if study_uid not in cache:
            row = self.conn.execute(
                f"SELECT patient_id, issuer FROM {alias}.studies WHERE study_uid = ?",
                (study_uid,)).fetchone()
            cache[study_uid] = (row[0], row[1]) if row else fallback
        return cache[study_uid]

    # -- missing and extra --------------------------------------------------------------
    def absent(self, kind: str, side: str, other: str, rows: list[tuple[str, str, str, str, str]]
               ) -> None:
        """Roll up instances of `side` that `other` lacks into patient/study/series findings."""
        if not rows:
            return
        by_series: dict[str, list[tuple]] = defaultdict(list)
        for row in rows:
            by_series[row[1]].append(row)
        series_total = dict(_in_chunks(
            self.conn, f"SELECT series_uid, count(*) FROM {side}.instances "
                       "WHERE series_uid IN ({}) GROUP BY series_uid", by_series))
        on_other = {r[0] for r in _in_chunks(
            self.conn, f"SELECT DISTINCT series_uid FROM {other}.instances "
                       "WHERE series_uid IN ({})", by_series)}
        full_series = {s for s, items in by_series.items()
                       if len(items) == series_total.get(s) and s not in on_other}

        study_of = {s: by_series[s][0][2] for s in by_series}
        full_by_study: dict[str, set[str]] = defaultdict(set)
        for s in full_series:
            full_by_study[study_of[s]].add(s)
        study_series = dict(_in_chunks(
            self.conn, f"SELECT study_uid, count(DISTINCT series_uid) FROM {side}.instances "
                       "WHERE study_uid IN ({}) GROUP BY study_uid", full_by_study))
        study_on_other = {r[0] for r in _in_chunks(
            self.conn, f"SELECT DISTINCT study_uid FROM {other}.instances "
                       "WHERE study_uid IN ({})", full_by_study)}
        full_studies = {st for st, series in full_by_study.items()
                        if len(series) == study_series.get(st) and st not in study_on_other}

        patient = {st: self.patient_of(side, st, (by_series[next(iter(ss))][0][3],
                                                  by_series[next(iter(ss))][0][4]))
                   for st, ss in full_by_study.items()}
        full_by_patient: dict[tuple[str, str], set[str]] = defaultdict(set)
        for st in full_studies:
            full_by_patient[patient[st]].add(st)
        full_patients = set()
        for key, studies in full_by_patient.items():
            total = self.conn.execute(
                f"SELECT count(*) FROM {side}.studies st WHERE patient_id = ? AND issuer = ? "
                f"AND EXISTS (SELECT 1 FROM {side}.instances i WHERE i.study_uid = st.study_uid)",
                key).fetchone()[0]
            if len(studies) == total:
                full_patients.add(key)

        def uids(series_set: Iterable[str]) -> list[str]:
            return sorted(r[0] for s in series_set for r in by_series[s])

        where = "target" if kind == "missing" else "source"
        for key in sorted(full_patients):
            studies = sorted(full_by_patient[key])
            series = [s for st in studies for s in full_by_study[st]]
            self.findings.append(Finding(
                f"{kind}_patient", "patient", key[0], key[1], sop_uids=uids(series),
                instances=len(uids(series)), related={"studies": studies},
                detail=f"patient {key[0]!r} ({len(studies)} studies) is not on the {where}"))
        for st in sorted(full_studies):
            if patient[st] in full_patients:
                continue
            series = sorted(full_by_study[st])
            self.findings.append(Finding(
                f"{kind}_study", "study", *patient[st], study_uid=st, sop_uids=uids(series),
                instances=len(uids(series)), related={"series": series},
                detail=f"study {st} ({len(series)} series) is not on the {where}"))
        def patient_of(row: tuple) -> tuple[str, str]:
            return self.patient_of(side, row[2], (row[3], row[4]))

        for s in sorted(full_series):
            st = study_of[s]
            if st in full_studies:
                continue
            self.findings.append(Finding(
                f"{kind}_series", "series", *patient_of(by_series[s][0]), study_uid=st,
                series_uid=s,
                sop_uids=uids([s]), instances=len(by_series[s]),
                detail=f"series {s} ({len(by_series[s])} instances) is not on the {where}"))
        for s, items in sorted(by_series.items()):
            if s in full_series:
                continue
            for row in sorted(items):
                sop, series_uid, study_uid = row[:3]
                self.findings.append(Finding(
                    f"{kind}_instance", "instance", *patient_of(row), study_uid=study_uid,
                    series_uid=series_uid, sop_uid=sop, sop_uids=[sop],
                    detail=f"instance {sop} is not on the {where}"))

    def missing_and_extra(self) -> tuple[int, int]:
        cols = "a.sop_uid, a.series_uid, a.study_uid, a.patient_id, a.issuer"
        missing = self.conn.execute(
            f"SELECT {cols} FROM cand c CROSS JOIN s.instances a ON a.sop_uid = c.sop_uid "
            "WHERE c.missing").fetchall()
        self.absent("missing", "s", "t", missing)

        extras = self.conn.execute(
            f"SELECT {cols.replace('a.', 'b.')}, r.attrs_digest, r.pixel_digest "
            "FROM extra e CROSS JOIN t.instances b ON b.sop_uid = e.sop_uid "
            "CROSS JOIN t.instance_rows r ON r.sop_uid = e.sop_uid").fetchall()
        plain = []
        for sop, series, study, pid, issuer, attrs_digest, pixels in extras:
            original = self._duplicate_of(sop, attrs_digest, pixels)
            if original is None:
                plain.append((sop, series, study, pid, issuer))
                continue
            self.findings.append(Finding(
                "duplicate_instance", "instance", pid, issuer, study_uid=study, series_uid=series,
                sop_uid=sop, sop_uids=[sop], related={"duplicate_of": original},
                detail=f"instance {sop} has the content of {original} under a new SOP "
                       "Instance UID"))
        self.absent("extra", "t", "s", plain)
        return len(missing), len(extras)

    def _duplicate_of(self, sop: str, attrs_digest: bytes | None, pixels: bytes | None
                      ) -> str | None:
        if attrs_digest is None:
            return None  # only known from C-FIND: too little to call it a duplicate
        for alias in ("t", "s"):
            row = self.conn.execute(
                f"SELECT sop_uid FROM {alias}.instance_rows WHERE attrs_digest = ? "
                "AND pixel_digest IS ? AND sop_uid != ? "
                "AND sop_uid NOT IN (SELECT sop_uid FROM extra) LIMIT 1",
                (attrs_digest, pixels, sop)).fetchone()
            if row:
                return row[0]
        return None

    # -- altered ----------------------------------------------------------------------
    def _diff(self, a: dict[str, Any], b: dict[str, Any]) -> tuple[dict[str, tuple], bool]:
        """Attribute differences the rules do not allow, and whether pixels changed.

        The transfer syntax is never compared by itself: it is an encoding (PS3.5 10), and
        retrieval may change it (a PACS decompressing for an SCU that did not offer the stored
        syntax). What a syntax change can lose shows in the decoded pixels, and a lossy
        recompression is told apart by `_lossy` (recompressed_lossy)."""
        rules = self.rules
        ja, jb = json.loads(a["attrs_json"]), json.loads(b["attrs_json"])
        both = a["retrieved"] and b["retrieved"]
        names = (set(ja) | set(jb)) if both else set(_COMPARED_WHEN_NOT_RETRIEVED)
        diff = {}
        for name in names:
            before, after = ja.get(name), jb.get(name)
            if before == after:
                continue
            if not both and (before is None or after is None) and name == "SOPClassUID":
                continue  # not every node answers SOPClassUID in C-FIND
            diff[name] = (before, after)
        pixels_changed = False
        if both and a["pixel_digest"] != b["pixel_digest"]:
            if a["pixel_mode"] == b["pixel_mode"]:
                pixels_changed = True
            else:
                self.warnings.append(f"instance {a['sop_uid']}: pixels decoded on one side "
                                     "only, not compared")
        merged = rules.merge_allowed(a["patient_id"], a["issuer"], b["patient_id"])
        if "PatientID" not in rules.ignore and not merged and not rules.patient_id_allowed(
                a["patient_id"], a["issuer"], b["patient_id"]):
            diff["PatientID"] = (a["patient_id"], b["patient_id"])  # e.g. a required prefix
        allowed = set()
        for name, (before, after) in diff.items():
            if merged and name in PATIENT_ATTRS:
                allowed.add(name)  # a declared merge: the survivor's identity (HL7 ADT^A40)
            elif name in rules.ignore:
                allowed.add(name)
            elif name in rules.added and before is None:
                allowed.add(name)
            elif name == "PatientID" and rules.patient_id_allowed(
                    str(before or ""), a["issuer"], str(after or "")):
                allowed.add(name)
            elif name == "SpecificCharacterSet" and rules.charset_conversion:
                allowed.add(name)
        return {k: v for k, v in diff.items() if k not in allowed}, pixels_changed

    def _other_source_patient(self, pair: dict[str, Any]) -> tuple[str, str] | None:
        """The other source patient a target instance is now filed under, if any."""
        a, b = pair["a"], pair["b"]
        candidates = self.rules.source_patient_ids(b["patient_id"])
        rows = _in_chunks(self.conn, "SELECT patient_id, issuer FROM s.patients "
                                     "WHERE patient_id IN ({})", sorted(candidates))
        rows = [r for r in rows if (r[0], r[1]) != (a["patient_id"], a["issuer"])]
        if not rows:
            return None
        same_issuer = [r for r in rows if r[1] == b["issuer"]]
        return tuple((same_issuer or rows)[0])

    def altered(self) -> int:
        cols = ", ".join(f"{alias}.{c}" for alias in ("a", "b") for c in INSTANCE_COLUMNS)
        cur = self.conn.execute(
            f"SELECT {cols}, ja.attrs, jb.attrs FROM cand c "
            "CROSS JOIN s.instances a ON a.sop_uid = c.sop_uid "
            "CROSS JOIN t.instances b ON b.sop_uid = c.sop_uid "
            "JOIN s.instance_attrs ja ON ja.sop_uid = c.sop_uid "
            "JOIN t.instance_attrs jb ON jb.sop_uid = c.sop_uid "
            "WHERE NOT c.missing")
        n = len(INSTANCE_COLUMNS)
        pairs = []
        for values in cur:
            a = dict(zip(INSTANCE_COLUMNS, values[:n], strict=True))
            b = dict(zip(INSTANCE_COLUMNS, values[n:2 * n], strict=True))
            a["attrs_json"] = attrs_text(values[2 * n])
            b["attrs_json"] = attrs_text(values[2 * n + 1])
            if a["retrieval_error"] is not None or b["retrieval_error"] is not None:
                continue  # reported as unretrievable; nothing to compare it with
            diff, pixels = self._diff(a, b)
            lossy = _lossy(a, b, diff, pixels)
            if lossy:
                diff = {k: v for k, v in diff.items() if k not in LOSSY_ATTRS}
            if diff or pixels or lossy:
                a["patient"] = self.patient_of("s", a["study_uid"], (a["patient_id"], a["issuer"]))
                del a["attrs_json"], b["attrs_json"]  # memory: keep what the findings need
                pairs.append({"a": a, "b": b, "diff": diff, "pixels": pixels and not lossy,
                              "lossy": lossy})
        if not pairs:
            return 0
        self.altered_studies = {p["a"]["study_uid"] for p in pairs}
        compared = self._compared_counts({p["a"]["patient"] for p in pairs})
        self._reassignments(pairs, compared)
        self._rollup_altered(pairs, compared)
        return len({p["a"]["sop_uid"] for p in pairs if p["diff"] or p["pixels"]
                    or p["lossy"] or p.get("reassigned")})

    def _compared_counts(self, patients: set[tuple[str, str]]) -> dict[str, Any]:
        """Instances present on both sides, per series, study and patient (for rollups)."""
        studies: dict[str, tuple[str, str]] = {}
        for key in patients:
            for (uid,) in self.conn.execute(
                    "SELECT study_uid FROM s.studies WHERE patient_id = ? AND issuer = ?", key):
                studies[uid] = key
        counts: dict[str, Any] = {"series": Counter(), "study": Counter(), "patient": Counter(),
                                  "studies_of": defaultdict(set)}
        for study, series, number in _in_chunks(
                self.conn, "SELECT a.study_uid, a.series_uid, count(*) FROM s.instances a "
                           "JOIN t.instances b ON b.sop_uid = a.sop_uid "
                           "WHERE a.study_uid IN ({}) GROUP BY 1, 2", studies):
            counts["series"][series] += number
            counts["study"][study] += number
            counts["patient"][studies[study]] += number
            counts["studies_of"][studies[study]].add(study)
        return counts

    def _reassignments(self, pairs: list[dict[str, Any]], compared: dict[str, Any]) -> None:
        by_study: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for pair in pairs:
            if "PatientID" in pair["diff"]:
                other = self._other_source_patient(pair)
                if other is not None:
                    pair["to"] = other
                    by_study[pair["a"]["study_uid"]].append(pair)
        moved: dict[str, tuple[str, str]] = {}
        for study, items in by_study.items():
            targets = {p["to"] for p in items}
            if len(targets) == 1 and len(items) == compared["study"][study]:
                moved[study] = next(iter(targets))
        by_patient: dict[tuple[str, str], list[str]] = defaultdict(list)
        for study in moved:
            by_patient[by_study[study][0]["a"]["patient"]].append(study)
        for source_patient, studies in sorted(by_patient.items()):
            targets = {moved[s] for s in studies}
            whole = set(studies) == compared["studies_of"][source_patient] and len(targets) == 1
            example = by_study[studies[0]][0]
            changes = {k: {"before": v[0], "after": v[1]} for k, v in example["diff"].items()
                       if k in PATIENT_ATTRS}
            groups = [studies] if whole else [[s] for s in sorted(studies)]
            for group in groups:
                to = moved[group[0]]
                sops = sorted(p["a"]["sop_uid"] for s in group for p in by_study[s])
                kind = "patient_reassignment" if whole else "study_reassignment"
                self.findings.append(Finding(
                    kind, "patient" if whole else "study", *source_patient,
                    study_uid="" if whole else group[0], instances=len(sops), sop_uids=sops,
                    attributes=changes,
                    related={"from_patient": {"patient_id": source_patient[0],
                                              "issuer": source_patient[1]},
                             "to_patient": {"patient_id": to[0], "issuer": to[1]},
                             "studies": sorted(group)},
                    detail=(f"{'all studies of ' if whole else 'study ' + group[0] + ' of '}"
                            f"patient {source_patient[0]!r} now under patient {to[0]!r}")))
            for study in studies:
                for pair in by_study[study]:
                    pair["reassigned"] = True
                    pair["diff"] = {k: v for k, v in pair["diff"].items()
                                    if k not in PATIENT_ATTRS}

    def _rollup_altered(self, pairs: list[dict[str, Any]], compared: dict[str, Any]) -> None:
        groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for pair in pairs:
            if pair["diff"]:
                signature = json.dumps(sorted(pair["diff"].items()), default=str)
                groups[("altered_attributes", signature)].append(pair)
            if pair["pixels"]:
                groups[("altered_pixels", "")].append(pair)
            if pair["lossy"]:
                groups[("recompressed_lossy", "")].append(pair)
        for (kind, _), items in groups.items():
            cap = _cap_level(items[0]["diff"]) if kind == "altered_attributes" else 0
            self._rollup_group(kind, items, compared, cap)

    def _rollup_group(self, kind: str, items: list[dict[str, Any]], compared: dict[str, Any],
                      cap: int) -> None:
        remaining = list(items)
        keys = (
            ("patient", lambda p: p["a"]["patient"]),
            ("study", lambda p: p["a"]["study_uid"]),
            ("series", lambda p: p["a"]["series_uid"]),
        )
        for level_index, (level, key_of) in enumerate(keys):
            if level_index < cap:
                continue
            grouped: dict[Any, list[dict[str, Any]]] = defaultdict(list)
            for pair in remaining:
                grouped[key_of(pair)].append(pair)
            kept = []
            for key, members in grouped.items():
                if len(members) == compared[level][key] and len(members) > 1:
                    self._altered_finding(kind, level, members)
                else:
                    kept.extend(members)
            remaining = kept
        for pair in remaining:
            self._altered_finding(kind, "instance", [pair])

    def _altered_finding(self, kind: str, level: str, members: list[dict[str, Any]]) -> None:
        first = members[0]["a"]
        diff = members[0]["diff"] if kind == "altered_attributes" else {}
        sops = sorted(m["a"]["sop_uid"] for m in members)
        where = {"patient": f"patient {first['patient'][0]!r}",
                 "study": f"study {first['study_uid']}",
                 "series": f"series {first['series_uid']}",
                 "instance": f"instance {first['sop_uid']}"}[level]
        if kind == "altered_pixels":
            detail = f"pixel data of {where} changed ({len(sops)} instance(s))"
        elif kind == "recompressed_lossy":
            detail = (f"{where} recompressed with loss ({len(sops)} instance(s)): "
                      f"{members[0]['lossy']}")
        else:
            detail = f"{', '.join(sorted(diff))} changed on {where} ({len(sops)} instance(s))"
        self.findings.append(Finding(
            kind, level, *first["patient"],
            study_uid=first["study_uid"] if level != "patient" else "",
            series_uid=first["series_uid"] if level in ("series", "instance") else "",
            sop_uid=first["sop_uid"] if level == "instance" else "",
            instances=len(sops), sop_uids=sops,
            attributes={k: {"before": v[0], "after": v[1]} for k, v in sorted(diff.items())},
            related=_pixel_details(members) if kind != "altered_attributes" else {},
            detail=detail))


def _pixel_details(members: list[dict[str, Any]]) -> dict[str, Any]:
    """Transfer syntaxes before and after (a lossy recompression shows here)."""
    syntaxes = Counter((m["a"]["transfer_syntax"], m["b"]["transfer_syntax"]) for m in members)
    return {"transfer_syntax": [{"before": a, "after": b, "instances": n}
                                for (a, b), n in sorted(syntaxes.items(), key=str)]}


def _lossy(a: dict[str, Any], b: dict[str, Any], diff: dict[str, tuple], pixels: bool) -> str:
    """Why the target copy looks lossily recompressed ('' when it does not): the source
    says its pixels were never lossily compressed and the target says they were
    (LossyImageCompression "01", PS3.3 C.7.6.1.1.5), or the pixels differ and only the
    target's known transfer syntax is a lossy one."""
    before, after = diff.get("LossyImageCompression", (None, None))
    if after == "01" and before != "01":
        return f"LossyImageCompression {before!r} -> {after!r}"
    ts_a, ts_b = a["transfer_syntax"], b["transfer_syntax"]
    if pixels and ts_a and ts_b and ts_a in LOSSLESS_SYNTAXES and ts_b not in LOSSLESS_SYNTAXES:
        return f"transfer syntax {ts_a} -> {ts_b} (lossy) and the pixels differ"
    return ""


def _cap_level(diff: dict[str, tuple]) -> int:
    """How high a shared difference may roll up: 0 patient, 1 study, 2 series."""
    level = 0
    for name in diff:
        if name in STUDY_ATTRS:
            level = max(level, 1)
        elif name in SERIES_ATTRS:
            level = max(level, 2)
    return level
