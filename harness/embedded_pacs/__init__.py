"""Embedded PACS: a zero-install DICOM Query/Retrieve SCP with storage, built on pynetdicom.

Why it exists: every harness run needs at least one PACS it can start, fill, query, retrieve
from and wipe without Docker or a vendor install. This package is that default node, started
by the harness as a subprocess, ``python -m harness.embedded_pacs`` (__main__.py), or in the
harness's container image, which carries this package, harness/sqlite_db.py and an empty
harness/__init__.py: so nothing here imports other harness modules.

Services: Verification; Storage SCP for every storage SOP class with every transfer syntax;
Patient Root and Study Root Query/Retrieve FIND, MOVE and GET; Storage Commitment Push Model
SCP; Modality Worklist FIND and MPPS (N-CREATE, N-SET). One module per concept:

* server.py      the AE, association policy (called/calling AE titles, limits), event
                 bindings, request logging, SIGTERM shutdown
* connection.py  TCP options; deadlines (ARTIM) and size limits on every PDU read
* peers.py       the peers file: C-MOVE destinations and accepted calling AE titles
* storage.py     files as received plus the SQLite index; the adapter API below
* store.py       C-STORE: what is accepted, refused (with which status) and indexed
* query.py       C-FIND: the query model over the index
* matching.py    attribute matching, wildcards and ranges (PS3.4 C.2.2.2)
* retrieve.py    C-GET and C-MOVE
* conversion.py  transfer syntax conversion for retrieval (endianness, decompression)
* hl7.py         HL7 v2 ADT^A08/A40 over MLLP (``--hl7-port``, off by default)
* commitment.py  Storage Commitment N-ACTION, and its N-EVENT-REPORT on the same or a new
                 association
* worklist.py    Modality Worklist C-FIND over a folder of .wl entries (PS3.4 K)
* mpps.py        MPPS N-CREATE / N-SET, steps kept in mpps.sqlite (PS3.4 F.7)

Adapter API (the harness's node adapter imports these; pure SQLite, no DICOM library):
``open_index``, ``statistics``, ``wipe_storage`` and ``COLUMNS`` (storage.py).
"""

from harness.embedded_pacs.storage import COLUMNS, open_index, statistics, wipe_storage

__all__ = ["COLUMNS", "open_index", "statistics", "wipe_storage"]
