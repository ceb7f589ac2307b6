"""proxy.analysis.stats: each method against statsmodels/scipy run independently, textbook values and simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import statsmodels.api as sm
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import confint_proportions_2indep, proportions_ztest

from proxy.analysis.stats import (
    Comparison,
    holm,
    non_inferiority,
    percentile_bootstrap,
    power_means,
    power_proportions,
    ratio_delta,
    sample_ratio,
    sample_size_means,
    sample_size_proportions,
    two_proportions,
    welch,
)

Z95 = stats.norm.ppf(0.95)
Z975 = stats.norm.ppf(0.975)


class TestTwoProportions:
    def test_reference_case_study_counts(self) -> None:
        """4,421/6,200 vs 1,223/1,550 gives z = 6.0, p ~ 2e-9 (REFERENCE.md), as the pooled formula does by hand."""
        c = two_proportions(4421, 6200, 1223, 1550)
        pooled = (4421 + 1223) / (6200 + 1550)
        z = (1223 / 1550 - 4421 / 6200) / math.sqrt(pooled * (1 - pooled) * (1 / 6200 + 1 / 1550))
        assert round(z, 1) == 6.0
        assert c.p_value == pytest.approx(2 * stats.norm.sf(z), rel=1e-9)
        assert c.p_value is not None and 1e-9 < c.p_value < 3e-9
        assert c.control == pytest.approx(0.713, abs=5e-4) and c.treatment == pytest.approx(0.789, abs=5e-4)
        assert c.diff == pytest.approx(1223 / 1550 - 4421 / 6200, rel=1e-15)
        assert c.lift == pytest.approx(c.diff / c.control, rel=1e-15)

    @pytest.mark.parametrize(("sc", "nc", "st", "nt"), [(480, 1000, 530, 1000), (30, 400, 18, 450), (7, 90, 15, 80)])
    def test_matches_statsmodels(self, sc: int, nc: int, st: int, nt: int) -> None:
        """p-value, diff CI (Newcombe) and lift CI (log ratio - 1) equal statsmodels' own calls."""
        c = two_proportions(sc, nc, st, nt, alpha=0.05)
        _, p = proportions_ztest([sc, st], [nc, nt])
        assert c.p_value == pytest.approx(p, rel=1e-12)
        assert c.diff_ci == pytest.approx(
            confint_proportions_2indep(st, nt, sc, nc, compare="diff", method="newcombe"), rel=1e-12
        )
        ratio = confint_proportions_2indep(st, nt, sc, nc, compare="ratio", method="log")
        assert c.lift_ci == pytest.approx((ratio[0] - 1, ratio[1] - 1), rel=1e-12)

    def test_newcombe_published_example(self) -> None:
        """Newcombe (1998) example (a): 56/70 - 48/80 = 0.2, method 10 interval 0.0524 to 0.3339."""
        c = two_proportions(48, 80, 56, 70)
        assert c.diff == pytest.approx(0.2, rel=1e-12)
        assert c.diff_ci == pytest.approx((0.0524, 0.3339), abs=5e-5)

    def test_lift_ci_is_the_katz_log_interval(self) -> None:
        """lift CI = exp(log RR ± z·sqrt(1/a - 1/n1 + 1/b - 1/n2)) - 1, computed by hand."""
        c = two_proportions(30, 400, 18, 450, alpha=0.1)
        rr = (18 / 450) / (30 / 400)
        half = stats.norm.ppf(0.95) * math.sqrt(1 / 18 - 1 / 450 + 1 / 30 - 1 / 400)
        assert c.lift_ci == pytest.approx((rr * math.exp(-half) - 1, rr * math.exp(half) - 1), rel=1e-12)

    def test_se_is_unpooled(self) -> None:
        """se = sqrt(p_c(1-p_c)/n_c + p_t(1-p_t)/n_t)."""
        c = two_proportions(480, 1000, 530, 1200)
        assert c.se == pytest.approx(math.sqrt(0.48 * 0.52 / 1000 + (530 / 1200) * (670 / 1200) / 1200), rel=1e-15)
        assert (c.n_control, c.n_treatment, c.method, c.alpha) == (1000, 1200, "two-proportion z-test", 0.05)

    def test_zero_events(self) -> None:
        """No control events: no lift. No events at all: p 1, se 0, a Newcombe interval that still has width."""
        c = two_proportions(0, 100, 3, 100)
        assert c.lift is None and c.lift_ci is None and c.p_value is not None
        none = two_proportions(0, 100, 0, 100)
        assert none.p_value == 1.0 and none.se == 0.0
        assert none.diff_ci[0] < 0 < none.diff_ci[1]
        assert two_proportions(5, 100, 0, 100).lift_ci is None

    @pytest.mark.parametrize(("sc", "nc", "st", "nt"), [(5, 4, 1, 10), (1, 0, 1, 10), (-1, 10, 1, 10)])
    def test_rejects_impossible_counts(self, sc: int, nc: int, st: int, nt: int) -> None:
        """successes outside 0..n, or n = 0, is a ValueError."""
        with pytest.raises(ValueError):
            two_proportions(sc, nc, st, nt)


