"""DIMSE client: C-ECHO, C-STORE over N parallel associations, C-FIND, C-MOVE, C-GET.

Every operation returns a typed result carrying the DIMSE status (status.py). The operations
live by concern (store.py, query.py, retrieve.py) on one peer (peer.py); this class puts
them together with C-ECHO and context negotiation.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from pynetdicom import build_context
from pynetdicom.sop_class import Verification

from harness.dicom.contexts import MAX_CONTEXTS
from harness.dicom.retrieve import RetrieveClient
from harness.dicom.status import NO_STATUS, EchoResult, Status
from harness.dicom.store import StoreClient
from harness.dicom.watchdog import Watchdog


class DimseClient(StoreClient, RetrieveClient):
    """A DIMSE service user talking to one peer (host, port, AE title)."""

    # -- C-ECHO ----------------------------------------------------------------------
    def echo(self) -> EchoResult:
        start = time.perf_counter()
        assoc = self.associate([build_context(Verification)])
        watchdog = Watchdog(lambda: assoc, self.timeout_s)  # the answer, dripped or not
        try:
            rsp = assoc.send_c_echo()
            status = Status(rsp.Status) if rsp and "Status" in rsp else NO_STATUS
        finally:
            watchdog.stop()
            if assoc.is_established:
                assoc.release()
        if watchdog.expired:
            status = NO_STATUS
        return EchoResult(status, time.perf_counter() - start)

    def negotiate(self, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], bool]:
        """Which (SOP class, transfer syntax) pairs the peer accepts, as one context each."""
        pairs = list(dict.fromkeys(pairs))
        accepted: dict[tuple[str, str], bool] = {}
        for start in range(0, len(pairs), MAX_CONTEXTS):
            chunk = pairs[start : start + MAX_CONTEXTS]
            assoc = self.associate([build_context(sop, [ts]) for sop, ts in chunk])
            try:
                for cx in assoc.accepted_contexts:
                    accepted[(cx.abstract_syntax, cx.transfer_syntax[0])] = True
            finally:
                assoc.release()
        return {pair: accepted.get(pair, False) for pair in pairs}
