"""experiments.NAME.rollout_plan and controller: validated with the config, one line per mistake."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from proxy.config import ConfigError, Settings, settings_from_dict
from proxy.controller.plan import GateConfig, parse_duration

EXP = "sales-companion"
PLAN_KEY = f"experiments.{EXP}.rollout_plan"

# The example in proxy/controller/plan.py's docstring.
PLAN: list[dict[str, Any]] = [
    {"name": "canary", "percent": 5, "min_duration": "7d", "min_users_per_variant": 500,
     "gates": [{"guardrail": "error_rate", "max_regression": 0.005}, {"guardrail": "latency_p99", "max_ratio": 1.15}]},
    {"name": "beta", "percent": 25, "min_duration": "14d",
     "gates": [{"metric": "csat", "non_inferior_margin": 0.05}, {"humaneval": "sales-study", "min_win_rate": 0.5}]},
    {"name": "ga", "percent": 100},
]  # fmt: skip

Mutation = Callable[[dict[str, Any], list[dict[str, Any]]], Any]


def _raw() -> dict[str, Any]:
    """A minimal valid config with the example plan, csat declared and the Redis stream on."""
    return copy.deepcopy({
        "upstreams": {"up": {"base_url": "http://127.0.0.1:9001/v1"}},
        "models": {"base": {"upstream": "up", "model": "m-base"}, "finetuned": {"upstream": "up", "model": "m-ft"}},
        "experiments": {EXP: {"aliases": [EXP], "control": "base", "treatment": "finetuned", "rollout_plan": PLAN}},
        "metrics": {"csat": {"type": "float", "min": 1, "max": 5}},
        "events": {"redis_stream": {"enabled": True}},
    })  # fmt: skip


def _load(mutate: Mutation | None = None) -> Settings:
    raw = _raw()
    if mutate is not None:
        mutate(raw, raw["experiments"][EXP]["rollout_plan"])
    return settings_from_dict(raw, {})


def _error(mutate: Mutation) -> str:
    with pytest.raises(ConfigError) as info:
        _load(mutate)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("config error: "), message
    return message


class TestValidPlan:
    def test_example_loads_with_durations_in_seconds(self) -> None:
        plan = _load().experiments[EXP].rollout_plan
        assert [p.name for p in plan] == ["canary", "beta", "ga"]
        assert [p.percent for p in plan] == [5.0, 25.0, 100.0]
        assert [p.min_duration for p in plan] == [604800.0, 14 * 86400.0, 0.0]
        assert [p.min_users_per_variant for p in plan] == [500, 0, 0]
        assert plan[2].gates == []

    def test_gate_kinds_labels_and_default_failure_actions(self) -> None:
        plan = _load().experiments[EXP].rollout_plan
        gates = [*plan[0].gates, *plan[1].gates]
        assert [g.kind for g in gates] == ["guardrail", "guardrail", "metric", "humaneval"]
        assert [g.subject for g in gates] == ["error_rate", "latency_p99", "csat", "sales-study"]
        assert [g.label for g in gates] == [
            "guardrail:error_rate", "guardrail:latency_p99", "metric:csat", "humaneval:sales-study",
        ]  # fmt: skip
        assert [g.failure_action for g in gates] == ["rollback", "rollback", "rollback", "hold"]
        assert gates[3].min_votes == 30
        assert gates[0].max_regression == 0.005 and gates[1].max_ratio == 1.15

    def test_offline_eval_holds_by_default(self) -> None:
        gate = GateConfig(offline_eval="icd10.jsonl")
        assert (gate.kind, gate.label, gate.failure_action) == ("offline_eval", "offline_eval:icd10.jsonl", "hold")

    def test_on_fail_overrides_the_default(self) -> None:
        def mutate(raw: dict[str, Any], plan: list[dict[str, Any]]) -> None:
            plan[0]["gates"][0]["on_fail"] = "hold"
            plan[1]["gates"][1]["on_fail"] = "rollback"

        plan = _load(mutate).experiments[EXP].rollout_plan
        assert plan[0].gates[0].failure_action == "hold"
        assert plan[0].gates[1].failure_action == "rollback"
        assert plan[1].gates[1].failure_action == "rollback"

    def test_superior_metric_and_implicit_metric(self) -> None:
        def mutate(raw: dict[str, Any], plan: list[dict[str, Any]]) -> None:
            plan[1]["gates"] = [{"metric": "csat", "superior": True}, {"metric": "error", "non_inferior_margin": 0}]

        gates = _load(mutate).experiments[EXP].rollout_plan[1].gates
        assert gates[0].superior is True and gates[1].label == "metric:error"

    def test_durations_in_every_unit_and_plain_seconds(self) -> None:
        def mutate(raw: dict[str, Any], plan: list[dict[str, Any]]) -> None:
            plan[0]["min_duration"] = 3600
            plan[1]["min_duration"] = "1.5h"
            plan[2]["min_duration"] = "2w"

        plan = _load(mutate).experiments[EXP].rollout_plan
        assert [p.min_duration for p in plan] == [3600.0, 5400.0, 1209600.0]

    def test_no_plan_needs_no_stream(self) -> None:
        def mutate(raw: dict[str, Any], plan: list[dict[str, Any]]) -> None:
            raw["experiments"][EXP].pop("rollout_plan")
            raw.pop("metrics")
            raw.pop("events")

        assert _load(mutate).experiments[EXP].rollout_plan == []

    def test_controller_defaults_and_short_interval(self) -> None:
        settings = _load()
        assert (settings.controller.interval_s, settings.controller.lease_s) == (60.0, 30.0)
        settings = _load(lambda raw, plan: raw.update(controller={"interval_s": 1, "lease_s": 2}))
        assert settings.controller.lease_s == 2.0


def _gate(phase: int, index: int, **update: Any) -> Mutation:
    return lambda raw, plan: plan[phase]["gates"][index].update(update)


def _drop(phase: int, index: int, field: str) -> Mutation:
    return lambda raw, plan: plan[phase]["gates"][index].pop(field)


class TestErrors:
    @pytest.mark.parametrize(
        ("mutate", "key", "problem"),
        [
            pytest.param(lambda r, p: p[1].update(percent=5), f"{PLAN_KEY}.1.percent", "above the previous phase's 5",
                         id="percent-not-increasing"),
            pytest.param(lambda r, p: p[1].update(percent=3), f"{PLAN_KEY}.1.percent", "above the previous",
                         id="percent-decreasing"),
            pytest.param(lambda r, p: p[2].update(percent=100.5), f"{PLAN_KEY}.2.percent", "between 0 and 100",
                         id="percent-above-100"),
            pytest.param(lambda r, p: p[1].update(percent=25.125), f"{PLAN_KEY}.1.percent", "two decimals",
                         id="percent-three-decimals"),
            pytest.param(lambda r, p: p[0].update(percent=True), f"{PLAN_KEY}.0.percent", "number",
                         id="percent-yes"),
            pytest.param(lambda r, p: p[1].update(name="canary"), f"{PLAN_KEY}.1.name", "'canary' appears twice",
                         id="duplicate-phase-name"),
            pytest.param(lambda r, p: p[1].update(name="Beta!"), f"{PLAN_KEY}.1.name", "lowercase letters",
                         id="bad-phase-name"),
            pytest.param(lambda r, p: p[1].update(name="x" * 33), f"{PLAN_KEY}.1.name", "1-32 characters",
                         id="long-phase-name"),
            pytest.param(lambda r, p: p[2].update(gates=[{"guardrail": "error_rate", "max_regression": 0.01}]),
                         f"{PLAN_KEY}.2.gates", "last phase", id="gates-on-last-phase"),
            pytest.param(_gate(0, 0, guardrail="latency_p999"), f"{PLAN_KEY}.0.gates.0.guardrail",
                         "unknown guardrail 'latency_p999'", id="unknown-guardrail"),
            pytest.param(_gate(1, 0, metric="nps"), f"{PLAN_KEY}.1.gates.0.metric", "unknown metric 'nps'",
                         id="unknown-metric"),
            pytest.param(_gate(0, 0, metric="csat"), f"{PLAN_KEY}.0.gates.0", "got guardrail, metric",
                         id="gate-with-two-kinds"),
            pytest.param(lambda r, p: p[0]["gates"].append({"on_fail": "hold"}), f"{PLAN_KEY}.0.gates.2",
                         "got none", id="gate-with-no-kind"),
            pytest.param(_gate(0, 0, max_ratio=1.2), f"{PLAN_KEY}.0.gates.0",
                         "exactly one of max_regression or max_ratio", id="guardrail-both-margins"),
            pytest.param(_drop(0, 0, "max_regression"), f"{PLAN_KEY}.0.gates.0",
                         "exactly one of max_regression or max_ratio", id="guardrail-no-margin"),
            pytest.param(_gate(0, 1, max_ratio=0.9), f"{PLAN_KEY}.0.gates.1.max_ratio", "greater than 1",
                         id="guardrail-ratio-below-1"),
            pytest.param(_gate(1, 0, superior=True), f"{PLAN_KEY}.1.gates.0",
                         "exactly one of non_inferior_margin or superior", id="metric-both-criteria"),
            pytest.param(_drop(1, 0, "non_inferior_margin"), f"{PLAN_KEY}.1.gates.0",
                         "exactly one of non_inferior_margin or superior", id="metric-no-criterion"),
            pytest.param(lambda r, p: p[1]["gates"].__setitem__(0, {"metric": "csat", "superior": False}),
                         f"{PLAN_KEY}.1.gates.0", "superior: false tests nothing", id="superior-false"),
            pytest.param(_gate(0, 0, min_win_rate=0.5), f"{PLAN_KEY}.0.gates.0",
                         "min_win_rate does not apply to a guardrail gate", id="stray-min-win-rate"),
            pytest.param(_gate(1, 1, max_ratio=1.2), f"{PLAN_KEY}.1.gates.1",
                         "max_ratio does not apply to a humaneval gate", id="stray-max-ratio"),
            pytest.param(_gate(0, 0, colour="red"), f"{PLAN_KEY}.0.gates.0.colour", "unknown key",
                         id="unknown-gate-key"),
            pytest.param(_drop(1, 1, "min_win_rate"), f"{PLAN_KEY}.1.gates.1", "humaneval gate needs min_win_rate",
                         id="humaneval-without-min-win-rate"),
            pytest.param(_gate(1, 1, min_win_rate=1.0), f"{PLAN_KEY}.1.gates.1.min_win_rate", "less than 1",
                         id="min-win-rate-1"),
            pytest.param(_gate(0, 0, on_fail="ignore"), f"{PLAN_KEY}.0.gates.0.on_fail", "'rollback' or 'hold'",
                         id="bad-on-fail"),
            pytest.param(lambda r, p: p[0].update(min_duration="7 days"), f"{PLAN_KEY}.0.min_duration",
                         "'7 days' is not a duration", id="bad-duration"),
            pytest.param(lambda r, p: p[0].update(min_duration=-1), f"{PLAN_KEY}.0.min_duration", ">= 0",
                         id="negative-duration"),
            pytest.param(lambda r, p: p[0].update(min_users_per_variant=-1), f"{PLAN_KEY}.0.min_users_per_variant",
                         "greater than or equal to 0", id="negative-min-users"),
            pytest.param(lambda r, p: p[0].update(colour="red"), f"{PLAN_KEY}.0.colour", "unknown key",
                         id="unknown-phase-key"),
            pytest.param(lambda r, p: r.update(events={"redis_stream": {"enabled": False}}),
                         "events.redis_stream.enabled", f"must be true for {PLAN_KEY}", id="plan-without-stream"),
            pytest.param(lambda r, p: r.update(controller={"lease_s": 5}), "controller.lease_s",
                         "at least twice the renewal period", id="lease-too-short"),
            pytest.param(lambda r, p: r.update(controller={"interval_s": 1, "lease_s": 1.9}), "controller.lease_s",
                         "at least twice the renewal period", id="lease-too-short-for-short-interval"),
            pytest.param(lambda r, p: r.update(controller={"interval_s": 0}), "controller.interval_s",
                         "greater than 0", id="zero-interval"),
        ],
    )  # fmt: skip
    def test_one_line_naming_the_key(self, mutate: Mutation, key: str, problem: str) -> None:
        message = _error(mutate)
        assert message.startswith(f"config error: {key}: "), message
        assert problem in message, message

    def test_stray_min_votes_on_a_guardrail_gate(self) -> None:
        message = _error(_gate(0, 0, min_votes=50))
        assert f"{PLAN_KEY}.0.gates.0: min_votes does not apply to a guardrail gate" in message


class TestParseDuration:
    @pytest.mark.parametrize(
        ("value", "seconds"),
        [("7d", 604800.0), ("12h", 43200.0), ("30m", 1800.0), ("45s", 45.0), ("2w", 1209600.0), ("90", 90.0),
         ("1.5h", 5400.0), (" 7d ", 604800.0), ("0", 0.0), (3600, 3600.0), (2.5, 2.5), (0, 0.0)],
    )  # fmt: skip
    def test_accepted(self, value: str | float, seconds: float) -> None:
        assert parse_duration(value) == seconds

    @pytest.mark.parametrize(
        "value",
        ["7 days", "", "d", "7D", "-5", "1e3", "inf", "7dd", "7d12h", -5, float("nan"), float("inf"), True],
    )
    def test_refused(self, value: str | float) -> None:
        with pytest.raises(ValueError):
            parse_duration(value)

    def test_gate_config_is_frozen(self) -> None:
        gate = GateConfig(guardrail="error_rate", max_regression=0.01)
        with pytest.raises(ValidationError):
            gate.on_fail = "hold"
