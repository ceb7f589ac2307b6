"""Always-valid inference: p-values and confidence sequences that may be looked at every day.

A fixed-horizon p-value checked daily and acted on the first time it dips below alpha declares
far more than alpha of A/A tests significant. The mixture sequential probability ratio test
(mSPRT) does not: its p-value may be read at any look, and stopping at the first p < alpha keeps
the false-positive rate at or below alpha.

Hand-written, because neither scipy nor statsmodels has it. Sources:
  Johari, Koomen, Pekelis, Walsh (2017), "Peeking at A/B Tests: Why it matters, and what to do
  about it", KDD: the mSPRT with a normal mixture over the effect, for a difference of means.
  Johari, Pekelis, Walsh (2022), "Always Valid Inference: Continuous Monitoring of A/B Tests",
  Operations Research 70(3): always-valid p-values p_n = min(p_{n-1}, 1 / Lambda_n) and, by
  duality, confidence sequences {theta : Lambda_n(theta) < 1 / alpha}, whose running
  intersection keeps the coverage (Howard, Ramdas, McAuliffe, Sekhon (2021), "Time-uniform,
  nonparametric, nonasymptotic confidence sequences", Annals of Statistics 49(2)).

Each look is the cumulative estimate (diff, var) of the treatment - control difference and its
variance, the normal approximation of the papers' two-sample setting with a plug-in variance:
with n per arm and per-observation variance s2, their
    Lambda_n = sqrt(2 s2 / (2 s2 + n tau2)) * exp(n² tau2 (mean_t - mean_c)² / (4 s2 (2 s2 + n tau2)))
is `msprt_lambda` with var = 2 s2 / n:
    Lambda = sqrt(var / (var + tau2)) * exp(tau2 diff² / (2 var (var + tau2))).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SequentialResult:
    p_value: float
    ci: tuple[float, float]
    looks: int
    tau2: float


def msprt_lambda(diff: float, var: float, tau2: float) -> float:
    """Mixture likelihood ratio of 'effect ~ N(0, tau2)' against 'no effect' at one look."""
    # Computed in logs: the exponent grows like z², so exp overflows from |z| ~ 38 on.
    try:
        return math.exp(_log_lambda(diff, var, tau2))
    except OverflowError:
        return math.inf


def confidence_sequence(diff: float, var: float, tau2: float, alpha: float) -> tuple[float, float]:
    """The (1 - alpha) confidence sequence at one look: the effects theta with Lambda(diff - theta) < 1/alpha."""
    _check(var, tau2)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    half = math.sqrt(var * (var + tau2) / tau2 * (math.log((var + tau2) / var) - 2 * math.log(alpha)))
    return diff - half, diff + half


def always_valid(looks: Sequence[tuple[float, float]], *, tau2: float, alpha: float = 0.05) -> SequentialResult:
    """Always-valid p-value and confidence sequence after the given cumulative looks, in time order.

    A look whose variance is not a positive number (no data yet, or a degenerate arm) says
    nothing and is skipped; `looks` counts the looks used. With none: p 1, ci (-inf, inf).
    The running intersection of the per-look sequences is empty only on an event of
    probability <= alpha (or when the normal model is wrong); then the last look's own sequence
    is returned rather than an empty interval.
    """
    if not (tau2 > 0 and math.isfinite(tau2)):
        raise ValueError(f"tau2 must be finite and > 0, got {tau2}")
    p_value, low, high, used = 1.0, -math.inf, math.inf, 0
    last: tuple[float, float] = (low, high)
    for diff, var in looks:
        if not (var > 0 and math.isfinite(var) and math.isfinite(diff)):
            continue
        used += 1
        # 1 / Lambda from the log, so a huge Lambda gives 0 instead of overflowing.
        p_value = min(p_value, math.exp(-_log_lambda(diff, var, tau2)))
        last = confidence_sequence(diff, var, tau2, alpha)
        low, high = max(low, last[0]), min(high, last[1])
    ci = (low, high) if low <= high else last
    return SequentialResult(p_value=p_value, ci=ci, looks=used, tau2=tau2)


def default_tau2(mde: float) -> float:
    """Mixing variance for a team's minimum detectable effect: tau = mde.

    Johari et al. (2017, 2022) tune tau to the effect sizes one expects: the test is most
    powerful near |effect| ~ tau and still valid, only slower, for any other effect.
    """
    if not (mde > 0 and math.isfinite(mde)):
        raise ValueError(f"mde must be finite and > 0, got {mde}")
    return mde * mde


def _log_lambda(diff: float, var: float, tau2: float) -> float:
    _check(var, tau2)
    return 0.5 * math.log(var / (var + tau2)) + tau2 * diff * diff / (2 * var * (var + tau2))


def _check(var: float, tau2: float) -> None:
    if not (var > 0 and math.isfinite(var)):
        raise ValueError(f"var must be finite and > 0, got {var}")
    if not (tau2 > 0 and math.isfinite(tau2)):
        raise ValueError(f"tau2 must be finite and > 0, got {tau2}")
