"""proxy.controller.decide: the pure decision function, one rule at a time."""

from __future__ import annotations

import json
import math

import orjson
import pytest

from proxy.controller.decide import decide
from proxy.controller.evidence import GateResult, PhaseEvidence
from proxy.controller.plan import GateConfig, OnFail, PhaseConfig
from proxy.controller.state import PlanState, Status

PLAN = [
    PhaseConfig(name="canary", percent=5, min_duration=604800, min_users_per_variant=500,
                gates=[GateConfig(guardrail="error_rate", max_regression=0.005),
                       GateConfig(humaneval="sales-study", min_win_rate=0.5)]),
    PhaseConfig(name="beta", percent=25, min_duration=1209600,
                gates=[GateConfig(metric="csat", non_inferior_margin=0.05)]),
    PhaseConfig(name="ga", percent=100),
]  # fmt: skip
CLOCK = 5000.0  # the controller's clock (min_duration)
WALL = 1_700_000_000.0  # the wall clock (data window)
ENTERED = 1000.0
SINCE = 1_699_000_000.0


def _state(phase: int = 0, status: Status = "running", reason: str = "") -> PlanState:
    return PlanState("exp", phase, PLAN[phase].name, status, ENTERED, SINCE, rev=3, updated_at=SINCE,
                     updated_by="controller", reason=reason)  # fmt: skip


def _pass(gate: str, on_fail: OnFail = "rollback") -> GateResult:
    return GateResult(gate, "pass", f"{gate} fine", on_fail)


def _wait(gate: str, eta: float | None, on_fail: OnFail = "rollback") -> GateResult:
    return GateResult(gate, "wait", f"{gate} inconclusive", on_fail, eta)


def _fail(gate: str, on_fail: OnFail) -> GateResult:
    return GateResult(gate, "fail", f"{gate} regressed", on_fail)


def _evidence(*gates: GateResult, srm: bool = False) -> PhaseEvidence:
    detail = "users control/treatment 900/100, expected 500/500, chi-square p = 1e-90" if srm else "fine"
    return PhaseEvidence((900, 100) if srm else (520, 515), 1e-90 if srm else 0.8, srm, detail, list(gates))


ALL_PASS = (_pass("min_duration"), _pass("min_users"), _pass("guardrail:error_rate"),
            _pass("humaneval:sales-study", "hold"))  # fmt: skip


class TestStart:
    def test_no_state_enters_the_first_phase(self) -> None:
        decision = decide(PLAN, None, None, by="controller", clock_now=CLOCK, wall_now=WALL)
        assert decision.action == "start"
        move = decision.move
        assert move is not None
        assert (move.action, move.phase, move.phase_name, move.status) == ("start", 0, "canary", "running")
        assert move.percent == 5.0
        assert (move.entered_at, move.data_since) == (CLOCK, WALL)  # a fresh window
        assert move.by == "controller" and "canary" in move.reason
        assert move.evidence is None


class TestIdle:
    @pytest.mark.parametrize("status", ["paused", "halted", "rolled_back", "aborted", "completed"])
    def test_not_running_does_nothing(self, status: Status) -> None:
        decision = decide(PLAN, _state(1, status, reason="by alice"), _evidence(*ALL_PASS), by="controller",
                          clock_now=CLOCK, wall_now=WALL)  # fmt: skip
        assert decision.action == "idle" and decision.move is None
        assert status.replace("_", " ") in decision.reason and "by alice" in decision.reason

    def test_last_phase_is_idle(self) -> None:
        decision = decide(PLAN, _state(2), _evidence(*ALL_PASS), by="controller", clock_now=CLOCK, wall_now=WALL)
        assert decision.action == "idle" and decision.move is None
        assert "last phase" in decision.reason

    def test_no_evidence_holds(self) -> None:
        decision = decide(PLAN, _state(0), None, by="controller", clock_now=CLOCK, wall_now=WALL)
        assert decision.action == "hold" and decision.move is None


class TestHalt:
    def test_sample_ratio_mismatch_halts_and_keeps_the_percent(self) -> None:
        # Even with a failing rollback gate: a broken split means no figure can be trusted.
        evidence = _evidence(_pass("min_duration"), _fail("guardrail:error_rate", "rollback"), srm=True)
        decision = decide(PLAN, _state(0), evidence, by="controller", clock_now=CLOCK, wall_now=WALL)
        assert decision.action == "halt"
        move = decision.move
        assert move is not None
        assert (move.action, move.status, move.percent) == ("halt", "halted", None)
        assert (move.phase, move.phase_name) == (0, "canary")
        assert (move.entered_at, move.data_since) == (ENTERED, SINCE)  # the phase is not re-entered
        assert move.evidence == evidence.as_dict()
        assert "sample-ratio mismatch" in decision.reason and "900/100" in decision.reason


class TestRollback:
    def test_a_failing_rollback_gate_rolls_back_even_if_others_wait(self) -> None:
        evidence = _evidence(_wait("min_duration", 3600.0), _fail("guardrail:error_rate", "rollback"),
                             _wait("humaneval:sales-study", None, "hold"))  # fmt: skip
        decision = decide(PLAN, _state(0), evidence, by="controller", clock_now=CLOCK, wall_now=WALL)
        assert decision.action == "rollback"
        move = decision.move
        assert move is not None
        assert (move.action, move.status, move.percent) == ("rollback", "rolled_back", 0.0)
        assert (move.phase, move.phase_name, move.entered_at, move.data_since) == (0, "canary", ENTERED, SINCE)
        assert move.evidence == evidence.as_dict()
        assert "guardrail:error_rate" in decision.reason

    def test_rollback_wins_over_a_failing_hold_gate(self) -> None:
        evidence = _evidence(_fail("humaneval:sales-study", "hold"), _fail("guardrail:error_rate", "rollback"))
        decision = decide(PLAN, _state(0), evidence, by="controller", clock_now=CLOCK, wall_now=WALL)
        assert decision.action == "rollback"
        assert "humaneval" not in decision.reason


