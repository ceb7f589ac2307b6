"""The report on simulated experiments with a known truth, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pytest
from scipy.stats import norm

from proxy.analysis import stats
from proxy.analysis.render import to_csv, to_json, to_markdown
from proxy.analysis.report import Report, build_report
from proxy.config import Settings, settings_from_dict
from proxy.store.db import Store, engine_for, migrate
from tests.synthetic import DAY, EXPERIMENT, Scenario, generate, per_user_truth

NOW = time.time()
T0 = NOW - 12 * DAY


def _settings(**analysis: Any) -> Settings:
    raw = {
        "upstreams": {"u": {"base_url": "http://127.0.0.1:9/v1"}},
        "models": {"base": {"upstream": "u", "model": "m"}, "finetuned": {"upstream": "u", "model": "ft:m"}},
        "experiments": {EXPERIMENT: {"aliases": [EXPERIMENT], "control": "base", "treatment": "finetuned",
                                     "salt": "sales-v2", "analysis": analysis}},
        "metrics": {
            "task_completed": {"type": "boolean"},
            "csat": {"type": "float", "min": 1, "max": 5},
            "returned": {"type": "boolean", "level": "user"},
        },
        "events": {"redis_stream": {"enabled": True}},
    }
    return settings_from_dict(raw, {})


def _report(url: str, scenario: Scenario, settings: Settings | None = None, **window: Any) -> tuple[Report, list[Any]]:
    engine = engine_for(url)
    migrate(engine)
    events = generate(scenario, T0)
    store = Store(engine)
    for i in range(0, len(events), 5000):
        store.write(events[i : i + 5000])
    with engine.connect() as conn:
        report = build_report(conn, settings or _settings(primary_metric="task_completed", mde=0.05), EXPERIMENT,
                              now=NOW, **window)
    engine.dispose()
    return report, events


def _csat_mean(mu: float, sd: float = 0.9) -> float:
    """E[clip(round(N(mu, sd)), 1, 5)], the simulated CSAT's true mean."""
    cuts = [-math.inf, 1.5, 2.5, 3.5, 4.5, math.inf]
    return sum(k * (norm.cdf(cuts[k], mu, sd) - norm.cdf(cuts[k - 1], mu, sd)) for k in range(1, 6))


def _metric(report: Report, name: str) -> Any:
    return next(m for m in report.metrics if m.name == name)


class TestKnownEffect:
    def test_finds_the_true_lift_with_correct_intervals(self, store_url: str) -> None:
        """Task completion 70 % -> 78 % and CSAT 3.8 -> 4.1: found, intervals cover the truth, no SRM."""
        report, _events = _report(store_url, Scenario(users=3000))
        assert not report.srm.mismatch
        task = _metric(report, "task_completed")
        assert task.role == "primary" and task.significant and task.better
        assert task.diff_ci[0] < 0.08 < task.diff_ci[1]
        assert task.lift_ci[0] < 0.78 / 0.70 - 1 < task.lift_ci[1]
        csat = _metric(report, "csat")
        true_diff = _csat_mean(4.1) - _csat_mean(3.8)  # rounding and clipping to 1..5 shrink the 0.3
        assert csat.significant and csat.better and csat.diff_ci[0] < true_diff < csat.diff_ci[1]
        assert report.verdict.decision == "ship", report.verdict

    def test_sql_aggregation_matches_an_independent_computation(self, store_url: str) -> None:
        """The report's delta-method numbers equal stats.ratio_delta on per-user sums computed in Python."""
        report, events = _report(store_url, Scenario(users=800, schedule=[(0, 20.0), (4, 50.0)]))
        truth = per_user_truth(events, "task_completed")
        arrays = {v: [(s, n) for var, s, n in truth.values() if var == v] for v in ("control", "treatment")}
        expected = stats.ratio_delta(
            [s for s, _ in arrays["control"]], [n for _, n in arrays["control"]],
            [s for s, _ in arrays["treatment"]], [n for _, n in arrays["treatment"]],
        )
        task = _metric(report, "task_completed")
        assert task.control.value == pytest.approx(expected.control, rel=1e-12)
        assert task.treatment.value == pytest.approx(expected.treatment, rel=1e-12)
        assert task.diff_ci == pytest.approx(expected.diff_ci, rel=1e-9)
        assert (task.control.users, task.treatment.users) == (expected.n_control, expected.n_treatment)

    def test_user_level_metric_is_one_value_per_user(self, store_url: str) -> None:
        report, _ = _report(store_url, Scenario(users=1500, returned_rate={"control": 0.40, "treatment": 0.55}))
        returned = _metric(report, "returned")
        assert returned.level == "user" and returned.method == "two-proportion z-test"
        assert returned.control.users == report.arms["control"].users
        assert returned.diff_ci[0] < 0.15 < returned.diff_ci[1] and returned.significant


