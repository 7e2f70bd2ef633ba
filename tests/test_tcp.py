"""Associations the harness opens or accepts send without Nagle delay and ACK at once.

Without this, every DIMSE message on one association idled ~40 ms (Nagle on one side, a
delayed ACK on the other): the cause of the 0.55x storescu store rate measured before
(benchmarks/bench_store.py, docs/performance.md). Here: real sockets, real pynetdicom peers.
"""

from __future__ import annotations

import socket
import time

from pynetdicom import build_context
from pynetdicom.sop_class import Verification

from harness.dicom.client import DimseClient
from harness.launch.ports import free_port
from harness.performance.runner import _MoveSink
from synthetic_data.templates import clone_study, template_instance


def _nodelay(transport) -> int:
    return transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_both_ends_of_an_association_disable_nagle_and_ack_promptly() -> None:
    port = free_port()
    sink = _MoveSink(port)  # the harness's own Storage SCP (C-MOVE destination)
    try:
        client = DimseClient("127.0.0.1", port, "PACSHARNESS", timeout_s=10)
        assoc = client.associate([build_context(Verification)])
        try:
            assert _nodelay(assoc.dul.socket) == 1
            assert getattr(assoc.dul.socket, "_prompt_acks", False)
            deadline = time.monotonic() + 60
            while not sink.server.active_associations and time.monotonic() < deadline:
                time.sleep(0.01)
            (accepted,) = sink.server.active_associations
            assert _nodelay(accepted.dul.socket) == 1
            assert assoc.send_c_echo().Status == 0x0000
        finally:
            assoc.release()
        # and a real store still arrives whole through the wrapped reads
        template = template_instance("small", "CT")
        report = client.store(list(clone_study(template, 3)))
        assert report.ok and len(report.succeeded) == 3
        assert sink.received == 3
    finally:
        sink.stop()
