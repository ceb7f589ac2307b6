"""Evaluating a phase: every gate read from the evidence, each pass, wait (with roughly how long) or fail.

    evaluate_phase(engine, settings, experiment, phase, elapsed_s=, data_since=, now=) -> PhaseEvidence

The data window is the phase's own: from when it was entered (wall clock) to now, so a phase is judged on
traffic served at its percent. The statistics are the analysis engine's (proxy.analysis): guardrails are
its non-inferiority tests on the proxy's measurements; outcome metrics read its always-valid (mSPRT)
confidence sequences, which stay valid however often the controller looks, so a metric gate may be read
every minute. Guardrails are fixed-sample intervals recomputed at each look: a repeated look raises the
chance of a false alarm, which for a guardrail means an unneeded rollback, the safe direction.

"Roughly how long" scales the interval: a half-width shrinks like 1/sqrt(n), and users arrive at the
phase's rate so far, so an interval h wide that must shrink to a distance d needs (h/d)^2 times the data.
"""

from __future__ import annotations

import math
from pathlib import Path

from sqlalchemy import Engine

from proxy.analysis import stats
from proxy.analysis.dataset import Dataset, Window, load
from proxy.analysis.report import compare_metric, guardrail
from proxy.config import GuardrailConfig, Settings
from proxy.controller.evidence import GateResult, PhaseEvidence, duration_text
from proxy.controller.plan import GateConfig, PhaseConfig


def evaluate_phase(
    engine: Engine, settings: Settings, experiment: str, phase: PhaseConfig, *, elapsed_s: float,
    data_since: float, now: float,
) -> PhaseEvidence:  # fmt: skip
    """The phase's evidence: SRM, its own minimums and every gate. Reads the store (blocking)."""
    analysis = settings.experiments[experiment].analysis
    with engine.connect() as conn:
        data = load(conn, experiment, Window(data_since, max(now, data_since)),
                    regeneration_window_s=settings.feedback.regeneration_window_s)  # fmt: skip
    n_t = int(data.treatment.sum())
    n_c = len(data.treatment) - n_t
    srm = stats.sample_ratio(n_c, n_t, data.expected_treatment.tolist())
    srm_detail = (f"users control/treatment {n_c}/{n_t}, expected {srm.expected[0]:.0f}/{srm.expected[1]:.0f}, "
                  f"chi-square p = {srm.p_value:.2g}")  # fmt: skip
    window_s = max(now - data_since, 1e-9)
    gates = [_min_duration(phase, elapsed_s), _min_users(phase, (n_c, n_t), window_s)]
    for gate in phase.gates:
        if gate.kind == "guardrail":
            gates.append(_guardrail(data, gate, analysis.alpha, window_s))
        elif gate.kind == "metric":
            gates.append(_metric(data, settings, experiment, gate, window_s))
        elif gate.kind == "humaneval":
            gates.append(_humaneval(engine, settings, experiment, gate))
        else:
            gates.append(_offline_eval(engine, settings, experiment, gate))
    return PhaseEvidence((n_c, n_t), srm.p_value, srm.mismatch, srm_detail, gates)


def _eta(window_s: float, half_width: float, distance: float) -> float | None:
    if not (math.isfinite(half_width) and half_width > 0 and distance > 0):
        return None
    return max(window_s * ((half_width / distance) ** 2 - 1), 0.0)


def _min_duration(phase: PhaseConfig, elapsed_s: float) -> GateResult:
    elapsed, needed = duration_text(elapsed_s), duration_text(phase.min_duration)
    if elapsed_s >= phase.min_duration:
        return GateResult("min_duration", "pass", f"{elapsed} in phase (min {needed})")
    left = phase.min_duration - elapsed_s
    return GateResult("min_duration", "wait", f"{elapsed} of {needed} in phase",
                      eta_s=left, figures={"elapsed_s": elapsed_s, "min_duration_s": phase.min_duration})  # fmt: skip


