"""Ledgers of a site's archive hold keyed tokens, and reconciliation still works on them:
equal values match, an altered name or a wrong prefix is a finding, prefix rules hold.

The ledgers are written as a crawl writes them (tests/test_reconcile.py's `build`), with the
meta a crawl of a non-synthetic node sets; each file is read back with the sqlite3 shell."""

from __future__ import annotations

import json
import subprocess
import zlib
from pathlib import Path

import pytest
from pydicom import Dataset

from harness.errors import ConfigError
from harness.migration import ledger as ledger_module
from harness.migration.reconcile import reconcile
from harness.migration.rules import parse_rules
from tests.test_reconcile import _prefixed, build, changed, read_back_archive

SQLITE = "/usr/bin/sqlite3"


@pytest.fixture(scope="module")
def archive() -> list[Dataset]:
    """test_reconcile's synthetic archive, read back as a PACS would send it."""
    return read_back_archive()


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PACS_HARNESS_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def tokenised(path: Path, datasets: list[Dataset], prefixes: tuple[str, ...] = (),
              monkeypatch: pytest.MonkeyPatch | None = None) -> Path:
    """`build` with the meta of a crawl of a non-synthetic node (identities as tokens)."""
    create = ledger_module.Ledger.create.__func__

    def with_tokens(cls, where, meta):
        return create(cls, where, {**meta, "identities": "tokens",
                                   "identity_prefixes": json.dumps(sorted(prefixes))})

    assert monkeypatch is not None
    with monkeypatch.context() as patch:
        patch.setattr(ledger_module.Ledger, "create", classmethod(with_tokens))
        return build(path, datasets)


def dump(path: Path) -> str:
    """The whole file as the sqlite3 shell dumps it, plus the attributes of every instance
    unpacked with zlib (instance_attrs keeps them compressed, where a text search sees
    nothing)."""
    out = subprocess.run([SQLITE, "-readonly", str(path), ".dump"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "INSERT INTO instance_rows" in out.stdout, out.stderr
    attrs = subprocess.run([SQLITE, "-readonly", str(path),
                            "SELECT hex(attrs) FROM instance_attrs"], capture_output=True,
                           text=True, timeout=60)
    unpacked = []
    for packed in (bytes.fromhex(line) for line in attrs.stdout.split()):
        try:
            unpacked.append(zlib.decompress(packed).decode())
        except zlib.error:  # kept as text: compressing did not make it shorter
            unpacked.append(packed.decode())
    assert unpacked and all(text.startswith("{") for text in unpacked)
    return out.stdout + "\n".join(unpacked)


def identities(datasets: list[Dataset]) -> set[str]:
    values = set()
    for ds in datasets:
        values |= {str(ds.PatientID), str(ds.PatientName), str(ds.PatientBirthDate),
                   str(ds.PatientName).split("^")[0]}
    return {v for v in values if len(v) >= 4}


def test_tokenised_ledger_holds_no_identity_and_equal_data_matches(archive, tmp_path,
                                                                   monkeypatch, state_dir):
    source = tokenised(tmp_path / "s.sqlite", archive, monkeypatch=monkeypatch)
    target = tokenised(tmp_path / "t.sqlite", archive, monkeypatch=monkeypatch)
    text = dump(source)
    assert not [v for v in identities(archive) if v in text]
    assert "pt-" in text and "nm-" in text and "dob-" in text
    assert reconcile(source, target).verdict == "pass"
    key = state_dir / "identity-token.key"
    assert key.stat().st_mode & 0o777 == 0o600 and key.read_bytes().hex() not in text


def test_altered_name_is_a_finding_by_token(archive, tmp_path, monkeypatch):
    victim = str(archive[0].PatientID)

    def rename(items):
        for ds in items:
            if ds.PatientID == victim:
                ds.PatientName = str(ds.PatientName) + "X"
        return items

    findings = reconcile(tokenised(tmp_path / "s.sqlite", archive, monkeypatch=monkeypatch),
                         tokenised(tmp_path / "t.sqlite", changed(archive, rename),
                                   monkeypatch=monkeypatch))
    assert findings.verdict == "fail"
    (change,) = [f for f in findings.findings if "PatientName" in f.attributes]
    before, after = (change.attributes["PatientName"][k] for k in ("before", "after"))
    assert before.startswith("nm-") and after.startswith("nm-") and before != after
    assert change.patient_id.startswith("pt-")


def test_prefix_rules_hold_on_tokens(archive, tmp_path, monkeypatch):
    issuers = sorted({ds.IssuerOfPatientID for ds in archive})
    prefixes = {issuer: f"F{n}-" for n, issuer in enumerate(issuers)}
    rules = parse_rules("prefix:\n  by_issuer:\n" + "".join(
        f"    {i}: {p}\n" for i, p in prefixes.items()), "rules.yaml")
    kept = tuple(prefixes.values())
    source = tokenised(tmp_path / "s.sqlite", archive, kept, monkeypatch)
    target = tokenised(tmp_path / "t.sqlite", changed(archive, lambda i: _prefixed(i, prefixes)),
                       kept, monkeypatch)
    assert "F0-pt-" in dump(target)
    assert reconcile(source, target, rules).verdict == "pass"
    assert reconcile(source, target).verdict == "fail"  # without the rule: altered IDs
    wrong = tokenised(tmp_path / "w.sqlite",
                      changed(archive, lambda i: _prefixed(i, dict.fromkeys(issuers, "ZZ-"))),
                      kept, monkeypatch)
    assert reconcile(source, wrong, rules).verdict == "fail"


def test_a_clear_and_a_tokenised_ledger_are_not_compared(archive, tmp_path, monkeypatch):
    clear = build(tmp_path / "c.sqlite", archive)
    tokens = tokenised(tmp_path / "t.sqlite", archive, monkeypatch=monkeypatch)
    with pytest.raises(ConfigError, match="crawl both the same way"):
        reconcile(clear, tokens)


def test_free_text_private_and_nested_values_are_tokens_and_a_change_is_found(
        archive, tmp_path, monkeypatch):
    """A site writes names into comments, private tags and request items: none of that is
    in clear in a tokenised ledger (the canary check found it was), and altering it is still
    one finding, by token."""
    secret = "Zorblax^Quintessa"

    def plant(items):
        for ds in items:
            ds.ImageComments = f"seen by {secret}"
            block = ds.private_block(0x0009, "SITE NOTES", create=True)
            block.add_new(0x01, "LO", secret)
            item = Dataset()
            item.RequestedProcedureDescription = f"for {secret}"
            ds.RequestAttributesSequence = [item]
        return items

    planted = changed(archive, plant)
    source = tokenised(tmp_path / "s.sqlite", planted, monkeypatch=monkeypatch)
    text = dump(source)
    assert "Zorblax" not in text and "Quintessa" not in text
    assert "tx-" in text

    def edit_one(items):
        items[0].ImageComments = "seen by nobody"
        return items

    target = tokenised(tmp_path / "t.sqlite", changed(planted, edit_one), monkeypatch=monkeypatch)
    findings = reconcile(source, target)
    (change,) = [f for f in findings.findings if "ImageComments" in f.attributes]
    before, after = (change.attributes["ImageComments"][k] for k in ("before", "after"))
    assert before.startswith("tx-") and after.startswith("tx-") and before != after
