"""Ratings and head-to-head summaries from blind pairwise votes.

    elo, elo_orderings      the reference online Elo (REFERENCE.md, "Ratings") and its spread over vote orders
    bradley_terry           order-free maximum-likelihood ratings on the Elo scale, bootstrap intervals
    pairwise                per pair of models: win / tie / loss rates, Wilson intervals, sign test
    per_criterion           the same per rubric criterion; Wilcoxon signed-rank test for 1..5 scores
    position_bias           do evaluators favour the answer shown on the left?
    median_time_per_vote    per evaluator, so the caller can flag click-through voting

`Vote`, the input of all of them, is also the input of `proxy.humaneval.agreement`.

The Elo update is the reference formula, written out. Everything else comes from libraries: the
Bradley-Terry fit is scikit-learn's logistic regression, as in LMSYS Chatbot Arena's published notebook
(Chiang et al. 2024, "Chatbot Arena: An Open Platform for Evaluating LLMs by Human Preference");
intervals and tests are statsmodels' and scipy's.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from scipy import sparse, stats
from scipy.sparse import csgraph
from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]
from statsmodels.stats.proportion import proportion_confint

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
Choice = Literal["A", "tie", "B"]

ELO_START = 1500.0
ELO_K = 32.0

# Natural-log odds to Elo points: Elo's expected score 1 / (1 + 10 ** (-d / 400)) is the logistic function of
# d * ln(10) / 400, so a Bradley-Terry coefficient beta (in logits) is beta * 400 / ln(10) Elo points.
_ELO_PER_LOGIT = 400.0 / math.log(10.0)

# Bradley-Terry fit. Not unpenalised (C=inf / penalty=None): when a model won or lost every game, the MLE is
# infinite, and an unpenalised solver stops at max_iter wherever it happens to be, with a warning. An L2 penalty of
# 1 / C is negligible against the likelihood of even a handful of votes (it moves ratings by ~1e-4 Elo points)
# and keeps such a rating finite, if huge (thousands of points): the sign of "no evidence of an upper bound".
_BT_C = 1e6
# The solver stops when the gradient of the mean log-likelihood is below this: ~1e-5 Elo points of accuracy.
_BT_TOL = 1e-10
_BT_MAX_ITER = 1000

_CHOICES = frozenset(("A", "tie", "B"))
_SCORES = range(1, 6)


@dataclass(frozen=True, slots=True)
class Vote:
    """One evaluator's verdict on one blind comparison.

    `model_a` was shown on the left (position A), `model_b` on the right; `choice` names a position, not a model,
    so the record says what the evaluator saw (`position_bias` needs that). `winner` and `loser` name the models.
    `evaluator` is a person, or "judge:<model>" for an automatic judge.

    `rubric` holds the answers per criterion, in one of two shapes set by the criterion's kind (`per_criterion`):
      preference  "<criterion>": "A" | "tie" | "B"
      score       "<criterion>.A": int and "<criterion>.B": int, each 1..5: the scores of the left and right answers
    """

    comparison_id: str
    evaluator: str
    model_a: str
    model_b: str
    choice: Choice
    ts: float
    time_taken_ms: float | None = None
    # Left out of the hash: a dict is not hashable, and votes are told apart by the other fields anyway.
    rubric: Mapping[str, str | int] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.choice not in _CHOICES:
            raise ValueError(f"choice must be 'A', 'tie' or 'B', got {self.choice!r}")
        if self.model_a == self.model_b:
            raise ValueError(f"a comparison needs two different models, got {self.model_a!r} twice")

    @property
    def winner(self) -> str | None:
        return {"A": self.model_a, "B": self.model_b}.get(self.choice)

    @property
    def loser(self) -> str | None:
        return {"A": self.model_b, "B": self.model_a}.get(self.choice)


# --- Elo --------------------------------------------------------------------------------------------------------


def elo(
    votes: Sequence[Vote], models: Sequence[str] | None = None, *, k: float = ELO_K, start: float = ELO_START
) -> dict[str, float]:
    """The reference online Elo, the votes applied one at a time in `ts` order (stable for equal `ts`).

    Every model starts at `start`. Expected score of A: E_A = 1 / (1 + 10 ** ((R_B - R_A) / 400)), E_B = 1 - E_A;
    a win scores 1, a loss 0, a tie 0.5 each; R <- R + k * (score - E). The result depends on the order of the
    votes: `elo_orderings` shows by how much, `bradley_terry` does without an order.

    Keys: `models` in their order (those without votes stay at `start`), then any other voted model by name.
    """
    ordered = sorted(votes, key=lambda v: v.ts)
    names = _model_names(ordered, models)
    a, b, score = _encode(ordered, names)
    final = _run_elo(a[np.newaxis, :], b[np.newaxis, :], score[np.newaxis, :], len(names), k, start)[0]
    return dict(zip(names, final.tolist(), strict=True))


def elo_orderings(
    votes: Sequence[Vote],
    models: Sequence[str] | None = None,
    *,
    rounds: int = 1000,
    seed: int = 0,
    k: float = ELO_K,
    start: float = ELO_START,
) -> dict[str, tuple[float, float, float, float]]:
    """Final Elo over `rounds` random orderings of the votes: (mean, sd, 2.5th, 97.5th percentile) per model.

    The votes are put in a canonical order before they are shuffled, so the result depends on the set of votes
    and the seed only, not on the order they were passed in. sd has ddof=1 (0 for a single round).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    canonical = sorted(votes, key=lambda v: (v.ts, v.comparison_id, v.evaluator, v.model_a, v.model_b, v.choice))
    names = _model_names(canonical, models)
    a, b, score = _encode(canonical, names)
    rng = np.random.default_rng(seed)
    order = rng.permuted(np.tile(np.arange(len(canonical)), (rounds, 1)), axis=1)
    final = _run_elo(a[order], b[order], score[order], len(names), k, start)
    mean = final.mean(axis=0)
    sd = final.std(axis=0, ddof=1) if rounds > 1 else np.zeros(len(names))
    low, high = np.percentile(final, [2.5, 97.5], axis=0)
    return {name: (float(mean[i]), float(sd[i]), float(low[i]), float(high[i])) for i, name in enumerate(names)}


