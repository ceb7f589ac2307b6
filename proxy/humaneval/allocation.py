"""Who sees which comparison, and on which side each model is shown: a pure, seeded plan.

1. How many comparisons. Sharing a comparison between two evaluators costs a slot that could show a
   new comparison, so the plan shares as little as `overlap` allows: it uses the most distinct
   comparisons U (at most the pool) for which the share seen by two or more evaluators reaches
   `overlap`. The n * k slots are spread evenly: each comparison goes to nk // U or nk // U + 1
   evaluators. When the pool is smaller than the least sharing needs, more is shared than asked
   (`overlap` is a floor); only a pool smaller than k, where someone would see a comparison twice,
   is an error.
2. Which evaluators share. Comparisons are placed from the most copies down, each with the evaluators
   that have the most free slots (Ryser's construction, which always fills every list exactly when
   no comparison has more copies than there are evaluators); among those, evaluators that have shared
   least with the ones already chosen come first, so every pair of evaluators gets overlap to agree on.
3. Which model is A. Per evaluator the tasks are edges between models; walking trails through them and
   showing each edge's first model on the left leaves every model within one of half on each side.
   Trail order is random, so the side of any one comparison is random too.

Without fixed `models`, a comparison of 3+ models compares one pair of them, the pair drawn once per
comparison (favouring pairs drawn least so far), so evaluators who share it judge the same pair.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    id: str
    models: tuple[str, ...]  # in the comparison's own order


@dataclass(frozen=True, slots=True)
class PlannedTask:
    evaluator: str
    position: int
    comparison_id: str
    model_a: str
    model_b: str


@dataclass(frozen=True, slots=True)
class Plan:
    tasks: list[PlannedTask]
    comparisons: int
    overlap_share: float


def copies_per_comparison(evaluators: int, per_evaluator: int, overlap: float, pool: int) -> list[int]:
    """How many evaluators see each used comparison, most first; ValueError when it cannot be done."""
    n, k = evaluators, per_evaluator
    if pool < k:
        raise ValueError(f"not enough comparisons: {pool} eligible, each evaluator needs {k} different ones")
    if n == 1 and overlap > 0:
        raise ValueError("overlap needs at least two evaluators")
    slots = n * k
    for used in range(min(slots, pool), k - 1, -1):
        shared = min(used, slots - used)
        # A small tolerance: 0.2 of 60 must count as 12 in floating point.
        if shared >= overlap * used - 1e-9:
            break
    base, extra = divmod(slots, used)
    return [base + 1] * extra + [base] * (used - extra)


def plan(
    pool: Sequence[Candidate],
    evaluators: Sequence[str],
    per_evaluator: int,
    overlap: float,
    *,
    models: tuple[str, str] | None,
    seed: int,
) -> Plan:
    rng = random.Random(seed)
    copies = copies_per_comparison(len(evaluators), per_evaluator, overlap, len(pool))
    chosen = rng.sample(list(pool), len(copies))
    pairs = _pairs(chosen, models, rng)
    lists = _distribute([(c.id, m) for c, m in zip(chosen, copies, strict=True)], evaluators, per_evaluator, rng)
    tasks: list[PlannedTask] = []
    for evaluator in evaluators:
        ids = lists[evaluator]
        rng.shuffle(ids)
        edges = [pairs[cid] for cid in ids]
        for position, (cid, keep) in enumerate(zip(ids, orient(edges, rng), strict=True)):
            a, b = pairs[cid] if keep else pairs[cid][::-1]
            tasks.append(PlannedTask(evaluator, position, cid, a, b))
    shared = sum(1 for m in copies if m >= 2)
    return Plan(tasks=tasks, comparisons=len(copies), overlap_share=shared / len(copies))


def _pairs(
    chosen: Sequence[Candidate], models: tuple[str, str] | None, rng: random.Random
) -> dict[str, tuple[str, str]]:
    if models is not None:
        return {c.id: models for c in chosen}
    drawn: Counter[frozenset[str]] = Counter()
    pairs: dict[str, tuple[str, str]] = {}
    for c in chosen:
        options = list(itertools.combinations(c.models, 2))
        least = min(drawn[frozenset(p)] for p in options)
        pair = rng.choice([p for p in options if drawn[frozenset(p)] == least])
        drawn[frozenset(pair)] += 1
        pairs[c.id] = pair
    return pairs


def _distribute(
    copies: Sequence[tuple[str, int]], evaluators: Sequence[str], per_evaluator: int, rng: random.Random
) -> dict[str, list[str]]:
    free = dict.fromkeys(evaluators, per_evaluator)
    together: Counter[frozenset[str]] = Counter()
    lists: dict[str, list[str]] = {e: [] for e in evaluators}
    for cid, m in sorted(copies, key=lambda item: -item[1]):
        group: list[str] = []
        for _ in range(m):
            group.append(min(
                (e for e in evaluators if e not in group),
                key=lambda e: (-free[e], sum(together[frozenset((e, g))] for g in group), rng.random()),
            ))  # fmt: skip
        for e in group:
            free[e] -= 1
            lists[e].append(cid)
        for pair in itertools.combinations(group, 2):
            together[frozenset(pair)] += 1
    # Ryser's construction cannot fail here (see the module docstring); a bug must not write a bad study.
    if any(free.values()):
        raise AssertionError(f"allocation left free slots: {free}")
    return lists


def orient(edges: Sequence[tuple[str, str]], rng: random.Random) -> list[bool]:
    """Per edge, True to show its first model on the left; every model within one of balanced.

    Trails are walked from a vertex of odd remaining degree while there is one, so each open trail
    ends at another odd vertex and every vertex ends at most one trail; closed trails are balanced.
    """
    incident: dict[str, list[int]] = defaultdict(list)
    for i, (a, b) in enumerate(edges):
        incident[a].append(i)
        incident[b].append(i)
    for indices in incident.values():
        rng.shuffle(indices)
    degree = {v: len(indices) for v, indices in incident.items()}
    keep: list[bool | None] = [None] * len(edges)
    while True:
        active = sorted(v for v, d in degree.items() if d)
        if not active:
            break
        odd = [v for v in active if degree[v] % 2]
        vertex = rng.choice(odd or active)
        while True:
            stack = incident[vertex]
            while stack and keep[stack[-1]] is not None:
                stack.pop()
            if not stack:
                break
            i = stack.pop()
            a, b = edges[i]
            keep[i] = a == vertex
            degree[a] -= 1
            degree[b] -= 1
            vertex = b if a == vertex else a
    return [bool(k) for k in keep]
