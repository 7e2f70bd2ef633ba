"""Reproduction: back-to-back C-FINDs on one association while the machine is busy.

    python benchmarks/repro_find_loss.py [--rounds 40] [--kinds orthanc,embedded]

Launches the nodes, stores a known study (SERIES x INSTANCES CT images), then, while two CPU
burners and a parallel C-STORE stream load the machine (both stopped at the end), runs
IMAGE-level C-FINDs series after series over ONE association, `rounds` times, and counts the
matches against what was stored:
  * `pynetdicom`: pynetdicom 3.0.4's send_c_find, as DimseClient.find_over used it until now;
  * `harness`: DimseClient.find_over today (harness/dicom/wire.py).
For the pynetdicom path it also counts the "unexpected C-FIND-RSP" warnings pynetdicom logs
when its reactor thread takes a response off the DIMSE queue (the lost ones).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom.uid import generate_uid  # noqa: E402
from pynetdicom import build_context  # noqa: E402
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # noqa: E402

from harness.cluster import Cluster  # noqa: E402
from harness.config import parse_topology  # noqa: E402
from harness.dicom.client import DimseClient  # noqa: E402
from harness.dicom.query import query_identifier  # noqa: E402
from synthetic_data.templates import clone_study, template_instance  # noqa: E402

SERIES, INSTANCES = 6, 12
BURN_S = 600.0  # hard bound of each CPU burner, whatever happens to this process


def burn(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.unexpected = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "unexpected C-FIND service message" in record.getMessage():
            self.unexpected += 1


def pynetdicom_find_over(client: DimseClient, assoc, keys: dict) -> tuple[int, str]:
    """The old DimseClient.find_over: matches and final status of one C-FIND."""
    identifier = query_identifier("IMAGE", keys)
    matches, final = 0, "none"
    for status, data in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
        if status is None or "Status" not in status:
            final = "none"
            break
        final = f"0x{status.Status:04X}"
        if status.Status in (0xFF00, 0xFF01) and data is not None:
            matches += 1
    return matches, final


def run(client: DimseClient, study: str, series: list[str], rounds: int, path: str) -> dict:
    lost = no_final = queries = 0
    if path == "pynetdicom":
        assoc = client.associate([build_context(StudyRootQueryRetrieveInformationModelFind)])
    else:
        assoc = client.find_association()
    try:
        for _ in range(rounds):
            for uid in series:
                keys = {"StudyInstanceUID": study, "SeriesInstanceUID": uid,
                        "SOPInstanceUID": None}
                if path == "pynetdicom":
                    found, final = pynetdicom_find_over(client, assoc, keys)
                    if not assoc.is_established:
                        assoc = client.associate(
                            [build_context(StudyRootQueryRetrieveInformationModelFind)])
                else:
                    result = client.find_over(assoc, "IMAGE", keys)
                    found, final = len(result.matches), f"0x{result.status.code:04X}"
                queries += 1
                lost += INSTANCES - found
                no_final += final != "0x0000"
    finally:
        assoc.release()
    return {"queries": queries, "lost": lost, "no_final": no_final}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--kinds", default="orthanc,embedded")
    parser.add_argument("--paths", default="pynetdicom,harness")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    nodes = "".join(f"  {k}: {{kind: {k}, ae_title: {k.upper()[:16]}}}\n" for k in kinds)
    cluster = Cluster.launch(parse_topology(f"name: repro-find\nnodes:\n{nodes}"))
    warnings = Warnings()
    logging.getLogger("pynetdicom").addHandler(warnings)
    burners = [multiprocessing.Process(target=burn, args=(BURN_S,), daemon=True)
               for _ in range(2)]
    stop = threading.Event()
    try:
        template = template_instance("tiny", "CT")
        known = clone_study(template, SERIES * INSTANCES, patient_id="FINDLOSS")
        series_uids = [generate_uid() for _ in range(SERIES)]
        for number, ds in enumerate(known):  # SERIES series of INSTANCES images
            ds.SeriesInstanceUID = series_uids[number // INSTANCES]
            ds.SeriesNumber = number // INSTANCES + 1
        study = str(known[0].StudyInstanceUID)
        series = list(dict.fromkeys(str(ds.SeriesInstanceUID) for ds in known))
        for kind in kinds:
            assert cluster.node(kind).dimse().store(known).ok

        def store_stream(client: DimseClient) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                client.store(clone_study(template, 10, patient_id=f"LOAD{n}"))

        for burner in burners:
            burner.start()
        streams = [threading.Thread(target=store_stream, args=(cluster.node(k).dimse(),),
                                    daemon=True) for k in kinds]
        for stream in streams:
            stream.start()
        for kind in kinds:
            client = cluster.node(kind).dimse()
            for path in args.paths.split(","):
                before = warnings.unexpected
                figures = run(client, study, series, args.rounds, path)
                figures["unexpected_rsp_warnings"] = warnings.unexpected - before
                print(f"{kind:9} {path:10} {figures}", flush=True)
    finally:
        stop.set()
        for burner in burners:
            if burner.is_alive():
                burner.terminate()
            burner.join()
        cluster.stop()


if __name__ == "__main__":
    main()