def _run_elo(a: IntArray, b: IntArray, score: FloatArray, n_models: int, k: float, start: float) -> FloatArray:
    """Final ratings, one row per ordering; a, b (model indices) and score (A's) are (orderings, votes) arrays.

    The orderings run side by side, so the Python loop is over votes only, whatever the number of orderings.
    """
    rows = np.arange(a.shape[0])
    ratings = np.full((a.shape[0], n_models), start, dtype=np.float64)
    for t in range(a.shape[1]):
        ia, ib = a[:, t], b[:, t]
        expected_a = 1.0 / (1.0 + 10.0 ** ((ratings[rows, ib] - ratings[rows, ia]) / 400.0))
        delta = k * (score[:, t] - expected_a)
        ratings[rows, ia] += delta
        # B's score and expectation are 1 minus A's, so B moves by exactly -delta.
        ratings[rows, ib] -= delta
    return ratings


# --- Bradley-Terry ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rating:
    model: str
    rating: float
    ci: tuple[float, float]
    games: int


def bradley_terry(
    votes: Sequence[Vote],
    models: Sequence[str] | None = None,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> list[Rating]:
    """Bradley-Terry maximum-likelihood ratings on the Elo scale, best first, with percentile-bootstrap intervals.

    P(i beats j) = 1 / (1 + 10 ** ((R_j - R_i) / 400)), fitted by logistic regression without intercept on the
    +1/-1 design (a column per model, +1 for one side, -1 for the other), as Chatbot Arena does; coefficients are
    converted from logits to Elo points by 400 / ln 10. Only differences are identified, so the ratings are
    anchored so that their MEAN is 1500: a rating reads as "points above or below the average model of this set",
    and adding a model to the set shifts all of them.

    A tie counts half a win to each side: each pair enters as two weighted rows, "i won" with weight
    wins_i + ties / 2 and "j won" with weight wins_j + ties / 2 (the usual treatment, e.g. Chatbot Arena's; Davidson
    1970's tie model would add a parameter). The sides' positions play no part: position bias is `position_bias`'s.

    Intervals: `bootstrap` resamples of the votes with replacement (0: no intervals, `ci` is (nan, nan)), each
    refitted and re-anchored, and the alpha / 2 and 1 - alpha / 2 percentiles taken. Votes with the same pair and
    outcome are interchangeable in the likelihood, so a resample is drawn as multinomial counts over those
    categories, which is the same distribution as resampling the votes themselves and needs no per-vote work.
    A resample may leave a model without a win or without a loss; its fit then gives that model a very large or
    small rating, which lands in the tails only when that happens in more than alpha / 2 of the resamples.

    Models connected only through others are ranked (A > B > C when A never met C). Raises ValueError when fewer
    than two models are given or the comparison graph is disconnected (ratings in separate components are not
    comparable), naming the components; a model in `models` without votes is a component of its own.
    """
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    names = _model_names(votes, models)
    if len(names) < 2:
        raise ValueError(f"Bradley-Terry needs at least two models, got {names}")
    pairs, counts = _pair_outcomes(votes, names)
    _check_connected(names, pairs)

    point = _fit_bradley_terry(pairs, counts[np.newaxis], len(names))[0]
    if bootstrap:
        n_votes = int(counts.sum())
        rng = np.random.default_rng(seed)
        resampled = rng.multinomial(n_votes, counts.ravel() / n_votes, size=bootstrap).reshape(bootstrap, *counts.shape)
        replicates = _fit_bradley_terry(pairs, resampled.astype(np.float64), len(names))
        low, high = np.percentile(replicates, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    else:
        low = high = np.full(len(names), math.nan)
    games = np.zeros(len(names), dtype=np.int64)
    for p, (i, j) in enumerate(pairs):
        games[[i, j]] += int(counts[p].sum())
    ratings = [
        Rating(model=name, rating=float(point[i]), ci=(float(low[i]), float(high[i])), games=int(games[i]))
        for i, name in enumerate(names)
    ]
    return sorted(ratings, key=lambda r: (-r.rating, r.model))


def _fit_bradley_terry(pairs: Sequence[tuple[int, int]], counts: FloatArray, n_models: int) -> FloatArray:
    """Ratings anchored at mean 1500, (replicates, models), from (replicates, pairs, 3) counts of (i won, tie, j won).

    All replicates are fitted in ONE logistic regression whose design is block-diagonal, a block of columns per
    replicate. The penalised log-likelihood is then a sum of independent per-replicate terms, so its maximum is
    each replicate's own fit; one sparse fit of 1000 replicates takes tens of milliseconds where 1000 separate
    fits cost ~2 ms each in scikit-learn's per-call overhead alone. newton-cg rather than lbfgs: lbfgs mixes
    curvature across blocks and needs hundreds of iterations once a resample leaves a model unbeaten.
    scikit-learn minimises the weighted MEAN loss, so a block's gradient is 1 / replicates of its own fit's:
    the tolerance is divided accordingly.
    """
    replicates = counts.shape[0]
    # Rows 2p and 2p + 1 are pair p = (i, j): "i won" (y = 1) and "j won" (y = 0), both with design row e_i - e_j.
    block = np.zeros((2 * len(pairs), n_models))
    for p, (i, j) in enumerate(pairs):
        block[2 * p : 2 * p + 2, i] = 1.0
        block[2 * p : 2 * p + 2, j] = -1.0
    design = sparse.kron(sparse.identity(replicates, format="csr"), sparse.csr_matrix(block), format="csr")
    outcome = np.tile([1, 0], len(pairs) * replicates)
    weights = np.empty((replicates, 2 * len(pairs)))
    weights[:, 0::2] = counts[:, :, 0] + 0.5 * counts[:, :, 1]
    weights[:, 1::2] = counts[:, :, 2] + 0.5 * counts[:, :, 1]
    estimator = LogisticRegression(
        C=_BT_C, fit_intercept=False, solver="newton-cg", tol=_BT_TOL / replicates, max_iter=_BT_MAX_ITER
    )
    estimator.fit(design, outcome, sample_weight=weights.ravel())
    logits = np.asarray(estimator.coef_[0], dtype=np.float64).reshape(replicates, n_models)
    anchored: FloatArray = _ELO_PER_LOGIT * (logits - logits.mean(axis=1, keepdims=True)) + ELO_START
    return anchored


def _pair_outcomes(votes: Iterable[Vote], names: Sequence[str]) -> tuple[list[tuple[int, int]], FloatArray]:
    """The model pairs (i < j) that met, and per pair the counts of (i won, tie, j won)."""
    index = {name: i for i, name in enumerate(names)}
    by_pair: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0, 0])
    for vote in votes:
        ia, ib = index[vote.model_a], index[vote.model_b]
        i, j = min(ia, ib), max(ia, ib)
        by_pair[i, j][_outcome_for(names[i], vote.winner)] += 1
    pairs = sorted(by_pair)
    return pairs, np.array([by_pair[p] for p in pairs], dtype=np.float64).reshape(len(pairs), 3)