class TestWhatNaiveAnalysesGetWrong:
    def test_sample_ratio_mismatch_makes_results_untrustworthy(self, store_url: str) -> None:
        report, _ = _report(store_url, Scenario(users=3000, lose_treatment_events=0.15))
        assert report.srm.mismatch and report.srm.p_value < 0.001
        assert report.verdict.decision == "untrustworthy"

    def test_rollout_change_inside_the_window_is_not_an_srm(self, store_url: str) -> None:
        """10 % then 50 %: users first seen later are more often treated; the expected split follows."""
        report, _ = _report(store_url, Scenario(users=3000, schedule=[(0, 10.0), (5, 50.0)]))
        assert not report.srm.mismatch
        share = report.srm.expected[1] / sum(report.srm.expected)
        assert 0.2 < share < 0.35  # neither 10 % nor 50 %
        naive = stats.sample_ratio(*report.srm.observed, 0.5)
        assert naive.mismatch  # a check against the final split alone would cry wolf
        assert report.crossover_users > 0  # control users moved to treatment by the raise

    def test_fixed_horizon_p_hidden_until_the_planned_sample(self, store_url: str) -> None:
        small, _ = _report(store_url, Scenario(users=600), _settings(primary_metric="task_completed",
                                                                     planned_users_per_variant=5000))
        task = _metric(small, "task_completed")
        assert task.p_value is None and 0 <= task.sequential_p <= 1 and task.decision_p == task.sequential_p
        assert not small.plan.reached and small.plan.days_left is not None and small.plan.days_left > 0
        assert small.verdict.decision in {"keep_running", "ship"}

    def test_planned_sample_reached_shows_fixed_p(self, store_url: str) -> None:
        report, _ = _report(store_url, Scenario(users=600), _settings(primary_metric="task_completed",
                                                                      planned_users_per_variant=100))
        task = _metric(report, "task_completed")
        assert report.plan.reached and task.p_value is not None and task.decision_p == task.p_value

    def test_sample_size_from_mde(self, store_url: str) -> None:
        """No planned n: computed from the mde and the control's rate (~1,100 per arm for 70 % -> 75 %)."""
        report, _ = _report(store_url, Scenario(users=600))
        assert report.plan.planned_from == "mde"
        planned = report.plan.planned_users_per_variant
        assert planned is not None and 1000 < planned[0] < 1500
        assert report.plan.current_power is not None and 0 < report.plan.current_power < 1

    def test_secondary_metrics_are_holm_corrected(self, store_url: str) -> None:
        report, _ = _report(store_url, Scenario(users=1000))
        family = [m for m in report.metrics if m.role != "primary"]
        assert len(family) >= 3
        expected = stats.holm([m.decision_p for m in family])
        assert [m.adjusted_p for m in family] == pytest.approx([p for p, _ in expected])
        assert all(m.adjusted_p >= m.decision_p for m in family)


class TestGuardrailsAndImplicitOutcomes:
    def test_error_regression_rolls_back(self, store_url: str) -> None:
        report, _ = _report(store_url, Scenario(users=3000, error_rate={"control": 0.01, "treatment": 0.08}))
        (errors,) = [g for g in report.guardrails if g.name == "error_rate"]
        assert errors.status == "fail"
        assert report.verdict.decision == "roll_back"

    def test_latency_and_cost_guardrails(self, store_url: str) -> None:
        report, _ = _report(store_url, Scenario(users=1500))
        by_name = {g.name: g for g in report.guardrails}
        assert by_name["latency_p95"].status == "pass"  # +20 ms on ~800 ms, margin x1.2
        assert by_name["cost_per_query"].ratio == pytest.approx(1.1, rel=1e-6)

    def test_regeneration_and_turns(self, store_url: str) -> None:
        report, _events = _report(store_url, Scenario(users=500, regenerate_share=0.3, episode_turns=2,
                                                     requests_per_user=(4, 4)))
        regenerated = _metric(report, "regenerated")
        # A re-ask marks the earlier of the pair: 0.3 / 1.3 of requests
        assert regenerated.control.value == pytest.approx(0.3 / 1.3, abs=0.04)
        turns = _metric(report, "turns_per_episode")
        assert turns.control.value == pytest.approx(2 * 1.3, abs=0.2)

    def test_cost_per_success(self, store_url: str) -> None:
        report, _ = _report(store_url, Scenario(users=2000))
        cps = report.cost_per_success
        assert cps is not None
        # 0.0010 / 0.70 (errors add cost without tasks: ~1 % more) vs 0.0011 / 0.78
        assert cps.control.value == pytest.approx(0.0010 / (0.70 * 0.99), rel=0.05)
        assert cps.treatment.value == pytest.approx(0.0011 / (0.78 * 0.99), rel=0.05)


