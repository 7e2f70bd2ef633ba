"""Benchmark: harness C-FIND and C-GET against DCMTK findscu and getscu (run by hand).

    python benchmarks/bench_query_retrieve.py     # ~1 min

One launched Orthanc holds 5 studies of 50 realistic CT instances (512x512). Timed on it:
  * 30 study-level C-FIND by PatientID: harness DimseClient.find vs /usr/bin/findscu
    (one process per query, as scripts call it);
  * 3 study retrievals by C-GET: harness DimseClient.get (streamed, nothing kept) vs
    /usr/bin/getscu writing the files into a temporary folder.
The DCMTK tools run with TCP_NODELAY=1, like the launched node (harness/nodes/base.py): without
it each of getscu's C-STORE responses waits for Orthanc's delayed ACK (~40 ms per instance).
Ratios > 1 mean the harness is faster.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.cluster import Cluster  # noqa: E402
from harness.config import parse_topology  # noqa: E402
from harness.dicom.peer import HARNESS_AE_TITLE  # noqa: E402
from synthetic_data.templates import clone_study, template_instance  # noqa: E402

FINDSCU, GETSCU = "/usr/bin/findscu", "/usr/bin/getscu"
STUDIES, INSTANCES, QUERIES, RETRIEVES = 5, 50, 30, 3


def main() -> None:
    cluster = Cluster.launch(parse_topology(
        "name: bench-qr\nnodes:\n  orthanc: {kind: orthanc, ae_title: BENCHQR}\n"))
    folder = Path(tempfile.mkdtemp(prefix="bench-qr-"))
    try:
        node = cluster.node("orthanc")
        client = node.dimse(timeout_s=120)
        template = template_instance("realistic", "CT")
        studies = []
        for n in range(STUDIES):
            datasets = clone_study(template, INSTANCES, patient_id=f"QR{n:03d}")
            assert client.store(datasets, associations=4).ok
            studies.append((f"QR{n:03d}", str(datasets[0].StudyInstanceUID)))
        dcmtk_env = {**os.environ, "TCP_NODELAY": "1"}
        address = ["-aet", HARNESS_AE_TITLE, "-aec", node.ae_title, node.host,
                   str(node.dicom_port)]

        start = time.perf_counter()
        for i in range(QUERIES):
            found = client.find("STUDY", {"PatientID": studies[i % STUDIES][0],
                                          "StudyInstanceUID": None})
            assert found.ok and len(found.matches) == 1
        harness_find = (time.perf_counter() - start) / QUERIES
        start = time.perf_counter()
        for i in range(QUERIES):
            subprocess.run([FINDSCU, "-S", "-k", "QueryRetrieveLevel=STUDY",
                            "-k", f"PatientID={studies[i % STUDIES][0]}",
                            "-k", "StudyInstanceUID", *address],
                           check=True, capture_output=True, timeout=60, env=dcmtk_env)
        dcmtk_find = (time.perf_counter() - start) / QUERIES

        start = time.perf_counter()
        for i in range(RETRIEVES):
            got = client.get("STUDY", {"StudyInstanceUID": studies[i][1]}, keep=False)
            assert got.ok and got.completed == INSTANCES
        harness_get = (time.perf_counter() - start) / RETRIEVES
        start = time.perf_counter()
        for i in range(RETRIEVES):
            target = folder / f"get{i}"
            target.mkdir()
            subprocess.run([GETSCU, "-S", "-k", "QueryRetrieveLevel=STUDY",
                            "-k", f"StudyInstanceUID={studies[i][1]}", "-od", str(target),
                            *address], check=True, capture_output=True, timeout=300,
                           env=dcmtk_env)
            assert len(list(target.iterdir())) == INSTANCES
        dcmtk_get = (time.perf_counter() - start) / RETRIEVES
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)

    print(f"C-FIND study level (mean of {QUERIES}): harness {harness_find * 1000:.1f} ms, "
          f"findscu {dcmtk_find * 1000:.1f} ms, ratio findscu/harness "
          f"{dcmtk_find / harness_find:.2f}")
    print(f"C-GET {INSTANCES}-image CT study (mean of {RETRIEVES}): harness {harness_get:.2f} s "
          f"({INSTANCES / harness_get:.0f} inst/s), getscu {dcmtk_get:.2f} s "
          f"({INSTANCES / dcmtk_get:.0f} inst/s), ratio getscu/harness "
          f"{dcmtk_get / harness_get:.2f}")


if __name__ == "__main__":
    main()
