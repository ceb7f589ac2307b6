"""Blind human comparison: studies, votes, ratings and agreement."""
