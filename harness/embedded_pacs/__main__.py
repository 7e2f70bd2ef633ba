"""``python -m harness.embedded_pacs``: run the embedded PACS (see harness/embedded_pacs)."""

import logging
import os
import sys

from harness.embedded_pacs.server import main

code = main()
# pynetdicom's reactor threads are not daemons and a handler may still be busy (a long
# C-FIND): exit now rather than wait for them; stores are atomic and SQLite is journalled.
logging.shutdown()
sys.stderr.flush()
os._exit(code)