def _check_connected(names: Sequence[str], pairs: Sequence[tuple[int, int]]) -> None:
    rows, cols = [i for i, _ in pairs], [j for _, j in pairs]
    graph = sparse.coo_matrix((np.ones(len(pairs)), (rows, cols)), shape=(len(names), len(names)))
    n_components, component = csgraph.connected_components(graph, directed=False)
    if n_components > 1:
        groups = [sorted(names[int(i)] for i in np.flatnonzero(component == c)) for c in range(n_components)]
        shown = " | ".join("{" + ", ".join(group) + "}" for group in groups)
        raise ValueError(f"the comparison graph is disconnected, ratings across components are not comparable: {shown}")


# --- Head to head -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PairResult:
    model: str
    other: str
    wins: int
    ties: int
    losses: int
    win_rate: float
    win_ci: tuple[float, float]
    tie_rate: float
    tie_ci: tuple[float, float]
    loss_rate: float
    loss_ci: tuple[float, float]
    sign_test_p: float | None


def pairwise(votes: Sequence[Vote], *, focus: str | None = None, alpha: float = 0.05) -> list[PairResult]:
    """Each pair of models that met, once: wins, ties and losses of `model` against `other`.

    `model` is `focus` in the pairs that include it (say the fine-tuned model), else the alphabetically first
    of the two. Rates are over all votes of the pair, ties included, each with a Wilson score interval at
    1 - alpha (good coverage at small counts and rates near 0 or 1, where Wald's fails: Brown, Cai & DasGupta
    2001, Statistical Science 16:101). `sign_test_p`: two-sided exact binomial test of wins against losses at
    1/2, ties left out (the sign test's usual handling of zero differences); None without a decisive vote.
    Sorted by (model, other).
    """
    outcomes: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for vote in votes:
        model, other = _orient(vote.model_a, vote.model_b, focus)
        outcomes[model, other][_outcome_for(model, vote.winner)] += 1
    results = []
    for (model, other), (wins, ties, losses) in sorted(outcomes.items()):
        n = wins + ties + losses
        results.append(
            PairResult(
                model=model,
                other=other,
                wins=wins,
                ties=ties,
                losses=losses,
                win_rate=wins / n,
                win_ci=_wilson(wins, n, alpha),
                tie_rate=ties / n,
                tie_ci=_wilson(ties, n, alpha),
                loss_rate=losses / n,
                loss_ci=_wilson(losses, n, alpha),
                sign_test_p=_sign_test(wins, losses),
            )
        )
    return results


