"""An experiment's report: every metric compared, the plan checked, and a verdict in words.

    build_report(conn, settings, experiment, since=, until=, now=) -> Report
    report_of(dataset, settings, experiment, now=) -> Report   (the data already loaded)

What it guards against, in the order a reader needs it:
    broken data       sample-ratio mismatch over first exposures (rollout changes included):
                      flagged at p < 0.001 and the verdict is "untrustworthy", whatever else
    peeking           the decision before the pre-registered sample uses always-valid (mSPRT)
                      p-values over daily looks; the fixed-horizon p-value is shown only once
                      the planned users per variant are reached
    the wrong unit    request metrics are ratios over users (delta method); user metrics are
                      one value per user
    many metrics      one primary metric at alpha; the rest together under Holm
    harm              guardrails (error rate, latency, cost) tested for non-inferiority
    too small         power now, users still needed, and days left at the current rate
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.stats import beta
from sqlalchemy.engine import Connection

from proxy.analysis import sequential, stats
from proxy.analysis.dataset import Dataset, Observations, load, resolve_window
from proxy.config import AnalysisConfig, GuardrailConfig, MetricConfig, Settings

Role = Literal["primary", "secondary", "implicit"]
Decision = Literal["ship", "keep_running", "roll_back", "no_difference", "untrustworthy", "no_data"]

IMPLICIT = {
    # name: (label, higher_is_better, kind)
    "error": ("error rate", False, "rate"),
    "empty_response": ("empty answers", False, "rate"),
    "regenerated": ("regenerated", False, "rate"),
    "turns_per_episode": ("turns per episode", False, "mean"),
}
# Guardrails measured by the proxy itself: name -> the request observations behind it.
RATIO_GUARDRAILS = {
    "error_rate": "error", "empty_rate": "empty_response", "cost_per_query": "cost_per_query",
    "latency_mean": "latency_mean",
}
# A metric's mixing scale for the sequential test when the plan gives no mde: a tenth of control.
DEFAULT_RELATIVE_EFFECT = 0.10
MIN_UNITS = 2  # per variant, below which a metric is not compared


@dataclass(frozen=True, slots=True)
class ArmSummary:
    model: str
    users: int
    requests: int


@dataclass(frozen=True, slots=True)
class Estimate:
    value: float
    users: int
    observations: int


@dataclass(slots=True)
class MetricResult:
    name: str
    label: str
    role: Role
    kind: str  # rate | mean
    level: str  # request | user
    higher_is_better: bool
    control: Estimate
    treatment: Estimate
    method: str
    diff: float
    diff_ci: tuple[float, float]
    lift: float | None
    lift_ci: tuple[float, float] | None
    p_value: float | None  # fixed horizon; None until the planned sample is reached
    sequential_p: float
    sequential_ci: tuple[float, float]
    looks: int
    decision_p: float  # the one the verdict reads: sequential before the horizon, fixed after
    adjusted_p: float | None = None  # Holm, for secondary and implicit metrics
    significant: bool = False
    better: bool | None = None  # None unless significant


@dataclass(frozen=True, slots=True)
class GuardrailResult:
    name: str
    control: float
    treatment: float
    diff: float
    ratio: float | None
    bound: float
    margin: float
    kind: str  # difference | ratio
    status: Literal["pass", "fail", "inconclusive"]
    method: str


@dataclass(frozen=True, slots=True)
class Plan:
    primary_metric: str | None
    alpha: float
    power: float
    mde: float | None
    planned_users_per_variant: tuple[int, int] | None  # control, treatment
    planned_from: str  # config | mde | none
    reached: bool
    current_power: float | None
    users_per_day: tuple[float, float]
    days_left: float | None


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    summary: str
    reasons: list[str]


@dataclass(slots=True)
class Report:
    experiment: str
    since: float
    until: float
    generated_at: float
    arms: dict[str, ArmSummary]
    unidentified_requests: int
    crossover_users: int
    srm: stats.SampleRatio
    plan: Plan
    metrics: list[MetricResult] = field(default_factory=list)
    guardrails: list[GuardrailResult] = field(default_factory=list)
    cost_per_success: MetricResult | None = None
    verdict: Verdict = Verdict("no_data", "", [])


def build_report(
    conn: Connection, settings: Settings, experiment: str, *, since: float | None = None,
    until: float | None = None, now: float,
) -> Report:
    window = resolve_window(conn, experiment, since, until, now)
    data = load(conn, experiment, window, regeneration_window_s=settings.feedback.regeneration_window_s)
    return report_of(data, settings, experiment, now=now)


def report_of(data: Dataset, settings: Settings, experiment: str, *, now: float) -> Report:
    """The report on data already loaded (`build_report` without the reads)."""
    window = data.window
    config = settings.experiments[experiment]
    analysis = config.analysis
    treated = data.treatment
    n_t = int(treated.sum())
    n_c = len(treated) - n_t
    srm = stats.sample_ratio(n_c, n_t, data.expected_treatment.tolist())
    primary = analysis.primary_metric
    primary_obs = None if primary is None else _observations_of(data, primary, settings.metrics)
    report = Report(
        experiment=experiment, since=window.since, until=window.until, generated_at=now,
        arms={
            "control": ArmSummary(config.control, n_c, data.requests_by_variant.get("control", 0)),
            "treatment": ArmSummary(config.treatment, n_t, data.requests_by_variant.get("treatment", 0)),
        },
        unidentified_requests=data.unidentified_requests, crossover_users=data.crossover_users, srm=srm,
        plan=_plan(data, analysis, settings.metrics, primary_obs),
    )
    if n_c < MIN_UNITS or n_t < MIN_UNITS:
        report.verdict = Verdict("no_data", "Not enough users in both variants to compare yet.",
                                 [f"users: control {n_c}, treatment {n_t}; need at least {MIN_UNITS} each"])
        return report
    reached = report.plan.reached
    for name, role in _metric_roles(analysis, settings.metrics):
        result = compare_metric(data, name, role, settings.metrics, analysis, reached)
        if result is not None:
            report.metrics.append(result)
    _judge(report.metrics, analysis.alpha)
    report.guardrails = [
        g for name, margin in analysis.guardrails.items()
        if (g := guardrail(data, name, margin, analysis.alpha)) is not None
    ]
    report.cost_per_success = _cost_per_success(data, analysis, settings.metrics, reached)
    report.verdict = _verdict(report, analysis)
    return report


# -- metrics ---------------------------------------------------------------------------------


def _metric_roles(analysis: AnalysisConfig, declared: dict[str, MetricConfig]) -> list[tuple[str, Role]]:
    roles: list[tuple[str, Role]] = []
    if analysis.primary_metric is not None:
        roles.append((analysis.primary_metric, "primary"))
    # Undeclared as secondary, every other declared outcome is secondary: reported, and corrected.
    secondary = analysis.secondary_metrics or [m for m in declared if m != analysis.primary_metric]
    roles += [(m, "secondary") for m in secondary if m not in IMPLICIT]
    roles += [(m, "implicit") for m in IMPLICIT if m != analysis.primary_metric]
    return roles


def _observations_of(data: Dataset, name: str, declared: dict[str, MetricConfig]) -> Observations:
    if name in IMPLICIT:
        return data.requests.get(name, Observations.empty())
    spec = declared[name]
    source = data.request_feedback if spec.level == "request" else data.user_feedback
    return source.get(name, Observations.empty())


def _describe(name: str, declared: dict[str, MetricConfig]) -> tuple[str, bool, str, str]:
    """label, higher_is_better, kind (rate | mean), level (request | user)."""
    if name in IMPLICIT:
        label, better_up, kind = IMPLICIT[name]
        return label, better_up, kind, "request"
    spec = declared[name]
    return name.replace("_", " "), spec.higher_is_better, "rate" if spec.type == "boolean" else "mean", spec.level


def _per_user(obs: Observations, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    num = np.bincount(obs.user, weights=obs.num, minlength=n_users)
    den = np.bincount(obs.user, weights=obs.den, minlength=n_users)
    return num, den


def _comparator(level: str, kind: str, alpha: float) -> Callable[[np.ndarray, np.ndarray, np.ndarray],
                                                                   stats.Comparison | None]:
    """How one metric is compared, given per-user sums and who is treated."""

    def compare(num: np.ndarray, den: np.ndarray, treated: np.ndarray) -> stats.Comparison | None:
        c, t = (den > 0) & ~treated, (den > 0) & treated
        if c.sum() < MIN_UNITS or t.sum() < MIN_UNITS:
            return None
        if level == "request":  # many requests per user: a ratio over users
            return stats.ratio_delta(num[c], den[c], num[t], den[t], alpha=alpha)
        if kind == "rate":  # one 0/1 per user
            return stats.two_proportions(int(num[c].sum()), int(c.sum()), int(num[t].sum()), int(t.sum()),
                                         alpha=alpha)
        return stats.welch(num[c], num[t], alpha=alpha)

    return compare


def _sequential(
    data: Dataset, obs: Observations, compare: Callable[[np.ndarray, np.ndarray, np.ndarray], stats.Comparison | None],
    tau2: float, alpha: float,
) -> sequential.SequentialResult:
    """mSPRT over cumulative daily looks: what a team that looked every day was entitled to see."""
    looks: list[tuple[float, float]] = []
    n_users = len(data.users)
    # Each look's per-user sums are the last look's plus that day's rows: one pass over the rows.
    # The rows in day order once; each look's day is then a slice of them (views, no copy).
    order = np.argsort(obs.day, kind="stable")
    by_day = Observations(obs.user[order], obs.day[order], obs.num[order], obs.den[order])
    ends = np.searchsorted(by_day.day, np.arange(data.looks), side="right").tolist()
    num, den = np.zeros(n_users), np.zeros(n_users)
    for start, end in itertools.pairwise([0, *ends]):  # rows after the last look's day: not in any look
        rows = slice(start, end)
        day_num, day_den = _per_user(Observations(by_day.user[rows], by_day.day[rows], by_day.num[rows],
                                                  by_day.den[rows]), n_users)  # fmt: skip
        num += day_num
        den += day_den
        comparison = compare(num, den, data.treatment)  # users not yet seen by that day have den 0
        if comparison is not None and math.isfinite(comparison.se):
            looks.append((comparison.diff, comparison.se**2))
    return sequential.always_valid(looks, tau2=tau2, alpha=alpha)


def _tau2(role: Role, analysis: AnalysisConfig, control_value: float, se: float) -> float:
    if role == "primary" and analysis.mde is not None:
        return sequential.default_tau2(analysis.mde)
    scale = abs(control_value) * DEFAULT_RELATIVE_EFFECT
    return sequential.default_tau2(scale if scale > 0 else max(se, 1e-9))


def compare_metric(
    data: Dataset, name: str, role: Role, declared: dict[str, MetricConfig], analysis: AnalysisConfig,
    reached: bool,
) -> MetricResult | None:
    label, higher_is_better, kind, level = _describe(name, declared)
    obs = _observations_of(data, name, declared)
    compare = _comparator(level, kind, analysis.alpha)
    num, den = _per_user(obs, len(data.users))
    final = compare(num, den, data.treatment)
    if final is None:
        return None
    seq = _sequential(data, obs, compare, _tau2(role, analysis, final.control, final.se), analysis.alpha)
    has = den > 0
    fixed_p = final.p_value if reached else None
    return MetricResult(
        name=name, label=label, role=role, kind=kind, level=level, higher_is_better=higher_is_better,
        control=Estimate(final.control, int((has & ~data.treatment).sum()), int(den[~data.treatment].sum())),
        treatment=Estimate(final.treatment, int((has & data.treatment).sum()), int(den[data.treatment].sum())),
        method=final.method, diff=final.diff, diff_ci=final.diff_ci, lift=final.lift, lift_ci=final.lift_ci,
        p_value=fixed_p, sequential_p=seq.p_value, sequential_ci=seq.ci, looks=seq.looks,
        decision_p=fixed_p if fixed_p is not None else seq.p_value,
    )


def _judge(results: list[MetricResult], alpha: float) -> None:
    """Primary at alpha; everything else as one Holm family, so ten metrics do not buy ten chances."""
    family = [r for r in results if r.role != "primary"]
    for result, (adjusted, _reject) in zip(family, stats.holm([r.decision_p for r in family], alpha=alpha),
                                           strict=True):
        result.adjusted_p = adjusted
    for result in results:
        p = result.decision_p if result.role == "primary" else result.adjusted_p
        result.significant = p is not None and p < alpha
        if result.significant:
            result.better = (result.diff > 0) == result.higher_is_better


# -- guardrails and cost ---------------------------------------------------------------------


def guardrail(data: Dataset, name: str, margin: GuardrailConfig, alpha: float) -> GuardrailResult | None:
    if name in RATIO_GUARDRAILS:
        num, den = _per_user(data.requests.get(RATIO_GUARDRAILS[name], Observations.empty()), len(data.users))
        comparison = _comparator("request", "mean", alpha)(num, den, data.treatment)
        if comparison is not None and name in ("error_rate", "empty_rate") and num.sum() == 0:
            return _no_events_guardrail(name, comparison, int(den[data.treatment].sum()), margin, alpha)
    else:
        source, percentile = name.split("_p")
        samples = data.latency_ms if source == "latency" else data.ttft_ms
        c, t = samples.get("control"), samples.get("treatment")
        if c is None or t is None or len(c) < MIN_UNITS or len(t) < MIN_UNITS:
            return None
        # 1,000 resamples of at most 20,000 requests per arm: under a second per percentile, and
        # the interval's own Monte-Carlo error stays well below its width.
        comparison = stats.percentile_bootstrap(c, t, float(percentile), alpha=alpha, n_resamples=1000,
                                                max_sample=20_000)
    if comparison is None:
        return None
    verdict = stats.non_inferiority(comparison, higher_is_better=False, max_regression=margin.max_regression,
                                    max_ratio=margin.max_ratio, alpha=alpha)
    status: Literal["pass", "fail", "inconclusive"] = (
        "pass" if verdict.passed else "fail" if verdict.failed else "inconclusive"
    )
    ratio = comparison.treatment / comparison.control if comparison.control else None
    return GuardrailResult(name, comparison.control, comparison.treatment, comparison.diff, ratio, verdict.bound,
                           verdict.margin, verdict.kind, status, comparison.method)


def _no_events_guardrail(
    name: str, comparison: stats.Comparison, treatment_requests: int, margin: GuardrailConfig, alpha: float
) -> GuardrailResult:
    """No errors in either arm: no spread for the delta method, yet the rate is bounded.

    The one-sided Clopper-Pearson bound of a rate with zero events in n requests, 1 - alpha^(1/n)
    (about 3/n at alpha 0.05), caps the treatment's rate and so its increase over control's 0.
    A ratio of two zeros stays undefined, so a max_ratio margin stays inconclusive.
    """
    bound = float(beta.ppf(1 - alpha, 1, treatment_requests)) if treatment_requests else math.inf
    passed = margin.max_regression is not None and bound < margin.max_regression
    limit = margin.max_regression if margin.max_regression is not None else math.nan
    return GuardrailResult(name, 0.0, 0.0, 0.0, None, bound, limit, "difference", "pass" if passed else "inconclusive",
                           "no events: Clopper-Pearson bound")


def _cost_per_success(
    data: Dataset, analysis: AnalysisConfig, declared: dict[str, MetricConfig], reached: bool
) -> MetricResult | None:
    """Dollars per completed task: what decides whether a pricier fine-tune is cheaper per outcome."""
    metric = analysis.success_metric
    if metric is None and analysis.primary_metric in declared and declared[analysis.primary_metric].type == "boolean":
        metric = analysis.primary_metric
    if metric is None:
        return None
    n_users = len(data.users)
    cost, requests_made = _per_user(data.requests.get("cost_per_query", Observations.empty()), n_users)
    successes, _ = _per_user(_observations_of(data, metric, declared), n_users)
    # Every user who made a request counts, those with no success too: they cost without succeeding.
    c, t = (requests_made > 0) & ~data.treatment, (requests_made > 0) & data.treatment
    if c.sum() < MIN_UNITS or t.sum() < MIN_UNITS or successes[c].sum() == 0 or successes[t].sum() == 0:
        return None
    final = stats.ratio_delta(cost[c], successes[c], cost[t], successes[t], alpha=analysis.alpha)
    return MetricResult(
        name="cost_per_success", label=f"cost per {metric.replace('_', ' ')}", role="implicit", kind="mean",
        level="request", higher_is_better=False,
        control=Estimate(final.control, final.n_control, int(successes[~data.treatment].sum())),
        treatment=Estimate(final.treatment, final.n_treatment, int(successes[data.treatment].sum())),
        method=final.method, diff=final.diff, diff_ci=final.diff_ci, lift=final.lift, lift_ci=final.lift_ci,
        p_value=final.p_value if reached else None, sequential_p=math.nan, sequential_ci=(math.nan, math.nan),
        looks=0, decision_p=final.p_value if final.p_value is not None else math.nan,
    )


# -- plan and verdict ------------------------------------------------------------------------


def _plan(
    data: Dataset, analysis: AnalysisConfig, declared: dict[str, MetricConfig], primary: Observations | None
) -> Plan:
    treated = data.treatment
    n_t = int(treated.sum())
    n_c = len(treated) - n_t
    days = max(data.window.days, 1 / 24)
    rates = (n_c / days, n_t / days)
    planned: tuple[int, int] | None = None
    planned_from = "none"
    power_now: float | None = None
    name = analysis.primary_metric
    ratio = n_t / n_c if n_c and n_t else 1.0
    if analysis.planned_users_per_variant is not None:
        planned = (analysis.planned_users_per_variant, analysis.planned_users_per_variant)
        planned_from = "config"
    if name is not None and analysis.mde is not None and primary is not None and n_c >= MIN_UNITS:
        _label, _up, kind, _level = _describe(name, declared)
        num, den = _per_user(primary, len(data.users))
        control = (den > 0) & ~treated
        if control.sum() >= MIN_UNITS:
            if kind == "rate":
                baseline = float(num[control].sum() / den[control].sum())
                baseline = min(max(baseline, 1e-6), 1 - 1e-6 - analysis.mde)
                if planned is None:
                    needed = stats.sample_size_proportions(baseline, analysis.mde, alpha=analysis.alpha,
                                                           power=analysis.power, ratio=ratio)
                    planned, planned_from = (needed, math.ceil(needed * ratio)), "mde"
                power_now = stats.power_proportions(baseline, analysis.mde, n_c, n_t, alpha=analysis.alpha)
            else:
                per_user = num[control] / den[control]
                sd = float(np.std(per_user, ddof=1)) or 1e-9
                if planned is None:
                    needed = stats.sample_size_means(sd, analysis.mde, alpha=analysis.alpha, power=analysis.power,
                                                     ratio=ratio)
                    planned, planned_from = (needed, math.ceil(needed * ratio)), "mde"
                power_now = stats.power_means(sd, analysis.mde, n_c, n_t, alpha=analysis.alpha)
    reached = planned is not None and n_c >= planned[0] and n_t >= planned[1]
    days_left: float | None = None
    if planned is not None and not reached:
        waits = [max(need - have, 0) / rate for need, have, rate in zip(planned, (n_c, n_t), rates, strict=True)
                 if rate > 0]
        days_left = max(waits) if waits else None
    return Plan(name, analysis.alpha, analysis.power, analysis.mde, planned, planned_from, reached, power_now,
                rates, 0.0 if reached else days_left)


def _verdict(report: Report, analysis: AnalysisConfig) -> Verdict:
    reasons: list[str] = []
    if report.srm.mismatch:
        observed, expected = report.srm.observed, report.srm.expected
        return Verdict(
            "untrustworthy",
            "Sample-ratio mismatch: the split is not the configured one, so these results cannot be trusted. "
            "Find the cause (lost events, bots, a routing bug) before reading any metric.",
            [f"users control/treatment {observed[0]}/{observed[1]}, expected {expected[0]:.0f}/{expected[1]:.0f}, "
             f"chi-square p = {report.srm.p_value:.2g} < {report.srm.threshold}"],
        )
    failed = [g for g in report.guardrails if g.status == "fail"]
    if failed:
        names = ", ".join(g.name for g in failed)
        return Verdict("roll_back", f"Roll back: guardrail {names} regressed beyond its margin.",
                       [f"{g.name}: bound {g.bound:.4g} past margin {g.margin:.4g}" for g in failed])
    primary = next((m for m in report.metrics if m.role == "primary"), None)
    if primary is None:
        return Verdict("keep_running", "No primary metric declared or no data for it yet: descriptive only. "
                       "Declare experiments.<name>.analysis.primary_metric before deciding.", reasons)
    which = "fixed-horizon" if primary.p_value is not None else "always-valid (sequential)"
    reasons.append(f"{primary.label}: {primary.control.value:.4g} -> {primary.treatment.value:.4g}, "
                   f"{which} p = {primary.decision_p:.2g}")
    if primary.significant and primary.better is False:
        return Verdict("roll_back", f"Roll back: the treatment is worse on {primary.label}.", reasons)
    pending = [g.name for g in report.guardrails if g.status == "inconclusive"]
    if primary.significant and primary.better:
        if pending:
            return Verdict("keep_running", f"The treatment is better on {primary.label}, but guardrails "
                           f"{', '.join(pending)} cannot yet rule out a regression: keep running.", reasons)
        lift = f" ({primary.lift:+.1%})" if primary.lift is not None else ""
        return Verdict("ship", f"Ship: the treatment is better on {primary.label}{lift} and no guardrail "
                       "regressed.", reasons)
    plan = report.plan
    if plan.reached:
        return Verdict("no_difference", f"No significant difference on {primary.label} at the planned sample "
                       "size: the fine-tune is not shown to be better.", reasons)
    if plan.days_left is not None:
        needed = plan.planned_users_per_variant
        assert needed is not None
        reasons.append(f"users so far {report.arms['control'].users}/{report.arms['treatment'].users} of "
                       f"{needed[0]}/{needed[1]} planned")
        return Verdict("keep_running", f"Keep running: about {math.ceil(plan.days_left)} more day(s) at the current "
                       "traffic to reach the planned sample.", reasons)
    return Verdict("keep_running", "Keep running: no significant difference yet (set analysis.mde or "
                   "planned_users_per_variant to get an end date).", reasons)
