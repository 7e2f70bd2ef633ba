"""The real-world corpus end to end, as a user runs it: files nobody here wrote are stored,
migrated by each method, and verified at full depth; the verdict must equal an independent
comparison of both archives, and each seeded defect must be exactly one more finding.

Nodes (one `up` for the module): `pocket` (embedded PACS) and `legacy` (DCMTK dcmqrscp) as
sources, `central` (Orthanc) as the target. Every step goes through the `pacs-harness`
command. The independent side reads the original files with pydicom and the target's copies
through Orthanc's own REST API (/instances/{id}/file), never through the harness's crawler.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from harness.cluster import Cluster
from harness.config import load_topology
from harness.launch.state import state_dir_for
from harness.launch.tools import find_binary
from harness.nodes.base import Node
from tests.helpers import run_cli
from tests.realworld import CorpusFile, valid_files

TOPOLOGY = """name: realworld
nodes:
  pocket:  {kind: embedded, ae_title: POCKET}
  legacy:  {kind: dcmqrscp, ae_title: LEGACY}
  central: {kind: orthanc,  ae_title: CENTRAL}
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """A state directory of the module's own, for the commands and for this process."""
    for binary in ("Orthanc", "dcmqrscp"):
        if not find_binary(binary):
            pytest.skip(f"{binary} not installed (apt-get install orthanc dcmtk)")
    state = tmp_path_factory.mktemp("state")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PACS_HARNESS_STATE_DIR", str(state))
        yield dict(os.environ)


@dataclass
class Site:
    topology: Path
    env: dict[str, str]
    cluster: Cluster
    corpus_dir: Path
    work: Path

    def cli(self, *args: str, timeout: float = 600) -> Any:
        return run_cli(*args, "--topology", str(self.topology), env=self.env, timeout=timeout)

    def node(self, name: str) -> Node:
        return self.cluster.node(name)


@pytest.fixture(scope="module")
def site(env, tmp_path_factory) -> Site:
    work = tmp_path_factory.mktemp("realworld")
    topology = work / "topology.yaml"
    topology.write_text(TOPOLOGY)
    corpus_dir = work / "corpus"
    corpus_dir.mkdir()
    for n, item in enumerate(valid_files()):
        shutil.copy(item.path, corpus_dir / f"{n:02d}-{item.path.name}")
    up = run_cli("up", "--topology", str(topology), env=env, timeout=300)
    assert up.returncode == 0, up.stderr
    try:
        topo = load_topology(topology)
        cluster = Cluster.from_state(topo, state_dir_for(topo))
        assert cluster is not None
        yield Site(topology, env, cluster, corpus_dir, work)
    finally:
        down = run_cli("down", "--topology", str(topology), env=env, timeout=300)
        assert down.returncode == 0, down.stderr


# -- the independent side ----------------------------------------------------------------------


