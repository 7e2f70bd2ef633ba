"""A site's archive (an external node not declared synthetic) keeps its patients out of every
report and ledger: `verify`, `inventory` and the assessment scenario against a real Orthanc
described as external, each output file read back byte by byte for the stored IDs, names and
birth dates, and every table of every SQLite ledger dumped by the sqlite3 tool."""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from harness.config import parse_topology
from harness.fixtures import pacs_cluster_factory
from harness.launch.tools import find_binary
from synthetic_data.samples import sample_study
from tests.helpers import external_node, external_topology, login_env

# recognisable made-up people: two share one MRN under two issuers (a collision)
PATIENTS = [
    {"PatientID": "MRN-ALPHA-7731", "IssuerOfPatientID": "SITEA",
     "PatientName": "Quaxwell^Zebulon", "PatientBirthDate": "19480317", "PatientSex": "M"},
    {"PatientID": "MRN-ALPHA-7731", "IssuerOfPatientID": "SITEB",
     "PatientName": "Vexbridge^Ottoline", "PatientBirthDate": "19520611", "PatientSex": "F"},
    {"PatientID": "MRN-GAMMA-5524", "IssuerOfPatientID": "SITEA",
     "PatientName": "Snodgrass^Perpetua", "PatientBirthDate": "19610923", "PatientSex": "F"},
]
SQLITE = "/usr/bin/sqlite3"  # an independent reader of the ledgers (the SQLite shell)


def _clear_values() -> list[str]:
    values = set()
    for p in PATIENTS:
        family, given = p["PatientName"].split("^")
        date = p["PatientBirthDate"]
        values |= {p["PatientID"], family, given, date, f"{date[:4]}-{date[4:6]}-{date[6:]}"}
    return sorted(values)


def _studies() -> list[list]:
    studies = []
    for number, who in enumerate(PATIENTS):
        study = sample_study(seed=880 + number, instances=2)
        for ds in study:
            for keyword, value in who.items():
                setattr(ds, keyword, value)
        studies.append(study)
    return studies


launched = pacs_cluster_factory(
    "name: redact\nnodes:\n"
    "  site: {kind: orthanc, ae_title: SITE}\n"
    "  copy: {kind: embedded, ae_title: COPY}\n",
    scope="module",
    requires=("Orthanc",),
)


@pytest.fixture(scope="module")
def site(launched, tmp_path_factory):
    """A launched Orthanc (the site) and an embedded PACS (its migration target), described
    to the CLI as external nodes; the target lacks one patient and misspells another."""
    studies = _studies()
    assert launched.node("site").dimse().store([ds for s in studies for ds in s]).ok
    renamed = [ds.copy() for ds in studies[0]]
    for ds in renamed:
        ds.PatientName = "Quaxwell^Zebulonn"
    assert launched.node("copy").dimse().store([*renamed, *studies[2]]).ok
    workdir = tmp_path_factory.mktemp("redact")
    env = login_env(launched, "REDACT", workdir / "state")
    topology = workdir / "topology.yaml"
    topology.write_text(
        "name: redact\nnodes:\n"
        + external_node(launched.node("site"), "REDACT", dicomweb_root=None)
        + external_node(launched.node("copy"), "REDACT")
    )
    return topology, env, workdir


def _cli(site, *args: str) -> subprocess.CompletedProcess:
    topology, env, _ = site
    return subprocess.run([sys.executable, "-m", "harness", *args, "-t", str(topology)],
                          capture_output=True, text=True, timeout=1500, env=env)


def _content(path: Path) -> str:
    """The file's bytes as text; for a SQLite file, every table as the sqlite3 shell dumps
    it (rows inside the file's pages may be compressed or split across pages)."""
    if path.read_bytes()[:16] == b"SQLite format 3\x00":
        dumped = subprocess.run([SQLITE, "-readonly", str(path), ".dump"], capture_output=True,
                                text=True, timeout=120, errors="replace")
        assert dumped.returncode == 0 and "CREATE TABLE" in dumped.stdout, dumped.stderr
        return dumped.stdout + _unpacked_attrs(path) + path.read_bytes().decode("utf-8",
                                                                                "replace")
    return path.read_bytes().decode("utf-8", "replace")


