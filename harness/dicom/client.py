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
from harness.dicom.peer import DimseConnectionError
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
        """Which (SOP class, transfer syntax) pairs the peer accepts, as one context each.

        An SCP may accept one context per abstract syntax and reject the others (PS3.8
        9.3.3.2 leaves the choice to it; PixelMed does so, measured): a pair refused among
        all the others is asked again in an association of its transfer syntax alone, so a
        syntax is "refused" only when the peer refused it when it had no other choice.
        """
        pairs = list(dict.fromkeys(pairs))
        accepted: dict[tuple[str, str], bool] = {}
        self._accepted_contexts(pairs, accepted)
        refused = [pair for pair in pairs if pair not in accepted]
        for syntax in dict.fromkeys(ts for _, ts in refused):
            self._accepted_contexts([p for p in refused if p[1] == syntax], accepted,
                                    quiet=True)
        return {pair: accepted.get(pair, False) for pair in pairs}

    def _accepted_contexts(
        self,
        pairs: list[tuple[str, str]],
        accepted: dict[tuple[str, str], bool],
        *,
        quiet: bool = False,
    ) -> None:
        """Propose `pairs` (at most MAX_CONTEXTS per association) and mark those accepted.
        `quiet`: an association the peer rejects outright means none of them (the peer may
        reject an association whose contexts it all refuses, PS3.8 9.3.4)."""
        for start in range(0, len(pairs), MAX_CONTEXTS):
            chunk = pairs[start : start + MAX_CONTEXTS]
            try:
                assoc = self.associate([build_context(sop, [ts]) for sop, ts in chunk])
            except DimseConnectionError:
                if quiet:
                    continue
                raise
            try:
                for cx in assoc.accepted_contexts:
                    accepted[(cx.abstract_syntax, cx.transfer_syntax[0])] = True
            finally:
                assoc.release()