@dataclass(frozen=True, slots=True)
class CriterionResult:
    criterion: str
    model: str
    other: str
    wins: int
    ties: int
    losses: int
    win_rate: float
    win_ci: tuple[float, float]
    sign_test_p: float | None
    mean_score: float | None
    other_mean_score: float | None


def per_criterion(
    votes: Sequence[Vote], criteria: Mapping[str, str], *, focus: str | None = None, alpha: float = 0.05
) -> list[CriterionResult]:
    """Head to head per rubric criterion; `criteria` maps name -> kind, "preference" or "score" (see `Vote`).

    preference  as `pairwise`: the A / tie / B answer mapped to the models, Wilson interval, sign test.
    score       a win is a higher score than the other side's on the same vote, a tie an equal one; mean score
                per model; `sign_test_p` is the two-sided Wilcoxon signed-rank test on the paired scores
                (scipy; equal pairs dropped, Wilcoxon's own treatment; None when every pair is equal). It uses
                the size of the differences, which the 1..5 scale has and a preference lacks.
    Votes without an answer for a criterion are left out of that criterion. `model` and `other` as in
    `pairwise`; sorted by criterion in the order given, then (model, other).
    """
    results: list[CriterionResult] = []
    for criterion, kind in criteria.items():
        if kind == "preference":
            results.extend(_preference_results(votes, criterion, focus, alpha))
        elif kind == "score":
            results.extend(_score_results(votes, criterion, focus, alpha))
        else:
            raise ValueError(f"criterion {criterion!r}: kind must be 'preference' or 'score', got {kind!r}")
    return results