def _min_users(phase: PhaseConfig, users: tuple[int, int], window_s: float) -> GateResult:
    need = phase.min_users_per_variant
    figures = {"control": users[0], "treatment": users[1], "min_users_per_variant": need}
    have = min(users)
    if have >= need:
        return GateResult("min_users", "pass", f"users {users[0]}/{users[1]} (min {need} each)", figures=figures)
    # The slower arm decides; users arrive at the rate seen so far in this phase.
    slower = users.index(have)
    rate = users[slower] / window_s
    eta = (need - have) / rate if rate > 0 else None
    return GateResult("min_users", "wait", f"users {users[0]}/{users[1]} of {need} each", eta_s=eta, figures=figures)


def _guardrail(data: Dataset, gate: GateConfig, alpha: float, window_s: float) -> GateResult:
    margin = GuardrailConfig(max_regression=gate.max_regression, max_ratio=gate.max_ratio)
    result = guardrail(data, gate.subject, margin, alpha)
    if result is None:
        return GateResult(gate.label, "wait", "no data in both variants yet", gate.failure_action)
    shown = f"ratio {result.ratio:.3g}" if result.kind == "ratio" and result.ratio is not None else \
        f"diff {result.diff:+.4g}"  # fmt: skip
    figures = {"control": result.control, "treatment": result.treatment, "diff": result.diff, "ratio": result.ratio,
               "bound": result.bound, "margin": result.margin, "method": result.method}  # fmt: skip
    detail = (f"control {result.control:.4g}, treatment {result.treatment:.4g} ({shown}); bound {result.bound:.4g} "
              f"vs margin {result.margin:.4g}")  # fmt: skip
    if result.status == "pass":
        return GateResult(gate.label, "pass", detail, gate.failure_action, figures=figures)
    if result.status == "fail":
        return GateResult(gate.label, "fail", f"regressed past its margin: {detail}", gate.failure_action,
                          figures=figures)  # fmt: skip
    centre = result.ratio if result.kind == "ratio" and result.ratio is not None else result.diff
    eta = _eta(window_s, abs(result.bound - centre), abs(result.margin - centre)) if math.isfinite(result.bound) \
        else None  # fmt: skip
    return GateResult(gate.label, "wait", f"inconclusive: {detail}", gate.failure_action, eta, figures)


def _metric(data: Dataset, settings: Settings, experiment: str, gate: GateConfig, window_s: float) -> GateResult:
    analysis = settings.experiments[experiment].analysis
    result = compare_metric(data, gate.subject, "secondary", settings.metrics, analysis, False)
    if result is None:
        return GateResult(gate.label, "wait", "no observations in both variants yet", gate.failure_action)
    low, high = result.sequential_ci
    up = result.higher_is_better
    figures = {"control": result.control.value, "treatment": result.treatment.value, "diff": result.diff,
               "always_valid_ci": [low, high], "always_valid_p": result.sequential_p,
               "method": result.method}  # fmt: skip
    shown = (f"control {result.control.value:.4g}, treatment {result.treatment.value:.4g}, diff {result.diff:+.4g}, "
             f"always-valid CI ({low:+.4g}, {high:+.4g})")  # fmt: skip
    if gate.superior:
        better, worse = (low > 0, high < 0) if up else (high < 0, low > 0)
        if better:
            return GateResult(gate.label, "pass", f"better: {shown}", gate.failure_action, figures=figures)
        if worse:
            return GateResult(gate.label, "fail", f"worse: {shown}", gate.failure_action, figures=figures)
        eta = _eta(window_s, (high - low) / 2, abs(result.diff))
        return GateResult(gate.label, "wait", f"not yet better: {shown}", gate.failure_action, eta, figures)
    margin = float(gate.non_inferior_margin or 0.0)
    limit = -margin if up else margin  # the worst difference still acceptable
    figures["margin"] = margin
    inside, outside = (low > limit, high < limit) if up else (high < limit, low > limit)
    if inside:
        return GateResult(gate.label, "pass", f"non-inferior (margin {margin:g}): {shown}", gate.failure_action,
                          figures=figures)  # fmt: skip
    if outside:
        return GateResult(gate.label, "fail", f"worse than the margin {margin:g}: {shown}", gate.failure_action,
                          figures=figures)  # fmt: skip
    eta = _eta(window_s, (high - low) / 2, abs(result.diff - limit))
    return GateResult(gate.label, "wait", f"inconclusive against margin {margin:g}: {shown}", gate.failure_action,
                      eta, figures)  # fmt: skip


