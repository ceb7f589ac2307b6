"""Paired comparisons of a baseline and a candidate model scored on the same held-out examples.

    paired_rates    a yes/no outcome per example (exact match, format ok)    McNemar; Bonett-Price interval
    paired_scores   a score in [0, 1] per example (similarity)               Wilcoxon signed-rank; paired bootstrap

Both models answer the same examples, so the samples are not independent: an example that is hard
for one model is hard for the other. Paired methods use only the within-example differences,
which removes that shared difficulty and makes the comparison far more sensitive than treating
the two columns as independent samples would.

Tests, distributions and the bootstrap come from scipy and statsmodels. The one method written out
here is the Bonett-Price interval for a paired difference of proportions, which neither offers.
An empty input gives nan estimates and p = 1.0 rather than an error, so a report of an empty run
still renders.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import stats
from statsmodels.stats.contingency_tables import mcnemar

FloatArray = NDArray[np.float64]

# Resampled values held in memory at once per sample by the bootstrap (8 bytes each): ~32 MB.
_BOOTSTRAP_BATCH_VALUES = 4_000_000

# Below this many discordant pairs McNemar's chi-square approximation is poor and the exact
# (conditional binomial) test is used: the usual rule (Fagerland, Lydersen & Laake 2013, "The
# McNemar test for binary matched-pairs data: mid-p and asymptotic are better than exact
# conditional", BMC Med Res Methodol 13:91; statsmodels' `mcnemar` docs).
_EXACT_BELOW = 25


@dataclass(frozen=True, slots=True)
class PairedRates:
    n: int
    base_rate: float
    candidate_rate: float
    diff: float
    ci_low: float
    ci_high: float
    improved: int
    regressed: int
    p_value: float
    test: str


@dataclass(frozen=True, slots=True)
class PairedScores:
    n: int
    base_mean: float
    candidate_mean: float
    diff: float
    ci_low: float
    ci_high: float
    improved: int
    regressed: int
    p_value: float
    test: str


def paired_rates(base: Sequence[bool], candidate: Sequence[bool], *, alpha: float = 0.05) -> PairedRates:
    """Share of True per model on the same examples: McNemar test and Bonett-Price interval of the difference."""
    _check(len(base), len(candidate), alpha)
    b = np.asarray(base, dtype=bool)
    c = np.asarray(candidate, dtype=bool)
    n = int(b.size)
    improved = int(np.count_nonzero(~b & c))
    regressed = int(np.count_nonzero(b & ~c))
    discordant = improved + regressed
    exact = discordant < _EXACT_BELOW
    test = "McNemar exact" if exact else "McNemar chi-square (continuity-corrected)"
    if n == 0:
        nan = math.nan
        return PairedRates(0, nan, nan, nan, nan, nan, 0, 0, 1.0, test)
    base_rate, candidate_rate = float(b.mean()), float(c.mean())
    if discordant == 0:
        # Only discordant pairs carry information on the difference; with none, statsmodels'
        # chi-square would divide 0 by 0. The models never disagree: no evidence either way.
        p_value = 1.0
    else:
        # Rows: baseline True / False; columns: candidate True / False. McNemar reads only the
        # off-diagonal cells (regressed, improved), and is symmetric in them.
        table = [[int(np.count_nonzero(b & c)), regressed], [improved, int(np.count_nonzero(~b & ~c))]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            p_value = float(mcnemar(table, exact=exact, correction=True).pvalue)
    low, high = _bonett_price(improved, regressed, n, alpha)
    return PairedRates(
        n=n,
        base_rate=base_rate,
        candidate_rate=candidate_rate,
        diff=candidate_rate - base_rate,
        ci_low=low,
        ci_high=high,
        improved=improved,
        regressed=regressed,
        p_value=p_value,
        test=test,
    )


def paired_scores(
    base: Sequence[float],
    candidate: Sequence[float],
    *,
    alpha: float = 0.05,
    resamples: int = 9999,
    seed: int = 0,
) -> PairedScores:
    """Mean score per model on the same examples: Wilcoxon signed-rank test and paired bootstrap interval."""
    _check(len(base), len(candidate), alpha)
    b = np.asarray(base, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    if not (np.isfinite(b).all() and np.isfinite(c).all()):
        # A nan would silently turn every estimate into nan; a missing score is the caller's to drop.
        raise ValueError("scores must be finite numbers")
    n = int(b.size)
    test = "Wilcoxon signed-rank"
    if n == 0:
        nan = math.nan
        return PairedScores(0, nan, nan, nan, nan, nan, 0, 0, 1.0, test)
    d = c - b
    diff = float(d.mean())
    nonzero = d != 0
    improved, regressed = int(np.count_nonzero(d > 0)), int(np.count_nonzero(d < 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if not nonzero.any():
            # Every example tied: scipy returns nan (or refuses); identical scores hold no evidence.
            p_value = 1.0
        else:
            # zero_method "wilcox": a zero difference (both answers equally similar to the
            # reference) has no direction, so it is dropped. We drop the zeros before calling, which
            # gives the same statistic, so that method "auto" chooses by the pairs actually ranked:
            # exact when at most 50 with no tied |differences|. Left in, any zero makes scipy (1.13+)
            # treat the sample as tied: a permutation test up to 13 pairs, the normal approximation above.
            result = stats.wilcoxon(
                c[nonzero], b[nonzero], zero_method="wilcox", alternative="two-sided", method="auto"
            )
            p = float(result.pvalue)
            p_value = p if math.isfinite(p) else 1.0
        if np.all(d == d[0]):
            # Every resample has the same mean: the interval is that point (and scipy would warn
            # of a degenerate distribution and return nan).
            low = high = diff
        else:
            low, high = _bootstrap_mean_diff(c, b, alpha, resamples, seed)
    return PairedScores(
        n=n,
        base_mean=float(b.mean()),
        candidate_mean=float(c.mean()),
        diff=diff,
        ci_low=low,
        ci_high=high,
        improved=improved,
        regressed=regressed,
        p_value=p_value,
        test=test,
    )


def _check(n_base: int, n_candidate: int, alpha: float) -> None:
    if n_base != n_candidate:
        raise ValueError(f"paired samples must have the same length, got {n_base} and {n_candidate}")
    if not 0 < alpha < 1:  # also rejects nan
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _bonett_price(improved: int, regressed: int, n: int, alpha: float) -> tuple[float, float]:
    """Adjusted Wald interval of candidate_rate - base_rate for paired proportions.

    Hand-written: neither scipy nor statsmodels has an interval for a paired difference of
    proportions. Bonett & Price (2012), "Adjusted Wald confidence interval for a difference of
    binomial proportions based on paired data", J. Educ. Behav. Stat. 37(4):479-488: add one
    pseudo-observation to each discordant cell (Laplace estimates over n + 2), then Wald. The same
    form is in Bonett's R package statpsych (`ci.prop.ps`) and in Fagerland, Lydersen & Laake
    (2014, Stat Med 33:2850, "Bonett-Price Wald"), who recommend it and truncate it to [-1, 1].
    Unlike the plain Wald interval it does not collapse to a point when there are no discordant
    pairs, and it keeps near-nominal coverage for small n.
    """
    p12 = (improved + 1) / (n + 2)
    p21 = (regressed + 1) / (n + 2)
    d = p12 - p21
    se = math.sqrt((p12 + p21 - d * d) / (n + 2))
    z = float(stats.norm.ppf(1 - alpha / 2))
    return max(-1.0, d - z * se), min(1.0, d + z * se)


def _bootstrap_mean_diff(
    candidate: FloatArray, base: FloatArray, alpha: float, resamples: int, seed: int
) -> tuple[float, float]:
    def mean_diff(c: FloatArray, b: FloatArray, axis: int) -> FloatArray:
        return np.asarray(np.mean(c - b, axis=axis), dtype=np.float64)

    # paired=True resamples examples, keeping each example's two scores together. "percentile",
    # not BCa: BCa's acceleration comes from a jackknife that is 0/0 when most differences tie
    # (common here: both models often give equally good answers), and BCa then returns nan.
    result = stats.bootstrap(
        (candidate, base),
        mean_diff,
        n_resamples=resamples,
        batch=max(1, _BOOTSTRAP_BATCH_VALUES // candidate.size),
        vectorized=True,
        paired=True,
        confidence_level=1 - alpha,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
