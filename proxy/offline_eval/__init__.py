"""Offline evaluation: a baseline and a candidate model compared on the same held-out examples."""
