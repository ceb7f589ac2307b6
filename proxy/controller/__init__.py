"""Staged rollout: a plan of phases per experiment, gates between them, and the controller that acts on them."""
