"""Canary identities (harness/security/canaries.py): planted, inventoried, searched for.

The canary study is read back with pydicom from a written file; the scanner is given files
whose leaks sit at known places (text lines, JSON keys, a gzip member, a SQLite table, a
token split across read chunks); the end-to-end check runs on a launched embedded PACS,
with the ledger dumped by the sqlite3 shell as the independent reader.
"""

from __future__ import annotations

import gzip
import json
import sqlite3
import subprocess
import zipfile

from pydicom import dcmread

from harness.config import parse_topology
from harness.fixtures import pacs_cluster_factory
from harness.nodes.external import ExternalNode
from harness.security.canaries import (
    CHUNK,
    FIELDS,
    PRIVATE_CREATOR,
    canary_checks,
    canary_study,
    new_token,
    scan,
    scan_for_canaries,
)
from tests.helpers import external_node

SQLITE = "/usr/bin/sqlite3"


def test_the_canary_sits_everywhere_identity_hides(tmp_path):
    token = new_token()
    study = canary_study(token, seed=5)
    assert len({ds.SOPInstanceUID for ds in study}) == 2
    study[0].save_as(tmp_path / "canary.dcm", enforce_file_format=True)
    ds = dcmread(tmp_path / "canary.dcm")
    assert str(ds.PatientName) == f"{token}-PN^CANARY"
    assert ds.PatientID == f"{token}-PID"
    assert ds.OtherPatientIDsSequence[0].PatientID == f"{token}-OPID"
    assert f"{token}-TXT" in ds.ImageComments
    assert ds.private_block(0x0011, PRIVATE_CREATOR)[0x10].value == f"{token}-PRIV"
    assert ds.RequestAttributesSequence[0].RequestedProcedureDescription == f"{token}-SEQ"
    assert canary_study(token, seed=5)[0].StudyInstanceUID == ds.StudyInstanceUID  # per seed


def _files_with_leaks(folder, token):
    """Files of every shape a run writes; the token only where the comment says."""
    (folder / "logs").mkdir()
    (folder / "logs" / "node.log").write_text("start\nstored study\n" * 50
                                             + f"C-STORE from patient {token}-PID done\n")
    (folder / "report.json").write_text(json.dumps(
        {"findings": [{"patient_id": "pt-0011"}, {"patient_id": f"{token}-PID"}]}))
    (folder / "events.jsonl").write_text('{"a": 1}\n{"b": "' + token.lower() + '"}\n')
    (folder / "index.html").write_text("<html><body><p>clean</p></body></html>")
    (folder / "audit.xml").write_text(f"<msg>\n<name>{token}-PN^CANARY</name>\n</msg>\n")
    with gzip.open(folder / "old.log.gz", "wt") as handle:
        handle.write("one\ntwo\n" + f"three {token}-TXT\n")
    with zipfile.ZipFile(folder / "allure.zip", "w") as archive:
        archive.writestr("attachment.txt", f"x\n{token}-PRIV\n")
    conn = sqlite3.connect(folder / "ledger.sqlite")
    conn.execute("CREATE TABLE studies (uid TEXT, keys TEXT)")
    conn.executemany("INSERT INTO studies VALUES (?, ?)",
                     [("1.2", "{}"), ("1.3", json.dumps({"seq": [{"d": f"{token}-SEQ"}]}))])
    conn.commit()
    conn.close()
    # a binary file with the token across a read-chunk border
    blob = bytearray(b"\0" * (CHUNK + 4096))
    at = CHUNK - len(token) // 2
    blob[at:at + len(token)] = token.encode()
    (folder / "pixels.bin").write_bytes(bytes(blob))
    return at


def test_the_scanner_finds_each_leak_where_it_is(tmp_path):
    token = new_token()
    border = _files_with_leaks(tmp_path, token)
    result = scan([tmp_path], [token, new_token()])
    assert result.files == 9 and result.skipped == []
    found = {(leak.path.removeprefix(f"{tmp_path}/"), leak.where, leak.field)
             for leak in result.leaks}
    assert found == {
        ("logs/node.log", "line 101", FIELDS["PID"]),
        ("report.json", "$.findings[1].patient_id", FIELDS["PID"]),
        ("events.jsonl", "line 2", ""),
        ("audit.xml", "line 2", FIELDS["PN"]),
        ("old.log.gz", "line 3 (decompressed)", FIELDS["TXT"]),
        ("allure.zip", "member attachment.txt, line 2", FIELDS["PRIV"]),
        ("ledger.sqlite", "table studies, column keys, row 2", FIELDS["SEQ"]),
        ("pixels.bin", f"byte offset {border}", ""),
    }
    assert all(leak.token == token for leak in result.leaks)


def test_a_deleted_row_is_still_found_in_the_pages(tmp_path):
    """A writer without secure_delete (Debian's SQLite has it on; other builds do not)
    leaves deleted rows in free pages until VACUUM."""
    token = new_token()
    conn = sqlite3.connect(tmp_path / "ledger.sqlite")
    conn.execute("PRAGMA secure_delete = 0")
    conn.execute("CREATE TABLE t (v TEXT)")
    conn.execute("INSERT INTO t VALUES (?)", (f"{token}-PID",))
    conn.commit()
    conn.execute("DELETE FROM t")
    conn.commit()
    conn.close()
    dumped = subprocess.run([SQLITE, "-readonly", str(tmp_path / "ledger.sqlite"), ".dump"],
                            capture_output=True, text=True, timeout=60).stdout
    assert "CREATE TABLE" in dumped and token not in dumped  # no row holds it any more
    leaks = scan_for_canaries([tmp_path], [token])
    assert len(leaks) == 1 and leaks[0].where.startswith("raw page bytes at offset")


