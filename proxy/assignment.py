"""Deterministic user -> variant assignment.

The formula is a public contract (anyone can reproduce a user's side outside the proxy):
    bucket = mmh3.hash(f"{salt}:{user_id}", seed=0, signed=False) % 10000
    treatment iff bucket < round(percent * 100)
A user's bucket never changes, so raising the percent only ever moves control users to
treatment, and lowering it only ever moves treatment users back.
"""

from __future__ import annotations

from typing import Literal

import mmh3

BUCKETS = 10_000  # 0.01 % rollout steps
Variant = Literal["control", "treatment"]


def bucket(salt: str, user_id: str) -> int:
    # Salted per experiment so that a new experiment reshuffles users on purpose and two
    # concurrent experiments do not treat the same users.
    # Encoded here rather than by mmh3: a lone surrogate (from a mis-decoded argv) crashes mmh3's
    # own str path; surrogatepass keeps every valid id's UTF-8 bytes, and so its bucket, unchanged.
    key = f"{salt}:{user_id}".encode("utf-8", "surrogatepass")
    return int(mmh3.hash(key, seed=0, signed=False)) % BUCKETS


def threshold(percent: float) -> int:
    """Number of buckets (of 10,000) in treatment at `percent`."""
    return round(percent * 100)


def choose_variant(bucket_: int, treatment_threshold: int) -> Variant:
    return "treatment" if bucket_ < treatment_threshold else "control"