def _read(data: bytes | Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(BytesIO(data) if isinstance(data, bytes) else data)


def _pixels(ds: Dataset) -> Any:
    """Decoded pixel values; the encoded bytes where no decoder here reads them (compared
    as they are then); None without pixel data."""
    if "PixelData" not in ds:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ds.pixel_array
        except Exception:  # noqa: BLE001 - e.g. a JPEG that no installed decoder reads
            return np.frombuffer(ds.PixelData, dtype=np.uint8)


# PhotometricInterpretation changes with decoding (the decoded pixels decide); trailing padding
# is no content and may be removed by any application (PS3.10 7.2).
IGNORED = {"PhotometricInterpretation", "DataSetTrailingPadding"}


def _values(ds: Dataset) -> dict[str, Any]:
    """Attribute values of a data set by keyword (or tag), recursively, without pixel data
    and without group 0002/group lengths: what "same content" means, independently."""
    out: dict[str, Any] = {}
    for elem in ds:
        if elem.tag.group == 0x0002 or elem.tag.element == 0 or elem.tag == 0x7FE00010:
            continue
        key = elem.keyword or str(elem.tag)
        if key in IGNORED:
            continue
        if elem.VR == "SQ":
            out[key] = [_values(item) for item in elem.value]
        elif isinstance(elem.value, bytes):
            out[key] = elem.value.rstrip(b"\0 ")
        else:
            value = elem.value
            out[key] = [str(v) for v in value] if isinstance(value, list | tuple) or (
                hasattr(value, "__iter__") and not isinstance(value, str)
            ) else str(value)
    return out


def independent_differences(originals: dict[str, CorpusFile], target: Node) -> dict[str, str]:
    """SOP Instance UID -> what differs on the target ("missing", "attributes: ...", "pixels"),
    from the original files and Orthanc's own REST API."""
    rest = target.rest()
    held: dict[str, str] = {}
    for orthanc_id in rest.session.get(f"{rest.base_url}/instances", timeout=30).json():
        tags = rest.session.get(f"{rest.base_url}/instances/{orthanc_id}/simplified-tags",
                                timeout=30).json()
        held[tags["SOPInstanceUID"]] = orthanc_id
    differences: dict[str, str] = {}
    for sop, item in originals.items():
        if sop not in held:
            differences[sop] = "missing"
            continue
        raw = rest.session.get(f"{rest.base_url}/instances/{held[sop]}/file", timeout=30).content
        original, copy = _read(item.path), _read(raw)
        a, b = _values(original), _values(copy)
        changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        if changed:
            differences[sop] = f"attributes: {changed}"
            continue
        pa, pb = _pixels(original), _pixels(copy)
        if (pa is None) != (pb is None) or (pa is not None and not np.array_equal(pa, pb)):
            differences[sop] = "pixels"
    for sop in held.keys() - originals.keys():
        differences[sop] = "extra"
    return differences


# -- the steps a user runs ---------------------------------------------------------------------


def _stored_on(site: Site, name: str) -> dict[str, CorpusFile]:
    """What the source really holds after `store`, read from its own storage (pydicom)."""
    node = site.node(name)
    folder = node.storage_dir if name == "pocket" else node.database_dir
    by_uid = {item.sop_instance_uid: item for item in valid_files()}
    held = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.name.endswith((".sqlite", ".dat", "-wal", "-shm")):
            try:
                sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            except Exception:  # noqa: BLE001 - not a DICOM file (index, journal)
                continue
            if sop in by_uid:
                held[sop] = by_uid[sop]
    return held


@pytest.fixture(scope="module")
def stored(site) -> dict[str, dict[str, CorpusFile]]:
    """The corpus stored into both sources with `pacs-harness store`."""
    held = {}
    for name in ("pocket", "legacy"):
        proc = site.cli("store", "--to", name, "--json", str(site.corpus_dir))
        assert proc.returncode in (0, 1), proc.stderr
        assert "Traceback" not in proc.stderr
        report = json.loads(proc.stdout)
        held[name] = _stored_on(site, name)
        assert len(held[name]) == report["stored"], (name, report)
    # the embedded PACS takes every valid file; dcmqrscp refuses only what it does not know
    assert len(held["pocket"]) == len(valid_files())
    return held


@pytest.mark.parametrize(("source", "method"), [
    ("pocket", "move"), ("pocket", "get"), ("legacy", "move"), ("legacy", "get"),
])
def test_migration_of_real_world_files_verifies_like_an_independent_comparison(
    site, stored, source, method
):
    target = site.node("central")
    target.wipe()
    state = site.work / f"migration-{source}-{method}.sqlite"
    moved = site.cli("migrate", "--from", source, "--to", "central", "--method", method,
                     "--state", str(state), "--no-monitor", "--json")
    assert "Traceback" not in moved.stderr
    assert moved.returncode == 0, moved.stdout + moved.stderr
    expected = independent_differences(stored[source], target)
    out = site.work / f"verify-{source}-{method}"
    checked = site.cli("verify", "--source", source, "--target", "central", "--depth", "full",
                       "--out", str(out), "--json")
    assert "Traceback" not in checked.stderr
    verdict = json.loads(checked.stdout)
    findings = json.loads((out / "findings.json").read_text())
    missing = {sop for sop, what in expected.items() if what == "missing"}
    extra = {sop for sop, what in expected.items() if what == "extra"}
    assert findings["missing"] == len(missing), (expected, findings["findings"])
    assert findings["extra"] == len(extra), (expected, findings["findings"])
    assert findings["altered"] == len(expected) - len(missing) - len(extra), (
        expected, findings["findings"])
    assert verdict["verdict"] == ("fail" if expected else "pass")
    assert checked.returncode == (1 if expected else 0)
