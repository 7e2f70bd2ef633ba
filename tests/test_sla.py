"""SLA contracts: parsing with file:line errors, a passing and an impossible clause, evidence."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from harness.errors import ConfigError
from harness.fixtures import pacs_cluster_factory
from harness.launch.tools import find_binary
from harness.performance.sla import evaluate, parse_contract, verify_evidence, write_evidence
from tests.helpers import run_cli

CONTRACT = """
name: ci
workloads:
  read:
    duration_s: 3
    warmup_s: 1
    dataset: {studies: 2, instances_per_study: 3, scale: tiny}
    groups:
      - {name: find, operation: c-find, level: STUDY, users: 1}
      - {name: store, operation: c-store, users: 1, instances: 2}
clauses:
  - {id: find-p99, metric: latency, percentile: 99, operation: find, threshold: "<= 10 s",
     workload: read}
  - {id: impossible, metric: throughput, operation: store, threshold: ">= 1000000 instances/s",
     workload: read, description: deliberately impossible}
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (CONTRACT.replace('"<= 10 s"', '"<= 10 parsecs"'), "c.yaml:12: clauses.0.threshold: unit"),
        (CONTRACT.replace("percentile: 99, ", ""), "c.yaml:12: clauses.0.percentile: latency"),
        (CONTRACT.replace("operation: find,", "operation: fnd,"), "c.yaml:12: clauses.0.operation"),
        (CONTRACT.replace("workload: read}", "workload: raed}"), "c.yaml:13: clauses.0.workload"),
        (CONTRACT.replace("users: 1}", "users: x}", 1), "c.yaml:9: workloads.read.groups.0.users"),
    ],
)
def test_contract_errors_name_file_line_field(text, message):
    with pytest.raises(ConfigError) as caught:
        parse_contract(text, "c.yaml")
    assert str(caught.value).startswith(message), str(caught.value)


cluster = pacs_cluster_factory("name: sla\nnodes:\n  t: {kind: orthanc, ae_title: SLA}\n",
                               scope="module", requires=("Orthanc",))


def test_passing_and_impossible_clause_with_evidence(cluster, tmp_path):
    contract = parse_contract(CONTRACT, "c.yaml")
    verdicts = evaluate(contract, cluster.node("t"))
    by_id = {v.clause: v for v in verdicts}
    assert by_id["find-p99"].verdict == "pass", by_id["find-p99"].message
    impossible = by_id["impossible"]
    assert impossible.verdict == "fail"
    assert 0 < impossible.measured < 1_000_000
    assert "required >= 1e+06 instances/s: fail" in impossible.message
    document = write_evidence(tmp_path / "evidence.json", contract, verdicts)
    saved = json.loads((tmp_path / "evidence.json").read_text())
    assert saved == json.loads(json.dumps(document)) and saved["verdict"] == "fail"
    assert verify_evidence(saved)
    clause = saved["clauses"][1]
    assert clause["node"]["name"] == "t" and clause["harness_version"] and clause["time"]
    assert clause["workload"]["name"] == "read"
    saved["clauses"][1]["measured"] = 2_000_000  # an edited verdict no longer verifies
    assert not verify_evidence(saved)