class TestHoldOnFailure:
    def test_a_failing_hold_gate_holds_without_moving(self) -> None:
        failed = _fail("humaneval:sales-study", "hold")
        evidence = _evidence(_pass("min_duration"), _pass("guardrail:error_rate"), failed)
        decision = decide(PLAN, _state(0), evidence, by="controller", clock_now=CLOCK, wall_now=WALL)
        assert decision.action == "hold" and decision.move is None
        assert decision.waiting == [failed]
        assert "humaneval:sales-study failed" in decision.reason and "person" in decision.reason


class TestPromote:
    def test_every_gate_passing_promotes_to_the_next_phase(self) -> None:
        evidence = _evidence(*ALL_PASS)
        decision = decide(PLAN, _state(0), evidence, by="controller", clock_now=CLOCK, wall_now=WALL)
        assert decision.action == "promote"
        move = decision.move
        assert move is not None
        assert (move.action, move.phase, move.phase_name, move.status) == ("promote", 1, "beta", "running")
        assert move.percent == 25.0
        assert (move.entered_at, move.data_since) == (CLOCK, WALL)
        assert move.evidence == evidence.as_dict()
        assert "canary -> beta" in decision.reason

    def test_promoting_into_the_last_phase_completes(self) -> None:
        evidence = _evidence(_pass("min_duration"), _pass("metric:csat"))
        decision = decide(PLAN, _state(1), evidence, by="controller", clock_now=CLOCK, wall_now=WALL)
        assert decision.action == "complete"
        move = decision.move
        assert move is not None
        assert (move.action, move.phase, move.phase_name, move.status) == ("complete", 2, "ga", "completed")
        assert move.percent == 100.0

    def test_no_gates_at_all_promotes(self) -> None:
        decision = decide(PLAN, _state(0), _evidence(), by="controller", clock_now=CLOCK, wall_now=WALL)
        assert decision.action == "promote"


class TestHoldWaiting:
    def test_names_the_waiting_gates_and_the_longest_eta(self) -> None:
        duration = _wait("min_duration", 2 * 86400.0)
        users = _wait("min_users", 3 * 3600.0)
        study = _wait("humaneval:sales-study", None, "hold")
        evidence = _evidence(duration, users, _pass("guardrail:error_rate"), study)
        decision = decide(PLAN, _state(0), evidence, by="controller", clock_now=CLOCK, wall_now=WALL)
        assert decision.action == "hold" and decision.move is None
        assert decision.waiting == [duration, users, study]
        assert "holding in canary (roughly 2d 0h more)" in decision.reason
        for name in ("min_duration waits (~2d 0h)", "min_users waits (~3h 0m)", "humaneval:sales-study waits "
                     "(no estimate)"):  # fmt: skip
            assert name in decision.reason, decision.reason
        assert "guardrail:error_rate" not in decision.reason

    def test_no_estimate_at_all(self) -> None:
        evidence = _evidence(_wait("humaneval:sales-study", None, "hold"))
        decision = decide(PLAN, _state(0), evidence, by="controller", clock_now=CLOCK, wall_now=WALL)
        assert decision.action == "hold" and "roughly" not in decision.reason


class TestEvidenceAsDict:
    def test_json_serialisable_with_nan_as_null(self) -> None:
        gate = GateResult("guardrail:latency_p99", "wait", "inconclusive", "rollback", math.inf,
                          {"bound": math.nan, "ratio": 1.1, "method": "bootstrap", "n": 3})  # fmt: skip
        evidence = PhaseEvidence((10, 12), math.nan, False, "too few users", [gate])
        as_dict = evidence.as_dict()
        assert as_dict["srm"]["p_value"] is None
        assert as_dict["gates"][0]["eta_s"] is None
        assert as_dict["gates"][0]["figures"] == {"bound": None, "ratio": 1.1, "method": "bootstrap", "n": 3}
        assert orjson.loads(orjson.dumps(as_dict)) == {
            "users": {"control": 10, "treatment": 12},
            "srm": {"p_value": None, "mismatch": False, "detail": "too few users"},
            "gates": [{"gate": "guardrail:latency_p99", "status": "wait", "detail": "inconclusive",
                       "on_fail": "rollback", "eta_s": None,
                       "figures": {"bound": None, "ratio": 1.1, "method": "bootstrap", "n": 3}}],
        }  # fmt: skip
        json.dumps(as_dict, allow_nan=False)  # strict JSON too, not only orjson's nan -> null

    def test_nested_nan_survives_orjson(self) -> None:
        """A metric gate's always_valid_ci is a list: orjson writes its nan as null."""
        gate = GateResult("metric:csat", "wait", "no data", "rollback", None, {"always_valid_ci": [math.nan, 0.1]})
        dumped = orjson.loads(orjson.dumps(PhaseEvidence((1, 1), 1.0, False, "", [gate]).as_dict()))
        assert dumped["gates"][0]["figures"]["always_valid_ci"] == [None, 0.1]
