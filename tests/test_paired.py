"""Paired baseline-vs-candidate comparisons: McNemar, Bonett-Price, Wilcoxon and the paired bootstrap."""

from __future__ import annotations

import itertools
import math
import warnings
from statistics import NormalDist

import numpy as np
import pytest
from scipy import stats

from proxy.offline_eval.paired import paired_rates, paired_scores


def _table(both: int, improved: int, regressed: int, neither: int) -> tuple[list[bool], list[bool]]:
    """(base, candidate) outcomes for a paired 2x2 table given by its four cells."""
    base = [True] * both + [False] * improved + [True] * regressed + [False] * neither
    candidate = [True] * both + [True] * improved + [False] * regressed + [False] * neither
    return base, candidate


def _exact_mcnemar_by_hand(b: int, c: int) -> float:
    # Two-sided exact binomial test of b successes in b + c trials at 1/2, doubling the smaller tail.
    m = b + c
    return min(1.0, 2 * sum(math.comb(m, k) for k in range(min(b, c) + 1)) / 2**m)


# --- paired_rates ------------------------------------------------------------------------------


def test_counts_rates_and_diff_on_a_small_example() -> None:
    base = [True, True, False, False, True, False]
    candidate = [True, False, True, True, True, False]
    r = paired_rates(base, candidate)
    assert r.n == 6
    assert (r.improved, r.regressed) == (2, 1)  # examples 2 and 3 fixed, example 1 broken
    assert r.base_rate == pytest.approx(3 / 6)
    assert r.candidate_rate == pytest.approx(4 / 6)
    assert r.diff == pytest.approx(1 / 6)
    assert r.test == "McNemar exact"
    assert r.p_value == pytest.approx(1.0)  # 2 vs 1 discordant: 2 * P(X <= 1 | 3, 1/2) = 1
    assert r.ci_low < r.diff < r.ci_high


def test_mcnemar_exact_matches_binomial_test() -> None:
    base, candidate = _table(both=10, improved=9, regressed=2, neither=9)
    r = paired_rates(base, candidate)
    assert r.test == "McNemar exact"
    assert (r.improved, r.regressed) == (9, 2)
    assert r.p_value == pytest.approx(stats.binomtest(2, 11, 0.5).pvalue, rel=1e-12)
    assert r.p_value == pytest.approx(_exact_mcnemar_by_hand(2, 9), rel=1e-12)
    assert r.p_value == pytest.approx(0.0654296875)  # 2 * (1 + 11 + 55) / 2048


def test_mcnemar_uses_exact_below_25_discordant_and_chi_square_from_25() -> None:
    exact = paired_rates(*_table(both=20, improved=16, regressed=8, neither=20))
    assert exact.test == "McNemar exact"
    assert exact.p_value == pytest.approx(_exact_mcnemar_by_hand(16, 8), rel=1e-12)

    chi = paired_rates(*_table(both=20, improved=17, regressed=8, neither=20))
    assert chi.test == "McNemar chi-square (continuity-corrected)"
    assert chi.p_value == pytest.approx(stats.chi2.sf((abs(17 - 8) - 1) ** 2 / 25, 1), rel=1e-12)


def test_mcnemar_chi_square_on_a_large_table() -> None:
    b, c = 40, 22
    r = paired_rates(*_table(both=300, improved=c, regressed=b, neither=138))
    assert r.n == 500
    assert r.test == "McNemar chi-square (continuity-corrected)"
    assert r.p_value == pytest.approx(stats.chi2.sf((abs(b - c) - 1) ** 2 / (b + c), 1), rel=1e-12)
    assert r.diff == pytest.approx((c - b) / 500)


def test_no_discordant_pairs_gives_p_one() -> None:
    r = paired_rates(*_table(both=7, improved=0, regressed=0, neither=5))
    assert r.p_value == 1.0
    assert r.diff == 0.0
    # The Laplace adjustment keeps the interval from collapsing to a point.
    assert r.ci_low < 0 < r.ci_high
    assert r.ci_low == pytest.approx(-r.ci_high)