@pytest.fixture(scope="module")
def skewed_samples() -> tuple[np.ndarray, np.ndarray]:
    """Fixed, skewed, unequal-variance, unequal-size samples (latency-like)."""
    rng = np.random.default_rng(7)
    return rng.lognormal(0.2, 0.5, 180), rng.lognormal(0.3, 0.8, 240)


class TestWelch:
    def test_matches_scipy_and_the_welch_satterthwaite_formula(self, skewed_samples: tuple[np.ndarray, ...]) -> None:
        """p and CI equal scipy's ttest_ind(equal_var=False) and Welch's formula by hand with scipy.stats.t."""
        x_c, x_t = skewed_samples
        c = welch(x_c, x_t, alpha=0.1)
        vc, vt = x_c.var(ddof=1) / x_c.size, x_t.var(ddof=1) / x_t.size
        se = math.sqrt(vc + vt)
        df = (vc + vt) ** 2 / (vc**2 / (x_c.size - 1) + vt**2 / (x_t.size - 1))
        diff = x_t.mean() - x_c.mean()
        assert c.diff == pytest.approx(diff, rel=1e-12)
        assert c.se == pytest.approx(se, rel=1e-12)
        assert c.p_value == pytest.approx(2 * stats.t.sf(abs(diff) / se, df), rel=1e-9)
        half = stats.t.ppf(0.95, df) * se
        assert c.diff_ci == pytest.approx((diff - half, diff + half), rel=1e-9)
        scipy_result = stats.ttest_ind(x_t, x_c, equal_var=False)
        assert c.p_value == pytest.approx(scipy_result.pvalue, rel=1e-12)

    def test_lift_ci_is_the_delta_method_on_the_log_ratio(self, skewed_samples: tuple[np.ndarray, ...]) -> None:
        """lift CI = exp(log(m_t/m_c) ± z·sqrt(v_t/m_t² + v_c/m_c²)) - 1 with v the variances of the means."""
        x_c, x_t = skewed_samples
        c = welch(x_c, x_t)
        m_c, m_t = x_c.mean(), x_t.mean()
        se_log = math.sqrt(x_t.var(ddof=1) / x_t.size / m_t**2 + x_c.var(ddof=1) / x_c.size / m_c**2)
        expected = (m_t / m_c * math.exp(-Z975 * se_log) - 1, m_t / m_c * math.exp(Z975 * se_log) - 1)
        assert c.lift_ci == pytest.approx(expected, rel=1e-12)
        assert c.lift == pytest.approx(m_t / m_c - 1, rel=1e-12)

    def test_non_positive_means_have_no_lift_interval(self) -> None:
        """A log-ratio interval needs both means > 0; otherwise lift_ci is None."""
        negative_control = welch([-3.0, 1.0, 1.0], [1.0, 2.0, 3.0])
        assert negative_control.lift is not None and negative_control.lift_ci is None
        zero_control = welch([-1.0, 1.0], [1.0, 2.0])
        assert zero_control.lift is None and zero_control.lift_ci is None

    def test_constant_samples(self) -> None:
        """Zero variance in both arms: the difference is exact (p 1 if equal, 0 otherwise)."""
        assert welch([2.0, 2.0], [2.0, 2.0, 2.0]).p_value == 1.0
        different = welch([2.0, 2.0], [3.0, 3.0])
        assert different.p_value == 0.0 and different.diff_ci == (1.0, 1.0)

    @pytest.mark.parametrize("bad", [[1.0], [1.0, math.nan], [[1.0, 2.0], [3.0, 4.0]]])
    def test_rejects_bad_samples(self, bad: list[float]) -> None:
        """Fewer than 2 values, nan, or 2-D input is a ValueError."""
        with pytest.raises(ValueError):
            welch(bad, [1.0, 2.0, 3.0])


def clustered_users(n_users: int, mean_requests: float, a: float, b: float, rng: np.random.Generator) -> np.ndarray:
    """(users, 2) array of (completed, requests): each user has their own success rate ~ Beta(a, b)."""
    requests = 1 + rng.poisson(mean_requests - 1, n_users)
    completed = rng.binomial(requests, rng.beta(a, b, n_users))
    return np.column_stack([completed, requests]).astype(float)


