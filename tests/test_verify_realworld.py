"""`verify` and `inventory` on the real-world corpus (files nobody in this project wrote).

The same corpus files are C-STOREd one by one by DCMTK's storescu (an independent sender)
into a source (embedded PACS) and a target (Orthanc): the target is a faithful copy without
depending on the harness's migrator. `pacs-harness verify --depth full` runs as a user runs
it, and what it reports is checked against an independent comparison of both archives:
the embedded PACS's stored files and Orthanc's own REST `/instances/{id}/file`, both read
with pydicom. Then one defect at a time is seeded in the target (or the source) and must be
exactly one more finding of the right type.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from harness.cluster import Cluster
from harness.dicom.peer import HARNESS_AE_TITLE
from harness.embedded_pacs import open_index
from harness.fixtures import pacs_cluster_factory
from harness.launch.tools import find_binary
from harness.nodes.base import Node
from tests.helpers import external_topology, login_env
from tests.realworld import CorpusFile, valid_files

STORESCU = "/usr/bin/storescu"
pytestmark = pytest.mark.skipif(
    not (find_binary("Orthanc") and Path(STORESCU).is_file()),
    reason="needs Orthanc and DCMTK's storescu (apt-get install orthanc dcmtk)",
)

#: storescu proposes uncompressed syntaxes unless told; the file's own syntax, so that it is
#: sent unchanged (storescu does not transcode).
_STORESCU_SYNTAX = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
}


def storescu(node: Node, files: Iterable[CorpusFile]) -> list[str]:
    """C-STORE each file with DCMTK in its own syntax; the SOP Instance UIDs stored. A file
    storescu cannot send is skipped with the reason printed."""
    stored = []
    for item in files:
        flag = _STORESCU_SYNTAX.get(item.transfer_syntax_uid, "-xe")
        # as the harness's AE title: launched nodes refuse callers outside the topology
        proc = subprocess.run([STORESCU, "-R", flag, "-aet", HARNESS_AE_TITLE,
                               "-aec", node.ae_title, node.host,
                               str(node.dicom_port), str(item.path)],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode:
            reason = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"skipped {item.name} on {node.name}: storescu: {reason}")
            continue
        stored.append(item.sop_instance_uid)
    return stored


# -- the independent comparison ------------------------------------------------------------


def _embedded_files(node: Node) -> dict[str, Path]:
    """SOP Instance UID -> stored file of the embedded PACS (its index says where)."""
    conn = open_index(node.storage_dir)
    try:
        return {uid: node.storage_dir / path for uid, path in
                conn.execute("SELECT sop_instance_uid, path FROM instances")}
    finally:
        conn.close()


def _read_source(node: Node) -> tuple[dict[str, Dataset], set[str]]:
    """Every instance the embedded PACS holds, read with pydicom; and those it cannot read."""
    datasets, unreadable = {}, set()
    for uid, path in _embedded_files(node).items():
        try:
            datasets[uid] = dcmread(path)
        except OSError:
            unreadable.add(uid)
    return datasets, unreadable


def _orthanc_file(node: Node, orthanc_id: str) -> Dataset:
    rest = node.rest()
    rsp = rest.session.get(f"{rest.base_url}/instances/{orthanc_id}/file", timeout=60)
    rsp.raise_for_status()
    return dcmread(BytesIO(rsp.content))


def _read_target(node: Node) -> dict[str, Dataset]:
    """Every instance Orthanc holds, as its REST API hands out the stored file."""
    rest = node.rest()
    ids = rest.session.get(f"{rest.base_url}/instances", timeout=60).json()
    return {str(ds.SOPInstanceUID): ds for ds in (_orthanc_file(node, i) for i in ids)}


@dataclass
class Differences:
    """What differs between the two archives, instance by instance."""

    missing: set[str] = field(default_factory=set)  # on the source only
    extra: set[str] = field(default_factory=set)  # on the target only
    unreadable: set[str] = field(default_factory=set)  # listed by the source, file unreadable
    attributes: dict[str, set[str]] = field(default_factory=dict)  # uid -> keywords
    pixels: set[str] = field(default_factory=set)


def _elements(ds: Dataset) -> dict[str, object]:
    return {elem.keyword or str(elem.tag): elem.value for elem in ds
            if elem.tag.group != 0x0002 and elem.keyword != "PixelData"}


def _pixels(ds: Dataset) -> np.ndarray | bytes | None:
    """Decoded pixels; the encoded bytes where pydicom has no working decoder for them."""
    if "PixelData" not in ds:
        return None
    try:
        return ds.pixel_array
    except Exception:  # noqa: BLE001 - e.g. a J2K stream the installed decoder rejects
        return bytes(ds.PixelData)


def independent_differences(source: Node, target: Node) -> Differences:
    """Both archives read with pydicom, compared element by element and pixel by pixel."""
    src, unreadable = _read_source(source)
    tgt = _read_target(target)
    out = Differences(missing=set(src) - set(tgt), extra=set(tgt) - set(src) - unreadable,
                      unreadable=unreadable)
    for uid in set(src) & set(tgt):
        a, b = _elements(src[uid]), _elements(tgt[uid])
        changed = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
        if changed:
            out.attributes[uid] = changed
        pa, pb = _pixels(src[uid]), _pixels(tgt[uid])
        if isinstance(pa, np.ndarray) and isinstance(pb, np.ndarray):
            pixels_equal = np.array_equal(pa, pb)
        else:
            pixels_equal = pa == pb  # both absent or both undecodable: the encoded bytes
        if not pixels_equal:
            out.pixels.add(uid)
    return out


# -- the nodes and the CLI ------------------------------------------------------------------


@dataclass
class Archives:
    cluster: Cluster
    source: Node
    target: Node
    files: list[CorpusFile]  # stored into both
    topology: Path
    workdir: Path
    runs: int = 0

    def honest_target(self) -> None:
        """The target as a faithful copy: emptied, then the same files stored again."""
        self.target.wipe()
        stored = storescu(self.target, self.files)
        assert sorted(stored) == sorted(f.sop_instance_uid for f in self.files)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        env = login_env(self.cluster, "RW", self.workdir / "state")
        return subprocess.run([sys.executable, "-m", "harness", *args, "-t", str(self.topology)],
                              capture_output=True, text=True, timeout=900, env=env)

    def verify(self) -> tuple[int, dict]:
        """`pacs-harness verify --depth full` as a user runs it: exit code, findings.json."""
        self.runs += 1
        out = self.workdir / f"verify-{self.runs}"
        proc = self.cli("verify", "--source", "src", "--target", "dst", "--depth", "full",
                        "--out", str(out), "--json")
        assert proc.returncode in (0, 1), proc.stderr
        return proc.returncode, json.loads((out / "findings.json").read_text())

    def inventory(self, node: str, depth: str) -> tuple[int, dict]:
        """`pacs-harness inventory --json`: exit code, summary (with the ledger's issues)."""
        self.runs += 1
        ledger = self.workdir / f"inventory-{self.runs}.sqlite"
        proc = self.cli("inventory", "--node", node, "--depth", depth, "--ledger", str(ledger),
                        "--json")
        assert proc.returncode in (0, 1), proc.stderr
        summary = json.loads(proc.stdout)
        with sqlite3.connect(ledger) as conn:
            summary["issue_lines"] = [" ".join(r) for r in conn.execute(
                "SELECT study_uid, sop_uid, problem FROM issues")]
        return proc.returncode, summary


def _external_topology(cluster: Cluster, path: Path) -> Path:
    """The launched nodes as external nodes, for the CLI in a subprocess; synthetic: public
    test files, no patient's identity (findings keep the names)."""
    return external_topology(path, "realworld", cluster.nodes.values(), "RW",
                             {"src": ", synthetic: true", "dst": ", synthetic: true"})


launched = pacs_cluster_factory(
    "name: realworld\nnodes:\n"
    "  src: {kind: embedded, ae_title: RWSOURCE}\n"
    "  dst: {kind: orthanc, ae_title: RWTARGET}\n",
    scope="module",
)


@pytest.fixture(scope="module")
def archives(launched, tmp_path_factory):
    source = launched.node("src")
    files = list(valid_files())
    stored = set(storescu(source, files))
    files = [f for f in files if f.sop_instance_uid in stored]
    assert len(files) >= 20, "storescu stored too little of the corpus to mean anything"
    workdir = tmp_path_factory.mktemp("realworld")
    return Archives(launched, source, launched.node("dst"), files,
                    _external_topology(launched, workdir / "topology.yaml"), workdir)


@pytest.fixture
def honest(archives):
    """A faithful copy on the target that both the independent comparison and verify pass."""
    archives.honest_target()
    assert independent_differences(archives.source, archives.target) == Differences()
    return archives


def _details(findings: dict) -> list[str]:
    return [f["detail"] for f in findings["findings"]] + findings["warnings"]


def _single_finding(before: dict, after: dict) -> dict:
    """The one finding `after` has; `before` (the honest copy) must have none."""
    assert before["findings"] == [], _details(before)
    assert after["verdict"] == "fail"
    assert len(after["findings"]) == 1, _details(after)
    return after["findings"][0]


def _orthanc_id(node: Node, uid: str, kind: str) -> str:
    (match,) = [m for m in node.rest().lookup(uid) if m["Type"] == kind]
    return match["ID"]


def _rewrite(node: Node, level: str, uid: str, change) -> list[str]:
    """Replace every instance of a study (or one instance) with a changed copy, through
    Orthanc's REST API: download the stored file, delete, upload it changed."""
    rest = node.rest()
    orthanc_id = _orthanc_id(node, uid, level.capitalize())
    resource = {"study": "studies", "instance": "instances"}[level]
    ids = [orthanc_id] if level == "instance" else [
        i["ID"] for i in rest.get_json(f"/studies/{orthanc_id}/instances")]
    datasets = [_orthanc_file(node, i) for i in ids]
    rest.delete(f"/{resource}/{orthanc_id}")
    for ds in datasets:
        change(ds)
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        rest.upload(buffer.getvalue())
    return sorted(str(ds.SOPInstanceUID) for ds in datasets)


# -- the honest copy --------------------------------------------------------------------------


def test_honest_copy_of_the_corpus_has_no_finding(honest):
    """Every transfer syntax of the corpus, the source read back by C-GET (which decodes what
    it cannot receive as stored) and the target by WADO-RS (as stored): zero findings."""
    code, findings = honest.verify()
    assert findings["findings"] == [], json.dumps(findings["findings"], indent=1)[:3000]
    assert (code, findings["verdict"]) == (0, "pass")
    expected = len(honest.files)
    assert findings["counts"]["source"]["instances"] == expected
    assert findings["counts"]["target"]["instances"] == expected
    syntaxes = {f.transfer_syntax_uid for f in honest.files}
    assert len(syntaxes) >= 5, syntaxes  # compressed, deflated, implicit, explicit ...


def test_inventory_counts_at_full_depth_equal_those_at_attributes_depth(honest):
    for node in ("src", "dst"):
        listed_code, listed = honest.inventory(node, "attributes")
        full_code, full = honest.inventory(node, "full")
        assert (listed_code, full_code) == (0, 0), (listed, full)
        assert full["counts"] == listed["counts"]
        assert full["instances_retrieved"] == full["counts"]["instances"] == len(honest.files)
        assert (full["issues"], full["unretrievable"]) == (0, 0)


# -- one defect at a time: exactly one more finding ------------------------------------------


def _series_of(archives: Archives) -> dict[str, list[CorpusFile]]:
    series: dict[str, list[CorpusFile]] = {}
    for item in archives.files:
        series.setdefault(str(dcmread(item.path, stop_before_pixels=True).SeriesInstanceUID),
                          []).append(item)
    return series


def test_deleted_instance_is_one_missing_finding(honest):
    before = honest.verify()[1]
    series = _series_of(honest)
    crowded = [items for items in series.values() if len(items) >= 2]
    victim = (crowded[0] if crowded else sorted(series.values(), key=len)[0])[0]
    uid = victim.sop_instance_uid
    honest.target.rest().delete(f"/instances/{_orthanc_id(honest.target, uid, 'Instance')}")
    assert independent_differences(honest.source, honest.target) == Differences(missing={uid})

    code, after = honest.verify()
    finding = _single_finding(before, after)
    assert code == 1
    assert finding["type"].startswith("missing_") and finding["sop_uids"] == [uid]
    if crowded:
        assert finding["type"] == "missing_instance"
    assert after["missing"] == 1


def test_deleted_study_is_one_missing_study(honest):
    before = honest.verify()[1]
    by_patient: dict[str, set[str]] = {}
    for item in honest.files:
        ds = dcmread(item.path, stop_before_pixels=True)
        by_patient.setdefault(str(ds.get("PatientID", "")), set()).add(item.study_uid)
    study = sorted(next(s for _, s in sorted(by_patient.items()) if len(s) >= 2))[0]
    uids = sorted(f.sop_instance_uid for f in honest.files if f.study_uid == study)
    honest.target.rest().delete(f"/studies/{_orthanc_id(honest.target, study, 'Study')}")
    assert independent_differences(honest.source, honest.target) == Differences(
        missing=set(uids))

    finding = _single_finding(before, honest.verify()[1])
    assert (finding["type"], finding["study_uid"], finding["sop_uids"]) == (
        "missing_study", study, uids)


def test_patient_name_changed_in_one_study_is_one_finding(honest):
    before = honest.verify()[1]
    item = next(f for f in honest.files if f.transfer_syntax_uid == ExplicitVRLittleEndian)
    old_name = str(dcmread(item.path, stop_before_pixels=True).PatientName)

    def rename(ds: Dataset) -> None:
        ds.PatientName = "Renamed^Wrongly"

    uids = _rewrite(honest.target, "study", item.study_uid, rename)
    independent = independent_differences(honest.source, honest.target)
    assert independent == Differences(attributes={u: {"PatientName"} for u in uids})

    finding = _single_finding(before, honest.verify()[1])
    assert (finding["type"], finding["sop_uids"]) == ("altered_attributes", uids)
    assert finding["attributes"] == {"PatientName": {"before": old_name,
                                                     "after": "Renamed^Wrongly"}}


def test_one_changed_pixel_is_one_altered_pixels_finding(honest):
    before = honest.verify()[1]
    item = next(f for f in honest.files
                if f.transfer_syntax_uid in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
                and "PixelData" in dcmread(f.path, stop_before_pixels=False))

    def plus_one(ds: Dataset) -> None:
        pixels = ds.pixel_array.copy()
        pixels.flat[0] = pixels.flat[0] + 1 if pixels.flat[0] < pixels.max() else 0
        ds.PixelData = pixels.tobytes()

    (uid,) = _rewrite(honest.target, "instance", item.sop_instance_uid, plus_one)
    assert independent_differences(honest.source, honest.target) == Differences(pixels={uid})

    finding = _single_finding(before, honest.verify()[1])
    assert (finding["type"], finding["sop_uids"]) == ("altered_pixels", [uid])


def test_instance_unreadable_on_the_source_is_one_unretrievable_finding(honest):
    """A stored file of the embedded PACS removed behind its back: its index still lists the
    instance, C-GET cannot send it. Not dropped, not `extra` on the target: one finding."""
    before = honest.verify()[1]
    item = honest.files[0]
    path = _embedded_files(honest.source)[item.sop_instance_uid]
    saved = path.read_bytes()
    path.unlink()
    try:
        independent = independent_differences(honest.source, honest.target)
        assert independent == Differences(unreadable={item.sop_instance_uid})

        code, after = honest.verify()
        finding = _single_finding(before, after)
        assert code == 1
        assert (finding["type"], finding["sop_uids"], finding["related"]["side"]) == (
            "unretrievable", [item.sop_instance_uid], "source")
        assert (after["missing"], after["extra"], after["unretrievable"]) == (0, 0, 1)

        listed_code, listed = honest.inventory("src", "attributes")
        full_code, full = honest.inventory("src", "full")
        assert (listed_code, full_code) == (0, 1)  # could not read all it listed: exit 1
        assert full["counts"] == listed["counts"]
        assert full["unretrievable"] == 1 and full["issues"] >= 1
    finally:
        path.write_bytes(saved)
