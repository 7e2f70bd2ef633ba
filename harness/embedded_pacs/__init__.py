"""The embedded PACS, run as ``python -m harness.embedded_pacs`` (see server.py)."""