class TestWindowAndRendering:
    def test_since_limits_the_window(self, store_url: str) -> None:
        full, _ = _report(store_url, Scenario(users=400))
        engine = engine_for(store_url)
        with engine.connect() as conn:
            late = build_report(conn, _settings(primary_metric="task_completed"), EXPERIMENT, since=T0 + 6 * DAY,
                                now=NOW)
        engine.dispose()
        assert late.arms["control"].requests < full.arms["control"].requests
        assert late.since == T0 + 6 * DAY

    def test_empty_store(self, store_url: str) -> None:
        report, _ = _report(store_url, Scenario(users=0))
        assert report.verdict.decision == "no_data" and report.metrics == []
        assert to_json(report)["verdict"]["decision"] == "no_data"

    def test_renderings_agree(self, tmp_path: Any) -> None:
        report, _ = _report(f"sqlite:///{tmp_path / 's.db'}", Scenario(users=600))
        body = to_json(report)
        assert body["experiment"] == EXPERIMENT and body["srm"]["mismatch"] is False
        assert {m["name"] for m in body["metrics"]} >= {"task_completed", "csat", "returned", "regenerated"}
        markdown = to_markdown(report)
        assert "| task completed [primary] |" in markdown and f"**Verdict: {report.verdict.decision}.**" in markdown
        rows = to_csv(report).splitlines()
        assert rows[0].startswith("section,name,role") and any(r.startswith("metric,task_completed,primary")
                                                                for r in rows)
        # nothing non-finite leaks into JSON
        assert "NaN" not in str(body) and all(
            not (isinstance(v, float) and not math.isfinite(v)) for v in np.array(rows, dtype=object)
        )


def test_the_daily_looks_are_each_days_cumulative_per_user_sums() -> None:
    """The sequential test's looks, built day by day on the look before, against each look's
    per-user sums taken afresh over the rows up to its day, in no particular row order."""
    from proxy.analysis import sequential
    from proxy.analysis.dataset import Dataset, Observations, Window
    from proxy.analysis.report import _comparator, _sequential

    rng = np.random.default_rng(5)
    users, rows, days = 300, 4000, 9
    obs = Observations(rng.integers(0, users, rows), rng.integers(0, days, rows),
                       rng.poisson(2.0, rows).astype(float), rng.integers(1, 4, rows).astype(float))  # fmt: skip
    treated = rng.random(users) < 0.5
    obs.num[treated[obs.user]] *= 1.1  # an effect, so the looks differ from one another
    start = math.floor(T0 / DAY) * DAY  # UTC days: a look each
    data = Dataset(window=Window(start, start + days * DAY), users=[f"u{i}" for i in range(users)], treatment=treated,
                   first_day=np.zeros(users, np.int64), expected_treatment=np.full(users, 0.5))  # fmt: skip
    compare = _comparator("request", "mean", 0.05)
    looks = []
    for day in range(data.looks):
        up_to = obs.day <= day
        num = np.bincount(obs.user[up_to], weights=obs.num[up_to], minlength=users)
        den = np.bincount(obs.user[up_to], weights=obs.den[up_to], minlength=users)
        comparison = compare(num, den, treated)
        assert comparison is not None
        looks.append((comparison.diff, comparison.se**2))
    expected = sequential.always_valid(looks, tau2=0.01, alpha=0.05)
    got = _sequential(data, obs, compare, 0.01, 0.05)
    assert data.looks == days and got.looks == expected.looks == days
    assert got.p_value == pytest.approx(expected.p_value, rel=1e-9)
    assert got.ci == pytest.approx(expected.ci, rel=1e-9)
