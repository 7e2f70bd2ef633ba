"""pacs-harness: a validation harness for PACS integration and migration."""

__version__ = "0.1.0"
