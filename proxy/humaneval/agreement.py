"""Do the evaluators agree? Inter-rater reliability over blind pairwise votes.

    cohen_pairs         Cohen's kappa for every pair of evaluators (scikit-learn), flagged under a threshold
    fleiss              Fleiss' kappa across evaluators (statsmodels)
    krippendorff_alpha  Krippendorff's alpha, nominal, any number of raters per comparison (krippendorff)
    with_majority       each evaluator's agreement with the majority of the others
    judge_agreement     an automatic judge against the human majority, Cohen's kappa

Labels are position-free: a vote becomes "first" | "tie" | "second" for its pair of models sorted by name
(`model_label`), so two evaluators who were shown a comparison with the sides swapped and preferred the same
model agree. The unit rated is the comparison (`comparison_id`); all its votes must be on the same two models.
When an evaluator voted on a comparison more than once, their latest vote by `ts` counts: a changed mind
replaces the earlier answer.

Kappa is chance-corrected agreement, (p_o - p_e) / (1 - p_e) (Cohen 1960, Educ. Psychol. Meas. 20:37); below
0.4 is "fair" or worse on Landis & Koch's scale (1977, Biometrics 33:159), the usual flag for an evaluator or
guideline to look at. It is undefined when p_e = 1, i.e. every label of both raters is the same one: then None.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import krippendorff
import numpy as np
from sklearn.metrics import cohen_kappa_score  # type: ignore[import-untyped]
from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

from proxy.humaneval.ratings import Vote

LABELS = ("first", "tie", "second")
JUDGE_PREFIX = "judge:"
HUMAN_MAJORITY = "human majority"


def model_label(vote: Vote, pair: tuple[str, str]) -> str:
    """Which model of sorted(pair) the vote preferred, "first" | "tie" | "second", whatever side it was shown on."""
    first, second = sorted(pair)
    if {vote.model_a, vote.model_b} != {first, second}:
        raise ValueError(f"vote on {vote.model_a!r} vs {vote.model_b!r} is not about the pair {pair}")
    winner = vote.winner
    return "tie" if winner is None else "first" if winner == first else "second"


@dataclass(frozen=True, slots=True)
class PairKappa:
    a: str
    b: str
    kappa: float | None
    shared: int
    flag: bool


def cohen_pairs(votes: Sequence[Vote], *, min_shared: int = 5, threshold: float = 0.4) -> list[PairKappa]:
    """Cohen's kappa for every pair of evaluators over the comparisons both voted on, sorted by (a, b).

    kappa is None with fewer than `min_shared` shared comparisons (too few to mean anything) or when undefined.
    `flag` is kappa < threshold; an undefined or too-thin kappa is not flagged, there being no evidence either way.
    """
    table = _label_table(votes)
    by_evaluator: dict[str, dict[str, str]] = defaultdict(dict)
    for comparison, labels in table.items():
        for evaluator, (_, label) in labels.items():
            by_evaluator[evaluator][comparison] = label
    results = []
    for a, b in itertools.combinations(sorted(by_evaluator), 2):
        shared = sorted(by_evaluator[a].keys() & by_evaluator[b].keys())
        kappa = _kappa([by_evaluator[a][c] for c in shared], [by_evaluator[b][c] for c in shared], min_shared)
        results.append(_pair_kappa(a, b, kappa, len(shared), threshold))
    return results


def fleiss(votes: Sequence[Vote], *, min_raters: int = 2) -> float | None:
    """Fleiss' kappa over the comparisons with at least `min_raters` evaluators, each counted with exactly that many.

    Fleiss' formula (Fleiss 1971, Psychol. Bull. 76:378) needs the same number of raters on every item. Of the
    two ways to get it, this keeps every eligible comparison and takes its first `min_raters` evaluators by the
    time of their vote, rather than keeping only the comparisons with the most common number of raters: which
    votes are dropped then depends on arrival order, never on the labels, so it cannot bias kappa, and no
    comparison is lost. Later raters' labels are unused; `krippendorff_alpha` uses every label.
    None when no comparison qualifies or kappa is undefined (a single label throughout).
    """
    if min_raters < 2:
        raise ValueError(f"min_raters must be >= 2, got {min_raters}")
    rows = []
    for labels in _label_table(votes).values():
        if len(labels) >= min_raters:
            by_time = sorted(labels.values())[:min_raters]
            rows.append([LABELS.index(label) for _, label in by_time])
    if not rows or len({code for row in rows for code in row}) < 2:
        return None
    counts, _ = aggregate_raters(np.array(rows), n_cat=len(LABELS))
    return float(fleiss_kappa(counts, method="fleiss"))


def krippendorff_alpha(votes: Sequence[Vote]) -> float | None:
    """Krippendorff's alpha, nominal level, over all comparisons and all their evaluators.

    Alpha allows any number of raters per comparison (missing ratings are its design case: Krippendorff 2011,
    "Computing Krippendorff's Alpha-Reliability"), so unlike `fleiss` it uses every label. Comparisons with a
    single evaluator carry no agreement information and do not count. None when no comparison has two
    evaluators or alpha is undefined (a single label throughout).
    """
    rows = []
    for labels in _label_table(votes).values():
        if len(labels) >= 2:
            tally = Counter(label for _, label in labels.values())
            rows.append([tally[label] for label in LABELS])
    counts = np.array(rows, dtype=np.int64).reshape(len(rows), len(LABELS))
    if np.count_nonzero(counts.sum(axis=0)) < 2:
        return None
    return float(krippendorff.alpha(value_counts=counts, level_of_measurement="nominal"))


@dataclass(frozen=True, slots=True)
class MajorityAgreement:
    evaluator: str
    agreement: float | None
    shared: int


def with_majority(votes: Sequence[Vote], *, exclude_judges: bool = True) -> list[MajorityAgreement]:
    """Each evaluator's share of agreement with the majority label of the OTHER evaluators, sorted by evaluator.

    Leave-one-out, so an evaluator does not vote on the majority they are compared with. Counted over the
    comparisons where at least two others voted and the others' most common label is unique (a tied majority
    is no reference); `shared` is their number, and `agreement` None when there are none. With
    `exclude_judges`, evaluators named "judge:..." take no part at all (see `judge_agreement` for them).
    """
    table = _label_table(v for v in votes if not (exclude_judges and v.evaluator.startswith(JUDGE_PREFIX)))
    matches: dict[str, list[bool]] = defaultdict(list)
    evaluators: set[str] = set()
    for labels in table.values():
        evaluators.update(labels)
        for evaluator, (_, label) in labels.items():
            others = [other_label for other, (_, other_label) in labels.items() if other != evaluator]
            majority = _majority(others) if len(others) >= 2 else None
            if majority is not None:
                matches[evaluator].append(label == majority)
    return [
        MajorityAgreement(
            evaluator=evaluator,
            agreement=sum(matches[evaluator]) / len(matches[evaluator]) if matches[evaluator] else None,
            shared=len(matches[evaluator]),
        )
        for evaluator in sorted(evaluators)
    ]


def judge_agreement(
    judge_votes: Sequence[Vote], human_votes: Sequence[Vote], *, min_shared: int = 5, threshold: float = 0.4
) -> PairKappa:
    """One automatic judge's labels against the human majority label per comparison: Cohen's kappa.

    The human majority is the unique most common label among the humans who voted on the comparison (one human
    is their own majority); comparisons with a tied human majority, or without a judge vote, are left out.
    `a` is the judge, `b` is "human majority"; kappa and flag as in `cohen_pairs`.
    """
    judges = {vote.evaluator for vote in judge_votes}
    if len(judges) != 1:
        raise ValueError(f"judge_votes must come from exactly one evaluator, got {sorted(judges)}")
    (judge,) = judges
    # One table for both, so a comparison whose judge and human votes name different models is caught.
    table = _label_table([*judge_votes, *human_votes])
    judge_labels, majority_labels = [], []
    for comparison in sorted(table):
        labels = table[comparison]
        humans = [label for evaluator, (_, label) in labels.items() if evaluator != judge]
        majority = _majority(humans) if humans else None
        if judge in labels and majority is not None:
            judge_labels.append(labels[judge][1])
            majority_labels.append(majority)
    kappa = _kappa(judge_labels, majority_labels, min_shared)
    return _pair_kappa(judge, HUMAN_MAJORITY, kappa, len(judge_labels), threshold)


def _label_table(votes: Iterable[Vote]) -> dict[str, dict[str, tuple[float, str]]]:
    """comparison_id -> evaluator -> (ts, label) of the evaluator's latest vote on it."""
    pairs: dict[str, tuple[str, str]] = {}
    table: dict[str, dict[str, tuple[float, str]]] = defaultdict(dict)
    # Stable sort by ts: of two votes with equal ts the one given later wins, as the later write would.
    for vote in sorted(votes, key=lambda v: v.ts):
        pair = pairs.setdefault(vote.comparison_id, (min(vote.model_a, vote.model_b), max(vote.model_a, vote.model_b)))
        if {vote.model_a, vote.model_b} != set(pair):
            raise ValueError(
                f"comparison {vote.comparison_id!r} has votes on {pair} and on ({vote.model_a!r}, {vote.model_b!r})"
            )
        table[vote.comparison_id][vote.evaluator] = (vote.ts, model_label(vote, pair))
    return table


def _majority(labels: Sequence[str]) -> str | None:
    """The unique most common label, or None when two labels share the top count."""
    ranked = Counter(labels).most_common(2)
    if len(ranked) == 2 and ranked[0][1] == ranked[1][1]:
        return None
    return ranked[0][0]


def _kappa(first: Sequence[str], second: Sequence[str], min_shared: int) -> float | None:
    # p_e = 1 exactly when both raters used one and the same label throughout; scikit-learn would warn and
    # return nan, so that case is answered here.
    if len(first) < min_shared or len(set(first) | set(second)) < 2:
        return None
    return float(cohen_kappa_score(first, second, labels=list(LABELS)))


def _pair_kappa(a: str, b: str, kappa: float | None, shared: int, threshold: float) -> PairKappa:
    return PairKappa(a=a, b=b, kappa=kappa, shared=shared, flag=kappa is not None and kappa < threshold)
