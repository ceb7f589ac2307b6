"""Fixed-horizon comparisons of control vs treatment, planning, sample-ratio checks and decision rules.

Every comparison returns a `Comparison` whose fields mean the same whatever the method:
`diff` = treatment - control, `lift` = diff / control, intervals two-sided at 1 - alpha, `se`
the standard error of `diff`.

    two_proportions         a rate per user                  pooled z-test; Newcombe interval
    welch                   a mean per user                  Welch t-test
    ratio_delta             sum(num) / sum(den) over users   delta method, users as clusters
    percentile_bootstrap    a percentile (latency p95)       percentile bootstrap
    sample_size_* power_*   planning; power of a running experiment
    sample_ratio            sample-ratio mismatch (SRM)      chi-square goodness of fit
    holm                    several metrics at once          Holm step-down
    non_inferiority         "no worse than a margin"         one-sided bound against the margin

Distributions, tests and power come from scipy and statsmodels. The one method written out here
is the delta method for ratio metrics, which neither library offers for user-level sums.

Every analytic `lift_ci` is symmetric on the log scale of the ratio treatment / control
(statsmodels' "log" interval for proportions, the delta method on the log ratio for means and
ratio metrics), so `non_inferiority` can rescale it exactly to another level.

These p-values hold for one pre-registered look. For looking daily use `proxy.analysis.sequential`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import NormalIndPower, TTestIndPower
from statsmodels.stats.proportion import confint_proportions_2indep, proportion_effectsize, proportions_ztest

FloatArray = NDArray[np.float64]

# Resampled values held in memory at once per sample by the bootstrap (8 bytes each): ~32 MB.
_BOOTSTRAP_BATCH_VALUES = 4_000_000


@dataclass(frozen=True, slots=True)
class Comparison:
    method: str
    n_control: int
    n_treatment: int
    control: float
    treatment: float
    diff: float
    diff_ci: tuple[float, float]
    lift: float | None
    lift_ci: tuple[float, float] | None
    p_value: float | None
    se: float
    alpha: float


def two_proportions(successes_c: int, n_c: int, successes_t: int, n_t: int, *, alpha: float = 0.05) -> Comparison:
    """Rates successes / n per variant: pooled two-proportion z-test, two-sided."""
    _check_alpha(alpha)
    for successes, n, side in ((successes_c, n_c, "control"), (successes_t, n_t, "treatment")):
        if n <= 0 or not 0 <= successes <= n:
            raise ValueError(f"{side}: need n > 0 and 0 <= successes <= n, got {successes}/{n}")
    rate_c, rate_t = successes_c / n_c, successes_t / n_t
    diff = rate_t - rate_c
    if successes_c + successes_t in (0, n_c + n_t):
        # Both rates 0 or both 1: the pooled variance is 0 and z is 0/0. Identical data hold no
        # evidence of a difference.
        p_value = 1.0
    else:
        _, p = proportions_ztest([successes_t, successes_c], [n_t, n_c], alternative="two-sided")
        p_value = float(p)
    # Newcombe's hybrid score interval (Newcombe 1998, Stat Med 17:873, method 10) rather than
    # Wald: it keeps near-nominal coverage with few events and rates near 0 or 1, as with error
    # rates in a 5 % canary, where Wald under-covers and collapses to [0, 0] when both arms have
    # no events. The price: it is not diff ± z·se, so it can disagree at the edge with `se`.
    low, high = confint_proportions_2indep(
        successes_t, n_t, successes_c, n_c, compare="diff", method="newcombe", alpha=alpha
    )
    lift_ci: tuple[float, float] | None = None
    if successes_c > 0 and successes_t > 0:
        # Katz log interval of the rate ratio, minus 1. It needs log(count), so no interval with
        # a zero count.
        r_low, r_high = confint_proportions_2indep(
            successes_t, n_t, successes_c, n_c, compare="ratio", method="log", alpha=alpha
        )
        lift_ci = (float(r_low) - 1.0, float(r_high) - 1.0)
    return Comparison(
        method="two-proportion z-test",
        n_control=n_c,
        n_treatment=n_t,
        control=rate_c,
        treatment=rate_t,
        diff=diff,
        diff_ci=(float(low), float(high)),
        lift=_lift(rate_c, rate_t),
        lift_ci=lift_ci,
        p_value=p_value,
        # Unpooled: the standard error of the estimated difference, not of the test under H0.
        se=math.sqrt(rate_c * (1 - rate_c) / n_c + rate_t * (1 - rate_t) / n_t),
        alpha=alpha,
    )


def welch(x_c: ArrayLike, x_t: ArrayLike, *, alpha: float = 0.05) -> Comparison:
    """Means of one value per unit: Welch's unequal-variance t-test, two-sided."""
    _check_alpha(alpha)
    xc, xt = _sample(x_c, "x_c"), _sample(x_t, "x_t")
    mean_c, mean_t = float(xc.mean()), float(xt.mean())
    var_c, var_t = float(xc.var(ddof=1)) / xc.size, float(xt.var(ddof=1)) / xt.size
    se = math.sqrt(var_c + var_t)
    diff = mean_t - mean_c
    if se == 0:
        p_value, diff_ci = _exact_difference(diff)
    else:
        result = stats.ttest_ind(xt, xc, equal_var=False)
        interval = result.confidence_interval(confidence_level=1 - alpha)
        p_value, diff_ci = float(result.pvalue), (float(interval.low), float(interval.high))
    return Comparison(
        method="Welch t-test",
        n_control=int(xc.size),
        n_treatment=int(xt.size),
        control=mean_c,
        treatment=mean_t,
        diff=diff,
        diff_ci=diff_ci,
        lift=_lift(mean_c, mean_t),
        lift_ci=_log_ratio_ci(mean_c, var_c, mean_t, var_t, alpha),
        p_value=p_value,
        se=se,
        alpha=alpha,
    )


