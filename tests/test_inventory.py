"""Inventory against real nodes of every kind: counts, digests, resume after a kill, sampling;
and the normalisation that makes a ledger row independent of the encoding."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
from io import BytesIO

import pytest
from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from harness.errors import ConfigError
from harness.fixtures import pacs_cluster_factory
from harness.migration.inventory import crawl, sample_rank
from harness.migration.ledger import Ledger
from harness.migration.normalise import row_from_dataset
from harness.migration.reconcile import reconcile
from harness.migration.verify import verify
from synthetic_data import GeneratorOptions, generate
from tests.helpers import LAUNCHABLE_KINDS, one_node_per_kind, store_into_every_node

ARCHIVE = GeneratorOptions(
    patients=2, studies_per_patient=2, modalities=["CT", "MR", "US", "SR", "DOC"], seed=5,
    scale="tiny", transfer_syntaxes=["implicit", "explicit"], charsets=["latin1", "utf8"],
)
KINDS = LAUNCHABLE_KINDS


def _file_roundtrip(ds: Dataset, transfer_syntax: str | None = None) -> Dataset:
    """`ds` written as a Part 10 file (optionally in another syntax) and read back."""
    ds = copy.deepcopy(ds)
    if transfer_syntax == RLELossless:
        ds.compress(RLELossless, generate_instance_uid=False)
    elif transfer_syntax:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return dcmread(BytesIO(buffer.getvalue()))


@pytest.fixture(scope="module")
def archive() -> list[Dataset]:
    return [copy.deepcopy(ds) for ds in generate(ARCHIVE)]


launched = pacs_cluster_factory(one_node_per_kind("inventory"), scope="module")


@pytest.fixture(scope="module")
def cluster(launched, archive):
    """One node of each launchable kind, each holding the archive."""
    return store_into_every_node(launched, archive)


@pytest.mark.parametrize("kind", KINDS)
def test_crawl_counts_and_digests_match_the_archive(cluster, archive, kind, tmp_path):
    node = cluster.node(kind)
    expected = {ds.SOPInstanceUID: row_from_dataset(_file_roundtrip(ds)) for ds in archive}
    statistics = node.statistics().as_dict()

    seen = []
    listed = crawl(node, tmp_path / "attributes.sqlite", depth="attributes",
                   progress=lambda done, total: seen.append((done, total)))
    assert listed.counts == statistics
    assert listed.instances_retrieved == 0
    assert seen[0] == (0, statistics["studies"]) and seen[-1] == (statistics["studies"],) * 2

    full = crawl(node, tmp_path / "full.sqlite", depth="full")
    assert full.counts == statistics
    assert full.instances_retrieved == len(archive) and full.issues == 0
    with Ledger.open(tmp_path / "full.sqlite") as ledger:
        rows = {r["sop_uid"]: r for r in ledger.iter_instances()}
    assert set(rows) == set(expected)
    for uid, row in rows.items():
        want = expected[uid]
        assert (row["attrs_digest"], row["pixel_digest"], row["keys_digest"]) == (
            want.attrs_digest, want.pixel_digest, want.keys_digest), uid
        assert row["patient_name"] == want.patient_name


def test_ledgers_of_every_kind_reconcile_without_findings(cluster, tmp_path):
    """The same archive in every kind of node: full-depth ledgers are equal (different
    servers, retrieval by C-GET or WADO-RS, stored syntaxes kept or converted)."""
    ledgers = {}
    for kind in KINDS:
        ledgers[kind] = tmp_path / f"{kind}.sqlite"
        crawl(cluster.node(kind), ledgers[kind], depth="full")
    reference = ledgers[KINDS[0]]
    for kind in KINDS[1:]:
        findings = reconcile(reference, ledgers[kind])
        assert findings.findings == [], findings.summary_text()
        assert findings.verdict == "pass"


def test_dimse_and_dicomweb_crawls_agree_on_orthanc(cluster, tmp_path):
    if "orthanc" not in KINDS:
        pytest.skip("Orthanc not installed")
    node = cluster.node("orthanc")
    web = crawl(node, tmp_path / "web.sqlite", depth="full", via="dicomweb")
    dimse = crawl(node, tmp_path / "dimse.sqlite", depth="full", via="dimse")
    assert (web.via, dimse.via) == ("dicomweb", "dimse")
    assert reconcile(tmp_path / "web.sqlite", tmp_path / "dimse.sqlite").findings == []


def test_sample_retrieves_the_same_studies_everywhere(cluster, tmp_path):
    # not Orthanc: outside the sample, key attributes come from the node's index, and
    # Orthanc 1.10's index answers '^' for names it cannot represent (see the report)
    node = cluster.node(KINDS[0])
    other = cluster.node("dcmqrscp" if "dcmqrscp" in KINDS else KINDS[0])
    a = crawl(node, tmp_path / "a.sqlite", depth="full", sample=2)
    b = crawl(other, tmp_path / "b.sqlite", depth="full", sample=2)
    assert a.studies_retrieved == b.studies_retrieved == 2
    assert a.counts == b.counts
    with Ledger.open(tmp_path / "a.sqlite") as ledger:
        studies = [uid for (uid,) in ledger.conn.execute("SELECT study_uid FROM studies")]
        chosen = {uid for (uid,) in ledger.conn.execute(
            "SELECT study_uid FROM studies WHERE retrieve = 1")}
    assert chosen == set(sorted(studies, key=sample_rank)[:2])
    findings = reconcile(tmp_path / "a.sqlite", tmp_path / "b.sqlite")
    assert findings.verdict == "pass", findings.summary_text()
    assert findings.sample["studies_compared_fully"] == 2
    assert findings.sample["studies_total"] == len(studies)
    assert 0 < findings.sample["max_altered_fraction_95"] < 1


def test_crawl_resumes_after_being_killed(cluster, tmp_path):
    """SIGKILL a crawl after its first committed study; the next run finishes the rest."""
    node = cluster.node(KINDS[0])
    ledger = tmp_path / "killed.sqlite"
    script = textwrap.dedent(f"""
        import sys, time
        from harness.cluster import Cluster
        from harness.config import parse_topology
        from harness.migration.inventory import crawl
        topology = parse_topology('''name: ext
        nodes:
          n: {{kind: external, ae_title: {node.ae_title}, host: 127.0.0.1,
              dicom_port: {node.dicom_port}, synthetic: true}}
        ''')
        node = Cluster.launch(topology).node("n")
        def progress(done, total):
            print(done, total, flush=True)
            if done >= 1:
                time.sleep(60)  # killed here, with one study committed
        crawl(node, sys.argv[1], depth="full", progress=progress)
    """)
    child = subprocess.Popen([sys.executable, "-c", script, str(ledger)],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in child.stdout:
            if int(line.split()[0]) >= 1:
                break
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    with pytest.raises(ConfigError, match="did not finish"):
        reconcile(ledger, ledger)
    with pytest.raises(ConfigError, match="depth 'full' \\(now 'attributes'\\)"):
        crawl(node, ledger, depth="attributes")  # resuming it differently: refused

    resumed = crawl(node, ledger, depth="full")
    assert resumed.studies_resumed == 1
    assert resumed.studies_crawled == resumed.studies_total - 1
    assert resumed.counts == node.statistics().as_dict()
    crawl(node, tmp_path / "fresh.sqlite", depth="full")
    assert reconcile(tmp_path / "fresh.sqlite", ledger).findings == []
    again = crawl(node, ledger, depth="attributes")  # a finished ledger is crawled afresh
    assert again.studies_resumed == 0 and again.depth == "attributes"


def test_bad_depth_or_sample_is_a_config_error(cluster, tmp_path):
    node = cluster.node(KINDS[0])
    with pytest.raises(ConfigError, match="depth: unknown depth 'deep'"):
        crawl(node, tmp_path / "x.sqlite", depth="deep")
    with pytest.raises(ConfigError, match="sample: only with depth full"):
        crawl(node, tmp_path / "x.sqlite", depth="attributes", sample=3)
    with pytest.raises(ConfigError, match="sample: must be a whole number"):
        crawl(node, tmp_path / "x.sqlite", depth="full", sample=0)


# -- normalisation (no server needed) ----------------------------------------------------


def test_rows_do_not_depend_on_the_encoding(archive):
    """Implicit/explicit VR, RLE Lossless and a charset conversion give equal digests;
    private elements that become UN under implicit VR compare equal to their originals."""
    images = [ds for ds in archive if "PixelData" in ds][:4]
    assert images
    for ds in images:
        reference = row_from_dataset(_file_roundtrip(ds, ExplicitVRLittleEndian))
        for syntax in (ImplicitVRLittleEndian, RLELossless):
            other = row_from_dataset(_file_roundtrip(ds, syntax))
            assert other.transfer_syntax == syntax
            assert (other.attrs_digest, other.pixel_digest) == (
                reference.attrs_digest, reference.pixel_digest)
        converted = _file_roundtrip(ds, ExplicitVRLittleEndian)
        converted.decode()
        converted.SpecificCharacterSet = "ISO_IR 192"
        utf8 = row_from_dataset(_file_roundtrip(converted))
        assert utf8.charset == "ISO_IR 192"
        assert (utf8.attrs_digest, utf8.patient_name) == (
            reference.attrs_digest, reference.patient_name)


def test_one_changed_pixel_changes_only_the_pixel_digest(archive):
    ds = _file_roundtrip(next(ds for ds in archive if "PixelData" in ds))
    before = row_from_dataset(ds)
    pixels = ds.pixel_array.copy()
    pixels.flat[-1] += 1
    ds.PixelData = pixels.tobytes()
    after = row_from_dataset(ds)
    assert after.pixel_digest != before.pixel_digest
    assert after.attrs_digest == before.attrs_digest


def test_undecodable_pixel_data_is_hashed_raw_and_flagged(archive):
    ds = _file_roundtrip(next(ds for ds in archive if "PixelData" in ds))
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8 not really JPEG-LS \xff\xd9"])
    row = row_from_dataset(ds)
    assert row.pixel_mode == "raw" and row.pixel_digest
    assert row.transfer_syntax == JPEGLSLossless


def test_verify_crawls_both_nodes_and_writes_the_findings(cluster, tmp_path):
    source = cluster.node(KINDS[0])
    target = cluster.node(KINDS[-1])
    seen = set()
    result = verify(source, target, tmp_path / "verify", depth="full",
                    progress=lambda side, done, total: seen.add(side))
    assert result.as_json() == {
        "verdict": "pass",
        "counts": {"source": source.statistics().as_dict(),
                   "target": target.statistics().as_dict()},
        "missing": 0, "extra": 0, "altered": 0, "unretrievable": 0,
    }
    assert seen == {"source", "target"}
    assert result.exit_code == 0 and result.findings.findings == []
    for name in ("findings.json", "findings.csv", "summary.txt", "source.ledger.sqlite",
                 "target.ledger.sqlite"):
        assert (tmp_path / "verify" / name).is_file()


def test_a_jpeg_decoded_on_retrieval_has_the_row_of_its_original():
    """What a PACS does for an SCU that did not offer JPEG: decode it (YBR_FULL_422 -> RGB,
    explicit VR little endian). Same content, so the same digests (PS3.5 8.2.1)."""
    from tests.realworld import valid_files

    originals = [f for f in valid_files() if f.transfer_syntax_uid == JPEGBaseline8Bit
                 and dcmread(f.path, stop_before_pixels=True).get(
                     "PhotometricInterpretation", "").startswith("YBR")]
    assert originals, "the corpus has no YBR JPEG baseline image"
    for item in originals:
        original = dcmread(item.path)
        decoded = dcmread(item.path)
        decoded.decompress()  # pydicom converts to RGB and sets PhotometricInterpretation
        assert decoded.PhotometricInterpretation == "RGB"
        a, b = row_from_dataset(original), row_from_dataset(_file_roundtrip(decoded))
        assert (a.attrs_digest, a.pixel_digest) == (b.attrs_digest, b.pixel_digest), item.name
        assert (a.pixel_mode, b.transfer_syntax) == ("decoded", ExplicitVRLittleEndian)