def expand(control: np.ndarray, treatment: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per request: y (1 = completed), treatment dummy, user index (the cluster)."""
    users = np.vstack([control, treatment]).astype(int)
    arm = np.repeat([0.0] * len(control) + [1.0] * len(treatment), users[:, 1])
    user = np.repeat(np.arange(len(users)), users[:, 1])
    y = np.concatenate([np.r_[np.ones(done), np.zeros(total - done)] for done, total in users])
    return y, arm, user


@pytest.fixture(scope="module")
def ratio_users() -> tuple[np.ndarray, np.ndarray]:
    """300 control and 320 treatment users, ~6 requests each, success rates varying by user."""
    rng = np.random.default_rng(11)
    return clustered_users(300, 6, 3.0, 1.5, rng), clustered_users(320, 6, 3.3, 1.5, rng)


class TestRatioDelta:
    def test_matches_cluster_robust_ols(self, ratio_users: tuple[np.ndarray, np.ndarray]) -> None:
        """Slope and SE of request-level OLS y ~ treatment, clustered by user (no correction), match."""
        control, treatment = ratio_users
        c = ratio_delta(control[:, 0], control[:, 1], treatment[:, 0], treatment[:, 1])
        y, arm, user = expand(control, treatment)
        fit = sm.OLS(y, sm.add_constant(arm)).fit(
            cov_type="cluster", cov_kwds={"groups": user, "use_correction": False, "df_correction": False}
        )
        assert c.diff == pytest.approx(fit.params[1], rel=1e-12)
        assert c.se == pytest.approx(fit.bse[1], rel=1e-2)
        # Precisely: the delta method uses ddof 1 per arm, the sandwich ddof 0.
        worst = math.sqrt(len(control) / (len(control) - 1))
        assert fit.bse[1] < c.se <= fit.bse[1] * worst * (1 + 1e-12)
        assert (c.n_control, c.n_treatment) == (300, 320)
        assert c.control == pytest.approx(control[:, 0].sum() / control[:, 1].sum(), rel=1e-15)

    def test_ignoring_clusters_would_understate_the_error(self, ratio_users: tuple[np.ndarray, np.ndarray]) -> None:
        """Requests of one user are correlated here: the i.i.d.-request SE is clearly too small."""
        control, treatment = ratio_users
        c = ratio_delta(control[:, 0], control[:, 1], treatment[:, 0], treatment[:, 1])
        y, arm, _ = expand(control, treatment)
        naive = sm.OLS(y, sm.add_constant(arm)).fit(cov_type="HC0").bse[1]
        assert c.se > 1.2 * naive

    def test_one_request_per_user_reduces_to_the_unclustered_error(self) -> None:
        """With den = 1 the SE is Welch's exactly, and OLS HC0 up to the n/(n-1) of ddof."""
        rng = np.random.default_rng(3)
        num_c, num_t = rng.binomial(1, 0.4, 400).astype(float), rng.binomial(1, 0.45, 500).astype(float)
        c = ratio_delta(num_c, np.ones(400), num_t, np.ones(500))
        w = welch(num_c, num_t)
        assert c.se == pytest.approx(w.se, rel=1e-12)
        assert c.diff == pytest.approx(w.diff, rel=1e-12)
        assert c.lift_ci == pytest.approx(w.lift_ci, rel=1e-12)
        y, arm = np.r_[num_c, num_t], np.r_[np.zeros(400), np.ones(500)]
        hc0 = sm.OLS(y, sm.add_constant(arm)).fit(cov_type="HC0").bse[1]
        clustered = (
            sm.OLS(y, sm.add_constant(arm))
            .fit(cov_type="cluster", cov_kwds={"groups": np.arange(900), "use_correction": False})
            .bse[1]
        )
        assert clustered == pytest.approx(hc0, rel=1e-12)
        assert hc0 < c.se <= hc0 * math.sqrt(400 / 399) * (1 + 1e-12)

    def test_variance_is_deng_et_al_formula(self, ratio_users: tuple[np.ndarray, np.ndarray]) -> None:
        """SE and lift CI follow (Var X - 2R Cov + R² Var Y)/(n μ_Y²) from np.cov, and the log-ratio delta."""
        control, treatment = ratio_users

        def ratio_var(users: np.ndarray) -> tuple[float, float]:
            x, y = users[:, 0], users[:, 1]
            r = x.mean() / y.mean()
            (var_x, cov), (_, var_y) = np.cov(x, y, ddof=1)
            return r, (var_x - 2 * r * cov + r**2 * var_y) / (len(x) * y.mean() ** 2)

        (r_c, v_c), (r_t, v_t) = ratio_var(control), ratio_var(treatment)
        c = ratio_delta(control[:, 0], control[:, 1], treatment[:, 0], treatment[:, 1], alpha=0.1)
        assert c.se == pytest.approx(math.sqrt(v_c + v_t), rel=1e-10)
        assert c.p_value == pytest.approx(2 * stats.norm.sf(abs(r_t - r_c) / math.sqrt(v_c + v_t)), rel=1e-9)
        half = Z95 * math.sqrt(v_c + v_t)
        assert c.diff_ci == pytest.approx((r_t - r_c - half, r_t - r_c + half), rel=1e-10)
        se_log = math.sqrt(v_t / r_t**2 + v_c / r_c**2)
        assert c.lift_ci == pytest.approx(
            (r_t / r_c * math.exp(-Z95 * se_log) - 1, r_t / r_c * math.exp(Z95 * se_log) - 1), rel=1e-10
        )

    def test_rejects_mismatched_or_empty_denominators(self) -> None:
        """num and den of different lengths, or sum(den) = 0, is a ValueError."""
        with pytest.raises(ValueError):
            ratio_delta([1, 2], [1, 2, 3], [1, 2], [1, 2])
        with pytest.raises(ValueError):
            ratio_delta([0, 0], [0, 0], [1, 2], [1, 2])


class TestPercentileBootstrap:
    def test_ci_contains_a_known_shift(self) -> None:
        """N(0,1) vs N(0.5,1), 10,000 each: the p95 difference CI contains 0.5; estimates are np.percentile."""
        rng = np.random.default_rng(5)
        x_c, x_t = rng.normal(0, 1, 10_000), rng.normal(0.5, 1, 10_000)
        c = percentile_bootstrap(x_c, x_t, 95)
        assert c.diff_ci[0] < 0.5 < c.diff_ci[1]
        assert c.control == np.percentile(x_c, 95) and c.treatment == np.percentile(x_t, 95)
        assert c.p_value is None and c.method == "bootstrap"
        assert c.diff_ci[1] - c.diff_ci[0] == pytest.approx(2 * Z975 * c.se, rel=0.15)

    def test_lift_ci_contains_a_known_ratio(self) -> None:
        """Lognormal latencies x 1.2: every percentile's ratio is 1.2, so the p95 lift CI contains 0.2."""
        rng = np.random.default_rng(6)
        x_c, x_t = rng.lognormal(0, 0.6, 8_000), 1.2 * rng.lognormal(0, 0.6, 8_000)
        c = percentile_bootstrap(x_c, x_t, 95, n_resamples=1000)
        assert c.lift_ci is not None and c.lift_ci[0] < 0.2 < c.lift_ci[1]
        true_diff = 0.2 * math.exp(0.6 * stats.norm.ppf(0.95))
        assert c.diff_ci[0] < true_diff < c.diff_ci[1]

    def test_deterministic_for_a_seed(self) -> None:
        """Same seed, same result; another seed, other resamples."""
        rng = np.random.default_rng(8)
        x_c, x_t = rng.exponential(1.0, 3_000), rng.exponential(1.1, 3_000)
        first = percentile_bootstrap(x_c, x_t, 90, n_resamples=500, seed=1)
        assert percentile_bootstrap(x_c, x_t, 90, n_resamples=500, seed=1) == first
        assert percentile_bootstrap(x_c, x_t, 90, n_resamples=500, seed=2).diff_ci != first.diff_ci

    def test_long_samples_are_subsampled(self) -> None:
        """Above max_sample the interval is a subsample's (wider), the estimates and n the full data's."""
        rng = np.random.default_rng(9)
        x_c, x_t = rng.normal(0, 1, 20_000), rng.normal(0.3, 1, 20_000)
        full = percentile_bootstrap(x_c, x_t, 50, n_resamples=500)
        sub = percentile_bootstrap(x_c, x_t, 50, n_resamples=500, max_sample=1_000)
        assert (sub.n_control, sub.n_treatment) == (20_000, 20_000)
        assert (sub.control, sub.treatment) == (full.control, full.treatment)
        # sqrt(20) ~ 4.5 times wider in theory.
        assert sub.diff_ci[1] - sub.diff_ci[0] > 3 * (full.diff_ci[1] - full.diff_ci[0])
        assert sub.diff_ci[0] < 0.3 < sub.diff_ci[1]

    def test_zero_control_percentile_has_no_lift(self) -> None:
        """A control percentile of 0 leaves lift and lift_ci undefined."""
        c = percentile_bootstrap(np.zeros(50), np.arange(50.0), 50, n_resamples=200)
        assert c.lift is None and c.lift_ci is None

    @pytest.mark.parametrize("q", [-1, 101])
    def test_rejects_q_outside_0_100(self, q: float) -> None:
        """q is a percentile in 0..100."""
        with pytest.raises(ValueError):
            percentile_bootstrap([1.0, 2.0], [1.0, 2.0], q)


def textbook_n(p1: float, p2: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Per-group n of the two-proportion z-test (pooled under H0, unpooled under H1), e.g. Fleiss."""
    p_bar = (p1 + p2) / 2
    z_a, z_b = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)
    root = z_a * math.sqrt(2 * p_bar * (1 - p_bar)) + z_b * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    return float(root**2 / (p2 - p1) ** 2)


def t_power(effect: float, n_c: float, n_t: float, alpha: float = 0.05) -> float:
    """Power of the two-sided two-sample t-test from the noncentral t (scipy.stats.nct)."""
    df = n_c + n_t - 2
    nc = effect / math.sqrt(1 / n_c + 1 / n_t)
    crit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def normal_power(h: float, n_c: float, n_t: float, alpha: float = 0.05) -> float:
    shift = h / math.sqrt(1 / n_c + 1 / n_t)
    z = stats.norm.ppf(1 - alpha / 2)
    return float(stats.norm.cdf(shift - z) + stats.norm.cdf(-shift - z))


def cohens_h(p1: float, p2: float) -> float:
    return abs(2 * math.asin(math.sqrt(p2)) - 2 * math.asin(math.sqrt(p1)))


class TestSampleSize:
    def test_reference_figure(self) -> None:
        """75 % baseline, +5 points, alpha 0.05, power 0.8: about 1,090-1,100 users per variant."""
        assert 1090 <= sample_size_proportions(0.75, 0.05) <= 1100

    def test_t_test_on_standardized_effect_gives_the_upper_reference_figure(self) -> None:
        """The same question as a t-test on d = 0.05 / sqrt(.75·.25) gives ~1,180 (REFERENCE.md)."""
        assert 1170 <= sample_size_means(math.sqrt(0.75 * 0.25), 0.05) <= 1180

    @pytest.mark.parametrize(
        ("baseline", "mde", "tolerance"),
        [(0.75, 0.05, 0.005), (0.30, 0.03, 0.005), (0.10, 0.02, 0.005), (0.50, -0.05, 0.005), (0.90, 0.05, 0.03)],
    )
    def test_close_to_the_textbook_formula(self, baseline: float, mde: float, tolerance: float) -> None:
        """Cohen's h and the two-proportion formula agree within 0.5 % (3 % near 1, where they differ most)."""
        n = sample_size_proportions(baseline, mde)
        assert n == pytest.approx(textbook_n(baseline, baseline + mde), rel=tolerance)

    @pytest.mark.parametrize("ratio", [1.0, 0.25, 4.0])
    def test_proportions_n_is_the_smallest_with_the_power(self, ratio: float) -> None:
        """At (n, ceil(ratio n)) the normal power on h reaches 0.8; at n - 1 it does not."""
        n = sample_size_proportions(0.3, 0.03, ratio=ratio)
        h = cohens_h(0.3, 0.33)
        assert normal_power(h, n, math.ceil(ratio * n)) >= 0.8 - 1e-9
        assert normal_power(h, n - 1, (n - 1) * ratio) < 0.8

    @pytest.mark.parametrize(("sd", "mde", "ratio"), [(1.0, 0.2, 1.0), (0.8, 0.1, 2.0), (300.0, 50.0, 0.5)])
    def test_means_n_is_the_smallest_with_the_power(self, sd: float, mde: float, ratio: float) -> None:
        """By the noncentral t: power >= 0.8 at n, < 0.8 at n - 1."""
        n = sample_size_means(sd, mde, ratio=ratio)
        assert t_power(mde / sd, n, math.ceil(ratio * n)) >= 0.8 - 1e-9
        assert t_power(mde / sd, n - 1, (n - 1) * ratio) < 0.8

    @pytest.mark.parametrize(
        ("args", "kwargs"),
        [((0.75, 0.0), {}), ((0.75, 0.3), {}), ((1.2, 0.05), {}), ((0.75, 0.05), {"ratio": 0.0})],
    )
    def test_rejects_impossible_plans(self, args: tuple[float, float], kwargs: dict[str, float]) -> None:
        """mde 0, rates outside [0, 1] or a non-positive ratio is a ValueError."""
        with pytest.raises(ValueError):
            sample_size_proportions(*args, **kwargs)


class TestPower:
    @pytest.mark.parametrize(("n_c", "n_t"), [(500, 500), (1092, 1092), (4000, 1000)])
    def test_proportions_power_is_the_normal_formula(self, n_c: int, n_t: int) -> None:
        """power_proportions = Φ(h/sqrt(1/n_c+1/n_t) - z) + Φ(-h/... - z)."""
        assert power_proportions(0.75, 0.05, n_c, n_t) == pytest.approx(
            normal_power(cohens_h(0.75, 0.80), n_c, n_t), rel=1e-9
        )

    def test_power_at_the_planned_size(self) -> None:
        """With the planned 1,092 per arm the power is 0.8; half way, well below."""
        assert power_proportions(0.75, 0.05, 1092, 1092) == pytest.approx(0.8, abs=2e-3)
        assert power_proportions(0.75, 0.05, 546, 546) < 0.55

    @pytest.mark.parametrize(("n_c", "n_t"), [(20, 20), (100, 300), (1000, 900)])
    def test_means_power_is_the_noncentral_t(self, n_c: int, n_t: int) -> None:
        """power_means equals the power from scipy.stats.nct."""
        assert power_means(2.0, 0.5, n_c, n_t) == pytest.approx(t_power(0.25, n_c, n_t), rel=1e-6)

    def test_no_users_no_power(self) -> None:
        """An empty arm has power 0."""
        assert power_proportions(0.75, 0.05, 0, 100) == 0.0
        assert power_means(1.0, 0.1, 1, 100) == 0.0


class TestSampleRatio:
    def test_even_split_observed_even(self) -> None:
        """50/50 configured, 5000/5000 observed: chi2 0, p 1, no mismatch."""
        r = sample_ratio(5000, 5000, 0.5)
        assert (r.chi2, r.p_value, r.mismatch, r.expected) == (0.0, 1.0, False, (5000.0, 5000.0))

    def test_5000_vs_5300(self) -> None:
        """5000/5300 at 50/50: chi2 = 8.74, p = 0.0031 (the z-test on one proportion); no mismatch at 0.001."""
        r = sample_ratio(5000, 5300, 0.5)
        z = (5300 - 5150) / math.sqrt(10300 * 0.25)
        assert r.chi2 == pytest.approx(z**2, rel=1e-12)
        assert r.p_value == pytest.approx(2 * stats.norm.sf(z), rel=1e-9)
        assert r.p_value == pytest.approx(0.0031, abs=1e-4)
        assert not r.mismatch and r.threshold == 0.001
        assert sample_ratio(5000, 5300, 0.5, threshold=0.01).mismatch

    def test_5000_vs_5600(self) -> None:
        """5000/5600 at 50/50 is a mismatch."""
        r = sample_ratio(5000, 5600, 0.5)
        assert r.mismatch and r.p_value < 1e-6

    def test_constant_probabilities_equal_the_constant_share(self) -> None:
        """A per-user probability sequence all equal to 0.2 gives the same result as the share 0.2."""
        share = sample_ratio(6200, 1650, 0.2)
        for probabilities in ([0.2] * 7850, np.full(7850, 0.2)):
            r = sample_ratio(6200, 1650, probabilities)
            assert r.expected == pytest.approx(share.expected, rel=1e-12)
            assert (r.chi2, r.p_value) == pytest.approx((share.chi2, share.p_value), rel=1e-9)
            assert (r.observed, r.mismatch, r.threshold) == (share.observed, share.mismatch, share.threshold)

    def test_rollout_change_inside_the_window(self) -> None:
        """1,000 users first seen at 10 % then 1,000 at 50 %: 600 treatment expected, not 2,000 x share."""
        probabilities = [0.1] * 1000 + [0.5] * 1000
        r = sample_ratio(1400, 600, probabilities)
        assert r.expected == pytest.approx((1400.0, 600.0))
        assert not r.mismatch and r.p_value == pytest.approx(1.0)
        skewed = sample_ratio(1500, 500, probabilities)
        expected = stats.chisquare([1500, 500], f_exp=[1400, 600])
        assert skewed.p_value == pytest.approx(expected.pvalue, rel=1e-12) and skewed.mismatch

    def test_everyone_expected_on_one_side(self) -> None:
        """At share 1 anyone in control is a certain mismatch; nobody there, nothing to test."""
        assert sample_ratio(0, 100, 1.0).p_value == 1.0
        certain = sample_ratio(1, 100, 1.0)
        assert certain.mismatch and certain.p_value == 0.0 and certain.chi2 == math.inf
        assert sample_ratio(100, 0, 0.0).p_value == 1.0
        assert sample_ratio(100, 1, [0.0] * 101).mismatch

    def test_no_users(self) -> None:
        """Zero users: p 1, no mismatch."""
        r = sample_ratio(0, 0, 0.5)
        assert r.p_value == 1.0 and not r.mismatch

    @pytest.mark.parametrize("share", [1.5, -0.1, [0.5] * 9, [0.5] * 9 + [2.0]])
    def test_rejects_bad_shares(self, share: float | list[float]) -> None:
        """A share outside [0, 1] or a sequence not one per user (10 users here) is a ValueError."""
        with pytest.raises(ValueError):
            sample_ratio(5, 5, share)


class TestHolm:
    def test_hand_computed_example(self) -> None:
        """p = .01 .04 .03 .005 (m = 4): sorted times 4, 3, 2, 1 then running max -> .03 .06 .06 .02."""
        result = holm([0.01, 0.04, 0.03, 0.005])
        assert [p for p, _ in result] == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12)
        assert [r for _, r in result] == [True, False, False, True]

    @pytest.mark.parametrize("alpha", [0.05, 0.1])
    def test_matches_statsmodels(self, alpha: float) -> None:
        """Adjusted p-values and rejections equal multipletests(method='holm')."""
        p_values = [0.0012, 0.034, 0.0008, 0.18, 0.049, 0.5, 0.011]
        reject, adjusted, _, _ = multipletests(p_values, alpha=alpha, method="holm")
        assert holm(p_values, alpha=alpha) == [(float(p), bool(r)) for p, r in zip(adjusted, reject, strict=True)]

    def test_empty(self) -> None:
        """No p-values, no results."""
        assert holm([]) == []

    def test_nan_is_left_out_of_the_family(self) -> None:
        """A nan p-value comes back (nan, False); the rest are adjusted as if it were absent."""
        result = holm([0.01, math.nan, 0.04])
        assert math.isnan(result[1][0]) and result[1][1] is False
        assert [result[0], result[2]] == holm([0.01, 0.04])

    @pytest.mark.parametrize("bad", [-0.1, 1.5])
    def test_rejects_p_values_outside_0_1(self, bad: float) -> None:
        """A p-value outside [0, 1] is a ValueError."""
        with pytest.raises(ValueError):
            holm([0.01, bad])


def comparison(diff: float, se: float, *, ratio: float = 1.0, log_se: float = 0.05, alpha: float = 0.05) -> Comparison:
    """A Comparison with a chosen diff/se and a log-symmetric lift interval around `ratio`."""
    z = stats.norm.ppf(1 - alpha / 2)
    return Comparison(
        method="test",
        n_control=1000,
        n_treatment=1000,
        control=1.0,
        treatment=ratio,
        diff=diff,
        diff_ci=(diff - z * se, diff + z * se),
        lift=ratio - 1,
        lift_ci=(ratio * math.exp(-z * log_se) - 1, ratio * math.exp(z * log_se) - 1),
        p_value=0.5,
        se=se,
        alpha=alpha,
    )


class TestNonInferiority:
    @pytest.mark.parametrize(
        ("higher_is_better", "diff", "se", "expected"),
        [
            (True, 0.0, 0.005, "passed"),  # lower bound -0.008 > -0.02
            (True, -0.05, 0.005, "failed"),  # upper bound -0.042 < -0.02
            (True, -0.02, 0.01, "inconclusive"),  # (-0.036, -0.004) straddles -0.02
            (False, 0.0, 0.005, "passed"),
            (False, 0.05, 0.005, "failed"),
            (False, 0.02, 0.01, "inconclusive"),
        ],
    )
    def test_difference(self, higher_is_better: bool, diff: float, se: float, expected: str) -> None:
        """Absolute margin 0.02: bound = diff ∓ z(0.95)·se against -0.02 (higher better) or +0.02."""
        result = non_inferiority(comparison(diff, se), higher_is_better=higher_is_better, max_regression=0.02)
        assert outcome(result.passed, result.failed) == expected
        assert result.kind == "difference"
        assert result.margin == (-0.02 if higher_is_better else 0.02)
        assert result.bound == pytest.approx(diff - Z95 * se if higher_is_better else diff + Z95 * se, rel=1e-12)

    @pytest.mark.parametrize(
        ("higher_is_better", "ratio", "log_se", "expected"),
        [
            (False, 1.0, 0.03, "passed"),  # latency ratio upper bound 1.05 < 1.15
            (False, 1.3, 0.03, "failed"),  # lower bound 1.24 > 1.15
            (False, 1.15, 0.05, "inconclusive"),
            (True, 1.0, 0.03, "passed"),  # completion ratio lower bound 0.95 > 1/1.15
            (True, 0.7, 0.03, "failed"),  # upper bound 0.74 < 0.87
            (True, 0.87, 0.05, "inconclusive"),
        ],
    )
    def test_ratio(self, higher_is_better: bool, ratio: float, log_se: float, expected: str) -> None:
        """max_ratio 1.15: treatment/control <= 1.15 (lower better) or >= 1/1.15, at one-sided 5 %."""
        c = comparison(0.0, 0.01, ratio=ratio, log_se=log_se)
        result = non_inferiority(c, higher_is_better=higher_is_better, max_ratio=1.15)
        assert outcome(result.passed, result.failed) == expected
        assert result.kind == "ratio"
        assert result.margin == pytest.approx(1 / 1.15 if higher_is_better else 1.15, rel=1e-15)
        sign = -1 if higher_is_better else 1
        assert result.bound == pytest.approx(ratio * math.exp(sign * Z95 * log_se), rel=1e-12)

    @pytest.mark.parametrize("higher_is_better", [True, False])
    def test_ratio_bound_is_the_90_percent_interval_of_an_analytic_method(self, higher_is_better: bool) -> None:
        """Rescaling a 95 % log interval gives exactly the 90 % interval the method computes itself."""
        counts = (700, 1000, 690, 1000)
        bound = non_inferiority(two_proportions(*counts), higher_is_better=higher_is_better, max_ratio=1.1).bound
        lift_ci_90 = two_proportions(*counts, alpha=0.1).lift_ci
        assert lift_ci_90 is not None
        assert bound == pytest.approx(1 + lift_ci_90[0 if higher_is_better else 1], rel=1e-12)

    def test_interval_at_twice_alpha_is_used_as_is(self) -> None:
        """A bootstrap built at alpha 0.10 gives the one-sided 5 % bound directly from its lift_ci."""
        rng = np.random.default_rng(12)
        x_c, x_t = rng.lognormal(0, 0.5, 4000), 1.02 * rng.lognormal(0, 0.5, 4000)
        c = percentile_bootstrap(x_c, x_t, 95, alpha=0.1, n_resamples=1000)
        result = non_inferiority(c, higher_is_better=False, max_ratio=1.15)
        assert c.lift_ci is not None and result.bound == 1 + c.lift_ci[1]
        assert result.passed

    def test_latency_regression_fails(self) -> None:
        """p95 latency 50 % higher with 4,000 requests per arm is a confident failure of a 1.15 cap."""
        rng = np.random.default_rng(13)
        x_c, x_t = rng.lognormal(0, 0.5, 4000), 1.5 * rng.lognormal(0, 0.5, 4000)
        result = non_inferiority(
            percentile_bootstrap(x_c, x_t, 95, n_resamples=1000), higher_is_better=False, max_ratio=1.15
        )
        assert result.failed and not result.passed

    def test_welch_difference_bound_uses_the_normal_quantile(self, skewed_samples: tuple[np.ndarray, ...]) -> None:
        """For a Welch comparison the bound is diff - z(1 - alpha)·se."""
        c = welch(*skewed_samples)
        result = non_inferiority(c, higher_is_better=True, max_regression=0.1, alpha=0.025)
        assert result.bound == pytest.approx(c.diff - stats.norm.ppf(0.975) * c.se, rel=1e-12)

    def test_no_spread_is_inconclusive(self) -> None:
        """se 0 (no events anywhere) or no lift interval: neither passed nor failed, bound nan."""
        zero = non_inferiority(two_proportions(0, 100, 0, 100), higher_is_better=False, max_regression=0.01)
        assert not zero.passed and not zero.failed and math.isnan(zero.bound)
        no_lift = non_inferiority(two_proportions(0, 100, 3, 100), higher_is_better=False, max_ratio=1.5)
        assert not no_lift.passed and not no_lift.failed and math.isnan(no_lift.bound)

    @pytest.mark.parametrize(
        "margins",
        [{}, {"max_regression": 0.1, "max_ratio": 1.1}, {"max_regression": -0.1}, {"max_ratio": 0.9}],
    )
    def test_rejects_bad_margins(self, margins: dict[str, float]) -> None:
        """Exactly one margin, max_regression >= 0, max_ratio >= 1; anything else is a ValueError."""
        with pytest.raises(ValueError):
            non_inferiority(comparison(0.0, 0.01), higher_is_better=True, **margins)


def outcome(passed: bool, failed: bool) -> str:
    assert not (passed and failed)
    return "passed" if passed else "failed" if failed else "inconclusive"