def test_files_over_the_bound_are_skipped_with_a_note(tmp_path):
    token = new_token()
    (tmp_path / "big.bin").write_bytes(b"\0" * ((1 << 20) + 1) + token.encode())
    (tmp_path / "small.txt").write_text("nothing here\n")
    result = scan([tmp_path], [token], max_file_mb=1)
    assert result.files == 1 and result.leaks == []
    assert len(result.skipped) == 1 and "big.bin" in result.skipped[0]
    assert "over the 1 MB bound" in result.skipped[0]


# -- end to end on a launched embedded PACS ------------------------------------------------

cluster = pacs_cluster_factory(
    "name: canary\nnodes:\n  pocket: {kind: embedded, ae_title: CANARY1}\n", scope="module")
orthanc = pacs_cluster_factory(
    "name: canaryo\nnodes:\n  orthanc: {kind: orthanc, ae_title: CANARY2}\n", scope="module",
    requires=("Orthanc",))


def _dump(ledger) -> str:
    out = subprocess.run([SQLITE, "-readonly", str(ledger), ".dump"], capture_output=True,
                         text=True, timeout=120, errors="replace")
    assert out.returncode == 0 and "CREATE TABLE" in out.stdout, out.stderr
    return out.stdout


def test_an_inventory_of_the_canary_leaks_nothing(cluster, tmp_path):
    node = cluster.node("pocket")
    token = new_token()
    checks = canary_checks(node, tmp_path, token=token)
    assert [(c.name, c.outcome) for c in checks] == [("canary identities", "pass")], checks
    assert checks[0].observed.startswith("1 files scanned, no canary")
    # the sqlite3 shell agrees: the ledger lists the canary study (as the node's C-FIND
    # finds it by the canary's PatientID), without the token
    found = node.dimse().find("STUDY", {"PatientID": f"{token}-PID", "StudyInstanceUID": None})
    assert found.ok and len(found.matches) == 1
    dump = _dump(tmp_path / "canary-pocket.ledger.sqlite")
    assert found.matches[0].StudyInstanceUID in dump
    assert token not in dump.upper()
    assert token not in " ".join(c.observed for c in checks)


def test_a_disposable_orthanc_gets_its_canary_removed(orthanc, tmp_path):
    """Inventoried over DICOMweb (QIDO-RS) this time; the canary deleted afterwards, as
    Orthanc's own REST counts show."""
    node = orthanc.node("orthanc")
    before = node.rest().statistics()
    checks = canary_checks(node, tmp_path)
    assert [c.outcome for c in checks] == ["pass"], [c.line() for c in checks]
    assert "canary study deleted afterwards" in checks[0].observed
    # the ledger (read by the sqlite3 shell) holds one study more than Orthanc did before...
    dump = _dump(tmp_path / "canary-orthanc.ledger.sqlite")
    assert dump.count('INSERT INTO studies VALUES') == before["CountStudies"] + 1
    # ...and Orthanc is back to what it held
    after = node.rest().statistics()
    assert (after["CountStudies"], after["CountInstances"]) == (
        before["CountStudies"], before["CountInstances"])


def test_one_planted_leak_is_one_finding(cluster, tmp_path):
    """A log line copied with the canary's name in it: exactly one finding, naming it."""
    node = cluster.node("pocket")
    token = new_token()
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "run.log").write_text(
        "08:00 store ok\n" f"08:01 stored patient {token}-PN^CANARY\n" "08:02 done\n")
    checks = canary_checks(node, tmp_path, token=token)
    assert [(c.name, c.outcome) for c in checks] == [("canary leak: logs/run.log", "fail")]
    assert "line 2 (PatientName)" in checks[0].observed and checks[0].remedy


def test_a_leak_in_a_sqlite_table_is_found(cluster, tmp_path):
    node = cluster.node("pocket")
    token = new_token()
    conn = sqlite3.connect(tmp_path / "notes.sqlite")
    conn.execute("CREATE TABLE notes (id INTEGER, body BLOB)")
    conn.execute("INSERT INTO notes VALUES (1, ?)", (f"about {token}-OPID".encode(),))
    conn.commit()
    conn.close()
    checks = canary_checks(node, tmp_path, token=token)
    assert [(c.name, c.outcome) for c in checks] == [("canary leak: notes.sqlite", "fail")]
    assert "table notes, column body, row 1" in checks[0].observed


def test_no_canary_into_a_node_not_writable(cluster, tmp_path):
    launched = cluster.node("pocket")
    before = launched.statistics().instances  # the embedded PACS's own SQLite index
    topology = parse_topology("name: site\nnodes:\n" + external_node(launched, "CANARY"),
                              "<test>")
    site = ExternalNode(topology.node("pocket"))
    checks = canary_checks(site, tmp_path)
    assert [(c.outcome, c.observed) for c in checks] == [
        ("skip", "canary not planted: node not writable")]
    assert launched.statistics().instances == before
    assert list(tmp_path.iterdir()) == []


def test_an_inventory_at_depth_full_leaks_nothing(cluster, tmp_path):
    """Found by this check: free text, private elements and sequence items were in clear in
    a depth-full ledger of a site's archive; they are tokens now (report/identities.py)."""
    checks = canary_checks(cluster.node("pocket"), tmp_path, depth="full")
    assert [c.outcome for c in checks] == ["pass"], [c.line() for c in checks]
