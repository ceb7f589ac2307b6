"""A staged rollout plan, as declared under `experiments.NAME.rollout_plan` (validated with the config).

    rollout_plan:
      - {name: canary, percent: 5, min_duration: 7d, min_users_per_variant: 500,
         gates: [{guardrail: error_rate, max_regression: 0.005}, {guardrail: latency_p99, max_ratio: 1.15}]}
      - {name: beta, percent: 25, min_duration: 14d,
         gates: [{metric: csat, non_inferior_margin: 0.05}, {humaneval: sales-study, min_win_rate: 0.5}]}
      - {name: ga, percent: 100}

A phase's gates decide whether the rollout moves on to the next phase; the last phase has none. A gate is
one of:
    guardrail     the proxy's own measurement (error_rate, latency_p99, ttft_p95, cost_per_query, ...) with
                  max_regression (a difference) or max_ratio, tested for non-inferiority
    metric        a declared or implicit outcome, with non_inferior_margin (no worse than this) or
                  superior: true, read from always-valid (sequential) intervals, so looking often is safe
    humaneval     a study whose 95 % interval of the treatment's win rate against control must lie above
                  min_win_rate, with at least min_votes votes
    offline_eval  a stored `abproxy eval run` on this test set (its file name, with or without .jsonl) that
                  compared the control's model with the very model version rolled out, and did not regress
`on_fail` says what a gate that fails with confidence does: `rollback` (to 0 % at once; the default for
guardrails and metrics) or `hold` (stop promoting and wait for a person; the default for human and
offline evaluation, which judge the model rather than harm users).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

OnFail = Literal["rollback", "hold"]
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_KINDS = ("guardrail", "metric", "humaneval", "offline_eval")


def parse_duration(value: str | float | int) -> float:
    """Seconds from 7d, 12h, 30m, 45s, 2w or a number of seconds; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("a duration is 7d, 12h, 30m, 45s, 2w or seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(value.strip())
        if match is None:
            raise ValueError(f"{value!r} is not a duration: use 7d, 12h, 30m, 45s, 2w or seconds")
        seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError("a duration must be finite and >= 0")
    return seconds


class GateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    guardrail: str | None = None
    max_regression: float | None = Field(default=None, ge=0)
    max_ratio: float | None = Field(default=None, gt=1)
    metric: str | None = None
    non_inferior_margin: float | None = Field(default=None, ge=0)
    superior: bool | None = None
    humaneval: str | None = Field(default=None, min_length=1, max_length=128)
    min_win_rate: float | None = Field(default=None, gt=0, lt=1)
    min_votes: int = Field(default=30, ge=1)
    offline_eval: str | None = Field(default=None, min_length=1, max_length=256)
    on_fail: OnFail | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> GateConfig:
        kinds = [k for k in _KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"a gate is exactly one of {', '.join(_KINDS)} (got {', '.join(kinds) or 'none'})")
        kind = kinds[0]
        allowed = {"guardrail": {"max_regression", "max_ratio"}, "metric": {"non_inferior_margin", "superior"},
                   "humaneval": {"min_win_rate", "min_votes"}, "offline_eval": set()}[kind]  # fmt: skip
        foreign = {"max_regression", "max_ratio", "non_inferior_margin", "superior", "min_win_rate"} - allowed
        stray = sorted(f for f in foreign if getattr(self, f) is not None)
        if kind != "humaneval" and "min_votes" in self.model_fields_set:  # it has a default: set means given
            stray = sorted([*stray, "min_votes"])
        if stray:
            raise ValueError(f"{stray[0]} does not apply to a {kind} gate")
        if kind == "guardrail" and (self.max_regression is None) == (self.max_ratio is None):
            raise ValueError("a guardrail gate needs exactly one of max_regression or max_ratio")
        if kind == "metric" and (self.non_inferior_margin is None) == (self.superior is None):
            raise ValueError("a metric gate needs exactly one of non_inferior_margin or superior: true")
        if kind == "metric" and self.superior is False:
            raise ValueError("superior: false tests nothing; use non_inferior_margin for 'no worse than'")
        if kind == "humaneval" and self.min_win_rate is None:
            raise ValueError("a humaneval gate needs min_win_rate (0..1)")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) is not None)

    @property
    def subject(self) -> str:
        """What the gate looks at: the guardrail, metric, study or test set name."""
        return str(getattr(self, self.kind))

    @property
    def label(self) -> str:
        """A short name for logs, metrics and the CLI, e.g. `guardrail:error_rate`."""
        return f"{self.kind}:{self.subject}"

    @property
    def failure_action(self) -> OnFail:
        if self.on_fail is not None:
            return self.on_fail
        return "rollback" if self.kind in ("guardrail", "metric") else "hold"


class PhaseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    percent: float = Field(strict=True)
    min_duration: float = 0.0  # seconds; written as 7d, 12h, ... in the file
    min_users_per_variant: int = Field(default=0, ge=0)
    gates: list[GateConfig] = []

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("1-32 characters: lowercase letters, digits, '_' or '-'")
        return value

    @field_validator("min_duration", mode="before")
    @classmethod
    def _duration(cls, value: str | float | int) -> float:
        return parse_duration(value)
