"""What a phase's evaluation found (proxy.controller.gates), as plain data.

Apart from the gates so that the decision logic and the admin API's overrides, which only read
evidence, do not import the statistics stack (scipy, statsmodels, pandas) into a serving process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from proxy.controller.plan import OnFail

GateStatus = Literal["pass", "wait", "fail"]


@dataclass(frozen=True, slots=True)
class GateResult:
    gate: str  # guardrail:error_rate, metric:csat, min_duration, ...
    status: GateStatus
    detail: str  # one line, with the figures
    on_fail: OnFail = "rollback"
    eta_s: float | None = None  # when waiting: roughly how long until it can decide
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PhaseEvidence:
    users: tuple[int, int]  # control, treatment, first exposed in the window
    srm_p: float
    srm_mismatch: bool
    srm_detail: str
    gates: list[GateResult]

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: what the audit entry and the decision record carry."""
        return {
            "users": {"control": self.users[0], "treatment": self.users[1]},
            "srm": {"p_value": _finite(self.srm_p), "mismatch": self.srm_mismatch, "detail": self.srm_detail},
            "gates": [{"gate": g.gate, "status": g.status, "detail": g.detail, "on_fail": g.on_fail,
                       "eta_s": _finite(g.eta_s), "figures": {k: _finite(v) for k, v in g.figures.items()}}
                      for g in self.gates],
        }  # fmt: skip


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def duration_text(seconds: float) -> str:
    """7d 2h, 3h 5m, 40s: how long, as a person reads it."""
    if seconds >= 86400:
        return f"{int(seconds // 86400)}d {int(seconds % 86400 // 3600)}h"
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60)}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m {int(seconds % 60)}s"
    return f"{seconds:.0f}s"


def span(seconds: float | None) -> str:
    return "unknown" if seconds is None else duration_text(seconds)