def _humaneval(engine: Engine, settings: Settings, experiment: str, gate: GateConfig) -> GateResult:
    from proxy.humaneval.report import study_report  # scipy and scikit-learn: only for this gate

    exp = settings.experiments[experiment]
    try:
        report = study_report(engine, gate.subject, bootstrap=0)
    except KeyError:
        return GateResult(gate.label, "wait", f"no study named {gate.subject!r} yet", gate.failure_action)
    pair = next((p for p in report.pairs if {p.model, p.other} == {exp.treatment, exp.control}), None)
    if pair is None:
        return GateResult(gate.label, "wait", f"no vote between {exp.treatment} and {exp.control} yet",
                          gate.failure_action)  # fmt: skip
    votes = pair.wins + pair.ties + pair.losses
    if pair.model == exp.treatment:
        rate, (low, high) = pair.win_rate, pair.win_ci
    else:  # the study oriented the pair the other way round: the treatment's wins are its losses
        rate, (low, high) = pair.loss_rate, pair.loss_ci
    wanted = float(gate.min_win_rate or 0.0)
    figures = {"votes": votes, "win_rate": rate, "ci": [low, high], "min_win_rate": wanted, "min_votes": gate.min_votes}
    shown = f"{exp.treatment} wins {rate:.0%} of {votes} votes, 95% CI ({low:.0%}, {high:.0%})"
    if votes < gate.min_votes:
        return GateResult(gate.label, "wait", f"{votes} of {gate.min_votes} votes needed: {shown}",
                          gate.failure_action, figures=figures)  # fmt: skip
    if low >= wanted:
        return GateResult(gate.label, "pass", f"{shown} above {wanted:.0%}", gate.failure_action, figures=figures)
    if high < wanted:
        return GateResult(gate.label, "fail", f"{shown} below {wanted:.0%}", gate.failure_action, figures=figures)
    return GateResult(gate.label, "wait", f"{shown}: more votes needed to clear {wanted:.0%}", gate.failure_action,
                      figures=figures)  # fmt: skip


def _offline_eval(engine: Engine, settings: Settings, experiment: str, gate: GateConfig) -> GateResult:
    from proxy.offline_eval.report import run_report
    from proxy.offline_eval.runs import list_runs, load_run

    exp = settings.experiments[experiment]
    control, treatment = settings.models[exp.control].model, settings.models[exp.treatment].model
    wanted = gate.subject.removesuffix(".jsonl")
    matching = [r for r in list_runs(engine)  # newest first
                if Path(r.test_file).stem == wanted and r.models and r.models[0].model == control
                and any(m.model == treatment for m in r.models[1:])]  # fmt: skip
    complete = [r for r in matching if r.answered == r.examples * len(r.models)]
    if not complete:
        why = "only unfinished runs" if matching else "no run"
        return GateResult(gate.label, "wait", f"{why} of {wanted} comparing {control} with {treatment}: "
                          f"abproxy eval run --test-file ... --model {exp.control} --model {exp.treatment}",
                          gate.failure_action)  # fmt: skip
    run = load_run(engine, complete[0].id)
    assert run is not None
    comparison = next(c for c in run_report(run).comparisons
                      if any(m.name == c.candidate and m.model == treatment for m in run.models))  # fmt: skip
    figures = {"run": run.id, "verdict": comparison.verdict, "paired": comparison.paired,
               "exact_diff": comparison.exact.diff, "exact_p": comparison.exact.p_value,
               "regressed_examples": len(comparison.regressions)}  # fmt: skip
    detail = (f"run {run.id}: {comparison.verdict.replace('_', ' ')} on {comparison.paired} examples (exact match "
              f"{comparison.exact.diff:+.1%}, p = {comparison.exact.p_value:.2g})")  # fmt: skip
    if comparison.verdict in ("worse", "mixed"):
        return GateResult(gate.label, "fail", f"regressed: {detail}", gate.failure_action, figures=figures)
    return GateResult(gate.label, "pass", detail, gate.failure_action, figures=figures)