def ratio_delta(
    num_c: ArrayLike, den_c: ArrayLike, num_t: ArrayLike, den_t: ArrayLike, *, alpha: float = 0.05
) -> Comparison:
    """sum(num) / sum(den) per variant, one array element per user: delta-method z-test.

    The user is the randomisation unit, so one user's requests are correlated and cannot be
    counted as independent observations; the delta method treats each user as a cluster.
    """
    _check_alpha(alpha)
    ratio_c, var_c = _ratio_and_variance(_sample(num_c, "num_c"), _sample(den_c, "den_c"), "control")
    ratio_t, var_t = _ratio_and_variance(_sample(num_t, "num_t"), _sample(den_t, "den_t"), "treatment")
    diff, se = ratio_t - ratio_c, math.sqrt(var_c + var_t)
    p_value, diff_ci = _normal_test(diff, se, alpha)
    return Comparison(
        method="delta-method z-test (users as clusters)",
        n_control=int(np.size(num_c)),
        n_treatment=int(np.size(num_t)),
        control=ratio_c,
        treatment=ratio_t,
        diff=diff,
        diff_ci=diff_ci,
        lift=_lift(ratio_c, ratio_t),
        lift_ci=_log_ratio_ci(ratio_c, var_c, ratio_t, var_t, alpha),
        p_value=p_value,
        se=se,
        alpha=alpha,
    )


