"""Worst-case forgetting: attacks that try to bring a forgotten class or concept back, each run with
the same budget against references that never knew it (docs/robustness.md)."""
