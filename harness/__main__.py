"""`python -m harness` is the same as the `pacs-harness` command."""

from harness.cli import main

main()
