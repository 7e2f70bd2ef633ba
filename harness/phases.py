"""Rollout phases, in order: a report is gated against one (see docs/phases.md)."""

PHASES = ("planning", "infrastructure", "pilot", "staged-rollout", "full")
