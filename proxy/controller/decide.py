"""What the controller does with a phase's evidence: a pure function, so every rule is tested alone.

In order, the first that applies:
    no plan state yet       start: enter the first phase
    not running             nothing (paused, halted, rolled back, aborted or completed: a person decides)
    sample-ratio mismatch   halt: the split is broken, so no figure can be trusted, neither to promote
                            nor to roll back; the percent stays and a person looks
    a gate fails, rollback  roll back to 0 % at once
    a gate fails, hold      hold, saying the gate failed and waits for a person
    every gate passes       promote to the next phase (the last one completes the plan)
    otherwise               hold, naming the gates that wait and roughly how long
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from proxy.controller.evidence import GateResult, PhaseEvidence, span
from proxy.controller.plan import PhaseConfig
from proxy.controller.state import PlanState, Status, Transition

Action = Literal["start", "promote", "complete", "hold", "rollback", "halt", "idle"]


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str
    move: Transition | None = None  # None: nothing to write (hold, idle)
    waiting: list[GateResult] = field(default_factory=list)


def enter(plan: list[PhaseConfig], index: int, *, action: str, by: str, reason: str, clock_now: float,
          wall_now: float, evidence: PhaseEvidence | None = None) -> Transition:  # fmt: skip
    """The move into phase `index`: its percent, a fresh data window, and "completed" if it is the last."""
    phase = plan[index]
    last = index == len(plan) - 1
    return Transition(action="complete" if last and action == "promote" else action, phase=index,
                      phase_name=phase.name, status="completed" if last else "running", entered_at=clock_now,
                      data_since=wall_now, percent=phase.percent, by=by, reason=reason,
                      evidence=evidence.as_dict() if evidence else None)  # fmt: skip


def decide(
    plan: list[PhaseConfig], state: PlanState | None, evidence: PhaseEvidence | None, *, by: str,
    clock_now: float, wall_now: float,
) -> Decision:  # fmt: skip
    if state is None:
        first = plan[0]
        return Decision("start", f"plan started: phase {first.name} at {first.percent:g} %",
                        enter(plan, 0, action="start", by=by, reason=f"plan started: phase {first.name}",
                              clock_now=clock_now, wall_now=wall_now))  # fmt: skip
    if state.status != "running":
        return Decision("idle", f"plan is {state.status.replace('_', ' ')}: {state.reason}")
    if state.phase >= len(plan) - 1:
        return Decision("idle", "in the last phase: nothing left to promote")
    if evidence is None:
        return Decision("hold", "no evidence could be read (store unavailable): holding")
    phase = plan[state.phase]
    if evidence.srm_mismatch:
        reason = f"halted: sample-ratio mismatch in phase {phase.name} ({evidence.srm_detail})"
        return Decision("halt", reason, _stay(state, "halt", "halted", by, reason, evidence))
    failed = [g for g in evidence.gates if g.status == "fail"]
    rollback = [g for g in failed if g.on_fail == "rollback"]
    if rollback:
        reason = "rolled back: " + "; ".join(f"{g.gate} {g.detail}" for g in rollback)
        return Decision("rollback", reason, Transition(
            action="rollback", phase=state.phase, phase_name=state.phase_name, status="rolled_back",
            entered_at=state.entered_at, data_since=state.data_since, percent=0.0, by=by, reason=reason,
            evidence=evidence.as_dict()))  # fmt: skip
    if failed:
        reason = "holding for a person: " + "; ".join(f"{g.gate} failed ({g.detail})" for g in failed)
        return Decision("hold", reason, waiting=failed)
    waiting = [g for g in evidence.gates if g.status == "wait"]
    if not waiting:
        target = plan[state.phase + 1]
        reason = f"promoted {phase.name} -> {target.name}: every gate passed"
        move = enter(plan, state.phase + 1, action="promote", by=by, reason=reason, clock_now=clock_now,
                     wall_now=wall_now, evidence=evidence)  # fmt: skip
        return Decision("complete" if move.action == "complete" else "promote", reason, move)
    slowest = max((g.eta_s for g in waiting if g.eta_s is not None), default=None)
    about = f" (roughly {span(slowest)} more)" if slowest is not None else ""
    waits = "; ".join(f"{g.gate} waits ({_eta(g)}): {g.detail}" for g in waiting)
    reason = f"holding in {phase.name}{about}: {waits}"
    return Decision("hold", reason, waiting=waiting)


def _eta(gate: GateResult) -> str:
    return f"~{span(gate.eta_s)}" if gate.eta_s is not None else "no estimate"


def _stay(state: PlanState, action: str, status: Status, by: str, reason: str, evidence: PhaseEvidence) -> Transition:
    return Transition(action=action, phase=state.phase, phase_name=state.phase_name, status=status,
                      entered_at=state.entered_at, data_since=state.data_since, percent=None, by=by, reason=reason,
                      evidence=evidence.as_dict())  # fmt: skip