def test_sla_cli_exits_1_on_a_failed_clause(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from harness.cli.load import sla_command

    if not find_binary("Orthanc"):
        pytest.skip("Orthanc not installed")
    topology = tmp_path / "topo.yaml"
    topology.write_text("name: slacli\nnodes:\n  t: {kind: orthanc, ae_title: SLACLI}\n")
    contract = tmp_path / "contract.yaml"
    contract.write_text(CONTRACT)
    env = {**os.environ, "PACS_HARNESS_STATE_DIR": str(tmp_path / "state")}
    monkeypatch.setenv("PACS_HARNESS_STATE_DIR", env["PACS_HARNESS_STATE_DIR"])
    up = run_cli("up", "--topology", str(topology), env=env)
    assert up.returncode == 0, up.stderr
    try:
        evidence = tmp_path / "ev.json"
        made = run_cli("keygen", str(tmp_path / "key"))
        # the key from the environment, as PEM text (a CI secret)
        monkeypatch.setenv("PACS_HARNESS_SIGNING_KEY", (tmp_path / "key").read_text())
        result = CliRunner().invoke(sla_command, [
            "--contract", str(contract), "--node", "t", "--topology", str(topology),
            "--evidence", str(evidence)])
        assert result.exit_code == 1, result.output
        assert "FAIL impossible" in result.output and "PASS find-p99" in result.output
        assert json.loads(evidence.read_text())["verdict"] == "fail"
        assert f"signed (Ed25519, public key {made.stdout.strip()})" in result.output
        verified = run_cli("sla", "verify", str(evidence), "--public-key", made.stdout.strip())
        assert verified.returncode == 0, verified.stdout + verified.stderr
        bad = CliRunner().invoke(sla_command, [
            "--contract", str(tmp_path / "nope.yaml"), "--node", "t"])
        assert isinstance(bad.exception, ConfigError)
    finally:
        run_cli("down", "--topology", str(topology), env=env)


# ---------------------------------------------------------------------------------------
# Signed evidence: a real run signed, verified, edited, re-signed with another key

SHORT = CONTRACT.replace("duration_s: 3", "duration_s: 2")
embedded = pacs_cluster_factory("name: slasig\nnodes:\n  e: {kind: embedded, ae_title: SLASIG}\n",
                                scope="module")


@pytest.fixture(scope="module")
def signed(embedded, tmp_path_factory):
    """Evidence of a real run against the embedded PACS, signed with a key from `keygen`."""
    from harness.report.signing import load_private_key

    home = tmp_path_factory.mktemp("signed")
    made = run_cli("keygen", str(home / "key"))
    assert made.returncode == 0, made.stderr
    contract = parse_contract(SHORT, "c.yaml")
    verdicts = evaluate(contract, embedded.node("e"))
    write_evidence(home / "evidence.json", contract, verdicts,
                   load_private_key(home / "key"))
    return home, made.stdout.strip()


def _edited_copy(home, name, edit) -> str:
    document = json.loads((home / "evidence.json").read_text())
    edit(document)
    (home / name).write_text(json.dumps(document, indent=2))
    return str(home / name)


def test_keygen_makes_a_private_key_only_its_owner_reads(signed):
    home, public_b64 = signed
    assert oct((home / "key").stat().st_mode & 0o777) == "0o600"
    assert "PRIVATE KEY" in (home / "key").read_text()
    again = run_cli("keygen", str(home / "key"))
    assert again.returncode == 2 and "never overwrites" in again.stderr


def test_signed_evidence_verifies_with_the_pinned_and_the_embedded_key(signed):
    home, public_b64 = signed
    pinned = run_cli("sla", "verify", str(home / "evidence.json"), "--public-key", public_b64)
    assert pinned.returncode == 0, pinned.stdout + pinned.stderr
    assert "integrity and origin (pinned key)" in pinned.stdout
    assert "figures recomputed: consistent" in pinned.stdout
    embedded_only = run_cli("sla", "verify", str(home / "evidence.json"),
                            "--public-key", str(home / "key.pub"))  # the PEM file works too
    assert embedded_only.returncode == 0, embedded_only.stdout
    unpinned = run_cli("sla", "verify", str(home / "evidence.json"))
    assert unpinned.returncode == 0 and "integrity only" in unpinned.stdout


def test_openssl_verifies_the_signature_over_the_documented_canonical_form(signed):
    """Independent of the harness: the canonical bytes rebuilt from the rule in
    harness/report/signing.py, the signature checked by OpenSSL's Ed25519."""
    import base64
    import subprocess

    home, _ = signed
    document = json.loads((home / "evidence.json").read_text())
    signature = document.pop("signature")
    (home / "canonical").write_bytes(
        json.dumps(document, sort_keys=True, separators=(",", ":")).encode())
    (home / "sig").write_bytes(base64.b64decode(signature["value"]))
    command = ["/usr/bin/openssl", "pkeyutl", "-verify", "-pubin", "-inkey",
               str(home / "key.pub"), "-rawin", "-in", str(home / "canonical"),
               "-sigfile", str(home / "sig")]
    good = subprocess.run(command, capture_output=True, text=True)
    assert good.returncode == 0 and "Signature Verified Successfully" in good.stdout, good
    document["clauses"][0]["measured"] = 0.0001
    (home / "canonical").write_bytes(
        json.dumps(document, sort_keys=True, separators=(",", ":")).encode())
    bad = subprocess.run(command, capture_output=True, text=True)
    assert bad.returncode != 0


def test_an_edited_figure_fails_and_names_its_clause(signed):
    home, public_b64 = signed

    def slower(document):  # p99 of 99 s breaks "<= 10 s", the verdict still says pass
        document["clauses"][0]["measured"] = 99.0

    proc = run_cli("sla", "verify", _edited_copy(home, "edited.json", slower),
                   "--public-key", public_b64)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "document was changed after it was signed" in proc.stdout
    assert "clause find-p99: verdict 'pass' but measured 99.0 against <= 10 s" in proc.stdout


def test_evidence_re_signed_with_another_key_fails_against_the_pinned_key(signed, tmp_path):
    from harness.report.signing import generate_key_pair, load_private_key, sign_document

    home, public_b64 = signed
    generate_key_pair(tmp_path / "other")

    def forged(document):  # a consistent forgery: figure and verdict agree
        document["clauses"][1]["measured"] = 2_000_000.0
        document["clauses"][1]["verdict"] = "pass"
        document["verdict"] = "pass"
        body = {k: v for k, v in document.items() if k not in ("sha256", "signature")}
        document["sha256"] = hashlib.sha256(
            json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        document.update(sign_document(document, load_private_key(tmp_path / "other")))

    path = _edited_copy(home, "forged.json", forged)
    assert run_cli("sla", "verify", path).returncode == 0  # integrity only: consistent
    proc = run_cli("sla", "verify", path, "--public-key", public_b64)
    assert proc.returncode == 1
    assert f"not by the pinned key {public_b64}" in proc.stdout


def test_unsigned_evidence_and_bad_keys_exit_2(signed, tmp_path):
    home, _ = signed

    def unsigned(document):
        document.pop("signature")

    proc = run_cli("sla", "verify", _edited_copy(home, "unsigned.json", unsigned))
    assert proc.returncode == 2 and "unsigned" in proc.stderr, proc.stderr
    proc = run_cli("sla", "verify", str(home / "evidence.json"), "--public-key", "AAAA")
    assert proc.returncode == 2 and "--public-key AAAA" in proc.stderr
    proc = run_cli("sla", "verify", str(tmp_path / "missing.json"))
    assert proc.returncode == 2 and "missing.json" in proc.stderr
    shared = tmp_path / "shared-key"
    shared.write_bytes((home / "key").read_bytes())
    shared.chmod(0o644)
    secret = (home / "key").read_text().splitlines()[1]
    proc = run_cli("sla", "--contract", str(tmp_path / "c.yaml"), "--node", "e",
                   "--signing-key", str(shared))
    assert proc.returncode == 2 and "chmod 600" in proc.stderr, proc.stderr
    assert secret not in proc.stdout + proc.stderr
    env = {**os.environ, "PACS_HARNESS_SIGNING_KEY": "not a key"}
    proc = run_cli("sla", "--contract", str(tmp_path / "c.yaml"), "--node", "e", env=env)
    assert proc.returncode == 2 and "PACS_HARNESS_SIGNING_KEY" in proc.stderr
    assert "not a key" not in proc.stderr


def test_run_signs_the_performance_evidence_beside_its_report(tmp_path):
    """The scenario writes sla-evidence.json beside report.json; `run` with a key signs both."""
    topo = tmp_path / "perf.yaml"
    topo.write_text("name: slarun\nnodes:\n  e: {kind: embedded, ae_title: SLARUN}\n")
    made = run_cli("keygen", str(tmp_path / "key"))
    proc = run_cli("run", "-t", str(topo), "--scenario", "performance", "--report-dir",
                   str(tmp_path / "r"), "--require-ready", "none", "-q",
                   "--signing-key", str(tmp_path / "key"), timeout=900)
    evidence = tmp_path / "r" / "sla-evidence.json"
    assert evidence.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"sla-evidence.json: signed (Ed25519, public key {made.stdout.strip()})" in proc.stderr
    for check in (("sla", "verify", str(evidence)), ("report", "verify", str(tmp_path / "r"))):
        verified = run_cli(*check, "--public-key", made.stdout.strip())
        assert verified.returncode == 0, verified.stdout + verified.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["exit"] == {"code": proc.returncode, "require_ready": "none",
                              "reason": report["exit"]["reason"]}