def _preference_results(
    votes: Sequence[Vote], criterion: str, focus: str | None, alpha: float
) -> list[CriterionResult]:
    outcomes: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for vote in votes:
        answer = vote.rubric.get(criterion)
        if answer is None:
            continue
        if answer not in _CHOICES:
            raise ValueError(f"criterion {criterion!r}: answer must be 'A', 'tie' or 'B', got {answer!r}")
        model, other = _orient(vote.model_a, vote.model_b, focus)
        winner = {"A": vote.model_a, "B": vote.model_b}.get(str(answer))
        outcomes[model, other][_outcome_for(model, winner)] += 1
    return [
        CriterionResult(
            criterion=criterion,
            model=model,
            other=other,
            wins=wins,
            ties=ties,
            losses=losses,
            win_rate=wins / (wins + ties + losses),
            win_ci=_wilson(wins, wins + ties + losses, alpha),
            sign_test_p=_sign_test(wins, losses),
            mean_score=None,
            other_mean_score=None,
        )
        for (model, other), (wins, ties, losses) in sorted(outcomes.items())
    ]


def _score_results(votes: Sequence[Vote], criterion: str, focus: str | None, alpha: float) -> list[CriterionResult]:
    scores: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for vote in votes:
        left, right = vote.rubric.get(f"{criterion}.A"), vote.rubric.get(f"{criterion}.B")
        if left is None and right is None:
            continue
        if not (isinstance(left, int) and isinstance(right, int) and left in _SCORES and right in _SCORES):
            raise ValueError(f"criterion {criterion!r}: need both sides scored 1..5, got A={left!r}, B={right!r}")
        model, other = _orient(vote.model_a, vote.model_b, focus)
        scores[model, other].append((left, right) if model == vote.model_a else (right, left))
    results = []
    for (model, other), paired in sorted(scores.items()):
        mine, theirs = np.array(paired, dtype=np.float64).T
        wins, losses = int((mine > theirs).sum()), int((mine < theirs).sum())
        n = len(paired)
        p_value = None if wins + losses == 0 else float(stats.wilcoxon(mine, theirs).pvalue)
        results.append(
            CriterionResult(
                criterion=criterion,
                model=model,
                other=other,
                wins=wins,
                ties=n - wins - losses,
                losses=losses,
                win_rate=wins / n,
                win_ci=_wilson(wins, n, alpha),
                sign_test_p=p_value,
                mean_score=float(mine.mean()),
                other_mean_score=float(theirs.mean()),
            )
        )
    return results