def percentile_bootstrap(
    x_c: ArrayLike,
    x_t: ArrayLike,
    q: float,
    *,
    alpha: float = 0.05,
    n_resamples: int = 2000,
    seed: int = 0,
    max_sample: int = 50_000,
) -> Comparison:
    """Difference of the q-th percentile (q in 0..100) by the percentile bootstrap; no p-value.

    A sample longer than `max_sample` is replaced, for the intervals only, by a seeded random
    subsample of that size: this bounds report time on millions of rows. The interval is then
    that of `max_sample` observations (wider than the full data's, so conservative), while
    `control` and `treatment` are the exact percentiles of all the data. `n_control` and
    `n_treatment` are the full lengths.
    """
    _check_alpha(alpha)
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in 0..100, got {q}")
    if n_resamples < 1 or max_sample < 2:
        raise ValueError("need n_resamples >= 1 and max_sample >= 2")
    xc, xt = _sample(x_c, "x_c"), _sample(x_t, "x_t")
    control, treatment = float(np.percentile(xc, q)), float(np.percentile(xt, q))
    rng = np.random.default_rng(seed)
    sub_c, sub_t = _subsample(xc, max_sample, rng), _subsample(xt, max_sample, rng)

    def statistic(c: FloatArray, t: FloatArray, axis: int) -> FloatArray:
        # Diff and ratio from the same resamples, so lift_ci and diff_ci describe one distribution.
        p_c, p_t = np.percentile(c, q, axis=axis), np.percentile(t, q, axis=axis)
        return np.stack([p_t - p_c, p_t / p_c - 1.0])

    # "percentile", not BCa: BCa estimates its acceleration by the jackknife, which fails for
    # non-smooth statistics such as quantiles (Efron & Tibshirani 1993, "An Introduction to the
    # Bootstrap", ch. 11: the jackknife is inconsistent for the median), and that jackknife costs
    # n evaluations on n - 1 points, O(max_sample**2) work.
    # errstate: a resample whose control percentile is 0 has an inf or nan ratio; that is
    # expected and handled below (no lift_ci), not a numerical accident worth a warning.
    with np.errstate(divide="ignore", invalid="ignore"):
        result = stats.bootstrap(
            (sub_c, sub_t),
            statistic,
            n_resamples=n_resamples,
            batch=max(1, _BOOTSTRAP_BATCH_VALUES // max(sub_c.size, sub_t.size)),
            vectorized=True,
            paired=False,
            confidence_level=1 - alpha,
            method="percentile",
            rng=rng,
        )
    low, high = result.confidence_interval.low, result.confidence_interval.high
    lift = _lift(control, treatment)
    lift_ci = (float(low[1]), float(high[1]))
    return Comparison(
        method="bootstrap",
        n_control=int(xc.size),
        n_treatment=int(xt.size),
        control=control,
        treatment=treatment,
        diff=treatment - control,
        diff_ci=(float(low[0]), float(high[0])),
        lift=lift,
        # A resample whose control percentile is 0 has no ratio; then no interval either.
        lift_ci=lift_ci if lift is not None and all(map(math.isfinite, lift_ci)) else None,
        p_value=None,
        se=float(result.standard_error[0]),
        alpha=alpha,
    )


def sample_size_proportions(
    baseline: float, mde: float, *, alpha: float = 0.05, power: float = 0.8, ratio: float = 1.0
) -> int:
    """Users per control variant to detect baseline -> baseline + mde (absolute), two-sided.

    The treatment variant needs ceil(ratio * n). Normal power on Cohen's h (arcsine transform);
    for 0.75 -> 0.80 at alpha 0.05, power 0.8 this gives 1,092.
    """
    _check_planning(alpha, power, ratio)
    n = NormalIndPower().solve_power(
        effect_size=_cohens_h(baseline, mde), alpha=alpha, power=power, ratio=ratio, alternative="two-sided"
    )
    return math.ceil(_scalar(n))


def sample_size_means(sd: float, mde: float, *, alpha: float = 0.05, power: float = 0.8, ratio: float = 1.0) -> int:
    """Units per control variant to detect a shift of mde in a mean with standard deviation sd."""
    _check_planning(alpha, power, ratio)
    n = TTestIndPower().solve_power(
        effect_size=_standardized(sd, mde), alpha=alpha, power=power, ratio=ratio, alternative="two-sided"
    )
    return math.ceil(_scalar(n))


def power_proportions(baseline: float, mde: float, n_c: int, n_t: int, *, alpha: float = 0.05) -> float:
    """Power the experiment has now, with n_c and n_t users, to detect baseline -> baseline + mde."""
    _check_alpha(alpha)
    effect = _cohens_h(baseline, mde)
    if min(n_c, n_t) < 1:
        return 0.0  # no data in one arm: the test cannot reject
    return _scalar(
        NormalIndPower().power(effect_size=effect, nobs1=n_c, alpha=alpha, ratio=n_t / n_c, alternative="two-sided")
    )


def power_means(sd: float, mde: float, n_c: int, n_t: int, *, alpha: float = 0.05) -> float:
    """Power the experiment has now, with n_c and n_t units, to detect a shift of mde in the mean."""
    _check_alpha(alpha)
    effect = _standardized(sd, mde)
    if min(n_c, n_t) < 2:
        return 0.0  # an arm without two values has no variance estimate: the t-test cannot reject
    return _scalar(
        TTestIndPower().power(effect_size=effect, nobs1=n_c, alpha=alpha, ratio=n_t / n_c, alternative="two-sided")
    )


@dataclass(frozen=True, slots=True)
class SampleRatio:
    observed: tuple[int, int]
    expected: tuple[float, float]
    chi2: float
    p_value: float
    mismatch: bool
    threshold: float


def sample_ratio(
    observed_c: int,
    observed_t: int,
    expected_treatment_share: float | Sequence[float] | FloatArray,
    *,
    threshold: float = 0.001,
) -> SampleRatio:
    """Sample-ratio mismatch: do the users per arm fit the configured split? Chi-square, 1 dof.

    `expected_treatment_share` is one share (0..1) or one probability of treatment per user (the
    rollout in force at the user's first exposure / 100), so a rollout changed inside the window
    is accounted for: expected treatment = sum of the probabilities. With varying probabilities
    the true variance, sum p(1 - p), is below the n·p̄(1 - p̄) chi-square assumes, so the test is
    conservative then: false alarms stay below `threshold`, but a small mismatch may go unreported.

    When a split puts every user on one side (share 0 or 1) the chi-square is undefined; then any
    user on the impossible side is a certain mismatch (chi2 inf, p 0) and otherwise there is
    nothing to test (chi2 0, p 1). No users at all: p 1, no mismatch.
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if observed_c < 0 or observed_t < 0:
        raise ValueError(f"observed counts must be >= 0, got {observed_c}, {observed_t}")
    n = observed_c + observed_t
    expected_t = _expected_treatment(n, expected_treatment_share)
    expected = (n - expected_t, expected_t)
    observed = (observed_c, observed_t)
    if n == 0:
        chi2, p_value = 0.0, 1.0
    elif min(expected) == 0:
        impossible = observed[expected.index(0)] > 0
        chi2, p_value = (math.inf, 0.0) if impossible else (0.0, 1.0)
    else:
        result = stats.chisquare(list(observed), f_exp=list(expected))
        chi2, p_value = float(result.statistic), float(result.pvalue)
    return SampleRatio(
        observed=observed,
        expected=expected,
        chi2=chi2,
        p_value=p_value,
        mismatch=p_value < threshold,
        threshold=threshold,
    )


def holm(p_values: Sequence[float], *, alpha: float = 0.05) -> list[tuple[float, bool]]:
    """Holm step-down over several metrics: (adjusted p, reject at alpha) per input, same order.

    A nan p-value (a metric with no test yet) is not part of the family: it comes back as
    (nan, False) and the others are adjusted among themselves.

    statsmodels' multipletests runs gc.collect() on every call (tens of ms in a large process):
    call this once per report with all the p-values, not once per metric.
    """
    _check_alpha(alpha)
    tested = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    if not all(0 <= p_values[i] <= 1 for i in tested):
        raise ValueError(f"p-values must be in [0, 1] or nan, got {list(p_values)}")
    result = [(math.nan, False)] * len(p_values)
    if tested:
        reject, adjusted, _, _ = multipletests([p_values[i] for i in tested], alpha=alpha, method="holm")
        for i, p, r in zip(tested, adjusted, reject, strict=True):
            result[i] = (float(p), bool(r))
    return result


@dataclass(frozen=True, slots=True)
class NonInferiority:
    passed: bool
    failed: bool
    bound: float
    margin: float
    kind: str


def non_inferiority(
    c: Comparison,
    *,
    higher_is_better: bool,
    max_regression: float | None = None,
    max_ratio: float | None = None,
    alpha: float = 0.05,
) -> NonInferiority:
    """Is treatment no worse than control by more than a margin? One-sided test at alpha.

    Give exactly one margin:
      max_regression  absolute: treatment may be worse than control by at most this (>= 0);
      max_ratio       relative: treatment / control at most this for lower-is-better metrics,
                      at least 1 / this for higher-is-better ones (>= 1).

    Both one-sided bounds at alpha, i.e. the two-sided (1 - 2 alpha) interval, are computed:
      difference  diff ∓ z(1 - alpha) · se, the normal quantile on c.diff and c.se whatever the
                  method (for Welch with few units this is slightly narrower than a t bound);
      ratio       from c.lift_ci: as is when c.alpha == 2 alpha; otherwise each half of it is
                  rescaled on the log scale by z(1 - alpha) / z(1 - c.alpha / 2) around
                  1 + c.lift. Exact for the analytic methods, whose intervals are log-symmetric;
                  for the bootstrap a per-side normal approximation (build it at 2 alpha for an
                  exact bound).
    `passed`: the bound on the favourable side clears the margin (`bound` is that bound).
    `failed`: the other bound is past the margin too, so the whole interval is: a confident
    regression. Neither: inconclusive; also when the comparison has no usable spread (se 0 or
    not finite, or no lift interval), in which case `bound` is nan.
    `margin` is on the scale of `bound`: -max_regression or +max_regression for differences,
    1 / max_ratio or max_ratio for ratios.
    """
    _check_alpha(alpha)
    if alpha >= 0.5:
        raise ValueError(f"a one-sided alpha must be below 0.5, got {alpha}")
    bounds: tuple[float, float] | None
    if max_regression is not None and max_ratio is None:
        # A negative margin would demand an improvement: that is a superiority test, not this one.
        if not (math.isfinite(max_regression) and max_regression >= 0):
            raise ValueError(f"max_regression must be finite and >= 0, got {max_regression}")
        kind, margin = "difference", -max_regression if higher_is_better else max_regression
        bounds = None
        if math.isfinite(c.se) and c.se > 0:
            half = _z(1 - alpha) * c.se
            bounds = (c.diff - half, c.diff + half)
    elif max_ratio is not None and max_regression is None:
        if not (math.isfinite(max_ratio) and max_ratio >= 1):
            raise ValueError(f"max_ratio must be finite and >= 1, got {max_ratio}")
        kind, margin = "ratio", 1 / max_ratio if higher_is_better else max_ratio
        bounds = _ratio_bounds(c, alpha)
    else:
        raise ValueError("give exactly one of max_regression and max_ratio")
    if bounds is None:
        return NonInferiority(passed=False, failed=False, bound=math.nan, margin=margin, kind=kind)
    low, high = bounds
    if higher_is_better:
        return NonInferiority(passed=low > margin, failed=high < margin, bound=low, margin=margin, kind=kind)
    return NonInferiority(passed=high < margin, failed=low > margin, bound=high, margin=margin, kind=kind)


def _ratio_and_variance(num: FloatArray, den: FloatArray, side: str) -> tuple[float, float]:
    """sum(num) / sum(den) of one variant and the delta-method variance of that ratio."""
    # Hand-written: neither scipy nor statsmodels has the delta method for a ratio of user-level
    # sums. Deng, Knoblich, Lu (2018), "Applying the Delta Method in Metric Analytics: A
    # Practical Guide with Novel Ideas", KDD, section 3: with users i.i.d., R = mean(X) / mean(Y),
    #     Var(R) ≈ [Var X - 2 R Cov(X, Y) + R² Var Y] / (n · mean(Y)²).
    # The bracket is the sample variance of X - R·Y, computed here directly (ddof 1, as Welch
    # does). So with one request per user (Y = 1) this is exactly Welch's standard error, and it
    # equals cluster-robust OLS without small-sample correction up to n / (n - 1).
    if num.shape != den.shape:
        raise ValueError(f"{side}: num and den need one value per user each, got {num.size} and {den.size}")
    total_den = float(den.sum())
    if total_den <= 0:
        raise ValueError(f"{side}: sum(den) must be > 0, got {total_den}")
    ratio = float(num.sum()) / total_den
    mean_den = total_den / den.size
    variance = float((num - ratio * den).var(ddof=1)) / (den.size * mean_den**2)
    return ratio, variance


def _log_ratio_ci(
    control: float, var_control: float, treatment: float, var_treatment: float, alpha: float
) -> tuple[float, float] | None:
    """CI of treatment / control - 1 for independent estimates with the given variances."""
    # Delta method on log(treatment / control): Var ≈ var_t / t² + var_c / c². On the log scale
    # the interval of a ratio stays positive and skews the way the ratio does. It needs both
    # estimates > 0, true of the latencies, token counts, costs and rates this gateway compares.
    if control <= 0 or treatment <= 0:
        return None
    log_ratio = math.log(treatment / control)
    half = _z(1 - alpha / 2) * math.sqrt(var_treatment / treatment**2 + var_control / control**2)
    return math.expm1(log_ratio - half), math.expm1(log_ratio + half)


def _ratio_bounds(c: Comparison, alpha: float) -> tuple[float, float] | None:
    """One-sided alpha bounds on treatment / control from c.lift_ci (see non_inferiority)."""
    if c.lift is None or c.lift_ci is None:
        return None
    ratio, low, high = 1 + c.lift, 1 + c.lift_ci[0], 1 + c.lift_ci[1]
    if math.isclose(c.alpha, 2 * alpha):
        return low, high
    if min(ratio, low, high) <= 0:
        return None
    scale = _z(1 - alpha) / _z(1 - c.alpha / 2)
    log_ratio = math.log(ratio)
    # max(0, ...): a bootstrap interval may exclude the full-data estimate; never let a half flip.
    return (
        math.exp(log_ratio - scale * max(0.0, log_ratio - math.log(low))),
        math.exp(log_ratio + scale * max(0.0, math.log(high) - log_ratio)),
    )


def _normal_test(diff: float, se: float, alpha: float) -> tuple[float, tuple[float, float]]:
    """Two-sided z-test p-value and (1 - alpha) interval of diff."""
    if se == 0:
        return _exact_difference(diff)
    half = _z(1 - alpha / 2) * se
    return 2 * float(stats.norm.sf(abs(diff) / se)), (diff - half, diff + half)


def _exact_difference(diff: float) -> tuple[float, tuple[float, float]]:
    # No variation within either arm: the observed difference is the difference.
    return (1.0 if diff == 0 else 0.0), (diff, diff)


def _expected_treatment(n: int, share: float | Sequence[float] | FloatArray) -> float:
    values = np.asarray(share, dtype=np.float64)
    if not np.all((values >= 0) & (values <= 1)):
        raise ValueError("treatment share and probabilities must be in [0, 1]")
    if values.ndim == 0:
        return n * float(values)
    if values.ndim != 1 or values.size != n:
        raise ValueError(f"need one treatment probability per user ({n}), got shape {values.shape}")
    return float(values.sum())


def _cohens_h(baseline: float, mde: float) -> float:
    target = baseline + mde
    if not (0 <= baseline <= 1 and 0 <= target <= 1):
        raise ValueError(f"baseline and baseline + mde must be in [0, 1], got {baseline} and {target}")
    if mde == 0:
        raise ValueError("mde must not be 0")
    # Direction does not matter for a two-sided test.
    return abs(float(proportion_effectsize(target, baseline)))


def _standardized(sd: float, mde: float) -> float:
    if not (sd > 0 and math.isfinite(sd)):
        raise ValueError(f"sd must be finite and > 0, got {sd}")
    if mde == 0 or not math.isfinite(mde):
        raise ValueError(f"mde must be finite and not 0, got {mde}")
    return abs(mde) / sd


def _check_planning(alpha: float, power: float, ratio: float) -> None:
    _check_alpha(alpha)
    if not alpha < power < 1:
        raise ValueError(f"power must be in (alpha, 1), got {power}")
    if not (ratio > 0 and math.isfinite(ratio)):
        raise ValueError(f"ratio must be finite and > 0, got {ratio}")


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _sample(x: ArrayLike, name: str) -> FloatArray:
    values = np.asarray(x, dtype=np.float64)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"{name} must be one-dimensional with at least 2 values, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} has nan or infinite values")
    return values


def _subsample(x: FloatArray, max_sample: int, rng: np.random.Generator) -> FloatArray:
    return x if x.size <= max_sample else rng.choice(x, size=max_sample, replace=False)


def _lift(control: float, treatment: float) -> float | None:
    return (treatment - control) / control if control != 0 else None


def _z(p: float) -> float:
    return float(stats.norm.ppf(p))


def _scalar(x: object) -> float:
    # statsmodels' power functions return numpy scalars or 0-d / 1-element arrays.
    return float(np.asarray(x).item())