def test_rates_of_an_empty_run() -> None:
    r = paired_rates([], [])
    assert r.n == 0
    assert math.isnan(r.base_rate) and math.isnan(r.candidate_rate) and math.isnan(r.diff)
    assert math.isnan(r.ci_low) and math.isnan(r.ci_high)
    assert (r.improved, r.regressed, r.p_value) == (0, 0, 1.0)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_bad_alpha_is_rejected(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        paired_rates([True], [False], alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        paired_scores([0.1], [0.2], alpha=alpha)


def test_length_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="same length"):
        paired_rates([True, False], [True])
    with pytest.raises(ValueError, match="same length"):
        paired_scores([0.1, 0.2], [0.3])


def test_bonett_price_interval_by_hand() -> None:
    n, n12, n21 = 40, 12, 3
    r = paired_rates(*_table(both=15, improved=n12, regressed=n21, neither=10))
    p12, p21 = (n12 + 1) / (n + 2), (n21 + 1) / (n + 2)
    d = p12 - p21
    se = math.sqrt((p12 + p21 - d**2) / (n + 2))
    z = NormalDist().inv_cdf(0.975)
    assert (r.ci_low, r.ci_high) == (pytest.approx(d - z * se, rel=1e-12), pytest.approx(d + z * se, rel=1e-12))
    assert r.diff == pytest.approx((n12 - n21) / n)  # the point estimate is not the adjusted one

    narrower = paired_rates(*_table(both=15, improved=n12, regressed=n21, neither=10), alpha=0.2)
    z80 = NormalDist().inv_cdf(0.9)
    assert narrower.ci_low == pytest.approx(d - z80 * se, rel=1e-12)


def test_bonett_price_matches_the_authors_package() -> None:
    # Bonett's R package statpsych: ci.prop.ps(.05, 12, 26, 4, 6) gives LL 0.2548067, UL 0.6251933
    # (f00 = 12 neither, f01 = 26 improved, f10 = 4 regressed, f11 = 6 both).
    r = paired_rates(*_table(both=6, improved=26, regressed=4, neither=12))
    assert r.ci_low == pytest.approx(0.2548067, abs=5e-8)
    assert r.ci_high == pytest.approx(0.6251933, abs=5e-8)
    assert r.diff == pytest.approx(22 / 48)


def test_bonett_price_is_clipped_to_minus_one_one() -> None:
    r = paired_rates(*_table(both=0, improved=3, regressed=0, neither=0))
    assert r.ci_high == 1.0
    assert -1.0 <= r.ci_low < r.ci_high


def test_bonett_price_coverage_by_simulation() -> None:
    rng = np.random.default_rng(20120412)
    n, p12, p21 = 40, 0.10, 0.25
    cells = rng.multinomial(n, [0.35, p12, p21, 0.30], size=2000)  # both, improved, regressed, neither
    truth = p12 - p21
    covered = 0
    for both, improved, regressed, neither in cells:
        r = paired_rates(*_table(int(both), int(improved), int(regressed), int(neither)))
        covered += r.ci_low <= truth <= r.ci_high
    assert 0.93 <= covered / len(cells) <= 0.975


# --- paired_scores -----------------------------------------------------------------------------

_DIFFS = [0.11, -0.02, 0.23, 0.05, -0.07, 0.31, 0.14, 0.09, -0.18]  # no zeros, no tied magnitudes


def _exact_wilcoxon_by_hand(d: list[float]) -> float:
    """Two-sided exact signed-rank p: every one of the 2^n sign assignments of ranks 1..n is equally likely."""
    order = sorted(range(len(d)), key=lambda i: abs(d[i]))
    ranks = {i: rank for rank, i in enumerate(order, start=1)}
    w = sum(ranks[i] for i in range(len(d)) if d[i] > 0)
    null = [
        sum(rank for rank, positive in zip(range(1, len(d) + 1), signs, strict=True) if positive)
        for signs in itertools.product((False, True), repeat=len(d))
    ]
    lower = sum(x <= w for x in null) / len(null)
    upper = sum(x >= w for x in null) / len(null)
    # scipy doubles the smaller tail and caps at 1.
    return min(1.0, 2 * min(lower, upper))


def test_wilcoxon_matches_exact_enumeration_and_scipy() -> None:
    base = [0.5] * len(_DIFFS)
    candidate = [b + d for b, d in zip(base, _DIFFS, strict=True)]
    s = paired_scores(base, candidate)
    actual = [c - b for b, c in zip(base, candidate, strict=True)]
    assert s.test.startswith("Wilcoxon signed-rank")
    assert s.p_value == pytest.approx(_exact_wilcoxon_by_hand(actual), rel=1e-12)
    assert s.p_value == pytest.approx(stats.wilcoxon(candidate, base).pvalue, rel=1e-12)
    assert 0.05 < s.p_value < 1.0  # W+ = 34 of 45: not a degenerate value
    assert (s.improved, s.regressed, s.n) == (6, 3, 9)


def test_zero_differences_are_dropped() -> None:
    base = [0.5] * len(_DIFFS)
    candidate = [b + d for b, d in zip(base, _DIFFS, strict=True)]
    without = paired_scores(base, candidate)
    # Ten ties: 19 pairs, more than scipy's "auto" enumerates when zeros are present; the zeros are
    # dropped before the call, so the exact test on the 9 nonzero pairs is used all the same.
    padded = paired_scores([*base, *[0.3] * 10], [*candidate, *[0.3] * 10])
    assert padded.p_value == pytest.approx(without.p_value, rel=1e-12)
    assert padded.p_value == pytest.approx(
        _exact_wilcoxon_by_hand([c - b for b, c in zip(base, candidate, strict=True)]), rel=1e-12
    )
    assert (padded.n, padded.improved, padded.regressed) == (19, 6, 3)
    assert padded.diff == pytest.approx(sum(_DIFFS) / 19)


def test_all_differences_zero() -> None:
    scores = [0.2, 0.9, 0.5, 0.5, 1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = paired_scores(scores, list(scores))
    assert s.p_value == 1.0
    assert (s.ci_low, s.ci_high) == (0.0, 0.0)
    assert (s.improved, s.regressed, s.diff) == (0, 0, 0.0)


def test_one_example_with_a_difference_does_not_crash_or_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = paired_scores([0.4], [0.9])
    assert math.isfinite(s.p_value) and 0 < s.p_value <= 1
    assert s.ci_low == s.ci_high == pytest.approx(0.5)
    assert (s.n, s.improved, s.regressed) == (1, 1, 0)


def test_scores_of_an_empty_run() -> None:
    s = paired_scores([], [])
    assert s.n == 0
    assert math.isnan(s.base_mean) and math.isnan(s.candidate_mean) and math.isnan(s.diff)
    assert math.isnan(s.ci_low) and math.isnan(s.ci_high)
    assert (s.improved, s.regressed, s.p_value) == (0, 0, 1.0)


def test_non_finite_scores_are_rejected() -> None:
    with pytest.raises(ValueError, match="finite"):
        paired_scores([0.1, math.nan], [0.2, 0.3])


def test_bootstrap_interval_contains_the_mean_difference_and_is_seeded() -> None:
    rng = np.random.default_rng(7)
    base = rng.uniform(0, 1, 80)
    candidate = np.clip(base + rng.normal(0.01, 0.15, 80), 0, 1)
    candidate[:30] = base[:30]  # many ties, as when both models answer equally well
    s = paired_scores(list(base), list(candidate))
    assert s.diff == pytest.approx(float(np.mean(candidate - base)))
    assert s.base_mean == pytest.approx(float(base.mean()))
    assert s.candidate_mean == pytest.approx(float(candidate.mean()))
    assert s.ci_low < s.diff < s.ci_high
    assert paired_scores(list(base), list(candidate)) == s
    other = paired_scores(list(base), list(candidate), seed=1)
    assert (other.ci_low, other.ci_high) != (s.ci_low, s.ci_high)
    wider = paired_scores(list(base), list(candidate), alpha=0.01)
    assert wider.ci_low < s.ci_low and s.ci_high < wider.ci_high


def test_bootstrap_interval_brackets_a_clear_shift() -> None:
    rng = np.random.default_rng(3)
    base = rng.uniform(0.1, 0.7, 50)
    candidate = base + 0.2 + rng.normal(0, 0.01, 50)
    s = paired_scores(list(base), list(candidate))
    assert 0 < s.ci_low < 0.2 < s.ci_high
    assert s.improved == 50 and s.regressed == 0
    assert s.p_value < 1e-10


def test_identical_nonzero_differences_give_a_point_interval() -> None:
    s = paired_scores([0.0, 0.25, 0.5], [0.5, 0.75, 1.0])
    assert (s.ci_low, s.ci_high, s.diff) == (0.5, 0.5, 0.5)