# --- Evaluator behaviour ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PositionBias:
    left_share: float
    left_votes: int
    right_votes: int
    ties: int
    p_value: float | None


def position_bias(votes: Sequence[Vote]) -> PositionBias:
    """Share of the decisive votes that went to the left answer (A), with a two-sided binomial test against 1/2.

    Assignment to sides is random, so without bias the left answer wins half the decisive votes whatever the
    models. Ties say nothing about sides and are left out. No decisive vote: left_share nan, p_value None.
    """
    left = sum(1 for v in votes if v.choice == "A")
    right = sum(1 for v in votes if v.choice == "B")
    decisive = left + right
    return PositionBias(
        left_share=left / decisive if decisive else math.nan,
        left_votes=left,
        right_votes=right,
        ties=len(votes) - decisive,
        p_value=_sign_test(left, right),
    )


def median_time_per_vote(votes: Sequence[Vote]) -> dict[str, float]:
    """Evaluator -> median `time_taken_ms` of their timed votes, by evaluator name; evaluators never timed left out.

    The median, not the mean: one vote left open over lunch would move a mean by minutes.
    """
    times: dict[str, list[float]] = defaultdict(list)
    for vote in votes:
        if vote.time_taken_ms is not None:
            times[vote.evaluator].append(vote.time_taken_ms)
    return {evaluator: float(np.median(times[evaluator])) for evaluator in sorted(times)}


# --- Shared helpers ---------------------------------------------------------------------------------------------


def _model_names(votes: Iterable[Vote], models: Sequence[str] | None) -> list[str]:
    given = list(models or ())
    if len(set(given)) != len(given):
        raise ValueError(f"models must not repeat, got {given}")
    voted = {name for vote in votes for name in (vote.model_a, vote.model_b)}
    return given + sorted(voted - set(given))


def _encode(votes: Sequence[Vote], names: Sequence[str]) -> tuple[IntArray, IntArray, FloatArray]:
    """Per vote: index of model A, index of model B, A's score (1 win, 0.5 tie, 0 loss)."""
    index = {name: i for i, name in enumerate(names)}
    a = np.array([index[v.model_a] for v in votes], dtype=np.int64)
    b = np.array([index[v.model_b] for v in votes], dtype=np.int64)
    score = np.array([{"A": 1.0, "tie": 0.5, "B": 0.0}[v.choice] for v in votes], dtype=np.float64)
    return a, b, score


def _orient(model_a: str, model_b: str, focus: str | None) -> tuple[str, str]:
    """(model, other) for the pair: `focus` first when it is one of them, else by name."""
    if focus in (model_a, model_b):
        return (model_a, model_b) if focus == model_a else (model_b, model_a)
    return (model_a, model_b) if model_a < model_b else (model_b, model_a)


def _outcome_for(model: str, winner: str | None) -> int:
    """0 when `model` won, 1 for a tie, 2 when it lost: an index into [wins, ties, losses]."""
    return 1 if winner is None else 0 if winner == model else 2


def _wilson(count: int, n: int, alpha: float) -> tuple[float, float]:
    low, high = proportion_confint(count, n, alpha=alpha, method="wilson")
    return float(low), float(high)


def _sign_test(successes: int, failures: int) -> float | None:
    if successes + failures == 0:
        return None
    return float(stats.binomtest(successes, successes + failures, 0.5).pvalue)
