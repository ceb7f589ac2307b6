"""proxy.analysis.sequential: the mSPRT against closed forms, and its error rates by simulation."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pytest
from scipy import integrate, optimize, stats

from proxy.analysis.sequential import (
    SequentialResult,
    always_valid,
    confidence_sequence,
    default_tau2,
    msprt_lambda,
)

ALPHA = 0.05
DAYS, USERS_PER_ARM_PER_DAY = 30, 100
BASELINE = 0.30
TAU2 = default_tau2(0.03)  # a plausible minimum detectable effect on a 30 % rate
A_A_RUNS = 2_000
# Three Monte-Carlo standard errors of a rate alpha estimated from A_A_RUNS runs.
ALLOWANCE = 3 * math.sqrt(ALPHA * (1 - ALPHA) / A_A_RUNS)


@dataclass(frozen=True)
class Simulation:
    diff: np.ndarray  # (runs, days): cumulative treatment - control rate
    var: np.ndarray  # (runs, days): its unpooled two-proportion variance
    results: list[SequentialResult]  # always_valid over all days, per run


def simulate(rate_c: float, rate_t: float, runs: int, seed: int) -> Simulation:
    """`runs` experiments peeked daily: Bernoulli outcomes, the cumulative estimate at each day."""
    rng = np.random.default_rng(seed)
    daily = rng.binomial(USERS_PER_ARM_PER_DAY, [rate_c, rate_t], size=(runs, DAYS, 2))
    n = USERS_PER_ARM_PER_DAY * np.arange(1, DAYS + 1)[None, :, None]
    rates = daily.cumsum(axis=1) / n
    diff = rates[..., 1] - rates[..., 0]
    var = (rates * (1 - rates) / n).sum(axis=-1)
    results = [
        always_valid(list(zip(d.tolist(), v.tolist(), strict=True)), tau2=TAU2, alpha=ALPHA)
        for d, v in zip(diff, var, strict=True)
    ]
    return Simulation(diff, var, results)


@pytest.fixture(scope="module")
def a_a() -> Simulation:
    return simulate(BASELINE, BASELINE, A_A_RUNS, seed=20240601)


@pytest.fixture(scope="module")
def effect() -> Simulation:
    return simulate(BASELINE, 0.36, 500, seed=20240602)


class TestAASimulation:
    def test_peeking_the_fixed_horizon_p_value_inflates_false_positives(self, a_a: Simulation) -> None:
        """A z-test p-value read daily for 30 days crosses 0.05 at least once in well over 10 % of A/A runs."""
        p_daily = 2 * stats.norm.sf(np.abs(a_a.diff) / np.sqrt(a_a.var))
        ever = float(np.mean((p_daily < ALPHA).any(axis=1)))
        assert ever > 0.10
        # ...while at any single pre-registered day it holds alpha.
        assert abs(float(np.mean(p_daily[:, -1] < ALPHA)) - ALPHA) <= ALLOWANCE

    def test_always_valid_p_value_keeps_alpha_under_daily_peeking(self, a_a: Simulation) -> None:
        """The share of A/A runs ever declared significant by the mSPRT is at most alpha (+ 3 MC s.e.)."""
        ever = np.mean([r.p_value < ALPHA for r in a_a.results])
        assert ever <= ALPHA + ALLOWANCE
        assert all(r.looks == DAYS for r in a_a.results)

    def test_confidence_sequence_covers_the_truth(self, a_a: Simulation) -> None:
        """The intersected confidence sequence at the last look contains 0 in >= 1 - alpha of A/A runs."""
        covered = np.array([r.ci[0] <= 0 <= r.ci[1] for r in a_a.results])
        assert covered.mean() >= 1 - ALPHA
        # Duality: the sequence excludes 0 at some look exactly when the p-value fell to alpha.
        assert np.array_equal(covered, np.array([r.p_value > ALPHA for r in a_a.results]))


class TestPower:
    def test_real_effect_becomes_significant(self, effect: Simulation) -> None:
        """With 30 % vs 36 % and 3,000 users per arm by day 30, nearly every run is significant."""
        assert np.mean([r.p_value < ALPHA for r in effect.results]) >= 0.95

    def test_confidence_sequence_covers_a_real_effect(self, effect: Simulation) -> None:
        """The sequence covers the true difference 0.06, not just 0."""
        assert np.mean([r.ci[0] <= 0.06 <= r.ci[1] for r in effect.results]) >= 1 - ALPHA


class TestMonotonicity:
    @pytest.mark.parametrize("which", ["a_a", "effect"])
    def test_p_value_never_rises_and_sequences_nest(self, which: str, request: pytest.FixtureRequest) -> None:
        """Over successive looks the p-value is non-increasing and each interval lies inside the last."""
        sim: Simulation = request.getfixturevalue(which)
        for d, v in zip(sim.diff[:25], sim.var[:25], strict=True):
            looks = list(zip(d.tolist(), v.tolist(), strict=True))
            prefixes = [always_valid(looks[: k + 1], tau2=TAU2, alpha=ALPHA) for k in range(DAYS)]
            p = [r.p_value for r in prefixes]
            assert all(later <= earlier for earlier, later in itertools.pairwise(p))
            for earlier_r, later_r in itertools.pairwise(prefixes):
                assert earlier_r.ci[0] <= later_r.ci[0] <= later_r.ci[1] <= earlier_r.ci[1]


class TestClosedForms:
    @pytest.mark.parametrize(("var", "tau2"), [(1e-4, 9e-4), (0.01, 0.01), (2.0, 0.5)])
    def test_lambda_at_zero_difference(self, var: float, tau2: float) -> None:
        """At diff 0 the mixture ratio is sqrt(var / (var + tau2))."""
        assert msprt_lambda(0.0, var, tau2) == pytest.approx(math.sqrt(var / (var + tau2)), rel=1e-15)

    @pytest.mark.parametrize(("diff", "var", "tau2"), [(0.01, 1e-4, 9e-4), (-0.04, 1.5e-4, 9e-4), (1.3, 0.5, 2.0)])
    def test_lambda_is_the_normal_mixture_likelihood_ratio(self, diff: float, var: float, tau2: float) -> None:
        """Lambda = ∫ N(diff; θ, var) N(θ; 0, tau2) dθ / N(diff; 0, var), by quadrature and in closed form."""
        sd, tau = math.sqrt(var), math.sqrt(tau2)
        mixture, _ = integrate.quad(
            lambda theta: stats.norm.pdf(diff, theta, sd) * stats.norm.pdf(theta, 0, tau), -12 * tau, 12 * tau
        )
        null = stats.norm.pdf(diff, 0, sd)
        assert msprt_lambda(diff, var, tau2) == pytest.approx(mixture / null, rel=1e-7)
        marginal = stats.norm.pdf(diff, 0, math.sqrt(var + tau2))
        assert msprt_lambda(diff, var, tau2) == pytest.approx(marginal / null, rel=1e-12)

    @pytest.mark.parametrize(
        ("diff", "var", "tau2", "alpha"), [(0.02, 1e-4, 9e-4, 0.05), (-0.01, 4e-5, 1e-4, 0.1), (3.0, 1.0, 4.0, 0.01)]
    )
    def test_sequence_endpoints_are_where_one_over_lambda_is_alpha(
        self, diff: float, var: float, tau2: float, alpha: float
    ) -> None:
        """Each endpoint theta solves 1 / Lambda(diff - theta) = alpha (found by brentq on log densities)."""

        def log_one_over_lambda_minus_log_alpha(theta: float) -> float:
            d = diff - theta
            log_lambda = stats.norm.logpdf(d, 0, math.sqrt(var + tau2)) - stats.norm.logpdf(d, 0, math.sqrt(var))
            return float(-log_lambda - math.log(alpha))

        reach = 100 * math.sqrt(var + tau2)
        low = optimize.brentq(log_one_over_lambda_minus_log_alpha, diff - reach, diff, xtol=1e-14, rtol=1e-14)
        high = optimize.brentq(log_one_over_lambda_minus_log_alpha, diff, diff + reach, xtol=1e-14, rtol=1e-14)
        got = confidence_sequence(diff, var, tau2, alpha)
        assert got == pytest.approx((low, high), rel=1e-9, abs=1e-12)
        assert alpha * msprt_lambda(diff - got[1], var, tau2) == pytest.approx(1.0, rel=1e-9)

    def test_sequence_is_wider_than_the_fixed_horizon_interval(self) -> None:
        """Safe peeking costs width: the sequence contains the fixed-horizon (1 - alpha) interval."""
        diff, var = 0.02, 1e-4
        half = stats.norm.ppf(1 - ALPHA / 2) * math.sqrt(var)
        low, high = confidence_sequence(diff, var, TAU2, ALPHA)
        assert low < diff - half and diff + half < high


class TestEdges:
    def test_huge_lambda_does_not_overflow(self) -> None:
        """A z of 1,000 gives Lambda inf and an always-valid p of 0, not an OverflowError."""
        assert msprt_lambda(1.0, 1e-6, 1.0) == math.inf
        assert always_valid([(1.0, 1e-6)], tau2=1.0).p_value == 0.0

    def test_looks_without_variance_are_skipped(self) -> None:
        """Looks with var 0, negative or nan (no data yet) are ignored and not counted."""
        good = (0.01, 1e-4)
        with_bad = always_valid([(0.0, 0.0), (0.5, -1.0), (0.2, math.nan), good], tau2=TAU2)
        assert with_bad == always_valid([good], tau2=TAU2)
        assert with_bad.looks == 1

    def test_no_usable_look(self) -> None:
        """With no usable look: p 1, the whole line as interval, 0 looks."""
        assert always_valid([], tau2=TAU2) == SequentialResult(1.0, (-math.inf, math.inf), 0, TAU2)

    def test_first_look_is_plain_one_over_lambda(self) -> None:
        """One look: p = min(1, 1 / Lambda) and ci = that look's sequence."""
        result = always_valid([(0.05, 1e-4)], tau2=TAU2)
        assert result.p_value == pytest.approx(1 / msprt_lambda(0.05, 1e-4, TAU2), rel=1e-12)
        assert result.ci == confidence_sequence(0.05, 1e-4, TAU2, ALPHA)
        assert always_valid([(0.0, 1e-4)], tau2=TAU2).p_value == 1.0

    def test_default_tau2_is_mde_squared(self) -> None:
        """tau = mde: default_tau2(0.03) == 0.0009."""
        assert default_tau2(0.03) == pytest.approx(0.0009, rel=1e-15)

    @pytest.mark.parametrize("mde", [0.0, -0.01, math.nan, math.inf])
    def test_default_tau2_rejects_non_positive(self, mde: float) -> None:
        """An mde that is not a positive number is a ValueError."""
        with pytest.raises(ValueError):
            default_tau2(mde)

    @pytest.mark.parametrize(("var", "tau2"), [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (math.nan, 1.0)])
    def test_lambda_rejects_bad_variances(self, var: float, tau2: float) -> None:
        """var and tau2 must be positive and finite."""
        with pytest.raises(ValueError):
            msprt_lambda(0.1, var, tau2)
