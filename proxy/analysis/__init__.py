"""Experiment analysis: pure functions from per-variant arrays to estimates, intervals and decisions."""
