"""IHE Scheduled Workflow (RAD TF-1 3): orders on worklists, a modality that performs them,
and the checks that the archive holds what was ordered and reported (docs/workflow.md)."""