def _unpacked_attrs(path: Path) -> str:
    """A ledger's instance_attrs, which it keeps zlib-compressed, unpacked with zlib."""
    rows = subprocess.run([SQLITE, "-readonly", str(path),
                           "SELECT hex(attrs) FROM instance_attrs"], capture_output=True,
                          text=True, timeout=120)
    if rows.returncode:  # not a ledger
        return ""
    texts = []
    for packed in (bytes.fromhex(h) for h in rows.stdout.split()):
        try:
            texts.append(zlib.decompress(packed).decode("utf-8", "replace"))
        except zlib.error:  # kept as text: compressing did not make it shorter
            texts.append(packed.decode("utf-8", "replace"))
    return "\n".join(texts)


def _found(folder: Path) -> dict[str, list[str]]:
    """Each clear value -> the files under `folder` (recursively) that contain it."""
    found: dict[str, list[str]] = {}
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for path in files:
        content = _content(path).casefold()
        for value in _clear_values():
            if value.casefold() in content:
                found.setdefault(value, []).append(str(path.relative_to(folder)))
    return found


def _verify(site, out: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = _cli(site, "verify", "--source", "site", "--target", "copy", "--out", str(out),
                *extra)
    assert proc.returncode == 1, proc.stderr  # a patient missing, a name altered
    return proc


def _dump_has_tables(folder: Path) -> None:
    ledgers = sorted(folder.glob("*.sqlite"))
    assert ledgers, "no ledger written"
    for ledger in ledgers:
        assert "INSERT INTO instance_rows" in _content(ledger)  # the dump did read rows


def test_verify_writes_no_identity_of_a_site_archive(site, tmp_path):
    proc = _verify(site, tmp_path / "out")
    _dump_has_tables(tmp_path / "out")
    assert _found(tmp_path / "out") == {}
    assert not [v for v in _clear_values() if v.casefold() in proc.stdout.casefold()]
    findings = json.loads((tmp_path / "out" / "findings.json").read_text())
    by_type = {f["type"]: f for f in findings["findings"]}
    assert by_type["missing_patient"]["patient_id"].startswith("pt-")
    change = next(f for f in findings["findings"] if "PatientName" in f["attributes"])
    before, after = (change["attributes"]["PatientName"][k] for k in ("before", "after"))
    assert before.startswith("nm-") and after.startswith("nm-") and before != after


def test_verify_shows_identities_when_asked(site, tmp_path):
    _verify(site, tmp_path / "out", "--show-identities")
    found = _found(tmp_path / "out")
    assert {"findings.json", "findings.csv", "summary.txt", "source.ledger.sqlite"} <= set(
        found["MRN-ALPHA-7731"])
    assert {"findings.json", "findings.csv", "target.ledger.sqlite"} <= set(
        found["Quaxwell"])  # the altered name


def test_a_second_verify_uses_the_same_tokens(site, tmp_path):
    """The key stays in the state directory (0600): a second run, like a resumed crawl,
    gives each patient the same token, and the key is in none of the outputs."""
    _, env, _ = site
    runs = []
    for name in ("one", "two"):
        _verify(site, tmp_path / name)
        runs.append(json.loads((tmp_path / name / "findings.json").read_text()))
    first, second = runs
    assert [f["patient_id"] for f in first["findings"]] == [
        f["patient_id"] for f in second["findings"]]
    key = Path(env["PACS_HARNESS_STATE_DIR"]) / "identity-token.key"
    assert key.stat().st_mode & 0o777 == 0o600
    secret = key.read_bytes()
    for path in [*(tmp_path / "one").iterdir(), *(tmp_path / "two").iterdir()]:
        assert secret not in path.read_bytes() and secret.hex() not in _content(path)


def test_inventory_ledger_holds_no_identity_of_a_site_archive(site, tmp_path):
    ledger = tmp_path / "inv" / "site.sqlite"
    ledger.parent.mkdir()
    proc = _cli(site, "inventory", "--node", "site", "--depth", "full", "--ledger", str(ledger))
    assert proc.returncode == 0, proc.stderr
    assert _found(tmp_path / "inv") == {}
    rows = subprocess.run([SQLITE, "-readonly", str(ledger),
                           "SELECT DISTINCT patient_id, issuer, sex FROM instances"],
                          capture_output=True, text=True, timeout=60).stdout.split()
    # three people, two sharing an MRN: still two distinct ID tokens, three issuer/sex pairs
    assert len(rows) == 3 and len({r.split("|")[0] for r in rows}) == 2, rows
    assert all(r.split("|")[0].startswith("pt-") for r in rows), rows


def _assessment(site, report: Path, *extra: str) -> dict:
    proc = _cli(site, "run", "--scenario", "assessment", "--report-dir", str(report), "-q",
                *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (scenario,) = json.loads((report / "report.json").read_text())["scenarios"]
    return scenario["metrics"]["inventory.site"]["identity"]


def test_assessment_report_holds_tokens_and_still_shows_the_collision(site, tmp_path):
    identity = _assessment(site, tmp_path / "report")
    assert (tmp_path / "report" / "index.html").exists()
    assert _found(tmp_path / "report") == {}
    (collision,) = identity["collisions"]
    assert collision["patient_id"].startswith("pt-")
    records = collision["records"]
    assert {r["patient_id"] for r in records} == {collision["patient_id"]}
    issuers = {r["issuer"] for r in records}  # tokens from the ledger, one per issuer
    assert len(issuers) == 2 and all(i.startswith("iss-") for i in issuers)
    names = {r["name"] for r in records}
    assert len(names) == 2 and all(n.startswith("nm-") for n in names)
    assert {r["sex"] for r in records} == {"sex-redacted"}


def test_assessment_report_shows_identities_when_asked(site, tmp_path):
    identity = _assessment(site, tmp_path / "report", "--show-identities")
    (collision,) = identity["collisions"]
    assert collision["patient_id"] == "MRN-ALPHA-7731"
    found = _found(tmp_path / "report")
    assert {"MRN-ALPHA-7731", "Quaxwell", "Vexbridge"} <= set(found)
    assert "report.json" in found["Quaxwell"]


def test_external_node_declared_synthetic_is_reported_in_clear(site, tmp_path):
    topology, env, _ = site
    declared = tmp_path / "synthetic.yaml"
    declared.write_text(topology.read_text().replace("{kind: external,",
                                                     "{kind: external, synthetic: true,"))
    proc = _cli((declared, env, None), "verify", "--source", "site", "--target", "copy",
                "--out", str(tmp_path / "out"))
    assert proc.returncode == 1, proc.stderr
    assert {"findings.json", "findings.csv"} <= set(_found(tmp_path / "out")["Quaxwell"])


def test_one_synthetic_node_is_not_enough(site, tmp_path):
    """verify reads both sides: the site's patients stay redacted when only the target is
    declared synthetic."""
    topology, env, _ = site
    declared = tmp_path / "half.yaml"
    declared.write_text(topology.read_text().replace("{kind: external, ae_title: COPY,",
                                                     "{kind: external, synthetic: true, "
                                                     "ae_title: COPY,"))
    proc = _cli((declared, env, None), "verify", "--source", "site", "--target", "copy",
                "--out", str(tmp_path / "out"))
    assert proc.returncode == 1, proc.stderr
    assert _found(tmp_path / "out") == {}


def test_synthetic_flag_must_be_a_boolean():
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match=r"nodes\.site\.synthetic.*true or false"):
        parse_topology("name: t\nnodes:\n  site: {kind: external, host: 127.0.0.1, "
                       "dicom_port: 104, synthetic: 'yes'}\n")


def test_migration_into_a_site_archive_reports_tokens(tmp_path, pacs_launch):
    """The migration scenario between two writable site archives (one holding the people
    above): its identity report, merged patients and findings attachment hold no identity."""
    if not find_binary("Orthanc"):
        pytest.skip("Orthanc not installed (install: apt-get install orthanc)")
    cluster = pacs_launch(
        "name: redactmig\nnodes:\n"
        "  site: {kind: orthanc, ae_title: SITE}\n"
        "  next: {kind: orthanc, ae_title: NEXT}\n")
    assert cluster.node("site").dimse().store([ds for s in _studies() for ds in s]).ok
    env = login_env(cluster, "MIG", tmp_path / "state")
    topology = external_topology(
        tmp_path / "topology.yaml", "redactmig", cluster.nodes.values(), "MIG",
        dict.fromkeys(cluster.nodes, ", writable: true"),
        # external Orthancs report storage commitment to the launching cluster's address,
        # not this run's: no report comes, so do not wait long for it
        "settings:\n  migration: {source: site, target: next, pilot_patients: 2, "
        "commit_timeout_s: 2}\n")
    report = tmp_path / "report"
    proc = _cli((topology, env, None), "run", "--scenario", "migration", "--phase",
                "pilot", "--report-dir", str(report), "-q")
    assert (report / "report.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    (scenario,) = json.loads((report / "report.json").read_text())["scenarios"]
    identity = next(m["identity"] for m in scenario["metrics"].values())
    assert "pt-" in json.dumps(identity["collisions"])  # our collision, as tokens
    assert _found(report) == {}
